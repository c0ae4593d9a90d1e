"""Transfer strategies as plugins: one module per strategy, registered by name.

A strategy module defines ``fit(config, strategy, ctx) -> Fitted`` and registers it with
``@register("name")``; its options are a config class in ``transferkit.config`` whose
``applies`` says which families (by capability), label budgets and node counts it takes. The
orchestration (``transferkit.training.train``) only looks strategies up here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from transferkit.config import STRATEGIES, PipelineConfig
from transferkit.training.context import Context, Fitted

Fit = Callable[[PipelineConfig, Any, Context], Fitted]
_FIT: dict[str, Fit] = {}


def register(name: str) -> Callable[[Fit], Fit]:
    """Register ``fit`` as the strategy ``name`` (a key of ``config.STRATEGIES``)."""

    def wrap(fit: Fit) -> Fit:
        _FIT[name] = fit
        return fit

    return wrap


def fit_strategy(config: PipelineConfig, strategy: Any, ctx: Context) -> Fitted:
    """Fit ``strategy`` (a strategy config) on ``ctx``."""
    if strategy.name not in _FIT:
        importlib.import_module(f"{__name__}.{strategy.name}")
    return _FIT[strategy.name](config, strategy, ctx)


def registered() -> list[str]:
    """Every strategy with a config class and a module (they must agree)."""
    for name in STRATEGIES:
        importlib.import_module(f"{__name__}.{name}")
    return sorted(_FIT)

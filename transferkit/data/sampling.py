"""Reproducible label-stratified samples of rows."""

from __future__ import annotations

import numpy as np

from transferkit.errors import TrainingError


def sample_per_class(
    labels: np.ndarray, k: int, seed: int, names: list[str], strict: bool = True
) -> np.ndarray:
    """Indices of k examples of every label, drawn with ``seed``, in a fixed order.

    Args:
        strict: a label with fewer than k examples is an error; otherwise all of them are
            taken (a label budget larger than a rare class).

    Raises:
        TrainingError: ``strict`` and a label has fewer than k examples.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(len(names)):
        pool = np.flatnonzero(labels == label)
        if not strict and len(pool) <= k:
            chosen.append(pool)
            continue
        if len(pool) < k:
            raise TrainingError(
                f"few_shot needs {k} training examples of every label; '{names[label]}' has "
                f"{len(pool)} — lower training.examples_per_class"
            )
        chosen.append(np.sort(rng.choice(pool, size=k, replace=False)))
    return np.concatenate(chosen)

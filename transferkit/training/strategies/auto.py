"""auto: climb the ladder (probe → partial → LoRA → full, the rungs this family can climb)
while each rung gains more than a margin on validation; keep the cheapest rung within the
margin of the best."""

from __future__ import annotations

import logging
import time

from transferkit.backbones.support import rungs
from transferkit.config import AutoStrategyConfig, PipelineConfig
from transferkit.progress import note
from transferkit.regression import orientation
from transferkit.training.context import Context, Fitted
from transferkit.training.runtime import seed_everything
from transferkit.training.strategies import fit_strategy, register

log = logging.getLogger(__name__)


@register("auto")
def fit(config: PipelineConfig, strategy: AutoStrategyConfig, ctx: Context) -> Fitted:
    metric = config.evaluation.primary_metric
    sign = orientation(metric)  # gains are positive when better, errors (rmse) included
    fitted: list[tuple[str, Fitted, float]] = []
    best: Fitted | None = None
    stopped = "reached the top of the ladder"
    ladder = rungs(strategy, ctx.capabilities())
    for number, name in enumerate(ladder, start=1):
        note(f"auto: rung {number}/{len(ladder)} {name}")
        rung = config.with_strategy(strategy.rung(name), strategy.training.get(name))
        seed_everything(config.training.seed)
        started = time.perf_counter()
        result = fit_strategy(rung, rung.strategy, ctx)
        fitted.append((name, result, round(time.perf_counter() - started, 1)))
        gain = None if best is None else sign * (result.validation_metric - best.validation_metric)
        log.info(
            "auto: %s validation %s %.4f%s",
            name,
            metric,
            result.validation_metric,
            "" if gain is None else f" (gain {gain:+.4f} over the best so far)",
        )
        if best is None or (gain is not None and gain > 0):
            best = result
        if gain is not None and gain <= strategy.margin:
            stopped = f"{name} gained {gain:+.4f} ≤ margin {strategy.margin:g}: stopped escalating"
            break
    assert best is not None
    floor = sign * best.validation_metric - strategy.margin
    selected, chosen, _ = next(item for item in fitted if sign * item[1].validation_metric >= floor)
    log.info("auto: selected %s (%s)", selected, stopped)
    chosen.details = {
        "selected": selected,
        "stopped": stopped,
        "ladder": [
            {
                "strategy": rung_name,
                f"validation_{metric}": item.validation_metric,
                "trainable_parameters": item.trainable,
                "seconds": seconds,
            }
            for rung_name, item, seconds in fitted
        ],
        "selected_details": chosen.details,
    }
    return chosen

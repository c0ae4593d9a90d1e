"""Strategy sweeps: plan the branches, compare them, pick one, and guard against negative transfer.

A sweep config lists strategies (``sweep.branches``) and label budgets
(``sweep.examples_per_class``). ``plan`` expands them into single-strategy configs that the
pipeline trains and evaluates as parallel branches on the same splits; ``compare`` reads every
branch's model and evaluation and writes

    comparison.json      one row per branch, the selection and the guard verdicts
    report.md            the comparison table and how the choice was made
    report.html          the same, with the plots inline (the KFP HTML artifact)
    metric_vs_parameters.png, metric_vs_seconds.png, learning_curve.png

Selection uses the validation split only (the evaluation split stays untouched by choices):
the branch with the fewest trainable parameters whose validation metric — or, with
``training.cross_validation_folds``, whose mean over folds of the pooled training and
validation rows — is within ``sweep.margin`` of the best. The guard uses the evaluation
split, where the promotion gate also looks: a transfer branch that does not beat ``scratch``
at the same label budget by more than the margin is flagged as negative transfer, and a
flagged model is never promoted.
"""

from __future__ import annotations

import base64
import html
import logging
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.errors import TrainingError
from transferkit.regression import orientation

log = logging.getLogger(__name__)

SCRATCH = "scratch"
PLOTS = ("metric_vs_parameters.png", "metric_vs_seconds.png", "learning_curve.png")


class Branch(BaseModel):
    """One planned branch: a label, its strategy, its label budget and its full config."""

    name: str
    label: str
    strategy: str
    examples_per_class: int | None
    config: dict[str, Any]


class BranchResult(BaseModel):
    """What one branch measured."""

    name: str
    label: str
    strategy: str
    examples_per_class: int | None
    labelled_examples: int
    trainable_parameters: int
    train_seconds: float
    validation: float
    test: float
    scores: dict[str, Any]
    cross_validation: float | None = None  # mean over folds (training.cross_validation_folds)
    cross_validation_std: float | None = None
    delta_vs_scratch: float | None = None
    negative_transfer: bool | None = None
    selected: bool = False


class SweepResult(BaseModel):
    """The comparison: every branch, which one was selected, and why."""

    primary_metric: str
    margin: float
    branches: list[BranchResult]
    selected: str
    reason: str
    negative_transfer: list[str]


def budget_name(examples_per_class: int | None) -> str:
    """How a label budget reads in names and tables."""
    return "all" if examples_per_class is None else str(examples_per_class)


def plan(config: PipelineConfig) -> list[Branch]:
    """Expand ``config.sweep`` into single-strategy branch configs, budgets outermost.

    zero_shot uses no labels and is planned once; few_shot draws k = the budget and is not
    planned for 'all' (it is a few-example method).

    Raises:
        TrainingError: the config has no sweep section, or the sweep plans no branch.
    """
    if config.sweep is None:
        raise TrainingError("the config has no 'sweep' section; add one or use 'transferkit run'")
    branches: list[Branch] = []
    planned_zero_shot: set[str] = set()
    for raw in config.sweep.examples_per_class:
        budget = None if raw == "all" else int(raw)
        for spec in config.sweep.branches:
            strategy = spec.strategy
            labels = type(strategy).applies.labels
            if labels == "none":  # reads no labels: one branch whatever the budget
                if spec.display in planned_zero_shot:
                    continue
                planned_zero_shot.add(spec.display)
                branch_config = config.branch(spec, None)
                budget_for_branch: int | None = None
            elif labels == "k":  # k examples per label: no 'all' budget
                if budget is None:
                    log.info("sweep: few_shot '%s' skips the 'all' budget", spec.display)
                    continue
                branch_config = config.branch(spec, budget)
                budget_for_branch = budget
            else:
                branch_config = config.branch(spec, budget)
                budget_for_branch = budget
            shown = "0" if labels == "none" else budget_name(budget_for_branch)
            name = f"{spec.display}@{shown}"
            branches.append(
                Branch(
                    name=name,
                    label=spec.display,
                    strategy=strategy.name,
                    examples_per_class=budget_for_branch,
                    config=branch_config.as_parameter(),
                )
            )
    if not branches:
        raise TrainingError(
            "sweep plans no branch (few_shot alone with only the 'all' budget); add a "
            "numeric budget to sweep.examples_per_class"
        )
    return branches


def _results(
    config: PipelineConfig,
    branches: list[Branch],
    model_dirs: list[Path],
    evaluation_dirs: list[Path],
) -> list[BranchResult]:
    if not len(branches) == len(model_dirs) == len(evaluation_dirs):
        raise TrainingError(
            f"sweep planned {len(branches)} branches but got {len(model_dirs)} models and "
            f"{len(evaluation_dirs)} evaluations; rerun the sweep without cached partial results"
        )
    metric = config.evaluation.primary_metric
    rows = []
    for branch, model_dir, evaluation_dir in zip(
        branches, model_dirs, evaluation_dirs, strict=True
    ):
        training = storage.read_json(model_dir / "training.json")
        evaluation = storage.read_json(evaluation_dir / "evaluation.json")
        if training["strategy"] != branch.strategy:
            raise TrainingError(
                f"sweep branch {branch.name} expected a {branch.strategy} model, got "
                f"{training['strategy']}; rerun the sweep"
            )
        rows.append(
            BranchResult(
                name=branch.name,
                label=branch.label,
                strategy=branch.strategy,
                examples_per_class=branch.examples_per_class,
                labelled_examples=training["labelled_examples"],
                trainable_parameters=training["trainable_parameters"],
                train_seconds=training["seconds"],
                validation=training["validation_metric"],
                test=evaluation["scores"][metric],
                scores=evaluation["scores"],
                cross_validation=(training.get("cross_validation") or {}).get("mean"),
                cross_validation_std=(training.get("cross_validation") or {}).get("std"),
            )
        )
    return rows


def _guard(rows: list[BranchResult], margin: float, sign: float) -> None:
    """Mark transfer branches that do not beat scratch at the same budget by the margin.

    ``delta_vs_scratch`` is the gain over scratch, positive when the branch is better
    (``sign``: ``transferkit.regression.orientation`` of the metric, so that an error that
    falls is a gain).

    zero_shot uses no labels; it is held to the scratch branch with the fewest labels (a
    zero-shot model that loses to a few labelled examples trained from scratch is not worth
    deploying).
    """
    scratch = {r.examples_per_class: r for r in rows if r.strategy == SCRATCH}
    fewest = min(scratch.values(), key=lambda r: r.labelled_examples, default=None)
    for row in rows:
        if row.strategy == SCRATCH:
            continue
        control = fewest if row.strategy == "zero_shot" else scratch.get(row.examples_per_class)
        if control is None:
            continue
        row.delta_vs_scratch = sign * (row.test - control.test)
        row.negative_transfer = row.delta_vs_scratch <= margin


def _select(rows: list[BranchResult], margin: float, sign: float) -> tuple[BranchResult, str]:
    """The cheapest branch (trainable parameters, then labels) within the margin of the best,
    by the cross-validated mean when every branch has one, else by the validation metric
    (``sign``: 1 when higher is better, -1 for an error such as rmse).

    Raises:
        TrainingError: some branches were cross-validated and some not (artifacts of two
            configs); they cannot be ranked together.
    """
    crossed = [r.cross_validation is not None for r in rows]
    if any(crossed) and not all(crossed):
        raise TrainingError(
            "sweep: some branches were cross-validated and some not; rerun the sweep with the "
            "cache off (runtime.caching: false)"
        )
    by = "cross-validated" if all(crossed) else "validation"

    def value(row: BranchResult) -> float:
        return row.cross_validation if row.cross_validation is not None else row.validation

    def gain(row: BranchResult) -> float:  # higher is better, whatever the metric
        return sign * value(row)

    best = max(rows, key=gain)
    near = [r for r in rows if gain(r) >= gain(best) - margin]
    chosen = min(near, key=lambda r: (r.trainable_parameters, r.labelled_examples, -gain(r)))
    chosen.selected = True
    if chosen is best:
        reason = f"{chosen.name} has the best {by} metric ({value(best):.4f})"
    else:
        reason = (
            f"{chosen.name} ({by} {value(chosen):.4f}, "
            f"{chosen.trainable_parameters:,} trainable parameters) is the cheapest within "
            f"{margin:g} of the best, {best.name} ({value(best):.4f}, "
            f"{best.trainable_parameters:,})"
        )
    return chosen, reason


def _plots(result: SweepResult, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result.primary_metric
    labels = sorted({r.label for r in result.branches})
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for filename, field, xlabel in (
        ("metric_vs_parameters.png", "trainable_parameters", "trainable parameters"),
        ("metric_vs_seconds.png", "train_seconds", "training seconds"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for label in labels:
            mine = [r for r in result.branches if r.label == label]
            ax.scatter(
                [max(getattr(r, field), 1) for r in mine],
                [r.test for r in mine],
                label=label,
                color=colours[label],
            )
            for r in mine:
                ax.annotate(
                    budget_name(r.examples_per_class),
                    (max(getattr(r, field), 1), r.test),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xscale("log")
        ax.set_xlabel(f"{xlabel} (log scale; labels: examples per class)")
        ax.set_ylabel(f"evaluation {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / filename)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label in labels:
        mine = sorted(
            (r for r in result.branches if r.label == label), key=lambda r: r.labelled_examples
        )
        xs = [max(r.labelled_examples, 1) for r in mine]
        if mine[0].strategy == "zero_shot":
            ax.axhline(
                mine[0].test, color=colours[label], linestyle=":", label=f"{label} (no labels)"
            )
            continue
        ax.plot(
            xs,
            [r.test for r in mine],
            marker="o",
            label=label,
            color="black" if mine[0].strategy == SCRATCH else colours[label],
            linestyle="--" if mine[0].strategy == SCRATCH else "-",
        )
    ax.set_xscale("log")
    ticks = sorted(
        {max(r.labelled_examples, 1) for r in result.branches if r.strategy != "zero_shot"}
    )
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("labelled training examples (log scale)")
    ax.set_ylabel(f"evaluation {metric}")
    ax.set_title("learning curve: transfer against scratch", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png")
    plt.close(fig)


def _second(result: SweepResult) -> tuple[str, str]:
    """The score shown beside the primary metric: macro-F1 for labels; for scores (task:
    regression) RMSE, or Spearman when RMSE is the primary metric."""
    if all("rmse" not in r.scores for r in result.branches):
        return "macro_f1", "macro-F1"
    return ("spearman", "Spearman") if result.primary_metric == "rmse" else ("rmse", "RMSE")


def _table(result: SweepResult) -> list[list[str]]:
    second, shown = _second(result)
    rows = [
        [
            "branch",
            "strategy",
            "examples/class",
            "trainable params",
            "train s",
            f"validation {result.primary_metric}",
            f"cross-validated {result.primary_metric}",
            f"evaluation {result.primary_metric}",
            shown,
            "vs scratch",
            "verdict",
        ]
    ]
    for r in result.branches:
        verdict = []
        if r.selected:
            verdict.append("**selected**")
        if r.negative_transfer:
            verdict.append("negative transfer")
        rows.append(
            [
                r.name,
                r.strategy,
                budget_name(r.examples_per_class) if r.strategy != "zero_shot" else "0",
                f"{r.trainable_parameters:,}",
                f"{r.train_seconds:.1f}",
                f"{r.validation:.4f}",
                "—"
                if r.cross_validation is None
                else f"{r.cross_validation:.4f} ± {r.cross_validation_std or 0:.4f}",
                f"{r.test:.4f}",
                f"{r.scores[second]:.4f}",
                "—" if r.delta_vs_scratch is None else f"{r.delta_vs_scratch:+.4f}",
                ", ".join(verdict),
            ]
        )
    return rows


def _markdown(result: SweepResult) -> str:
    table = _table(result)
    lines = [
        f"# Strategy sweep: {len(result.branches)} branches",
        "",
        "| " + " | ".join(table[0]) + " |",
        "|" + "---|" * len(table[0]),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    lines += ["", f"**Selected:** {result.reason}."]
    if result.negative_transfer:
        lines.append(
            f"**Negative transfer:** {', '.join(result.negative_transfer)} did not beat scratch "
            f"at the same label budget by more than {result.margin:g} on the evaluation split; "
            "such a model is never promoted."
        )
    lines += ["", *[f"![{name}]({name})" for name in PLOTS], ""]
    return "\n".join(lines)


def _html(result: SweepResult, out: Path) -> str:
    table = _table(result)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.replace('**', ''))}</td>" for c in row) + "</tr>"
        for row in table[1:]
    )
    images = "".join(
        f'<img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode((out / name).read_bytes()).decode()}"/>'
        for name in PLOTS
    )
    notes = f"<p><b>Selected:</b> {html.escape(result.reason)}.</p>"
    if result.negative_transfer:
        notes += (
            f"<p><b>Negative transfer:</b> {html.escape(', '.join(result.negative_transfer))} "
            f"did not beat scratch by more than {result.margin:g}; never promoted.</p>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>transferkit sweep</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>Strategy sweep: {len(result.branches)} branches</h1><table><tr>{head}</tr>{body}"
        f"</table>{notes}{images}</body></html>"
    )


def compare(
    config: PipelineConfig,
    model_dirs: list[Path],
    evaluation_dirs: list[Path],
    model_out: Path,
    evaluation_out: Path,
) -> tuple[SweepResult, dict[str, Any]]:
    """Compare the branches, write the report, and copy out the selected model and evaluation.

    Args:
        config: the sweep configuration (the one the plan came from).
        model_dirs: train artifacts, in plan order.
        evaluation_dirs: evaluate artifacts, in plan order.
        model_out: folder to create with the selected model.
        evaluation_out: folder to create with the selected evaluation plus ``sweep/``
            (the comparison and its report), which register_model logs to MLflow.

    Returns:
        The comparison, and the selected branch's config (as a pipeline parameter).

    Raises:
        TrainingError: the artifacts do not match the plan.
    """
    assert config.sweep is not None
    branches = plan(config)
    rows = _results(config, branches, model_dirs, evaluation_dirs)
    sign = orientation(config.evaluation.primary_metric)
    _guard(rows, config.sweep.margin, sign)
    chosen, reason = _select(rows, config.sweep.margin, sign)
    result = SweepResult(
        primary_metric=config.evaluation.primary_metric,
        margin=config.sweep.margin,
        branches=rows,
        selected=chosen.name,
        reason=reason,
        negative_transfer=[r.name for r in rows if r.negative_transfer],
    )
    index = rows.index(chosen)
    with storage.atomic_dir(model_out) as tmp:
        shutil.copytree(model_dirs[index], tmp, dirs_exist_ok=True)
    with storage.atomic_dir(evaluation_out) as tmp:
        shutil.copytree(evaluation_dirs[index], tmp, dirs_exist_ok=True)
        report = tmp / "sweep"
        report.mkdir()
        _plots(result, report)
        storage.write_json(report / "comparison.json", result.model_dump())
        storage.write_json(report / "branches.json", [b.model_dump() for b in branches])
        (report / "report.md").write_text(_markdown(result), encoding="utf-8")
        (report / "report.html").write_text(_html(result, report), encoding="utf-8")
    for row in rows:
        log.info(
            "%-28s validation %.4f  %sevaluation %.4f  %s",
            row.name,
            row.validation,
            "" if row.cross_validation is None else f"cross-validated {row.cross_validation:.4f}  ",
            row.test,
            "negative transfer" if row.negative_transfer else "",
        )
    log.info("selected %s", reason)
    return result, branches[index].config

"""evaluate: score the trained model on the evaluation split; report and plot.

Output folder (a KFP artifact)::

    evaluation.json        headline metrics, per-class scores, confusion matrix
    predictions.parquet    label, predicted, probability per class, for every evaluation row
                           (label sets: lists of label ids in label and predicted)
    confusion_matrix.png   the confusion matrix, counts and row-normalised shading
    label_scores.png       label sets instead: each label's F1, precision and recall
    scores.png             scores (task: regression) instead: predicted against true
    roc_curve.png          binary tasks: the ROC curve of the positive label
    report.md              a Markdown report (also logged to MLflow and shown by KFP)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from transferkit import storage
from transferkit.config import PipelineConfig
from transferkit.data import load_label_map
from transferkit.metrics import Scores, roc_points, score_task
from transferkit.multilabel import MultiLabelScores
from transferkit.regression import METRICS as SCORE_METRICS
from transferkit.regression import RegressionScores

log = logging.getLogger(__name__)


class EvaluationResult(BaseModel):
    """Scores of a model on the evaluation split."""

    primary_metric: str
    primary_value: float
    scores: Scores | MultiLabelScores | RegressionScores
    strategy: str
    seconds: float
    roc: dict[str, list[float]] | None = None  # binary tasks: fpr, tpr, threshold
    precision: str = "fp32"  # inference precision of this evaluation

    def kfp_metrics(self) -> dict[str, float]:
        """Flat scalar metrics for KFP's Metrics artifact."""
        s = self.scores
        if isinstance(s, MultiLabelScores):
            return set_metrics(s)
        if isinstance(s, RegressionScores):
            return score_metrics(s)
        flat = {
            "accuracy": s.accuracy,
            "macro_f1": s.macro_f1,
            "balanced_accuracy": s.balanced_accuracy,
        }
        flat.update(
            {
                key: float(value)
                for key, value in (
                    ("roc_auc", s.roc_auc),
                    ("sensitivity", s.sensitivity),
                    ("specificity", s.specificity),
                )
                if value is not None
            }
        )
        for name, cls in s.per_class.items():
            flat.update(
                {
                    f"precision_{name}": cls.precision,
                    f"recall_{name}": cls.recall,
                    f"f1_{name}": cls.f1,
                }
            )
        return flat


def set_metrics(s: MultiLabelScores) -> dict[str, float]:
    """Flat scalar metrics of label sets: the headline ones, then F1 and ROC-AUC per label."""
    keys = ("macro_f1", "micro_f1", "samples_f1", "subset_accuracy", "hamming_loss")
    flat = {key: float(getattr(s, key)) for key in keys}
    flat.update(mean_average_precision=s.mean_average_precision, roc_auc=s.roc_auc)
    for name, label in s.per_label.items():
        flat.update({f"f1_{name}": label.f1, f"roc_auc_{name}": label.roc_auc})
    return flat


def score_metrics(s: RegressionScores) -> dict[str, float]:
    """Flat scalar metrics of scores (task: regression)."""
    return {name: float(s.metric(name)) for name in SCORE_METRICS}


def plot_scores(truth: np.ndarray, predicted: np.ndarray, path: Path, title: str) -> None:
    """Regression's counterpart of the confusion matrix: each evaluation row's predicted
    score against its true one, with the diagonal of perfect predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.4, 4.4), dpi=120)
    ax.scatter(truth, predicted, s=6, alpha=0.35, color="tab:blue", linewidths=0)
    low = float(min(truth.min(), predicted.min()))
    high = float(max(truth.max(), predicted.max()))
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("true score")
    ax.set_ylabel("predicted score")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with storage.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_label_scores(scores: MultiLabelScores, path: Path, title: str) -> None:
    """Label sets' counterpart of the confusion matrix: F1, precision and recall per label,
    labels sorted by F1, with each label's support."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(scores.per_label.items(), key=lambda item: item[1].f1)
    height = max(3.0, 0.28 * len(items) + 1.2)
    fig, ax = plt.subplots(figsize=(6.4, height), dpi=120)
    rows = np.arange(len(items))
    for offset, key, color in ((-0.25, "precision", "0.75"), (0.0, "recall", "0.55")):
        ax.barh(rows + offset, [getattr(c, key) for _, c in items], 0.25, color=color, label=key)
    ax.barh(rows + 0.25, [c.f1 for _, c in items], 0.25, color="tab:blue", label="F1")
    ax.set_yticks(rows, [f"{name} ({c.support})" for name, c in items], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("score at the label's threshold (support in brackets)")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with storage.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_confusion(scores: Scores, path: Path, title: str) -> None:
    """Confusion-matrix PNG: counts in the cells, shading by row (recall per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(scores.confusion_matrix, dtype=float)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(3.5, 0.6 * len(scores.labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=120)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(scores.labels))
    ax.set_xticks(ticks, scores.labels, rotation=45, ha="right")
    ax.set_yticks(ticks, scores.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for i in ticks:
        for j in ticks:
            ax.text(
                j,
                i,
                f"{int(matrix[i, j])}",
                ha="center",
                va="center",
                color="white" if shares[i, j] > 0.5 else "black",
            )
    fig.tight_layout()
    with storage.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, path: Path, title: str) -> None:
    """ROC curve PNG of a binary task, with the chance diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    ax.plot(fpr, tpr, color="tab:blue", linewidth=1.8)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("false-positive rate (1 − specificity)")
    ax.set_ylabel("true-positive rate (sensitivity)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with storage.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}


def prevalence(dataset: dict[str, Any]) -> list[str]:
    """Report lines: every label's share of each split (ingest's class balance)."""
    balance: dict[str, dict[str, int]] = dataset.get("class_balance") or {}
    if not balance:
        return []
    # stats.json sorts its keys: put the splits back in the order the data flows.
    splits = sorted(balance, key=lambda split: (SPLIT_ORDER.get(split, 3), split))
    totals = {split: max(sum(balance[split].values()), 1) for split in splits}
    lines = [
        "",
        "Label prevalence",
        "",
        "| label | " + " | ".join(splits) + " |",
        "|---" + "|---:" * len(splits) + "|",
    ]
    for label in balance[splits[0]]:
        cells = [
            f"{balance[split].get(label, 0):,} ({balance[split].get(label, 0) / totals[split]:.1%})"
            for split in splits
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _provenance(
    result: EvaluationResult,
    training: dict[str, Any],
    dataset: dict[str, Any],
    card: dict[str, Any],
) -> list[str]:
    """Report lines: label prevalence, provenance, and the overlap warning."""
    lines = prevalence(dataset)
    lines += [
        "",
        "| provenance | |",
        "|---|---|",
        f"| backbone | {card.get('backbone_source')} "
        f"(`{card.get('backbone_fingerprint', '')[:12]}`) |",
        f"| data | `{dataset.get('fingerprint', '')[:12]}`, rows {dataset.get('rows')} |",
        f"| trainable parameters | {training.get('trainable_parameters', 0):,} of "
        f"{training.get('total_parameters', 0):,} |",
        f"| precision | training {training.get('precision')}, evaluation {result.precision} |",
        f"| training seconds | {training.get('seconds')} |",
    ]
    from transferkit.backbones.modality import modality_of

    overlap = dataset.get("overlap", {}).get("test", 0)
    if overlap:
        what = modality_of(dataset.get("modality") or "text").noun
        lines += [
            "",
            f"> {overlap} evaluation {what} also occur in the training data; the "
            "evaluation may be optimistic.",
        ]
    return lines


def _set_report(
    result: EvaluationResult,
    s: MultiLabelScores,
    training: dict[str, Any],
    dataset: dict[str, Any],
    card: dict[str, Any],
) -> str:
    """The report of a multi-label model: headline metrics, thresholds, per-label table."""
    thresholds = (card.get("decision") or {}).get("thresholds") or []
    lines = [
        f"# Evaluation — {result.strategy}",
        "",
        f"**{result.primary_metric}: {result.primary_value:.4f}** on {s.rows:,} evaluation rows "
        f"(macro-F1 {s.macro_f1:.4f}, micro-F1 {s.micro_f1:.4f}, samples-F1 "
        f"{s.samples_f1:.4f}, subset accuracy {s.subset_accuracy:.4f}, Hamming loss "
        f"{s.hamming_loss:.4f}, mean average precision {s.mean_average_precision:.4f}, "
        f"ROC-AUC {s.roc_auc:.4f}); validation "
        f"{training.get('primary_metric', result.primary_metric)} during training: "
        f"{training.get('validation_metric', float('nan')):.4f}.",
        "",
        "| label | threshold | precision | recall | F1 | ROC-AUC | AP | support |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (name, c) in enumerate(s.per_label.items()):
        cut = f"{thresholds[i]:.3f}" if i < len(thresholds) else "—"
        lines.append(
            f"| {name} | {cut} | {c.precision:.4f} | {c.recall:.4f} | {c.f1:.4f} | "
            f"{c.roc_auc:.4f} | {c.average_precision:.4f} | {c.support} |"
        )
    lines += _provenance(result, training, dataset, card)
    return "\n".join(lines) + "\n"


def _score_report(
    result: EvaluationResult,
    s: RegressionScores,
    training: dict[str, Any],
    dataset: dict[str, Any],
    card: dict[str, Any],
) -> str:
    """The report of a regression model: its metrics, the targets of every split."""
    lines = [
        f"# Evaluation — {result.strategy}",
        "",
        f"**{result.primary_metric}: {result.primary_value:.4f}** on {s.rows:,} evaluation rows "
        f"(RMSE {s.rmse:.4f}, MAE {s.mae:.4f}, R² {s.r2:.4f}, Pearson {s.pearson:.4f}, "
        f"Spearman {s.spearman:.4f}); validation "
        f"{training.get('primary_metric', result.primary_metric)} during training: "
        f"{training.get('validation_metric', float('nan')):.4f}.",
    ]
    targets: dict[str, dict[str, float]] = dataset.get("targets") or {}
    if targets:
        splits = sorted(targets, key=lambda split: (SPLIT_ORDER.get(split, 3), split))
        lines += [
            "",
            "| targets | rows | min | max | mean | std |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {split} | {int(t['rows']):,} | {t['min']:.4g} | {t['max']:.4g} | "
            f"{t['mean']:.4f} | {t['std']:.4f} |"
            for split, t in ((split, targets[split]) for split in splits)
        ]
    lines += _provenance(result, training, dataset, card)
    return "\n".join(lines) + "\n"


def render_report(
    result: EvaluationResult,
    training: dict[str, Any],
    dataset: dict[str, Any],
    card: dict[str, Any],
) -> str:
    """Markdown report of one evaluation: headline, per-class table, confusion, provenance."""
    s = result.scores
    if isinstance(s, MultiLabelScores):
        return _set_report(result, s, training, dataset, card)
    if isinstance(s, RegressionScores):
        return _score_report(result, s, training, dataset, card)
    lines = [
        f"# Evaluation — {result.strategy}",
        "",
        f"**{result.primary_metric}: {result.primary_value:.4f}** on {s.rows:,} evaluation rows "
        f"(accuracy {s.accuracy:.4f}, macro-F1 {s.macro_f1:.4f}, balanced accuracy "
        f"{s.balanced_accuracy:.4f}"
        + (f", ROC-AUC {s.roc_auc:.4f}" if s.roc_auc is not None else "")
        + "); validation "
        f"{training.get('primary_metric', result.primary_metric)} during training: "
        f"{training.get('validation_metric', float('nan')):.4f}.",
        "",
        *(
            [
                f"Cross-validated {folds['metric']} over {folds['folds']} folds of "
                f"{folds['rows']:,} training and validation rows: {folds['mean']:.4f} ± "
                f"{folds['std']:.4f} (out-of-fold {folds['out_of_fold']:.4f}).",
                "",
            ]
            if (folds := training.get("cross_validation"))
            else []
        ),
        *(
            [
                f"Sensitivity (recall of {s.positive_label}) {s.sensitivity:.4f}, specificity "
                f"{s.specificity:.4f}.",
                "",
            ]
            if s.sensitivity is not None
            else []
        ),
        *(
            [
                f"Decision: {s.labels[decision['positive']]} when its probability reaches "
                f"{decision['threshold']:.4f} (training.decision_threshold).",
                "",
            ]
            if (decision := card.get("decision") or {}).get("threshold") is not None
            else []
        ),
        "| class | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {c.precision:.4f} | {c.recall:.4f} | {c.f1:.4f} | {c.support} |"
        for name, c in s.per_class.items()
    ]
    lines += [
        "",
        "Confusion matrix (rows: true, columns: predicted)",
        "",
        "| | " + " | ".join(s.labels) + " |",
        "|---" * (len(s.labels) + 1) + "|",
    ]
    lines += [
        f"| **{name}** | " + " | ".join(str(v) for v in row) + " |"
        for name, row in zip(s.labels, s.confusion_matrix, strict=True)
    ]
    lines += _provenance(result, training, dataset, card)
    return "\n".join(lines) + "\n"


def _rows(labels: np.ndarray) -> Any:
    """Labels as a predictions column: the ids, or for label sets each row's list of ids."""
    if labels.ndim == 2:
        return [np.flatnonzero(row).tolist() for row in labels]
    return labels


def evaluate(
    config: PipelineConfig,
    dataset_dir: Path,
    model_dir: Path,
    output_dir: Path,
) -> EvaluationResult:
    """Score the model on the dataset's evaluation (test) split.

    Args:
        config: the run configuration (``evaluation``).
        dataset_dir: the ingest_data artifact.
        model_dir: the train artifact.
        output_dir: folder to create atomically.

    Returns:
        The primary metric and all scores.
    """
    from transferkit.backbones.text import resolve_precision
    from transferkit.training.model import load_classifier, predict_proba
    from transferkit.training.runtime import configure_torch, device

    started = time.perf_counter()
    configure_torch(config)
    target = device()
    tokenizer, model, card = load_classifier(model_dir)
    model.to(target)
    inputs, truth = card.input_modality().load(dataset_dir, "test")
    precision = resolve_precision(config.evaluation.precision, target)
    proba = predict_proba(model, tokenizer, card, inputs, config.evaluation.batch_size, precision)
    predicted = card.decide(proba)
    metric = config.evaluation.primary_metric
    positive = None
    if not (card.regression or card.multi_label):
        positive = load_label_map(dataset_dir).positive(config.evaluation.positive_label)
    scores = score_task(truth, predicted, proba, card.labels, positive)
    roc = None
    if isinstance(scores, Scores) and len(card.labels) == 2:
        index = card.labels.index(scores.positive_label or card.labels[1])
        fpr, tpr, threshold = roc_points(truth == index, proba[:, index])
        roc = {
            "fpr": fpr.tolist(),
            "tpr": tpr.tolist(),
            # JSON has no infinity: the "nothing positive" point gets a threshold above 1.
            "threshold": np.minimum(threshold, 2.0).tolist(),
        }
    result = EvaluationResult(
        primary_metric=metric,
        primary_value=scores.metric(metric),
        scores=scores,
        strategy=card.strategy,
        seconds=round(time.perf_counter() - started, 3),
        roc=roc,
        precision=precision,
    )
    training = storage.read_json(model_dir / "training.json")
    dataset = storage.read_json(dataset_dir / "stats.json")
    with storage.atomic_dir(output_dir) as tmp:
        storage.write_json(tmp / "evaluation.json", result.model_dump())
        frame = pd.DataFrame({"label": _rows(truth), "predicted": _rows(predicted)})
        for i, name in enumerate([] if card.regression else card.labels):
            frame[f"p_{name}"] = proba[:, i]
        frame.to_parquet(tmp / "predictions.parquet", index=False)
        title = f"{card.strategy}: {metric} {result.primary_value:.3f}"
        if isinstance(scores, MultiLabelScores):
            plot_label_scores(scores, tmp / "label_scores.png", title)
        elif isinstance(scores, RegressionScores):
            plot_scores(truth, predicted, tmp / "scores.png", title)
        else:
            plot_confusion(scores, tmp / "confusion_matrix.png", title)
        if roc is not None and isinstance(scores, Scores):
            plot_roc(
                np.asarray(roc["fpr"]),
                np.asarray(roc["tpr"]),
                tmp / "roc_curve.png",
                f"{card.strategy}: ROC-AUC {scores.roc_auc:.3f} "
                f"(positive: {scores.positive_label})",
            )
        (tmp / "report.md").write_text(render_report(result, training, dataset, card.model_dump()))
    second = (
        ("RMSE", scores.rmse)
        if isinstance(scores, RegressionScores)
        else ("macro-F1", scores.macro_f1)
    )
    log.info(
        "evaluation: %s %.4f, %s %.4f on %d rows",
        metric,
        result.primary_value,
        *second,
        scores.rows,
    )
    return result

"""KFP component: evaluate. Logic: transferkit.evaluation.evaluate."""

from kfp import dsl
from kfp.dsl import (
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)
from transferkit.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    config: dict,
    dataset: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    report: Output[Markdown],
) -> None:
    """Score the model on the evaluation split; metrics, confusion matrix and report.

    Args:
        config: the parts of the run configuration this step reads
            (transferkit.step_inputs).
        dataset: output of ingest_data.
        model: output of train.
        evaluation: evaluation.json, predictions, confusion-matrix PNG, report.md.
        metrics: headline and per-class metrics for the KFP UI.
        classification_metrics: the confusion matrix for the KFP UI.
        report: the Markdown report for the KFP UI.
    """
    import json
    import shutil
    from pathlib import Path

    from transferkit.evaluation import evaluate as score
    from transferkit.logs import configure_logging
    from transferkit.metrics import Scores
    from transferkit.step_inputs import step_config

    configure_logging()
    result = score(
        step_config(config, "evaluate"),
        Path(dataset.path),
        Path(model.path),
        Path(evaluation.path),
    )
    for name, value in result.kfp_metrics().items():
        metrics.log_metric(name, value)
    if isinstance(result.scores, Scores):  # label sets have no confusion matrix
        classification_metrics.log_confusion_matrix(
            result.scores.labels, result.scores.confusion_matrix
        )
    if result.roc is not None:
        classification_metrics.log_roc_curve(
            result.roc["fpr"], result.roc["tpr"], result.roc["threshold"]
        )
    shutil.copyfile(Path(evaluation.path) / "report.md", report.path)
    # Metric artifacts live in metadata; a file at their path lets caches see them as present.
    for artifact in (metrics, classification_metrics):
        Path(artifact.path).write_text(json.dumps(artifact.metadata))

"""KFP component: compare_strategies. Logic: transferkit.sweep.compare."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Model, Output
from transferkit.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def compare_strategies(
    config: dict,
    models: Input[list[Model]],
    evaluations: Input[list[Artifact]],
    model: Output[Model],
    evaluation: Output[Artifact],
    report: Output[HTML],
    summary: Output[Markdown],
) -> dict:
    """Compare the sweep's branches; select one; flag negative transfer against scratch.

    Args:
        config: the parts of the sweep configuration this step reads
            (transferkit.step_inputs).
        models: every branch's train output, in plan order.
        evaluations: every branch's evaluate output, in plan order.
        model: the selected branch's model.
        evaluation: the selected branch's evaluation, plus sweep/ (comparison and report).
        report: the comparison table and plots as HTML for the KFP UI.
        summary: the comparison table as Markdown for the KFP UI.

    Returns:
        The parts of the selected branch's config that register_model reads (and records).
    """
    import shutil
    from pathlib import Path

    from transferkit.logs import configure_logging
    from transferkit.step_inputs import selected_arguments, step_config
    from transferkit.sweep import compare

    configure_logging()
    _, selected = compare(
        step_config(config, "compare_strategies"),
        [Path(m.path) for m in models],
        [Path(e.path) for e in evaluations],
        Path(model.path),
        Path(evaluation.path),
    )
    shutil.copyfile(Path(evaluation.path) / "sweep" / "report.html", report.path)
    shutil.copyfile(Path(evaluation.path) / "sweep" / "report.md", summary.path)
    return selected_arguments(selected)

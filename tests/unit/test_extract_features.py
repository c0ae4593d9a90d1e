"""extract_features: correctness against sentence-transformers, bf16, order, content cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_config
from transferkit import storage
from transferkit.backbones import fetch_backbone, text
from transferkit.backbones.encoder import load_text_encoder
from transferkit.backbones.text import (
    encode_chunks,
    frozen_encoder,
    length_sorted_batches,
    pad,
    run_batched,
)
from transferkit.config import PipelineConfig
from transferkit.data import ingest_data, load_split
from transferkit.features import extract_features, load_features, save_rows


@pytest.fixture(scope="module")
def sentences(sst2_frames: tuple) -> list[str]:
    train, _ = sst2_frames
    # Mixed lengths: short phrases and the longest sentences of the file.
    longest = train.loc[train["sentence"].str.len().nlargest(20).index, "sentence"].tolist()
    return train["sentence"].iloc[:180].tolist() + longest


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> tuple:
    return load_text_encoder(minilm_dir, "mean", True)


def test_fp32_matches_sentence_transformers(
    minilm: tuple, minilm_dir: Path, sentences: list[str]
) -> None:
    """Peer reference: the same folder loaded by sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer

    tokenizer, encoder = minilm
    ours = run_batched(encoder, tokenizer, sentences, max_length=256, batch_size=32)
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(
        sentences, batch_size=32, convert_to_numpy=True
    )
    assert ours.shape == (200, 384)
    np.testing.assert_allclose(ours, reference, atol=2e-5)


def test_bf16_stays_close_to_fp32(minilm: tuple, sentences: list[str]) -> None:
    tokenizer, encoder = minilm
    fp32 = run_batched(encoder, tokenizer, sentences, 128, 64, "fp32")
    bf16 = run_batched(encoder, tokenizer, sentences, 128, 64, "bf16")
    cosine = (fp32 * bf16).sum(axis=1) / (
        np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1)
    )
    # The fast path's promise (bench/extract.py measures it on 20,000 sentences).
    assert cosine.min() >= 0.999, cosine.min()


def test_frozen_bf16_encoder_stays_close_to_fp32(minilm_dir: Path, sentences: list[str]) -> None:
    """extract_features' path: bf16 weights, plain attention, float32 pooling."""
    tokenizer, encoder = load_text_encoder(minilm_dir, "mean", True)
    fp32 = run_batched(encoder, tokenizer, sentences, 128, 64, "fp32")
    same, precision = frozen_encoder(encoder, "fp32")
    assert same is encoder
    assert precision == "fp32"
    assert next(encoder.parameters()).dtype == torch.float32
    fast, precision = frozen_encoder(encoder, "bf16")
    assert precision == "fp32"  # nothing left for autocast: the weights are bf16
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    vectors = run_batched(fast, tokenizer, sentences, 128, 64, precision)
    assert vectors.dtype == np.float32
    cosine = (fp32 * vectors).sum(axis=1)  # both L2-normalised
    assert cosine.min() >= 0.999, cosine.min()
    assert cosine.min() < 1.0  # really computed in bf16


def test_chunks_come_back_in_input_order(minilm: tuple, sentences: list[str]) -> None:
    """Chunked encoding (bounded memory) gives the whole-list result, chunk by chunk."""
    tokenizer, encoder = minilm
    chunks = list(encode_chunks(encoder, tokenizer, sentences, 128, 16, "fp32", chunk_texts=37))
    assert [len(c) for c in chunks] == [37, 37, 37, 37, 37, 15]
    whole = run_batched(encoder, tokenizer, sentences, 128, batch_size=16)
    np.testing.assert_allclose(np.concatenate(chunks), whole, atol=1e-5)
    assert list(encode_chunks(encoder, tokenizer, [], 128)) == []


def test_save_rows_streams_one_npy_file(tmp_path: Path) -> None:
    blocks = [np.arange(12, dtype=np.float32).reshape(4, 3) + i for i in range(3)]
    assert save_rows(tmp_path / "a.npy", 12, iter(blocks)) == 3
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.concatenate(blocks))
    assert np.load(tmp_path / "a.npy", mmap_mode="r").shape == (12, 3)
    assert save_rows(tmp_path / "empty.npy", 0, iter([])) == 0
    assert np.load(tmp_path / "empty.npy").shape == (0, 0)
    with pytest.raises(ValueError, match="8 rows written, 12 announced"):
        save_rows(tmp_path / "short.npy", 12, iter(blocks[:2]))
    with pytest.raises(ValueError, match="width 2, not 3"):
        save_rows(tmp_path / "ragged.npy", 6, iter([blocks[0], np.zeros((2, 2), np.float32)]))


def test_length_sorting_restores_input_order(minilm: tuple, sentences: list[str]) -> None:
    tokenizer, encoder = minilm
    batched = run_batched(encoder, tokenizer, sentences, 128, batch_size=16)
    one_by_one = np.stack(
        [run_batched(encoder, tokenizer, [s], 128, batch_size=1)[0] for s in sentences[::17]]
    )
    np.testing.assert_allclose(batched[::17], one_by_one, atol=1e-5)


def test_batches_cover_every_index_once_longest_first() -> None:
    lengths = np.array([3, 9, 1, 9, 5, 2, 7])
    batches = length_sorted_batches(lengths, 3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    assert lengths[batches[0]].tolist() == [9, 9, 7]
    input_ids, mask = pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def prepare(tmp_path: Path, sst2_small: dict[str, Path], **backbone: object) -> PipelineConfig:
    config = make_config(
        tmp_path,
        {
            "train_uri": str(sst2_small["train"]),
            "test_uri": str(sst2_small["test"]),
            "max_rows": 300,
        },
        backbone=dict(backbone),
    )
    ingest_data(config, tmp_path / "dataset")
    fetch_backbone(config, tmp_path / "backbone")
    return config


def test_features_cover_every_split_and_hit_the_cache(
    tmp_path: Path, sst2_small: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = prepare(tmp_path, sst2_small)
    first = extract_features(config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "f1")
    assert not first.cache_hit
    assert first.rows == {"train": 270, "validation": 30, "test": 300}
    for split, rows in first.rows.items():
        features = load_features(tmp_path / "f1", split)
        assert features.shape == (rows, 384)
        assert features.dtype == np.float32
        # normalize=True from the sentence-transformers config: unit vectors.
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-4)
    second = extract_features(config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "f2")
    assert second.cache_hit
    assert second.key == first.key
    for split in first.rows:
        np.testing.assert_array_equal(
            load_features(tmp_path / "f1", split), load_features(tmp_path / "f2", split)
        )
    assert storage.read_json(tmp_path / "f2" / "features.json")["cache_hit"] is True

    # The step streams each split a chunk at a time: with chunks of 64 texts the files hold
    # the same rows in the same order as the one-chunk run above.
    config.runtime.feature_cache = str(tmp_path / "other-cache")
    monkeypatch.setattr(text, "CHUNK_TEXTS", 64)
    chunked = extract_features(config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "f3")
    assert not chunked.cache_hit
    for split in first.rows:
        # bf16 sums depend a little on which texts share a padded batch: compare directions.
        a, b = load_features(tmp_path / "f3", split), load_features(tmp_path / "f1", split)
        assert a.shape == b.shape
        assert np.sum(a * b, axis=1).min() >= 0.9995


@pytest.mark.parametrize("damage", ["truncated", "altered", "no checksums"])
def test_a_damaged_cache_entry_is_embedded_again_never_served(
    tmp_path: Path,
    sst2_small: dict[str, Path],
    tiny_backbone: Path,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = prepare(tmp_path, sst2_small, uri=str(tiny_backbone), max_length=32)
    first = extract_features(config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "f1")
    # Copied now: the artifact and the cache entry share their files (hard links).
    original = {split: load_features(tmp_path / "f1", split).copy() for split in first.rows}
    entry = Path(config.feature_cache) / first.key
    array = entry / "train.npy"
    if damage == "truncated":  # a full disk or a crash while the file was written
        with array.open("r+b") as handle:
            handle.truncate(array.stat().st_size // 2)
    elif damage == "altered":  # same size, one byte of the data changed
        with array.open("r+b") as handle:
            handle.seek(-1, 2)
            last = handle.read(1)
            handle.seek(-1, 2)
            handle.write(bytes([last[0] ^ 0xFF]))
    else:  # an entry from before checksums, or one whose manifest was lost
        (entry / "checksums.json").unlink()

    with caplog.at_level(logging.WARNING, logger="transferkit.features"):
        second = extract_features(
            config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "f2"
        )
    assert not second.cache_hit
    warned = [r.getMessage() for r in caplog.records if r.name == "transferkit.features"]
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"feature cache entry {first.key} is damaged (")
    assert {
        "truncated": "train.npy is ",
        "altered": "train.npy does not match its sha256",
        "no checksums": "no checksums.json",
    }[damage] in warned[0]
    for split, rows in original.items():
        np.testing.assert_array_equal(load_features(tmp_path / "f2", split), rows)
    # The entry was written again, whole: the next run is served from it.
    third = extract_features(config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "f3")
    assert third.cache_hit
    for split, rows in original.items():
        np.testing.assert_array_equal(load_features(tmp_path / "f3", split), rows)


def test_cache_key_follows_content_and_settings(
    tmp_path: Path, sst2_small: dict[str, Path]
) -> None:
    config = prepare(tmp_path, sst2_small)
    base = extract_features(config, tmp_path / "dataset", tmp_path / "backbone", tmp_path / "f")
    # A different max length is a different feature set.
    other = prepare(tmp_path / "b", sst2_small, max_length=32)
    other = other.model_copy(update={"runtime": config.runtime})
    shorter = extract_features(
        other, tmp_path / "b" / "dataset", tmp_path / "b" / "backbone", tmp_path / "f-short"
    )
    assert not shorter.cache_hit
    assert shorter.key != base.key
    # Different rows (another sample) miss the cache even with the same settings.
    resampled = make_config(
        tmp_path / "c",
        {
            "train_uri": str(sst2_small["train"]),
            "test_uri": str(sst2_small["test"]),
            "max_rows": 300,
            "split": {"seed": 1},
        },
    )
    resampled = resampled.model_copy(update={"runtime": config.runtime})
    ingest_data(resampled, tmp_path / "c" / "dataset")
    moved = extract_features(
        resampled, tmp_path / "c" / "dataset", tmp_path / "backbone", tmp_path / "f-c"
    )
    assert not moved.cache_hit
    assert moved.key != base.key
    texts, _ = load_split(tmp_path / "c" / "dataset", "train")
    assert len(texts) == 270


def test_half_precision_checkpoints_load_as_fp32(tmp_path: Path, tiny_backbone: Path) -> None:
    """transformers 5 keeps a checkpoint's dtype; training needs fp32 master weights."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(tiny_backbone, tmp_path / "half"))
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v.half() for k, v in weights.items()}, str(folder / "model.safetensors"))
    _, encoder = load_text_encoder(folder, "mean", False)
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}


def _family_tokenizer(kind: str, tmp_path: Path, minilm_dir: Path) -> object:
    from transformers import AutoTokenizer

    from tests.families import tiny_clip, tiny_decoder

    if kind in ("clip", "siglip"):
        return tiny_clip.tokenizer(kind)
    folder = minilm_dir
    if kind == "gpt2":
        folder = tiny_decoder.save_tiny_gpt2(tmp_path / kind)
    elif kind == "llama":
        folder = tiny_decoder.save_tiny_llama(tmp_path / kind)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if kind == "left":  # a tokenizer that keeps the end of long texts
        tokenizer.truncation_side = "left"
    return tokenizer


@pytest.mark.parametrize("kind", ["minilm", "left", "gpt2", "llama", "clip", "siglip"])
def test_tokenize_gives_transformers_ids_for_every_family(
    kind: str, tmp_path: Path, minilm_dir: Path, sentences: list[str]
) -> None:
    """The Rust fast path gives the ids transformers' own call gives, at every length cut,
    for every family's tokenizer (special tokens, truncation side, empty and odd texts), and
    leaves the tokenizer's own settings as they were."""
    tokenizer = _family_tokenizer(kind, tmp_path, minilm_dir)
    texts = [*sentences[:60], "", " ", "word " * 300, "héllo wörld 🙂 [SEP] <s> <eos> a photo"]
    backend = tokenizer.backend_tokenizer
    for max_length in (4, 16, 128):
        before = (backend.truncation, backend.padding)
        ours = text.tokenize(tokenizer, texts, max_length)
        assert (backend.truncation, backend.padding) == before  # set on a copy only
        expected = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        assert ours == expected, max_length
        assert max(map(len, ours)) <= max_length
    # A tokenizer whose truncation side changes after a first call is set up anew.
    tokenizer.truncation_side = "right" if tokenizer.truncation_side == "left" else "left"
    expected = tokenizer(texts, truncation=True, max_length=4)["input_ids"]
    assert text.tokenize(tokenizer, texts, 4) == expected


def test_tokenize_without_a_rust_backend_asks_transformers() -> None:
    class Slow:
        is_fast = False

        def __call__(self, texts: list[str], truncation: bool, max_length: int) -> dict:
            assert truncation
            return {"input_ids": [[len(t)][:max_length] for t in texts]}

    assert text.tokenize(Slow(), ["ab", "abc"], 8) == [[2], [3]]


def test_pad_fills_rows_in_order_and_masks_the_padding() -> None:
    ids, mask = pad([[5, 6, 7], [8], [9, 10], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long

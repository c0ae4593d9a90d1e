"""domain_adaptation: masked-language-model pre-training on unlabelled text, then a strategy."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from transferkit.backbones import load_backbone_info
from transferkit.config import DomainAdaptationConfig, StorageConfig
from transferkit.errors import DataError, StorageError
from transferkit.training import train
from transferkit.training.domain import mask_tokens, read_unlabelled
from transferkit.training.model import load_classifier, predict_proba


@pytest.fixture(scope="module")
def unlabelled(
    tmp_path_factory: pytest.TempPathFactory, sst2_frames: tuple[pd.DataFrame, pd.DataFrame]
) -> Path:
    """2,000 real SST-2 phrases without their labels (rows the small training set never uses)."""
    train_frame, _ = sst2_frames
    path = tmp_path_factory.mktemp("unlabelled") / "reviews.txt"
    path.write_text("\n".join(train_frame["sentence"].iloc[-2000:]) + "\n", encoding="utf-8")
    return path


def adapted_config(config, unlabelled: Path, **options):  # type: ignore[no-untyped-def]
    data = config.model_dump()
    data["strategy"] = {
        "name": "domain_adaptation",
        "unlabelled_uri": str(unlabelled),
        "steps": 40,
        "head_warmup_steps": 40,
        "batch_size": 32,
        "learning_rate": 1.0e-4,
        "then": {"name": "linear_probe"},
        **options,
    }
    return type(config).model_validate(data)


@pytest.fixture(scope="module")
def adapted_run(probe_run: tuple, unlabelled: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    config, folder, probe_result = probe_run
    out = tmp_path_factory.mktemp("adapted") / "model"
    config = adapted_config(config, unlabelled)
    result = train(config, folder / "dataset", folder / "backbone", folder / "features", out)
    return config, folder, out, result, probe_result


@pytest.mark.slow  # adapted_run: MLM adaptation of MiniLM, 42 s measured
def test_adaptation_lowers_the_held_out_mlm_loss(adapted_run) -> None:  # type: ignore[no-untyped-def]
    _, _, _, result, _ = adapted_run
    record = result.details["adaptation"]
    assert record["unlabelled_texts"] == 2000
    assert record["held_out_texts"] == 100
    # In-domain text: 40 encoder steps must predict its masked words better than before.
    assert record["held_out_mlm_loss_after"] < record["held_out_mlm_loss_before"] - 0.05
    assert result.details["then"] == "linear_probe"
    assert result.strategy == "domain_adaptation"


@pytest.mark.slow  # adapted_run: MLM adaptation of MiniLM, 42 s measured
def test_the_adapted_model_is_a_changed_backbone_that_still_classifies(adapted_run) -> None:  # type: ignore[no-untyped-def]
    _, folder, out, result, probe_result = adapted_run
    original = load_backbone_info(folder / "backbone")
    tokenizer, model, card = load_classifier(out)
    assert "MLM on" in card.backbone_source
    assert card.backbone_fingerprint != original.fingerprint
    # The saved encoder is the adapted one, not the original weights.
    from transferkit.backbones.encoder import load_text_encoder

    _, reference = load_text_encoder(folder / "backbone" / "model", card.pooling, card.normalize)
    moved = [
        name
        for (name, a), (_, b) in zip(
            model.encoder.state_dict().items(), reference.state_dict().items(), strict=True
        )
        if a.dtype.is_floating_point and not torch.allclose(a, b)
    ]
    assert any("encoder.layer" in name for name in moved)
    assert result.validation_metric > 0.65
    assert abs(result.validation_metric - probe_result.validation_metric) < 0.1
    proba = predict_proba(model, tokenizer, card, ["a wonderful film", "a dreadful bore"])
    assert proba.shape == (2, 2)
    assert result.trainable_parameters >= original.parameters


def test_masking_never_touches_padding_or_special_tokens() -> None:
    batch = torch.tensor([[101, 7, 8, 9, 102, 0], [101, 5, 102, 0, 0, 0]])
    attention = (batch != 0).long()
    special = (batch == 101) | (batch == 102)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        corrupted, labels = mask_tokens(batch, attention, special, 103, 1000, 0.5, generator)
        asked = labels != -100
        assert not (asked & (special | (attention == 0))).any()
        assert asked.any(dim=1).all()  # every text asks for at least one token
        assert torch.equal(corrupted[~asked], batch[~asked])


def test_unlabelled_tables_and_bad_corpora(tmp_path: Path) -> None:
    table = tmp_path / "reviews.csv"
    pd.DataFrame({"review": [f"text number {i}" for i in range(30)] + [""]}).to_csv(table)
    texts = read_unlabelled(
        DomainAdaptationConfig(unlabelled_uri=str(table), text_column="review"), StorageConfig()
    )
    assert len(texts) == 30
    with pytest.raises(DataError, match=r"no column 'text'.*strategy\.text_column"):
        read_unlabelled(DomainAdaptationConfig(unlabelled_uri=str(table)), StorageConfig())
    short = tmp_path / "short.txt"
    short.write_text("one\ntwo\n")
    with pytest.raises(DataError, match="2 unlabelled texts"):
        read_unlabelled(DomainAdaptationConfig(unlabelled_uri=str(short)), StorageConfig())
    with pytest.raises(StorageError, match=r"missing\.txt"):
        read_unlabelled(
            DomainAdaptationConfig(unlabelled_uri=str(tmp_path / "missing.txt")), StorageConfig()
        )

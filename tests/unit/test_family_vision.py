"""The Hugging Face vision family (ResNet, ConvNeXt, ViT, DINOv2, Swin) on tiny random-weight
folders in their real format, and torchvision ResNet checkpoints converted to it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.families.tiny_vision import MAIN, MODEL_TYPES, colour_task, save_tiny_vision
from transferkit.backbones import torchvision_resnet
from transferkit.backbones.base import detect, family_of, read_config
from transferkit.backbones.fetch import _fetch_checkpoint
from transferkit.backbones.images import IMAGENET_MEAN, IMAGENET_STD, run_images
from transferkit.backbones.resnet_cifar import ResNetCifarFamily
from transferkit.backbones.vision import HFVisionEncoder, VisionFamily, feature_width
from transferkit.config import PipelineConfig
from transferkit.errors import BackboneError

FAMILY = VisionFamily()
# Pooled feature width and number of blocks of each tiny model (tests/families/tiny_vision).
WIDTHS = {
    "resnet": 16,  # last stage
    "convnext": 32,
    "convnextv2": 32,
    "vit": 32,  # hidden_size
    "dinov2": 64,  # CLS ⊕ mean patch: 2 × hidden_size
    "dinov2_with_registers": 64,
    "swin": 32,  # embed_dim 16 doubled once
    "swinv2": 32,
}
BLOCKS = {
    "resnet": 3,  # stem + 1 + 1 layers
    "convnext": 3,  # 1 + 2 layers
    "convnextv2": 3,
    "vit": 2,
    "dinov2": 2,
    "dinov2_with_registers": 2,
    "swin": 3,  # 1 + 2 blocks
    "swinv2": 3,
}


class Settings:
    pooling = "image"
    normalize = False
    max_length = 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-vision")
    return {t: save_tiny_vision(root / t, t) for t in MODEL_TYPES}


@pytest.fixture(scope="module")
def encoders(folders: dict[str, Path]) -> dict[str, HFVisionEncoder]:
    loaded = {}
    for model_type, folder in folders.items():
        _, encoder = FAMILY.load(folder, "image", Settings())
        assert isinstance(encoder, HFVisionEncoder)
        loaded[model_type] = encoder
    return loaded


def pixels(count: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_each_architecture_is_detected_as_vision(folders: dict[str, Path], model_type: str):
    folder = folders[model_type]
    assert detect(read_config(folder), files(folder), str(folder)).name == "vision"


def test_text_unknown_and_cifar_folders_are_not_claimed(tmp_path: Path) -> None:
    bert = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32}
    assert not FAMILY.detect(bert, {"config.json", "vocab.txt", "model.safetensors"})
    assert not FAMILY.detect({"model_type": "clip"}, {"preprocessor_config.json"})
    assert not FAMILY.detect({"model_type": "resnet_cifar"}, {"model.safetensors"})
    assert not FAMILY.detect({}, {"preprocessor_config.json"})
    # An image model the family has not been taught to pool: refused by detection, in one line.
    beit = {"model_type": "beit", "architectures": ["BeitModel"]}
    assert not FAMILY.detect(beit, {"config.json", "preprocessor_config.json"})
    with pytest.raises(BackboneError, match=r"model_type 'beit'.*backbone\.family") as caught:
        detect(beit, {"config.json", "preprocessor_config.json"}, "models/beit")
    assert "\n" not in str(caught.value)


def test_a_forced_vision_family_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "beit"}))
    pattern = r"model_type 'beit' is not a vision architecture .*\(resnet, convnext.*swinv2\)"
    with pytest.raises(BackboneError, match=pattern):
        family_of("vision").load(tmp_path, "image", Settings())
    with pytest.raises(BackboneError, match=pattern):
        FAMILY.capabilities("image", {"model_type": "beit"})


# --- image input from each processor ----------------------------------------------------------


def test_image_input_follows_each_processor(folders: dict[str, Path]) -> None:
    imagenet = ([pytest.approx(v) for v in IMAGENET_MEAN], [pytest.approx(v) for v in IMAGENET_STD])
    specs = {t: FAMILY.image_input(folders[t]) for t in MAIN}
    # ConvNeXt's processor (ResNet, ConvNeXt): shortest_edge, ImageNet statistics.
    for model_type in ("resnet", "convnext"):
        spec = specs[model_type]
        assert (spec.size, spec.channels, (spec.mean, spec.std)) == (32, 3, imagenet)
    # ViT's (ViT, Swin): height × width, mean and std 0.5.
    for model_type in ("vit", "swin"):
        spec = specs[model_type]
        assert (spec.size, spec.mean, spec.std) == (32, [0.5] * 3, [0.5] * 3)
    # BiT's (DINOv2): resized to a shortest edge of 36, then centre-cropped: the crop counts.
    processor = json.loads((folders["dinov2"] / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 36}
    assert (specs["dinov2"].size, (specs["dinov2"].mean, specs["dinov2"].std)) == (32, imagenet)


def edited_processor(source: Path, target: Path, **changes: Any) -> Path:
    shutil.copytree(source, target)
    path = target / "preprocessor_config.json"
    processor = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            processor.pop(key, None)
        else:
            processor[key] = value
    path.write_text(json.dumps(processor))
    return target


def test_image_input_without_normalisation_and_from_the_config_size(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    plain = edited_processor(folders["vit"], tmp_path / "plain", do_normalize=False, size=None)
    spec = FAMILY.image_input(plain)
    # No size in the processor: the model's image_size; no normalisation: mean 0, std 1.
    assert (spec.size, spec.mean, spec.std) == (32, [0.0] * 3, [1.0] * 3)


def test_bad_or_missing_processors_are_refused_in_one_line(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(folders["vit"], bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(BackboneError, match=r"no preprocessor_config\.json.*save_pretrained"):
        FAMILY.image_input(bare)
    (bare / "preprocessor_config.json").write_text("[1, 2")
    with pytest.raises(BackboneError, match="not a JSON object"):
        FAMILY.image_input(bare)
    # ResNet's config has no image_size to fall back on.
    sizeless = edited_processor(folders["resnet"], tmp_path / "sizeless", size=None)
    with pytest.raises(BackboneError, match="no size"):
        FAMILY.image_input(sizeless)
    meanless = edited_processor(folders["convnext"], tmp_path / "meanless", image_mean=None)
    with pytest.raises(BackboneError, match="no image_mean"):
        FAMILY.image_input(meanless)


# --- pooling, blocks, capabilities ------------------------------------------------------------


def reference_features(folder: Path, model_type: str, x: torch.Tensor) -> torch.Tensor:
    """What each architecture's own classification head reads, from the plain HF model."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()  # ViT with its (unused) pooler
    with torch.no_grad():
        out = model(pixel_values=x)
    tokens = out.last_hidden_state
    if model_type == "vit":
        assert not torch.allclose(out.pooler_output, tokens[:, 0])  # the pooler is not it
        return tokens[:, 0]
    if model_type in ("dinov2", "dinov2_with_registers"):
        registers = 2 if model_type == "dinov2_with_registers" else 0
        assert tokens.shape[1] == 1 + registers + 16  # CLS, registers, 4 × 4 patches
        return torch.cat([tokens[:, 0], tokens[:, 1 + registers :].mean(dim=1)], dim=1)
    return out.pooler_output.flatten(1)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pooled_features_are_what_each_head_reads(
    folders: dict[str, Path], encoders: dict[str, HFVisionEncoder], model_type: str
) -> None:
    encoder = encoders[model_type]
    x = pixels()
    with torch.no_grad():
        features = encoder(x)
    assert features.dtype == torch.float32
    assert features.shape == (3, WIDTHS[model_type])
    assert encoder.hidden_size == WIDTHS[model_type]
    assert feature_width(read_config(folders[model_type])) == WIDTHS[model_type]
    expected = reference_features(folders[model_type], model_type, x)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(features[0], features[1], atol=1e-3)  # images told apart


def test_vit_is_built_without_its_pooler_and_takes_other_sizes(
    encoders: dict[str, HFVisionEncoder],
) -> None:
    vit = encoders["vit"]
    assert not any("pooler" in name for name, _ in vit.body.named_parameters())
    with torch.no_grad():  # backbone.image.size 48: position embeddings interpolated
        assert vit(pixels(2, size=48)).shape == (2, 32)


def test_weights_that_do_not_fit_are_refused_not_left_random(
    folders: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # ViT's stored pooler is not built: one log line, no error.
    with caplog.at_level("INFO", logger="transferkit.backbones.base"):
        FAMILY.load(folders["vit"], "image", Settings())
    assert "2 stored tensors not used for features (pooler.dense.bias" in caplog.text
    for name, change in (("missing", None), ("misshapen", torch.zeros(3, 3))):
        broken = tmp_path / name
        shutil.copytree(folders["dinov2"], broken)
        tensors = load_file(str(broken / "model.safetensors"))
        key = next(k for k in sorted(tensors) if k.endswith("mlp.fc1.weight"))
        if change is None:
            del tensors[key]
        else:
            tensors[key] = change
        save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(BackboneError) as caught:
            FAMILY.load(broken, "image", Settings())
        message = str(caught.value)
        assert "\n" not in message
        assert message.endswith("fetch it again")
        if change is None:
            assert "(1 of 1 missing tensors), which would be left random" in message
        else:
            assert "its weights do not load (RuntimeError" in message


def _first_parameter_index(block: nn.Module, order: dict[int, int]) -> int:
    return min(order[id(p)] for p in block.parameters())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_blocks_run_bottom_to_top_and_cover_the_stack(
    encoders: dict[str, HFVisionEncoder], model_type: str
) -> None:
    body = encoders[model_type].body
    blocks = encoders[model_type].blocks()
    assert len(blocks) == BLOCKS[model_type]
    order = {id(p): i for i, p in enumerate(body.parameters())}
    starts = [_first_parameter_index(b, order) for b in blocks]
    assert starts == sorted(starts)
    inside = [id(p) for b in blocks for p in b.parameters()]
    assert len(inside) == len(set(inside))  # no parameter in two blocks
    # Outside the blocks only the stem/embeddings and the final norm: stage downsampling
    # (ConvNeXt) and patch merging (Swin) belong to a block, so partial freezing covers them.
    outside = {n.split(".")[0] for n, p in body.named_parameters() if id(p) not in set(inside)}
    assert outside <= {"embeddings", "layernorm"}
    if model_type == "resnet":
        assert blocks[0] is body.embedder
        assert not outside


@pytest.mark.parametrize("model_type", MAIN)
def test_lora_defaults_and_adabn_where_they_belong(
    folders: dict[str, Path], encoders: dict[str, HFVisionEncoder], model_type: str
) -> None:
    caps = FAMILY.capabilities("image", read_config(folders[model_type]))
    has_batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in encoders[model_type].modules())
    assert (caps.adaptation == "adabn") == has_batch_norm == (model_type == "resnet")
    assert (caps.finetune, caps.blocks, caps.zero_shot, caps.contrastive) == (
        True,
        True,
        False,
        False,
    )
    expected = {
        "resnet": (),  # convolutions only: no default, LoRA refused
        "convnext": ("pwconv1", "pwconv2"),
        "vit": ("q_proj", "v_proj"),
        "dinov2": ("q_proj", "v_proj"),
        "swin": ("q_proj", "v_proj"),
    }[model_type]
    assert (caps.lora_targets, caps.lora) == (expected, bool(expected))


@pytest.mark.parametrize(
    ("model_type", "adapted"),
    [("vit", 4), ("dinov2", 4), ("swin", 6), ("convnext", 6), ("swinv2", 6)],
)
def test_lora_default_targets_apply(folders: dict[str, Path], model_type: str, adapted: int):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    caps = FAMILY.capabilities("image", read_config(folders[model_type]))
    _, encoder = FAMILY.load(folders[model_type], "image", Settings())
    x = pixels(2)
    with torch.no_grad():
        before = encoder(x)
    peft_model = get_peft_model(
        encoder.body,  # type: ignore[arg-type]
        LoraConfig(r=4, lora_alpha=8, target_modules=list(caps.lora_targets)),
    )
    layers = [m for m in encoder.body.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == adapted  # two projections in each block
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.allclose(encoder(x), before, atol=1e-6)  # B starts at zero
        for layer in layers:
            layer.lora_B["default"].weight.normal_()  # type: ignore[index, union-attr]
        assert not torch.allclose(encoder(x), before, atol=1e-3)


# --- save / load ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MAIN)
def test_save_and_load_round_trip(
    folders: dict[str, Path], tmp_path: Path, model_type: str
) -> None:
    source = folders[model_type]
    _, encoder = FAMILY.load(source, "image", Settings())
    x = pixels(2)
    with torch.no_grad():
        original = encoder(x)
        top = encoder.blocks()[-1]
        for parameter in top.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # "trained"
        for module in top.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.add_(0.3)  # AdaBN's statistics are saved too
        trained = encoder(x)
    assert not torch.allclose(original, trained, atol=1e-4)
    family_of("vision").save(encoder, None, source, tmp_path / "saved")
    saved = tmp_path / "saved"
    assert FAMILY.image_input(saved) == FAMILY.image_input(source)
    assert detect(read_config(saved), files(saved), str(saved)).name == "vision"
    _, again = FAMILY.load(saved, "image", Settings())
    with torch.no_grad():
        torch.testing.assert_close(again(x), trained)
    if model_type == "vit":
        assert not any("pooler" in k for k in load_file(str(saved / "model.safetensors")))
    # The scratch control: the same architecture, other weights.
    torch.manual_seed(1)
    _, scratch = FAMILY.load(source, "image", Settings(), random_init=True)
    with torch.no_grad():
        fresh = scratch(x)
    assert fresh.shape == trained.shape
    assert not torch.allclose(fresh, trained, atol=1e-3)


# --- learning ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train, train_labels = colour_task(150, seed=0)
    test, test_labels = colour_task(90, seed=1)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("model_type", MAIN)
def test_a_probe_on_frozen_features_learns_the_colour_task(
    folders: dict[str, Path],
    encoders: dict[str, HFVisionEncoder],
    colour_images: tuple[np.ndarray, ...],
    model_type: str,
) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, train_labels, test, test_labels = colour_images
    spec = FAMILY.image_input(folders[model_type])  # 24 px images resized to 32
    encoder = encoders[model_type]
    features = run_images(encoder, train, spec), run_images(encoder, test, spec)
    assert features[0].shape == (150, WIDTHS[model_type])
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(features[0], train_labels)
    accuracy = probe.score(features[1], test_labels)
    assert accuracy >= 0.85, accuracy  # 3 colours: chance is 1/3


# --- torchvision ResNet checkpoints -----------------------------------------------------------


class TVBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: same module names, same forward."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TVBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (v1.5: the stride on the 3×3 convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TVResNet(nn.Module):
    """torchvision.models.resnet.ResNet's layout and forward (torchvision does not import
    beside this torch build); ``features`` is the forward up to the flattened average pool."""

    def __init__(self, block: type[TVBasicBlock | TVBottleneck], layers: tuple[int, ...]):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, 1000)

    def _make_layer(self, block: Any, planes: int, count: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def torchvision_resnet_state(architecture: str) -> tuple[TVResNet, dict[str, torch.Tensor]]:
    """A random torchvision-layout ResNet in eval mode with non-trivial batch norms."""
    torch.manual_seed(0)
    layer_type, depths = torchvision_resnet.ARCHITECTURES[architecture]
    model = TVResNet(TVBasicBlock if layer_type == "basic" else TVBottleneck, depths)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.2, 0.6)  # keeps 50 random layers from blowing up
                module.bias.uniform_(-0.1, 0.1)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval(), model.state_dict()


def checkpoint_config(tmp_path: Path, uri: Path, **backbone: Any) -> PipelineConfig:
    raw = {
        "data": {"uri": str(tmp_path / "images.npz")},
        "backbone": {"uri": str(uri), **backbone},
        "runtime": {"work_dir": str(tmp_path / "work")},
    }
    return PipelineConfig.model_validate(raw).resolved()


def fetch_checkpoint(tmp_path: Path, uri: Path, **backbone: Any) -> Path:
    config = checkpoint_config(tmp_path, uri, **backbone)
    scratch = tmp_path / "fetch"
    scratch.mkdir(parents=True)
    _fetch_checkpoint(config, config.backbone, scratch)
    return scratch / "model"


@pytest.mark.parametrize(
    ("architecture", "suffix"), [("resnet18", "pth"), ("resnet50", "safetensors")]
)
def test_a_torchvision_resnet_converts_to_the_same_network(
    tmp_path: Path, architecture: str, suffix: str
) -> None:
    model, state = torchvision_resnet_state(architecture)
    if suffix == "pth":  # torchvision's own format, read with weights_only=True
        uri = tmp_path / f"{architecture}-weights.pth"
        torch.save({f"module.{k}": v for k, v in state.items()}, uri)  # DataParallel prefix
        model_dir = fetch_checkpoint(tmp_path, uri, architecture=architecture, allow_pickle=True)
    else:
        uri = tmp_path / f"{architecture}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(uri))
        model_dir = fetch_checkpoint(tmp_path, uri, architecture=architecture)
    assert files(model_dir) == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "source.json",
    }
    assert json.loads((model_dir / "source.json").read_text())["torchvision_architecture"] == (
        architecture
    )
    family = detect(read_config(model_dir), files(model_dir), str(model_dir))
    assert family.name == "vision"
    spec = family.image_input(model_dir)
    assert (spec.size, spec.channels) == (224, 3)
    assert spec.mean == pytest.approx(IMAGENET_MEAN)
    assert spec.std == pytest.approx(IMAGENET_STD)
    assert family.capabilities("image", read_config(model_dir)).adaptation == "adabn"
    _, encoder = family.load(model_dir, "image", Settings())
    width = 512 if architecture == "resnet18" else 2048
    assert encoder.hidden_size == width
    x = pixels(2, size=48)
    with torch.no_grad():
        expected = model.features(x)
        converted = encoder(x)
    assert converted.shape == (2, width)
    assert expected.abs().mean() > 1e-2  # the comparison is not between near-zero vectors
    torch.testing.assert_close(converted, expected, rtol=1e-4, atol=1e-5)
    assert len(encoder.blocks()) == 1 + sum(torchvision_resnet.ARCHITECTURES[architecture][1])


def test_a_torchvision_resnet_without_architecture_is_refused(tmp_path: Path) -> None:
    """The issue's bug: it was taken for a ResNet20Cifar and failed at extraction."""
    _, state = torchvision_resnet_state("resnet50")
    uri = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(uri))
    with pytest.raises(BackboneError) as caught:
        fetch_checkpoint(tmp_path, uri)
    message = str(caught.value)
    assert "not a CIFAR ResNet; set backbone.architecture: resnet50 to convert it" in message
    assert "\n" not in message
    assert str(uri) in message
    assert not (tmp_path / "fetch" / "model").exists()


def small_state(architecture: str) -> dict[str, torch.Tensor]:
    _, state = torchvision_resnet_state(architecture)
    return state


def test_unknown_architectures_and_keys_that_do_not_fit_are_refused() -> None:
    resnet18 = small_state("resnet18")
    with pytest.raises(BackboneError) as caught:
        torchvision_resnet.convert(resnet18, "vgg16", "ckpt.pth")
    assert str(caught.value) == (
        "ckpt.pth: backbone.architecture 'vgg16' is not a torchvision ResNet transferkit "
        "converts; use one of resnet18, resnet34, resnet50, resnet101, resnet152"
    )
    # A ResNet-18 said to be a ResNet-50: the first bottleneck tensor it lacks is named.
    with pytest.raises(BackboneError, match=r"not a torchvision resnet50 state dict: no "):
        torchvision_resnet.convert(resnet18, "resnet50", "ckpt.pth")
    # A ResNet-18 said to be a ResNet-34: layer1 has 2 blocks, not 3.
    with pytest.raises(BackboneError, match=r"resnet34 state dict: no layer1\.2\.conv1\.weight"):
        torchvision_resnet.convert(resnet18, "resnet34", "ckpt.pth")
    extra = {**resnet18, "layer5.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(BackboneError, match=r"unexpected key layer5\.0\.conv1\.weight \(1 of 1"):
        torchvision_resnet.convert(extra, "resnet18", "ckpt.pth")
    misshapen = {**resnet18, "layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)}
    with pytest.raises(BackboneError) as caught:
        torchvision_resnet.convert(misshapen, "resnet18", "ckpt.pth")
    assert "layer2.0.conv1.weight has shape [128, 64, 1, 1], but a torchvision resnet18 has " in (
        str(caught.value)
    )
    # fc is the source classifier: optional. num_batches_tracked: filled when absent.
    headless = {
        k: v
        for k, v in resnet18.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    config, tensors, _ = torchvision_resnet.convert(headless, "resnet18", "ckpt.pth")
    assert config["depths"] == [2, 2, 2, 2]
    assert config["layer_type"] == "basic"
    assert tensors["embedder.embedder.normalization.num_batches_tracked"].item() == 0
    assert not any("fc" in k for k in tensors)


def test_a_resnet50_layout_is_told_apart_from_resnet18_and_cifar() -> None:
    assert torchvision_resnet.layout_of(small_state("resnet18")) == "resnet18"
    assert torchvision_resnet.layout_of({"layer4.0.conv3.weight": torch.zeros(1)}) == "resnet"
    cifar = {"conv1.weight": torch.zeros(16, 3, 3, 3), "layer3.0.conv1.weight": torch.zeros(1)}
    assert torchvision_resnet.layout_of(cifar) is None


def test_the_cifar_checkpoint_still_loads_and_cifar_mismatches_are_refused(
    tmp_path: Path, resnet20: Path
) -> None:
    model_dir = fetch_checkpoint(tmp_path, resnet20, allow_pickle=True)
    config = read_config(model_dir)
    assert config["architectures"] == ["ResNet20Cifar"]
    assert "torchvision_architecture" not in json.loads((model_dir / "source.json").read_text())
    _, encoder = ResNetCifarFamily().load(model_dir, "image", Settings())
    assert encoder(pixels(2)).shape == (2, 64)
    # The CIFAR checkpoint said to be a torchvision ResNet: refused, naming what to unset.
    with pytest.raises(
        BackboneError,
        match=r"not a torchvision resnet18 state dict: unexpected key .*unset it for a CIFAR",
    ):
        fetch_checkpoint(
            tmp_path / "as-resnet18", resnet20, allow_pickle=True, architecture="resnet18"
        )
    # A CIFAR ResNet with a stray tensor is refused at fetch, not at extraction.
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors["layer3.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "stray.safetensors"))
    with pytest.raises(
        BackboneError, match=r"not a CIFAR ResNet-20 state dict: unexpected key layer3\.0\.extra"
    ):
        fetch_checkpoint(tmp_path / "stray", tmp_path / "stray.safetensors")

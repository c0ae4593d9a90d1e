"""The clip family: CLIP and SigLIP dual encoders (tiny random-weight folders in their real
formats, and the same folders pre-trained contrastively on a synthetic colour task)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.families import tiny_clip
from transferkit.backbones.base import detect, family_of, read_config
from transferkit.backbones.images import run_images
from transferkit.backbones.text import run_batched
from transferkit.config import ZeroShotConfig
from transferkit.errors import BackboneError
from transferkit.training.zero_shot import zero_shot_head

KINDS = ("clip", "siglip")
SETTINGS = SimpleNamespace(pooling="projection", normalize=True, max_length=32)
TEXTS = ["red", "a photo of a blue square", "the square is green", "a small yellow patch"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Tiny models: thread synchronisation costs more than it saves (see tiny_clip.pretrain).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-weight folders ('clip', 'siglip') and their pre-trained copies ('clip_pre' …)."""
    root = tmp_path_factory.mktemp("dual")
    out: dict[str, Path] = {}
    for kind in KINDS:
        out[kind] = tiny_clip.build(kind, root / kind)
        out[f"{kind}_pre"] = tiny_clip.pretrain(out[kind], root / f"{kind}_pre", steps=200)
    return out


def family() -> Any:
    return family_of("clip")


def files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()]


def zero_shot_predictions(model_dir: Path, images: np.ndarray) -> np.ndarray:
    """CLIP's recipe through the family's API, as the training step wires it: prototypes of
    templates × label descriptions from ``prompt_encoder``'s text tower, the head from
    ``zero_shot_head``, image features from ``load(…, 'image')``."""
    names = [f"label_{i}" for i in range(len(tiny_clip.NAMES))]
    strategy = ZeroShotConfig(
        templates=["a photo of a {} square", "a {} block on grey", "{}"],
        label_texts={n: [colour] for n, colour in zip(names, tiny_clip.NAMES, strict=True)},
    )
    tokenizer, text = family().prompt_encoder(model_dir, "image", SETTINGS)
    head, prototypes = zero_shot_head(
        tokenizer, text, strategy, names, names, SETTINGS.max_length, "fp32"
    )
    assert prototypes.shape == (len(names), text.hidden_size)
    _, encoder = family().load(model_dir, "image", SETTINGS)
    features = run_images(encoder, images, family().image_input(model_dir))
    with torch.no_grad():
        logits = head(torch.from_numpy(features))
    return logits.argmax(dim=1).numpy()


# ---- detection and capabilities ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_dual_encoder_folder_is_the_clip_family(folders: dict[str, Path], kind: str) -> None:
    folder = folders[kind]
    assert detect(read_config(folder), files(folder), str(folder)).name == "clip"


def test_vision_text_and_half_configs_are_not_clip(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel, ViTConfig, ViTImageProcessorPil, ViTModel

    small = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    vit, bert = tmp_path / "vit", tmp_path / "bert"
    ViTModel(ViTConfig(**small, image_size=16, patch_size=4)).save_pretrained(vit)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(vit)
    BertModel(BertConfig(**small, vocab_size=len(tiny_clip.vocabulary()))).save_pretrained(bert)
    tiny_clip.tokenizer("clip").save_pretrained(bert)
    clip = family()
    for folder, expected in ((vit, "vision"), (bert, "encoder")):
        assert not clip.detect(read_config(folder), set(files(folder)))
        assert detect(read_config(folder), files(folder), str(folder)).name == expected
    # A model_type alone is not enough: a CLIP vision-tower config has no text tower.
    assert not clip.detect({"model_type": "clip", "vision_config": {}}, {"config.json"})
    assert not clip.detect({"model_type": "clip_vision_model"}, {"config.json"})
    with pytest.raises(BackboneError, match=r"model_type 'bert' is not a CLIP-style") as info:
        clip.load(bert, "text", SETTINGS)
    assert "\n" not in str(info.value)


def test_capabilities_per_modality() -> None:
    image = family().capabilities("image", {"model_type": "clip"})
    text = family().capabilities("text", {"model_type": "siglip"})
    assert image.lora_targets == text.lora_targets == ("q_proj", "v_proj")
    assert (image.zero_shot, text.zero_shot) == (True, True)
    assert (image.contrastive, text.contrastive) == (False, True)
    assert (image.adaptation, text.adaptation) == (None, None)
    assert family().modalities == ("text", "image")
    assert family().default_pooling(Path("unused")) == ("projection", True)


# ---- embeddings --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_embeddings_are_the_models_own_features(folders: dict[str, Path], kind: str) -> None:
    """Image and text embeddings equal get_image_features / get_text_features fed as the
    model's own processor feeds it (SigLIP: padded to full length, ids only), normalised."""
    from transformers import AutoModel

    folder = folders[f"{kind}_pre"]
    model = AutoModel.from_pretrained(folder).eval()
    images, _ = tiny_clip.images(6, seed=5)
    spec = family().image_input(folder)
    _, image_encoder = family().load(folder, "image", SETTINGS)
    ours = run_images(image_encoder, images, spec, batch_size=4)
    width = 24 if kind == "clip" else 32
    assert ours.shape == (6, width) == (6, image_encoder.hidden_size)
    tokenizer, text_encoder = family().load(folder, "text", SETTINGS)
    text = run_batched(text_encoder, tokenizer, TEXTS, SETTINGS.max_length, batch_size=3)
    assert text.shape == (len(TEXTS), width) == (len(TEXTS), text_encoder.hidden_size)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    padding = "max_length" if kind == "siglip" else True
    encoded = tokenizer(TEXTS, padding=padding, return_tensors="pt")
    if kind == "siglip":
        encoded.pop("attention_mask", None)
    with torch.no_grad():
        theirs_text = model.get_text_features(**encoded).pooler_output
        pixels = tiny_clip.pixels(images, spec.mean, spec.std)
        theirs_image = model.get_image_features(pixel_values=pixels).pooler_output
    unit = torch.nn.functional.normalize
    assert np.allclose(ours, unit(theirs_image, dim=-1).numpy(), atol=1e-5)
    assert np.allclose(text, unit(theirs_text, dim=-1).numpy(), atol=1e-5)
    # A text's embedding does not depend on what it is batched with (its padding).
    alone = run_batched(text_encoder, tokenizer, TEXTS[:1], SETTINGS.max_length)
    assert np.allclose(alone[0], text[0], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_texts_longer_than_the_position_table_keep_their_end_token(
    folders: dict[str, Path], kind: str
) -> None:
    """max_length beyond the text tower's 16 positions: the first 15 tokens and the end
    token (CLIP pools there), as the tokenizer would truncate at the tower's own length."""
    from transformers import AutoModel

    folder = folders[f"{kind}_pre"]
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer, encoder = family().load(folder, "text", SETTINGS)
    long_text = " ".join(["a photo of a red square"] * 5)
    ours = run_batched(encoder, tokenizer, [long_text, "blue"], max_length=64)
    cut = tokenizer([long_text], truncation=True, max_length=16, return_tensors="pt")
    assert cut["input_ids"][0, -1].item() == tokenizer.eos_token_id
    with torch.no_grad():
        theirs = model.get_text_features(input_ids=cut["input_ids"]).pooler_output
    assert np.allclose(ours[0], torch.nn.functional.normalize(theirs, dim=-1)[0], atol=1e-5)


def test_siglip2_takes_patch_sequences_and_full_length_text(tmp_path: Path) -> None:
    """SigLIP 2 (NaFlex): the image tower is fed flattened patches in its processor's order
    with the grid's shape; texts right-padded to full length, pooled at the last position."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    folder = tiny_clip.build("siglip2", tmp_path / "siglip2")
    assert detect(read_config(folder), files(folder), str(folder)).name == "clip"
    model = AutoModel.from_pretrained(folder).eval()
    spec = family().image_input(folder)
    assert spec.size == 16  # a 4×4 grid of 4-pixel patches: max_num_patches 16
    images, _ = tiny_clip.images(3, seed=4)
    _, encoder = family().load(folder, "image", SETTINGS)
    ours = run_images(encoder, images, spec)
    processed = AutoImageProcessor.from_pretrained(folder)(
        images=[Image.fromarray(image) for image in images], return_tensors="pt"
    )
    _, text_encoder = family().load(folder, "text", SETTINGS)
    ids = torch.tensor([[4, 5, 6, 3, 0, 0], [7, 3, 0, 0, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[4], [2]])).long()
    full = torch.nn.functional.pad(ids, (0, 16 - ids.shape[1]), value=0)
    with torch.no_grad():
        theirs = model.get_image_features(**processed).pooler_output
        ours_text = text_encoder(ids, mask)
        theirs_text = model.get_text_features(input_ids=full).pooler_output
    unit = torch.nn.functional.normalize
    assert np.allclose(ours, unit(theirs, dim=-1).numpy(), atol=1e-5)
    assert torch.allclose(ours_text, unit(theirs_text, dim=-1), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_image_input_is_the_towers_size_and_the_processors_normalisation(
    folders: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    spec = family().image_input(folders[kind])
    assert spec.size == 16 == read_config(folders[kind])["vision_config"]["image_size"]
    assert spec.channels == 3
    expected_mean = tiny_clip.CLIP_MEAN if kind == "clip" else [0.5] * 3
    assert spec.mean == pytest.approx(expected_mean)
    # A processor that disagrees with the tower's position table: the tower's size wins (any
    # other size would not run), and without a processor file the layout's defaults apply.
    odd = tmp_path / "odd"
    odd.mkdir()
    for name in files(folders[kind]):
        (odd / name).write_bytes((folders[kind] / name).read_bytes())
    processor = json.loads((odd / "preprocessor_config.json").read_text())
    processor["crop_size"] = processor["size"] = {"height": 32, "width": 32}
    (odd / "preprocessor_config.json").write_text(json.dumps(processor))
    assert family().image_input(odd).size == 16
    (odd / "preprocessor_config.json").unlink()
    assert family().image_input(odd).mean == pytest.approx(expected_mean)
    _, encoder = family().load(odd, "image", SETTINGS)
    images, _ = tiny_clip.images(2, seed=0)
    assert run_images(encoder, images, family().image_input(odd)).shape[0] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_are_the_towers_layers(folders: dict[str, Path], kind: str) -> None:
    for modality in ("image", "text"):
        _, encoder = family().load(folders[kind], modality, SETTINGS)
        blocks = encoder.blocks()
        assert len(blocks) == 2
        body_ids = {id(m) for m in encoder.body.modules()}
        assert all(id(b) in body_ids and hasattr(b, "self_attn") for b in blocks)


# ---- the tower trained alone, saved whole ------------------------------------------------


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("modality", ["image", "text"])
def test_lora_wraps_only_the_chosen_tower_and_save_writes_the_whole_model(
    folders: dict[str, Path], kind: str, modality: str, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    source = folders[kind]
    processor, encoder = family().load(source, modality, SETTINGS)
    targets = family().capabilities(modality, read_config(source)).lora_targets
    encoder.body = get_peft_model(
        encoder.body, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets))
    )
    wrapped = [n for n, m in encoder.body.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 2 * 2  # q_proj and v_proj of the tower's two layers, nothing else
    assert all(n.endswith(("q_proj", "v_proj")) for n in wrapped)
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in n for n in trainable)
    with pytest.raises(BackboneError, match="merge them"):
        family().save(encoder, processor, source, tmp_path / "unmerged")
    # One step that moves the adapters, then merged as the LoRA strategy does.
    optimiser = torch.optim.SGD([p for p in encoder.parameters() if p.requires_grad], lr=1.0)
    for module in encoder.body.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    encoder.train()
    if modality == "image":
        images, _ = tiny_clip.images(4, seed=1)
        outputs = encoder(tiny_clip.pixels(images, [0.5] * 3, [0.5] * 3))
    else:
        ids = processor(TEXTS, padding=True, return_tensors="pt")
        outputs = encoder(ids["input_ids"], ids["attention_mask"])
    outputs.sum().backward()
    optimiser.step()
    encoder.body = encoder.body.merge_and_unload()
    encoder.eval()
    target = tmp_path / "saved"
    family().save(encoder, processor, source, target)

    # A complete dual-encoder folder the family detects and loads for both modalities.
    names = set(files(target))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "preprocessor_config.json" in names
    assert detect(read_config(target), files(target), str(target)).name == "clip"
    before, after = tensors(source), tensors(target)
    assert before.keys() == after.keys()
    tower = "vision_model." if modality == "image" else "text_model."
    projection = "visual_projection." if modality == "image" else "text_projection."
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the trained tower's weights were not written"
    assert all(k.startswith((tower, projection)) for k in changed)
    assert any("q_proj" in k for k in changed)
    assert any("v_proj" in k for k in changed)

    images, _ = tiny_clip.images(5, seed=9)
    tokenizer_source, text_source = family().load(source, "text", SETTINGS)
    _, image_source = family().load(source, "image", SETTINGS)
    tokenizer_saved, text_saved = family().load(target, "text", SETTINGS)
    _, image_saved = family().load(target, "image", SETTINGS)
    spec = family().image_input(target)
    assert spec == family().image_input(source)
    image_old = run_images(image_source, images, spec)
    image_new = run_images(image_saved, images, spec)
    text_old = run_batched(text_source, tokenizer_source, TEXTS, 32)
    text_new = run_batched(text_saved, tokenizer_saved, TEXTS, 32)
    trained = run_images(encoder, images, spec) if modality == "image" else None
    if modality == "image":
        assert np.allclose(image_new, trained, atol=1e-5)  # type: ignore[arg-type]
        assert not np.allclose(image_new, image_old, atol=1e-3)
        assert np.array_equal(text_new, text_old)
    else:
        trained_text = run_batched(encoder, processor, TEXTS, 32)
        assert np.allclose(text_new, trained_text, atol=1e-5)
        assert not np.allclose(text_new, text_old, atol=1e-3)
        assert np.array_equal(image_new, image_old)


@pytest.mark.parametrize("kind", KINDS)
def test_partial_fine_tuning_of_the_image_tower_trains_its_top_block_only(
    folders: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    """The top block of blocks() and what follows it (final norm, pooling head, projection)
    train with a linear head; the embeddings and the lower block stay as they were, and the
    saved folder holds exactly those changes; the head's accuracy on held-out images rises."""
    source = folders[kind]
    _, encoder = family().load(source, "image", SETTINGS)
    spec = family().image_input(source)
    blocks = encoder.blocks()
    below = {id(p) for block in blocks[:-1] for p in block.parameters()}
    seen_top = False
    top = {id(p) for p in blocks[-1].parameters()}
    for parameter in encoder.body.parameters():
        seen_top = seen_top or id(parameter) in top
        parameter.requires_grad = seen_top and id(parameter) not in below
    head = torch.nn.Linear(encoder.hidden_size, len(tiny_clip.NAMES))
    trained = [p for p in encoder.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW([*trained, *head.parameters()], lr=3e-3)
    images, labels = tiny_clip.images(256, seed=21)
    pixels = tiny_clip.pixels(images, spec.mean, spec.std)
    encoder.train()
    for step in range(40):
        part = slice((step * 32) % 256, (step * 32) % 256 + 32)
        loss = torch.nn.functional.cross_entropy(
            head(encoder(pixels[part])), torch.from_numpy(labels[part])
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    encoder.eval()
    held_out, held_labels = tiny_clip.images(200, seed=22)
    with torch.no_grad():
        logits = head(torch.from_numpy(run_images(encoder, held_out, spec)))
    accuracy = (logits.argmax(1).numpy() == held_labels).mean()
    assert accuracy >= 0.8, accuracy
    family().save(encoder, None, source, tmp_path / "partial")
    before, after = tensors(source), tensors(tmp_path / "partial")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".layers.1." in k for k in changed)
    assert not any(".layers.0." in k or ".embeddings." in k for k in changed)
    assert all(k.startswith(("vision_model.", "visual_projection.")) for k in changed)


def test_random_init_draws_fresh_weights_of_the_same_shape(folders: dict[str, Path]) -> None:
    torch.manual_seed(3)
    _, fresh = family().load(folders["clip_pre"], "image", SETTINGS, random_init=True)
    _, trained = family().load(folders["clip_pre"], "image", SETTINGS)
    shapes = {k: v.shape for k, v in trained.body.state_dict().items()}
    assert {k: v.shape for k, v in fresh.body.state_dict().items()} == shapes
    weight = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(fresh.body.state_dict()[weight], trained.body.state_dict()[weight])


# ---- learning: a probe on the image tower, zero-shot from prompts ------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_probe_on_frozen_image_features(folders: dict[str, Path], kind: str) -> None:
    from sklearn.linear_model import LogisticRegression

    folder = folders[kind]  # random weights: the features still carry the colour
    _, encoder = family().load(folder, "image", SETTINGS)
    spec = family().image_input(folder)
    train, train_labels = tiny_clip.images(300, seed=11)
    test, test_labels = tiny_clip.images(300, seed=12)
    probe = LogisticRegression(max_iter=2000, C=10.0)
    probe.fit(run_images(encoder, train, spec), train_labels)
    accuracy = probe.score(run_images(encoder, test, spec), test_labels)
    assert accuracy >= 0.9, accuracy


@pytest.mark.parametrize("kind", KINDS)
def test_zero_shot_image_classification_from_prompts(folders: dict[str, Path], kind: str) -> None:
    """After contrastive pre-training on captions, held-out images are classified from
    prompt templates × label descriptions alone; the same architecture untrained is not."""
    images, labels = tiny_clip.images(400, seed=321)
    trained = (zero_shot_predictions(folders[f"{kind}_pre"], images) == labels).mean()
    untrained = (zero_shot_predictions(folders[kind], images) == labels).mean()
    assert trained >= 0.9, trained
    assert untrained <= 0.45, untrained  # chance is 0.25


# ---- bad inputs --------------------------------------------------------------------------


def test_bad_folders_and_settings_are_refused_in_one_line(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "no_tokenizer"
    broken.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (broken / name).write_bytes((folders["clip"] / name).read_bytes())
    checks = [
        (lambda: family().load(broken, "text", SETTINGS), "no tokenizer files"),
        (
            lambda: family().load(
                folders["clip"], "text", SimpleNamespace(pooling="mean", normalize=False)
            ),
            "backbone.pooling 'mean' does not apply",
        ),
    ]
    (broken / "model.safetensors").unlink()
    checks.append((lambda: family().load(broken, "image", SETTINGS), "without safetensors"))
    from transferkit.backbones.encoder import HFTextEncoder

    bert_like = HFTextEncoder(torch.nn.Linear(2, 2), "mean", False)
    checks.append(
        (lambda: family().save(bert_like, None, folders["clip"], tmp_path / "x"), "cannot save")
    )
    for call, message in checks:
        with pytest.raises(BackboneError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()

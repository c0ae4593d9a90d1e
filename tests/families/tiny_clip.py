"""Tiny random-weight CLIP and SigLIP folders in their real formats, and a learnable
synthetic image task with captions.

A folder is what ``save_pretrained`` writes for the dual model (``config.json``,
``model.safetensors``), a fast tokenizer built offline with the ``tokenizers`` library over
the task's words, and the model's own image processor's ``preprocessor_config.json``.

The task: 16×16 images of noisy grey with a square of one of four colours somewhere in it;
the label is the square's colour. Captions name the colour in one of several phrasings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 190, 60),
    "blue": (45, 65, 215),
    "yellow": (225, 215, 40),
}
NAMES = list(COLOURS)
CAPTION_TEMPLATES = (
    "a {} square",
    "a photo of a {} square",
    "a {} block on grey",
    "{}",
    "the square is {}",
    "a small {} patch",
)
FILLER = ("image", "picture", "of", "the", "a", "an", "thing", "shape")
SIZE = 16
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
TEXT_POSITIONS = 16
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LEARNING_RATE = 3e-3


def images(
    count: int, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [count, 16, 16, 3] and their labels (index into NAMES): the labels given,
    or balanced and shuffled."""
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = np.arange(count) % len(NAMES)
        rng.shuffle(labels)
    out = rng.integers(70, 170, size=(count, SIZE, SIZE, 3)).astype(np.int16)
    for row, label in enumerate(labels):
        side = int(rng.integers(6, 11))
        top, left = rng.integers(0, SIZE - side + 1, size=2)
        colour = np.array(COLOURS[NAMES[label]], dtype=np.int16)
        noise = rng.integers(-25, 26, size=(side, side, 3))
        out[row, top : top + side, left : left + side] = colour + noise
    return np.clip(out, 0, 255).astype(np.uint8), labels


def captions(labels: np.ndarray, seed: int) -> list[str]:
    """One caption per label, in a random phrasing."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(CAPTION_TEMPLATES), size=len(labels))
    return [CAPTION_TEMPLATES[p].format(NAMES[y]) for p, y in zip(picks, labels, strict=True)]


def vocabulary() -> list[str]:
    words = {w for t in CAPTION_TEMPLATES for w in t.replace("{}", "").split()}
    words |= set(FILLER) | set(NAMES) | {"photo", "colour", "color"}
    return [*SPECIALS, *sorted(words)]


def tokenizer(model_type: str) -> Any:
    """A word-level fast tokenizer over the task's words: '<bos> words <eos>' for CLIP (it
    pools at the end-of-text token), 'words <eos>' for SigLIP (as its SentencePiece one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = vocab["<bos>"], vocab["<eos>"]
    if model_type == "clip":
        core.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
        )
    else:
        core.post_processor = processors.TemplateProcessing(
            single="$A <eos>", special_tokens=[("<eos>", eos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=TEXT_POSITIONS,
    )


def _towers(vocab_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    ids = {w: i for i, w in enumerate(SPECIALS)}
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": TEXT_POSITIONS,
        "pad_token_id": ids["<pad>"],
        "bos_token_id": ids["<bos>"],
        "eos_token_id": ids["<eos>"],
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": SIZE,
        "patch_size": 4,
        "num_channels": 3,
    }
    return text, vision


def build(model_type: str, target: Path, seed: int = 0) -> Path:
    """A tiny random-weight dual encoder folder: 'clip', 'siglip' or 'siglip2'."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        Siglip2Config,
        Siglip2Model,
        SiglipConfig,
        SiglipModel,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        Siglip2ImageProcessorPil,
    )

    torch.manual_seed(seed)
    tok = tokenizer(model_type)
    text, vision = _towers(len(tok))
    processor: Any
    if model_type == "clip":
        model: Any = CLIPModel(
            CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
        )
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": SIZE},
            crop_size={"height": SIZE, "width": SIZE},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
    elif model_type == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessorPil(
            size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    elif model_type == "siglip2":
        # NaFlex: no fixed image size, a position grid of num_patches resized per image, and
        # a processor that resizes to at most max_num_patches patches.
        del vision["image_size"]
        vision["num_patches"] = (SIZE // vision["patch_size"]) ** 2
        model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
        processor = Siglip2ImageProcessorPil(
            patch_size=vision["patch_size"],
            max_num_patches=vision["num_patches"],
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
    else:
        raise ValueError(model_type)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def pixels(batch: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [N, H, W, C] → normalised float [N, C, H, W] (as the model's processor would)."""
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def pretrain(model_dir: Path, target: Path, steps: int = 200, seed: int = 0) -> Path:
    """Contrastive pre-training on synthetic (image, caption) pairs with the model's own loss
    (``return_loss=True``), its texts fed as its processor feeds them; saved like the source
    (weights, tokenizer, image processor).

    Each batch holds one image of every colour: a caption of the same colour elsewhere in the
    batch would be a false negative (SigLIP's sigmoid loss pushes every such pair apart).
    """
    import shutil

    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    threads = torch.get_num_threads()
    # One thread: a model this small spends more time syncing threads than computing, and
    # on a busy machine far more (measured: 20 ms a step on one, 440 ms on two).
    torch.set_num_threads(1)
    try:
        _train(model, tok, steps, seed)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(target)
    for path in model_dir.iterdir():
        if path.name != "config.json" and not path.name.endswith(".safetensors"):
            shutil.copyfile(path, target / path.name)
    return target


def _train(model: Any, tok: Any, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    siglip = model.config.model_type == "siglip"
    mean, std = (CLIP_MEAN, CLIP_STD) if not siglip else ([0.5] * 3, [0.5] * 3)
    batch = len(NAMES)
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.permutation(batch) for _ in range(steps)])
    data, _ = images(len(labels), seed, labels)
    texts = captions(labels, seed + 1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    model.train()
    for step in range(steps):
        part = slice(step * batch, (step + 1) * batch)
        if siglip:  # SigLIP's processor: padding="max_length", ids only
            encoded = tok(texts[part], padding="max_length", return_tensors="pt")
            inputs = {"input_ids": encoded["input_ids"]}
        else:
            encoded = tok(texts[part], padding=True, return_tensors="pt")
            inputs = {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
            }
        loss = model(**inputs, pixel_values=pixels(data[part], mean, std), return_loss=True).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

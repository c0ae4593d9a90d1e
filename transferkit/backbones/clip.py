"""CLIP-style dual encoders: CLIP, SigLIP and SigLIP 2 (a text tower and an image tower
trained contrastively into one embedding space).

Each modality is served by its own tower: ``load(…, "image")`` gives the image tower with its
projection (what ``get_image_features`` returns), ``load(…, "text")`` the text tower with its
projection (``get_text_features``). The encoder's ``body`` is that tower alone, so LoRA,
partial freezing and full fine-tuning touch only the tower being trained; ``save`` writes the
whole dual-encoder folder again (the untouched tower from the source, the trained one new), so
a fine-tuned image tower still has its text tower for zero-shot prompts.

Zero-shot image classification is CLIP's recipe: prompt templates × label descriptions are
embedded by the text tower (``prompt_encoder``), averaged and normalised into one prototype per
label in the image-embedding space, and images are classified by cosine similarity.

The text towers pool as their checkpoints were trained: CLIP at the end-of-text token (any
padding), SigLIP at the last position after padding to the tokenizer's full length with no
attention mask (its ``padding="max_length"``). Both are what ``get_text_features`` computes
given the inputs the model's own processor makes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit import storage
from transferkit.backbones.base import (
    Capabilities,
    Encoder,
    Family,
    Settings,
    model_types,
    read_config,
    register,
)
from transferkit.backbones.encoder import has_tokenizer, text_blocks
from transferkit.backbones.images import ImageInput
from transferkit.errors import BackboneError

log = logging.getLogger(__name__)

# What ``default_pooling`` reports: the tower's own pooled, projected embedding (no token
# pooling of ours), L2-normalised so cosine similarity is a dot product.
POOLING = "projection"
LORA_TARGETS = ("q_proj", "v_proj")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Layout:
    """Where a dual encoder keeps its towers, and how its text and images are fed."""

    vision: str  # attribute of the tower models on the full model
    text: str
    vision_projection: str | None  # a separate projection after the tower (CLIP), or None
    text_projection: str | None
    pad_text_to_max: bool  # SigLIP: pad to max positions, no attention mask, last position
    patches: bool  # SigLIP 2: the vision tower takes patch sequences, not images
    mean: tuple[float, ...]  # normalisation when the folder has no preprocessor_config.json
    std: tuple[float, ...]


CLIP_LAYOUT = Layout(
    "vision_model", "text_model", "visual_projection", "text_projection", False, False,
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
)  # fmt: skip
SIGLIP_LAYOUT = Layout(
    "vision_model", "text_model", None, None, True, False, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
)
LAYOUTS = {
    "clip": CLIP_LAYOUT,
    "siglip": SIGLIP_LAYOUT,
    "siglip2": Layout(
        "vision_model", "text_model", None, None, True, True, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    ),
}


def known_model_types() -> dict[str, Layout]:
    """The dual-encoder model types this transformers build knows and this family handles."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return {t: layout for t, layout in LAYOUTS.items() if t in CONFIG_MAPPING_NAMES}


def layout_of(hf_config: dict[str, Any], source: str) -> Layout:
    """The layout of a dual-encoder config.

    Raises:
        BackboneError: not a dual encoder this family knows.
    """
    model_type, _ = model_types(hf_config)
    known = known_model_types()
    if model_type not in known:
        raise BackboneError(
            f"{source}: model_type '{model_type or 'none'}' is not a CLIP-style dual encoder "
            f"known here ({', '.join(known)}); set backbone.family to the family it belongs to"
        )
    return known[model_type]


def tower_of(model: nn.Module, layout: Layout, modality: str) -> nn.Module:
    """The model giving ``modality``'s embeddings: the tower, or for CLIP the library's own
    ``…ModelWithProjection`` made of the tower and its projection (a PreTrainedModel LoRA can
    wrap, with the full model's parameter names).

    It shares its parameters with ``model``: loading a state into it changes ``model``.
    """
    image = modality == "image"
    name = layout.vision if image else layout.text
    projection = layout.vision_projection if image else layout.text_projection
    tower: nn.Module = getattr(model, name)
    if projection is None:
        return tower
    import copy
    import sys

    prefix = type(model).__name__.removesuffix("Model")
    kind = "Vision" if image else "Text"
    wrapper_class = getattr(
        sys.modules[type(model).__module__], f"{prefix}{kind}ModelWithProjection"
    )
    config = copy.deepcopy(getattr(model.config, f"{kind.lower()}_config"))
    config.projection_dim = model.config.projection_dim  # type: ignore[union-attr]
    with torch.device("meta"):  # its own modules are replaced at once: never initialised
        wrapper = wrapper_class(config)
    setattr(wrapper, name, tower)
    setattr(wrapper, projection, getattr(model, projection))
    return wrapper.eval()


def embedding_width(model: nn.Module, layout: Layout, modality: str) -> int:
    """Width of the projected embeddings (the shared space)."""
    projection = layout.vision_projection if modality == "image" else layout.text_projection
    if projection:
        return int(getattr(model, projection).out_features)
    tower = getattr(model, layout.vision if modality == "image" else layout.text)
    head = getattr(tower, "head", None)
    if isinstance(head, nn.Linear):  # SigLIP's text head
        return int(head.out_features)
    return int(tower.config.hidden_size)


class DualTowerEncoder(Encoder):
    """One tower of a dual encoder: its projected embedding, optionally L2-normalised."""

    def __init__(
        self, body: nn.Module, modality: str, width: int, normalize: bool, layout: Layout
    ) -> None:
        super().__init__()
        self.body = body
        self.modality = modality
        self.width = width
        self.normalize = normalize
        self.layout = layout

    @property
    def hidden_size(self) -> int:
        return self.width

    def blocks(self) -> list[nn.Module]:
        return text_blocks(self.body)

    def embed(self, out: Any) -> torch.Tensor:
        vectors = next(
            getattr(out, name)
            for name in ("image_embeds", "text_embeds", "pooler_output")
            if getattr(out, name, None) is not None
        ).float()
        return nn.functional.normalize(vectors, dim=-1) if self.normalize else vectors


class DualImageEncoder(DualTowerEncoder):
    """The image tower: normalised pixels [B, C, H, W] → projected image embeddings."""

    def __init__(
        self, body: nn.Module, width: int, normalize: bool, layout: Layout, patch_size: int
    ) -> None:
        super().__init__(body, "image", width, normalize, layout)
        self.patch_size = patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.layout.patches:
            return self.embed(self.body(pixel_values=pixels))
        # SigLIP 2 takes the image as a sequence of flattened patches (row-major, each patch
        # as P×P×C values: its processor's order), with the grid's shape and a patch mask.
        batch, channels, height, width = pixels.shape
        p = self.patch_size
        rows, cols = height // p, width // p
        patches = (
            pixels[:, :, : rows * p, : cols * p]
            .reshape(batch, channels, rows, p, cols, p)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(batch, rows * cols, p * p * channels)
        )
        shapes = torch.tensor([[rows, cols]] * batch, device=pixels.device)
        mask = torch.ones(batch, rows * cols, dtype=torch.long, device=pixels.device)
        return self.embed(
            self.body(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        )


class DualTextEncoder(DualTowerEncoder):
    """The text tower: right-padded ``(input_ids, attention_mask)`` → projected embeddings."""

    def __init__(
        self,
        body: nn.Module,
        width: int,
        normalize: bool,
        layout: Layout,
        positions: int,
        pad_id: int,
    ) -> None:
        super().__init__(body, "text", width, normalize, layout)
        self.positions = positions
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(dim=1)
        if input_ids.shape[1] > self.positions:
            # Longer than the position table: keep the first tokens and the last real one
            # (the end-of-text token CLIP pools at).
            last = input_ids[torch.arange(len(input_ids)), (lengths - 1).clamp(min=0)]
            input_ids = input_ids[:, : self.positions].clone()
            attention_mask = attention_mask[:, : self.positions]
            cut = lengths > self.positions
            input_ids[cut, self.positions - 1] = last[cut]
        if not self.layout.pad_text_to_max:
            return self.embed(self.body(input_ids=input_ids, attention_mask=attention_mask))
        # SigLIP was trained on texts padded to the full length, attending to the padding and
        # pooling at the last position: feed it exactly that, whatever the batch's padding.
        ids = input_ids.masked_fill(attention_mask == 0, self.pad_id)
        ids = nn.functional.pad(ids, (0, self.positions - ids.shape[1]), value=self.pad_id)
        return self.embed(self.body(input_ids=ids))


def load_dual(model_dir: Path, random_init: bool) -> Any:
    """The whole dual encoder, fp32 master weights, offline, safetensors only."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if random_init:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        return AutoModel.from_config(config, dtype=torch.float32)
    if not any(model_dir.glob("*.safetensors")):
        raise BackboneError(
            f"{model_dir}: a dual encoder folder without safetensors weights; save the model "
            "with save_pretrained (safetensors) into it"
        )
    return AutoModel.from_pretrained(
        model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32
    )


# Files save_pretrained writes anew (the weights and the config) are not copied from the source.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")


class DualEncoderFamily(Family):
    """CLIP-style dual encoders: the image tower for image tasks (probe, partial, LoRA, full,
    zero-shot from prompts), the text tower for text tasks (also SetFit and zero-shot)."""

    name = "clip"
    title = "CLIP-style dual encoder"
    modalities = ("text", "image")
    priority = 20  # before the generic text and vision families, which would claim its files

    def detect(self, hf_config: dict[str, Any], files: set[str]) -> bool:
        model_type, _ = model_types(hf_config)
        # The cheap tests first: asking transformers which types it knows imports it (~1 s).
        return (
            model_type in LAYOUTS
            and "text_config" in hf_config
            and "vision_config" in hf_config
            and model_type in known_model_types()
        )

    def capabilities(self, modality: str, hf_config: dict[str, Any]) -> Capabilities:
        return Capabilities(
            lora_targets=LORA_TARGETS,
            zero_shot=True,
            contrastive=modality == "text",
            adaptation=None,
        )

    def image_pooling(self) -> tuple[str, bool]:
        # The projected embedding, normalised: what CLIP compares by cosine.
        return "projection", True

    def default_pooling(self, model_dir: Path) -> tuple[str, bool]:
        return POOLING, True

    def load(
        self, model_dir: Path, modality: str, settings: Settings, random_init: bool = False
    ) -> tuple[Any, Encoder]:
        # Images have no token pooling to choose (the fetch record may name it 'image').
        if modality == "text" and settings.pooling not in (POOLING, "auto"):
            raise BackboneError(
                f"backbone.pooling '{settings.pooling}' does not apply to the CLIP-style dual "
                f"encoder at {model_dir} (its embedding is the tower's own projected output); "
                "leave backbone.pooling at 'auto'"
            )
        layout = layout_of(read_config(model_dir), str(model_dir))
        if modality == "text" and not has_tokenizer({p.name for p in model_dir.iterdir()}):
            raise BackboneError(
                f"{model_dir}: the dual encoder has no tokenizer files, so its text tower "
                "cannot be used; add the tokenizer (tokenizer.save_pretrained) to the folder"
            )
        model = load_dual(model_dir, random_init)
        width = embedding_width(model, layout, modality)
        body = tower_of(model, layout, modality)
        if modality == "image":
            patch_size = int(getattr(model.config.vision_config, "patch_size", 1))
            encoder = DualImageEncoder(body, width, settings.normalize, layout, patch_size)
            return None, encoder.eval()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        positions = int(model.config.text_config.max_position_embeddings)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        text = DualTextEncoder(body, width, settings.normalize, layout, positions, int(pad_id))
        return tokenizer, text.eval()

    def prompt_encoder(
        self, model_dir: Path, modality: str, settings: Settings
    ) -> tuple[Any, Encoder]:
        # Prompts go through the text tower whatever the modality classified: its projected
        # space is the image tower's. Prototypes are compared by cosine: normalised.
        tokenizer, encoder = self.load(model_dir, "text", settings)
        assert isinstance(encoder, DualTextEncoder)
        encoder.normalize = True
        return tokenizer, encoder

    def image_input(self, model_dir: Path) -> ImageInput:
        """The vision tower's own input size (its position table is built for it), the
        processor's normalisation (the layout's defaults when the folder has none)."""
        config = read_config(model_dir)
        layout = layout_of(config, str(model_dir))
        vision = config.get("vision_config") or {}
        processor = read_json(model_dir / "preprocessor_config.json")
        channels = int(vision.get("num_channels", 3))
        if layout.patches:
            # SigLIP 2 resizes to at most max_num_patches patches: a square grid of them.
            patch = int(vision.get("patch_size", 16))
            grid = int(int(processor.get("max_num_patches", vision.get("num_patches", 256))) ** 0.5)
            size = grid * patch
        else:
            size = int(vision.get("image_size", 224))
            stated = processor_size(processor)
            if stated is not None and stated != size:
                log.warning(
                    "%s: preprocessor_config.json crops to %d px but the vision tower is built "
                    "for %d px; using %d",
                    model_dir,
                    stated,
                    size,
                    size,
                )
        mean = processor.get("image_mean") or list(layout.mean)
        std = processor.get("image_std") or list(layout.std)
        return ImageInput(size=size, channels=channels, mean=list(mean), std=list(std))

    def save(self, encoder: Encoder, processor: Any, source_dir: Path, target: Path) -> None:
        """The whole dual encoder: the source's other tower, this tower's new weights, the
        source's tokenizer and image-processor files (the tokenizer given, if any)."""
        if not isinstance(encoder, DualTowerEncoder):
            raise BackboneError(
                f"the clip family cannot save a {type(encoder).__name__}; save it with its own "
                "family"
            )
        if hasattr(encoder.body, "peft_config"):
            raise BackboneError(
                "the encoder still holds LoRA adapters; merge them (merge_and_unload) before saving"
            )
        layout = layout_of(read_config(source_dir), str(source_dir))
        model = load_dual(source_dir, random_init=False)
        tower = tower_of(model, layout, encoder.modality)
        tower.load_state_dict(encoder.body.state_dict(), strict=True)
        model.save_pretrained(target)
        if processor is not None:
            processor.save_pretrained(target)
        for path in sorted(source_dir.iterdir()):
            if (
                path.is_file()
                and not path.name.endswith(WEIGHT_SUFFIXES)
                and not path.name.endswith(".index.json")
                and not (target / path.name).exists()
            ):
                storage.link_or_copy(path, target / path.name)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or an empty mapping when there is none."""
    import json

    if not path.exists():
        return {}
    value = json.loads(path.read_text())
    return value if isinstance(value, dict) else {}


def processor_size(processor: dict[str, Any]) -> int | None:
    """The square size an image processor's config crops or resizes to, if it says one."""
    for key in ("crop_size", "size"):
        value = processor.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            side = value.get("height") or value.get("shortest_edge")
            if side:
                return int(side)
    return None


register(DualEncoderFamily())

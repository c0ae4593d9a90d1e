"""The model-family seam: one small protocol every backbone family implements.

A *family* knows one kind of pre-trained model: how to recognise its folder, load its fp32
master weights and its tokenizer or image processor, embed inputs with the family's right
pooling, list its blocks for partial freezing, name its default LoRA target modules, and say
which domain-adaptation objective and which zero-shot form it supports. A *modality* is the
kind of data a family embeds (``text`` or ``image``); a dual encoder (CLIP) embeds both.

Every other module asks the family (``family_of``) rather than testing which model or data it
has: adding a family is one module in ``transferkit/backbones/`` that calls ``register``.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from torch import nn

from transferkit.errors import BackboneError

log = logging.getLogger(__name__)


class Settings(Protocol):
    """What a family needs to rebuild an encoder: the fetch record or the model card."""

    pooling: str
    normalize: bool
    max_length: int


class Encoder(nn.Module):
    """A backbone body mapping one batch of model inputs to one float32 vector per input.

    ``body`` is the underlying model (a Hugging Face ``PreTrainedModel`` or the CIFAR ResNet):
    it is what LoRA wraps and what is saved.
    """

    body: nn.Module

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """Trainable units bottom to top, for partial fine-tuning (stem or embeddings first
        when they form one); parameters outside them train with the layers they follow."""
        raise NotImplementedError


@dataclass(frozen=True)
class Capabilities:
    """What a family can do with one modality of data."""

    finetune: bool = True  # gradients through the body (full, partial, scratch)
    blocks: bool = True  # a stack of blocks to freeze below (partial)
    lora_targets: tuple[str, ...] = ()  # default LoRA targets; () means no LoRA by default
    lora: bool = True  # LoRA applies (given targets, default or the user's)
    zero_shot: bool = False  # classify from label descriptions alone
    contrastive: bool = False  # SetFit's pair tuning of the encoder (text encoders)
    adaptation: str | None = None  # domain-adaptation objective: 'mlm', 'clm', 'adabn'


class Family:
    """One kind of backbone. Subclasses set the class attributes and override the methods."""

    name: ClassVar[str]
    title: ClassVar[str]  # how errors name one, e.g. "GPT-style decoder"
    modalities: ClassVar[tuple[str, ...]]  # data it embeds: ('text',), ('image',) or both
    # Detection order: lower first. Specific families (CLIP, the CIFAR ResNet) go before the
    # generic ones (any AutoModel text encoder).
    priority: ClassVar[int] = 50

    def detect(self, hf_config: dict[str, Any], files: set[str]) -> bool:
        """Whether a folder with this ``config.json`` and these file names is this family."""
        raise NotImplementedError

    def capabilities(self, modality: str, hf_config: dict[str, Any]) -> Capabilities:
        """What this family can do with ``modality`` data (one of ``self.modalities``)."""
        raise NotImplementedError

    def feature_size(self, hf_config: dict[str, Any], modality: str) -> int:
        """Width of the features this family embeds ``modality`` into (backbone.json)."""
        return config_width(hf_config)

    def examples(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, config.json) of the kinds whose capabilities differ, for the README's
        support matrix; one unnamed kind by default."""
        return [("", {})]

    def default_pooling(self, model_dir: Path) -> tuple[str, bool]:
        """(pooling, normalize) when the config says 'auto' (text modalities)."""
        return "mean", False

    def image_pooling(self) -> tuple[str, bool]:
        """(pooling, normalize) recorded for image features: the family's own head."""
        return "image", False

    def load(
        self,
        model_dir: Path,
        modality: str,
        settings: Settings,
        random_init: bool = False,
    ) -> tuple[Any, Encoder]:
        """The processor (tokenizer for text, None for images) and the encoder, fp32, CPU.

        Args:
            random_init: the same architecture with fresh weights (the scratch control);
                draws from torch's global generator, so seed it first.
        """
        raise NotImplementedError

    def prompt_encoder(
        self, model_dir: Path, modality: str, settings: Settings
    ) -> tuple[Any, Encoder]:
        """Tokenizer and a text encoder whose vectors share the space of ``modality``'s
        features, for zero-shot prototypes. Only called where ``capabilities`` says
        ``zero_shot``."""
        raise NotImplementedError

    def image_input(self, model_dir: Path) -> Any:
        """The ``ImageInput`` an image modality expects (size, channels, mean, std)."""
        raise NotImplementedError

    def save(self, encoder: Encoder, processor: Any, source_dir: Path, target: Path) -> None:
        """Write a trained encoder as a backbone folder that ``load`` reads back."""
        encoder.body.save_pretrained(target)  # type: ignore[operator]
        if processor is not None:
            processor.save_pretrained(target)
        copy_processor_files(source_dir, target)


def config_width(hf_config: dict[str, Any]) -> int:
    """Width of the features: transformers' hidden_size (n_embd in GPT-2, d_model in OPT),
    ResNets' last stage width, a dual encoder's projection."""
    value = hf_config.get("hidden_size") or hf_config.get("d_model") or hf_config.get("n_embd")
    if not value and hf_config.get("hidden_sizes"):
        value = hf_config["hidden_sizes"][-1]
    value = value or hf_config.get("projection_dim")
    return int(value or 0)


PROCESSOR_FILES = ("preprocessor_config.json",)


def copy_processor_files(source_dir: Path, target: Path) -> None:
    """The image processor's config beside saved weights (save_pretrained does not write it)."""
    from transferkit import storage

    for name in PROCESSOR_FILES:
        if (source_dir / name).exists() and not (target / name).exists():
            storage.link_or_copy(source_dir / name, target / name)


_FAMILIES: dict[str, Family] = {}
# Modules that register the built-in families, imported on first use (they import torch and
# transformers, which the config validation need not load).
BUILTIN = (
    "transferkit.backbones.clip",
    "transferkit.backbones.resnet_cifar",
    "transferkit.backbones.vision",
    "transferkit.backbones.encoder",
    "transferkit.backbones.decoder",
)


def register(family: Family) -> Family:
    """Make a family known by its name (and to detection)."""
    _FAMILIES[family.name] = family
    return family


def families() -> list[Family]:
    """Every known family, in detection order."""
    for module in BUILTIN:
        importlib.import_module(module)
    return sorted(_FAMILIES.values(), key=lambda f: (f.priority, f.name))


def family_names() -> list[str]:
    """The names ``backbone.family`` accepts."""
    return [f.name for f in families()]


def family_of(name: str) -> Family:
    """The family called ``name``.

    Raises:
        BackboneError: no such family, naming the known ones.
    """
    known = {f.name: f for f in families()}
    if name not in known:
        raise BackboneError(f"backbone.family '{name}' is unknown; use one of {', '.join(known)}")
    return known[name]


def read_config(model_dir: Path) -> dict[str, Any]:
    """A model folder's ``config.json`` (an empty mapping when there is none)."""
    path = model_dir / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def detect(hf_config: dict[str, Any], files: Iterable[str], source: str) -> Family:
    """The family of a model folder, from its ``config.json`` and file names.

    Raises:
        BackboneError: no family recognises it; the message lists the known ones and how to
            choose one with ``backbone.family``.
    """
    names = {Path(f).name for f in files} | set(files)
    for family in families():
        if family.detect(hf_config, names):
            return family
    model_type = hf_config.get("model_type", "none")
    raise BackboneError(
        f"{source}: no model family recognises this folder (model_type '{model_type}'); "
        f"known families: {', '.join(f.name for f in families())} — set backbone.family to "
        "the one it belongs to, or give a folder saved with save_pretrained"
    )


def model_types(hf_config: dict[str, Any]) -> tuple[str, list[str]]:
    """``model_type`` and ``architectures`` of a config (empty when absent)."""
    architectures = hf_config.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = []
    return str(hf_config.get("model_type") or ""), [str(a) for a in architectures]


def folder_family(model_dir: Path, name: str = "") -> Family:
    """The family of a stored backbone or encoder folder: ``name`` when recorded, else
    detected (records written before families had none)."""
    if name:
        return family_of(name)
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    return detect(read_config(model_dir), files, str(model_dir))


def load_folder(
    model_dir: Path, modality: str, settings: Settings | None = None
) -> tuple[Any, Encoder]:
    """Processor and encoder of a stored backbone folder, by its detected family (images need
    no settings; text takes pooling and normalisation from ``settings``)."""
    family = folder_family(model_dir)
    if settings is None:
        pooling, normalize = family.default_pooling(model_dir)
        settings = Defaults(pooling, normalize)
    return family.load(model_dir, modality, settings)


@dataclass
class Defaults:
    pooling: str
    normalize: bool
    max_length: int = 0


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while the caller checks the loading info itself."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def checked_pretrained(model_dir: Path, unused_ok: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """The fp32 ``AutoModel`` of a folder, every weight it needs present.

    transformers reports missing and unused weights in a table and goes on, the missing ones
    left random: here a missing weight is an error (except batch-norm counters and names
    starting with ``unused_ok``, parts the features never read, like BERT's pooler), and
    stored weights the model does not use (a causal LM's ``lm_head``, a classifier's head) a
    log line.

    Raises:
        BackboneError: weights missing, misshapen or unreadable.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModel

    fix = "the folder is incomplete or its config.json is not its weights' — fetch it again"
    try:
        with quiet_transformers():
            body, loading = AutoModel.from_pretrained(
                model_dir,
                local_files_only=True,
                use_safetensors=True,
                dtype=torch.float32,
                output_loading_info=True,
                **kwargs,
            )
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        cause = " ".join(str(exc).split())[:160]
        raise BackboneError(
            f"{model_dir}: its weights do not load ({type(exc).__name__}: {cause}); {fix}"
        ) from None
    missing = sorted(
        k
        for k in loading["missing_keys"]
        if not k.endswith("num_batches_tracked") and not k.startswith(unused_ok or ("\0",))
    )
    if missing:
        raise BackboneError(
            f"{model_dir}: the weights have no {missing[0]} (1 of {len(missing)} missing "
            f"tensors), which would be left random; {fix}"
        )
    unused = sorted(loading["unexpected_keys"])
    if unused:
        log.info(
            "%s: %d stored tensors not used for features (%s …)", model_dir, len(unused), unused[0]
        )
    return body

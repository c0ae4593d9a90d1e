"""fetch_backbone: resolve a pre-trained model, check it and copy it into the pipeline.

Output folder (the KFP ``Model`` artifact)::

    model/          the Hugging Face folder: config.json, *.safetensors, tokenizer files
    backbone.json   source, architecture, parameter count, sha256 of every weight file,
                    the content fingerprint, and the resolved pooling / normalisation
"""

from __future__ import annotations

import difflib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from transferkit import storage
from transferkit.backbones import hub
from transferkit.backbones.base import Family, detect, family_of
from transferkit.backbones.encoder import TOKENIZER_FILES, has_tokenizer
from transferkit.backbones.images import ImageInput
from transferkit.backbones.modality import Modality, modality_of
from transferkit.config import BackboneConfig, PipelineConfig
from transferkit.errors import BackboneError, StorageError

log = logging.getLogger(__name__)

SAFE_WEIGHTS = (".safetensors",)
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".th", ".ckpt", ".pkl")
# Weights for other frameworks are never needed by torch and only cost transfer time.
FOREIGN_WEIGHTS = (".h5", ".msgpack", ".onnx", ".ot", ".tflite", ".gguf")
# Batch-norm statistics are stored beside the weights but are buffers, not parameters.
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class BackboneInfo(BaseModel):
    """Provenance and shape of a fetched backbone (``backbone.json``)."""

    source: str
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    parameters: int
    weights: dict[str, str]
    fingerprint: str
    pooling: str
    normalize: bool
    max_length: int
    converted_from_pickle: bool = False
    seconds: float = 0.0
    modality: str = "text"  # the data it embeds here: 'text' or 'image'
    image: ImageInput | None = None  # what a vision backbone is fed (after config overrides)
    family: str = ""  # transferkit.backbones.base: '' in records written before families
    revision: str | None = None  # the commit an hf:// source resolved to
    files: dict[str, str] = {}  # sha256 of every file of model/


def load_backbone_info(backbone_dir: Path) -> BackboneInfo:
    """Read ``backbone.json`` of a fetched backbone."""
    return BackboneInfo.model_validate_json((backbone_dir / "backbone.json").read_text())


def _select(names: list[str], config: PipelineConfig, uri: str) -> tuple[list[str], bool]:
    """Files to copy, and whether pickle weights must be converted."""
    is_weight = [n for n in names if n.endswith(SAFE_WEIGHTS + PICKLE_WEIGHTS)]
    safe = [n for n in is_weight if n.endswith(SAFE_WEIGHTS)]
    pickles = [n for n in is_weight if n.endswith(PICKLE_WEIGHTS)]
    if "config.json" not in names:
        raise BackboneError(
            f"{uri}: no config.json; backbone.uri must point at a Hugging Face model folder"
        )
    if not safe and not pickles:
        raise BackboneError(
            f"{uri}: no weights (*.safetensors or pytorch_model.bin) in the folder; point "
            "backbone.uri at a complete model"
        )
    if not safe and not config.backbone.allow_pickle:
        raise BackboneError(
            f"{uri}: only pickle weights ({pickles[0]}), which can run code when loaded; "
            "provide safetensors or set backbone.allow_pickle: true to convert them safely"
        )
    keep = [
        n
        for n in names
        if not n.endswith(FOREIGN_WEIGHTS)
        and not (safe and n.endswith(PICKLE_WEIGHTS))
        and not (safe and n.endswith(".bin.index.json"))
    ]
    return keep, not safe


# model_types every transformers release this project accepts (>= 4.46) knows: a folder of one
# of these is checked without importing transformers (2 s of a fetch step that needs no model).
ESTABLISHED_MODEL_TYPES = frozenset(
    {
        "albert", "bert", "camembert", "clip", "convnext", "deberta", "deberta-v2", "dinov2",
        "distilbert", "electra", "gpt2", "gpt_neox", "llama", "mistral", "mpnet", "phi3",
        "qwen2", "resnet", "roberta", "siglip", "swin", "vit", "xlm-roberta",
    }
)  # fmt: skip


def _read_json_files(model_dir: Path, uri: str) -> dict[str, Any]:
    """Parse every JSON file of a fetched model folder (transformers reads them later, at
    extraction, with raw errors) and check that its ``model_type`` is one transformers knows.

    Returns:
        ``config.json``.

    Raises:
        BackboneError: a file that is not UTF-8 JSON (its name and the position), a
            config.json that is not an object, a missing or unknown model_type.
    """
    from transferkit.backbones.resnet_cifar import RESNET_CIFAR

    parsed: dict[str, Any] = {}
    for path in sorted(model_dir.rglob("*.json")):
        rel = path.relative_to(model_dir).as_posix()
        try:
            parsed[rel] = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise BackboneError(
                f"{uri}: {rel} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8 JSON "
                "or fetch the model again"
            ) from None
        except json.JSONDecodeError as exc:
            raise BackboneError(
                f"{uri}: {rel} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                f"{exc.colno}); repair the file or fetch the model again"
            ) from None
    hf_config = parsed.get("config.json")
    if not isinstance(hf_config, dict):
        raise BackboneError(
            f"{uri}: config.json holds a {type(hf_config).__name__}, not an object; it is not "
            "a Hugging Face config — fetch the model again"
        )
    model_type = hf_config.get("model_type")
    if model_type == RESNET_CIFAR:
        return hf_config
    if not isinstance(model_type, str) or not model_type:
        raise BackboneError(
            f"{uri}: config.json has no model_type, so transformers cannot tell the "
            'architecture; add it (e.g. "model_type": "bert") or save the model with '
            "save_pretrained"
        )
    if model_type in ESTABLISHED_MODEL_TYPES:
        return hf_config
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise BackboneError(
            f"{uri}: config.json model_type '{model_type[:80]}' is not known to transformers "
            f"{transformers_version}; {hint}fix the model_type or use a model of a supported "
            "architecture"
        )
    return hf_config


def _convert_pickles(model_dir: Path) -> None:
    """Load pickle weights with weights_only=True and rewrite them as safetensors."""
    import torch
    from safetensors.torch import save_file

    for path in sorted(model_dir.rglob("*")):
        if not path.name.endswith(PICKLE_WEIGHTS):
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BackboneError(
                f"{path.name}: cannot be loaded with weights_only=True "
                f"({type(exc).__name__}); it is not a plain tensor checkpoint"
            ) from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        stem = (
            "model" if path.stem == "pytorch_model" else path.stem.replace("pytorch_model", "model")
        )
        save_file(tensors, model_dir / f"{stem}.safetensors", metadata={"format": "pt"})
        path.unlink()
    index = model_dir / "pytorch_model.bin.index.json"
    if index.exists():
        mapping = json.loads(index.read_text())
        mapping["weight_map"] = {
            k: v.replace("pytorch_model", "model").replace(".bin", ".safetensors")
            for k, v in mapping.get("weight_map", {}).items()
        }
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(mapping))
        index.unlink()


def _inspect_weights(model_dir: Path, uri: str) -> tuple[dict[str, str], int]:
    """sha256 of every weight file and the total parameter count (read from headers)."""
    from safetensors import safe_open

    weights: dict[str, str] = {}
    parameters = 0
    for path in sorted(model_dir.rglob("*.safetensors")):
        rel = path.relative_to(model_dir).as_posix()
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = handle.get_slice(key)
                    if not tensor.get_dtype().startswith(("F", "BF")):
                        continue  # integer buffers (position ids) are not parameters
                    if key.endswith(BUFFERS):
                        continue
                    shape = tensor.get_shape()
                    count = 1
                    for dim in shape:
                        count *= dim
                    parameters += count
        except Exception as exc:
            raise BackboneError(
                f"{uri}: weights file {rel} is unreadable ({type(exc).__name__}); it is "
                "truncated or corrupt — fetch it again"
            ) from None
        weights[rel] = storage.sha256_file(path)
    return weights, parameters


def image_input(declared: ImageInput, backbone: BackboneConfig) -> ImageInput:
    """The backbone's declared input with the config's overrides applied.

    Raises:
        BackboneError: mean/std lengths do not match the channels.
    """
    override = backbone.image
    channels = override.channels or declared.channels
    spec = ImageInput(
        size=override.size or declared.size,
        channels=channels,
        mean=override.mean or declared.mean,
        std=override.std or declared.std,
        flip_average=override.flip_average,
    )
    for key in ("mean", "std"):
        values = getattr(spec, key)
        if len(values) == 1:
            setattr(spec, key, values * channels)
        elif len(values) != channels:
            raise BackboneError(
                f"backbone.image.{key} has {len(values)} values for {channels} input channels; "
                f"give {channels} (or one for all)"
            )
    return spec


def _fetch_checkpoint(config: PipelineConfig, backbone: BackboneConfig, tmp: Path) -> bool:
    """A single checkpoint file → ``tmp/model`` (config.json + model.safetensors).

    With ``backbone.architecture`` set, a torchvision ImageNet ResNet converted to the
    Hugging Face ResNet layout (plus its preprocessor_config.json); unset, a CIFAR ResNet
    whose depth is inferred from its keys.

    Returns whether pickle weights were converted.

    Raises:
        BackboneError: the file is not a state dict, or its tensors do not fit the
            architecture (a torchvision ResNet given without backbone.architecture among them).
    """
    import torch
    from safetensors.torch import load_file, save_file

    from transferkit.backbones import torchvision_resnet
    from transferkit.backbones.resnet_cifar import resnet_cifar_config

    uri = backbone.uri
    is_pickle = uri.lower().endswith(PICKLE_WEIGHTS)
    if is_pickle and not backbone.allow_pickle:
        raise BackboneError(
            f"{uri}: a pickle checkpoint, which can run code when loaded; set "
            "backbone.allow_pickle: true to load it with weights_only=True and convert it to "
            "safetensors"
        )
    path = storage.fetch_file(uri, tmp / "download", config.storage)
    actual = storage.sha256_file(path)
    if backbone.weights_sha256 and actual != backbone.weights_sha256:
        raise BackboneError(
            f"{uri}: sha256 is {actual}, expected {backbone.weights_sha256}; the "
            "file is corrupt or not the model you meant — fetch it again"
        )
    try:
        state: Any = (
            torch.load(path, map_location="cpu", weights_only=True)
            if is_pickle
            else load_file(str(path))
        )
    except Exception as exc:
        raise BackboneError(
            f"{uri}: cannot be read as a tensor checkpoint ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:100]}); it is corrupt or not a state dict"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{uri}: holds a {type(state).__name__}, not a state dict")
    # Checkpoints saved from nn.DataParallel prefix every key with 'module.'.
    tensors = {
        k.removeprefix("module."): v.contiguous()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }
    preprocessor: dict[str, Any] | None = None
    architecture = backbone.architecture
    if architecture:
        hf_config, tensors, preprocessor = torchvision_resnet.convert(tensors, architecture, uri)
    else:
        layout = torchvision_resnet.layout_of(tensors)
        if layout is not None:
            choice = (
                f"backbone.architecture: {layout}"
                if layout in torchvision_resnet.ARCHITECTURES
                else f"backbone.architecture (one of {', '.join(torchvision_resnet.ARCHITECTURES)})"
            )
            raise BackboneError(
                f"{uri}: a torchvision ImageNet ResNet checkpoint (layer4, fc; {layout} layout), "
                f"not a CIFAR ResNet; set {choice} to convert it to the Hugging Face ResNet layout"
            )
        hf_config = resnet_cifar_config(tensors, uri)
    model_dir = tmp / "model"
    model_dir.mkdir()
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    storage.write_json(model_dir / "config.json", hf_config)
    if preprocessor is not None:
        storage.write_json(model_dir / "preprocessor_config.json", preprocessor)
    storage.write_json(
        model_dir / "source.json",
        {
            "uri": uri,
            "sha256": actual,
            "converted_from_pickle": is_pickle,
            # Only for conversions: a CIFAR ResNet's folder (and fingerprint) stays as before.
            **({"torchvision_architecture": architecture} if architecture else {}),
        },
    )
    shutil.rmtree(tmp / "download", ignore_errors=True)  # an S3 download; local files stay
    return is_pickle


def fetch_backbone(
    config: PipelineConfig,
    output_dir: Path,
    dataset_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> BackboneInfo:
    """Copy the configured backbone into ``output_dir`` and record its provenance.

    With ``backbone_selection`` set, every candidate is fetched and ranked by LogME on the
    training data (``transferkit.ranking.rank_backbones``) and the best one is kept, with
    ``ranking.json`` beside ``backbone.json``.

    Args:
        config: the run configuration (``backbone`` and ``storage`` are used).
        output_dir: folder to create atomically.
        dataset_dir: the ingest_data artifact; needed only to rank candidates.
        cache_dir: a shared folder caching backbones fetched from S3 (see
            ``storage.fetch_tree_cached``); None: no cache.

    Returns:
        Architecture, parameter count, weight hashes and the content fingerprint.

    Raises:
        BackboneError: not a model folder, no weights, pickle weights without opt-in,
            corrupt weights or a sha256 mismatch.
        StorageError: the URI cannot be read.
    """
    if config.backbone_selection is not None:
        from transferkit.ranking import rank_backbones

        if dataset_dir is None:
            raise BackboneError(
                "backbone_selection ranks candidates on the training data, but no dataset "
                "was given; run it inside the pipeline"
            )
        rank_backbones(config, dataset_dir, output_dir, _fetch_candidate)
        return load_backbone_info(output_dir)
    started = time.perf_counter()
    uri = config.backbone.uri
    if hub.is_hub_uri(uri):
        with tempfile.TemporaryDirectory(prefix="transferkit-hub-") as scratch:
            got = hub.fetch_hub(uri, Path(scratch), cache_dir, lambda n: _select(n, config, uri)[0])
            return _fetch_one(config, output_dir, None, started, uri, str(got.folder), got.commit)
    if uri.lower().endswith(storage.ARCHIVES):
        # A packed model folder (a .tar.gz from a training job, a .zip from a hub export):
        # unpacked safely into scratch, then fetched from there like any folder.
        with tempfile.TemporaryDirectory(prefix="transferkit-archive-") as scratch:
            unpacked = _unpack(uri, Path(scratch), config)
            return _fetch_one(config, output_dir, None, started, uri, str(unpacked))
    return _fetch_one(config, output_dir, cache_dir, started, uri, uri)


def _fetch_candidate(config: PipelineConfig, output_dir: Path) -> BackboneInfo:
    """fetch_backbone of one candidate of a backbone selection."""
    return fetch_backbone(config, output_dir)


def _unpack(uri: str, scratch: Path, config: PipelineConfig) -> Path:
    """The model folder inside an archive: its root, or its one top-level folder."""
    try:
        path = storage.fetch_file(uri, scratch / "download", config.storage)
        storage.extract_archive(path, scratch / "unpacked", uri)
    except StorageError as exc:
        raise BackboneError(str(exc)) from None
    entries = [p for p in (scratch / "unpacked").iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return scratch / "unpacked"


def _files(model_dir: Path) -> set[str]:
    """Relative paths of a fetched model folder's files."""
    return {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}


def resolve_family(
    config: PipelineConfig, hf_config: dict[str, Any], files: set[str], uri: str
) -> tuple[Family, Modality]:
    """The backbone's family (``backbone.family`` or detected) and the data's modality, checked
    against each other. The strategy is checked against the family by ``transferkit run`` for
    a local backbone and by training: fetching does not read the strategy, so a new strategy
    re-runs neither the fetch nor the extraction (``transferkit.step_inputs``).

    Raises:
        BackboneError: no family recognises the folder, or it cannot embed the data.
    """
    if config.backbone.family:
        family = family_of(config.backbone.family)
    else:
        family = detect(hf_config, files, uri)
    modality = modality_of(config.data.modality)
    if modality.name not in family.modalities:
        raise BackboneError(
            f"{uri}: a {family.title} backbone embeds {' and '.join(family.modalities)}, but "
            f"data {config.data.uri or config.data.train_uri} holds {modality.noun}; point "
            f"backbone.uri at a model for {modality.noun} (or set backbone.family if the "
            "detected family is wrong)"
        )
    return family, modality


def _fetch_one(
    config: PipelineConfig,
    output_dir: Path,
    cache_dir: Path | None,
    started: float,
    uri: str,
    location: str,
    revision: str | None = None,
) -> BackboneInfo:
    """fetch_backbone of one backbone: ``uri`` is what the config names (messages,
    provenance), ``location`` where its files are read (an unpacked archive's folder, a
    Hub snapshot), ``revision`` the commit a Hub id resolved to."""
    is_file = uri.lower().endswith(SAFE_WEIGHTS + PICKLE_WEIGHTS)
    keep: list[str] = []
    convert = False
    if not is_file:
        try:
            names = storage.list_tree(location, config.storage)
        except StorageError as exc:
            raise BackboneError(str(exc)) from None
        keep, convert = _select(names, config, uri)
        if not has_tokenizer(set(keep)) and "preprocessor_config.json" not in keep:
            raise BackboneError(
                f"{uri}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}) and no image "
                "processor (preprocessor_config.json); save them next to the model "
                "(tokenizer.save_pretrained / image_processor.save_pretrained)"
            )
    with storage.atomic_dir(output_dir) as tmp:
        model_dir = tmp / "model"
        if is_file:
            convert = _fetch_checkpoint(config, config.backbone, tmp)
        else:
            storage.fetch_tree_cached(location, model_dir, keep, config.storage, cache_dir)
        hf_config = _read_json_files(model_dir, uri)
        family, modality = resolve_family(config, hf_config, _files(model_dir), uri)
        if convert and not is_file:
            log.warning("converting pickle weights to safetensors (backbone.allow_pickle)")
            _convert_pickles(model_dir)
        weights, parameters = _inspect_weights(model_dir, uri)
        files: dict[str, str] = {}
        for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(model_dir).as_posix()
            files[rel] = weights.get(rel) or storage.sha256_file(path)
        expected = None if is_file else config.backbone.weights_sha256
        if expected:
            if len(weights) != 1:
                raise BackboneError(
                    f"{uri}: backbone.weights_sha256 needs a single weights file, found "
                    f"{len(weights)}; remove it or merge the shards"
                )
            ((name, actual),) = weights.items()
            if actual != expected:
                raise BackboneError(
                    f"{uri}: sha256 of {name} is {actual}, expected {expected}; the "
                    "file is corrupt or not the model you meant — fetch it again"
                )
        spec = None
        if modality.name == "image":
            spec = image_input(family.image_input(model_dir), config.backbone)
            pooling, normalize = family.image_pooling()
        else:
            default_pooling, default_normalize = family.default_pooling(model_dir)
            pooling = config.backbone.pooling
            pooling = default_pooling if pooling == "auto" else pooling
            setting = config.backbone.normalize
            normalize = default_normalize if setting == "auto" else bool(setting)
        info = BackboneInfo(
            source=uri,
            architecture=(hf_config.get("architectures") or [hf_config.get("model_type", "?")])[0],
            model_type=str(hf_config.get("model_type", "unknown")),
            hidden_size=family.feature_size(hf_config, modality.name),
            num_layers=int(hf_config.get("num_hidden_layers") or hf_config.get("n_layer") or 0),
            parameters=parameters,
            weights=weights,
            fingerprint=storage.sha256_tree(model_dir, known=files),
            pooling=pooling,
            normalize=bool(normalize),
            max_length=0 if spec else config.backbone.max_length,
            converted_from_pickle=convert,
            seconds=round(time.perf_counter() - started, 3),
            modality=modality.name,
            image=spec,
            family=family.name,
            revision=revision,
            files=files,
        )
        storage.write_json(tmp / "backbone.json", info.model_dump())
    log.info(
        "fetched %s (%s, %.1fM parameters, fingerprint %s)",
        uri,
        info.architecture,
        parameters / 1e6,
        info.fingerprint[:12],
    )
    return info

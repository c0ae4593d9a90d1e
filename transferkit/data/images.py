"""Readers for labelled images: MedMNIST-style ``.npz`` arrays, image folders, image CSVs.

Every reader returns ``ImageRows``: a frame with string ``label`` and ``source`` columns (where
each image came from: ``file.npz[train:17]``, a file name) and a uint8 array [N, H, W, C]
aligned with it. Errors are one line naming the file and the fix: undecodable images, mixed
channels or sizes, mismatched array lengths, empty classes.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from transferkit.data.readers import missing_column
from transferkit.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Split names in an npz file, MedMNIST spelling first.
NPZ_SPLITS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}


@dataclass
class ImageRows:
    """Labelled images: ``frame`` (label, source as strings) and ``images`` uint8 [N, H, W, C]."""

    frame: pd.DataFrame
    images: np.ndarray

    def take(self, index: np.ndarray) -> ImageRows:
        """The rows at ``index`` (positions), in that order."""
        return ImageRows(self.frame.iloc[index].reset_index(drop=True), self.images[index])

    def __len__(self) -> int:
        return len(self.frame)


def as_images(array: np.ndarray, where: str) -> np.ndarray:
    """[N, H, W] or [N, H, W, C] (C = 1 or 3) uint8; floats in [0, 1] are scaled to 0..255."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        if array.ndim == 4 and array.shape[1] in (1, 3):
            raise DataError(
                f"{where}: images are channels-first {array.shape}; store them as "
                "[N, H, W, C] (numpy.moveaxis(x, 1, -1))"
            )
        raise DataError(
            f"{where}: expected images [N, H, W] or [N, H, W, 1|3], got shape {array.shape}"
        )
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1 or np.isnan(array).any()):
            raise DataError(
                f"{where}: float images must lie in [0, 1] without NaN; store uint8 0..255"
            )
        return np.round(array * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"{where}: integer pixel values outside 0..255; store uint8")
        return array.astype(np.uint8)
    raise DataError(f"{where}: pixel type {array.dtype} is not an image; store uint8")


def _as_labels(array: np.ndarray, count: int, where: str) -> list[str]:
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(
            f"{where}: labels must be 1-D or N×1 (one label per image), got shape "
            f"{array.shape}; multi-label data is not supported"
        )
    if len(array) != count:
        raise DataError(f"{where}: {len(array)} labels for {count} images; they must match")
    return [str(v.item() if hasattr(v, "item") else v) for v in array]


def read_npz(path: Path, name: str) -> dict[str, ImageRows]:
    """Splits of an npz file: MedMNIST keys (``train_images``, ``val_labels`` …) or one
    ``images``/``labels`` pair (returned as 'all').

    Raises:
        DataError: not an npz, pickled objects, missing keys, mismatched lengths.
    """
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DataError(
            f"{name}: not a readable .npz archive ({' '.join(str(exc).split())[:80]}); "
            "copy it again if it was cut short, or save it with numpy.savez"
        ) from None
    pairs: dict[str, tuple[str, str]] = {}
    for split, spellings in NPZ_SPLITS.items():
        for spelling in spellings:
            if f"{spelling}_images" in keys:
                pairs[split] = (f"{spelling}_images", f"{spelling}_labels")
                break
    if not pairs:
        for images_key, labels_key in (("images", "labels"), ("x", "y"), ("X", "y")):
            if images_key in keys:
                pairs["all"] = (images_key, labels_key)
                break
    if not pairs:
        raise DataError(
            f"{name}: no image arrays (keys: {', '.join(sorted(keys)[:8])}); expected "
            "train_images/train_labels (MedMNIST) or images/labels"
        )
    out: dict[str, ImageRows] = {}
    for split, (images_key, labels_key) in pairs.items():
        where = f"{name}[{images_key}]"
        if labels_key not in keys:
            raise DataError(f"{name}: has {images_key} but no {labels_key}; add the labels")
        try:
            images = as_images(archive[images_key], where)
            labels = _as_labels(archive[labels_key], len(images), f"{name}[{labels_key}]")
        except ValueError as exc:  # object arrays need pickle, which is refused
            raise DataError(
                f"{where}: {' '.join(str(exc).split())[:80]}; store plain numeric arrays"
            ) from None
        prefix = images_key.removesuffix("images").rstrip("_") or "images"
        sources = [f"{PurePosixPath(name).name}[{prefix}:{i}]" for i in range(len(images))]
        out[split] = ImageRows(pd.DataFrame({"label": labels, "source": sources}), images)
    return out


def decode_image(raw: bytes, where: str, mode: str, size: int | None) -> np.ndarray:
    """One encoded image (PNG, JPEG, …) → uint8 [H, W, C].

    Args:
        mode: 'grey' or 'rgb' converts; 'auto' keeps grey as 1 channel and anything else
            (RGB, palette, RGBA) as RGB.
        size: resize to size × size when given.

    Raises:
        DataError: the bytes are not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as opened:
            opened.load()
            grey = mode == "grey" or (
                mode == "auto" and opened.mode in ("L", "I", "I;16", "F", "1")
            )
            image = opened.convert("L" if grey else "RGB")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(
            f"{where}: not a decodable image ({' '.join(str(exc).split())[:80]}); remove or "
            "re-export the file"
        ) from None
    return array[..., None] if array.ndim == 2 else array


def stack_images(arrays: list[np.ndarray], sources: list[str], where: str) -> np.ndarray:
    """Stack decoded images, requiring one shape (size and channels) for all of them.

    Raises:
        DataError: naming the first image that differs from the first one.
    """
    if not arrays:
        raise DataError(f"{where}: no images found; check the path and the file extensions")
    first = arrays[0].shape
    for array, source in zip(arrays, sources, strict=True):
        if array.shape[-1] != first[-1]:
            kinds = {1: "greyscale", 3: "RGB"}
            raise DataError(
                f"{source}: {kinds[array.shape[-1]]} but {sources[0]} is "
                f"{kinds[first[-1]]}; set data.image_mode: grey or rgb to convert them all"
            )
        if array.shape != first:
            raise DataError(
                f"{source}: {array.shape[1]}×{array.shape[0]} pixels but {sources[0]} is "
                f"{first[1]}×{first[0]}; set data.image_size to resize them all"
            )
    return np.stack(arrays)


def read_image_files(
    entries: list[tuple[str, str]],
    read: Callable[[str], bytes],
    where: str,
    mode: str,
    size: int | None,
) -> ImageRows:
    """Decode (relative name, label) entries with ``read(name) → bytes``."""
    arrays = [decode_image(read(rel), f"{where}/{rel}", mode, size) for rel, _ in entries]
    sources = [rel for rel, _ in entries]
    images = stack_images(arrays, [f"{where}/{s}" for s in sources], where)
    frame = pd.DataFrame({"label": [label for _, label in entries], "source": sources})
    return ImageRows(frame, images)


def folder_entries(names: list[str], where: str) -> list[tuple[str, str]]:
    """(relative file, label) pairs of a folder laid out as ``<label>/<image file>``.

    Raises:
        DataError: files outside label folders, or fewer than two label folders.
    """
    entries: list[tuple[str, str]] = []
    for name in names:
        parts = PurePosixPath(name).parts
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        if len(parts) < 2:
            raise DataError(
                f"{where}/{name}: an image outside a label folder; put each image in a "
                "sub-folder named after its label (or use data.format: image_csv)"
            )
        entries.append((name, parts[0]))
    if not entries:
        raise DataError(
            f"{where}: no image files ({', '.join(IMAGE_SUFFIXES[:3])} …) in label "
            "sub-folders; check data.uri"
        )
    skipped = len([n for n in names if not n.lower().endswith(IMAGE_SUFFIXES)])
    if skipped:
        log.info("%s: skipped %d files that are not images", where, skipped)
    return entries


def csv_entries(frame: pd.DataFrame, where: str, image_column: str, label_column: str):
    """(path, label) pairs of an image CSV, with one-line errors for empty cells.

    Raises:
        DataError: a missing column or an empty path or label (with the line).
    """
    for column, key in ((image_column, "image_column"), (label_column, "label_column")):
        if column not in frame.columns:
            raise DataError(missing_column(where, column, frame.columns, f"data.{key}"))
    entries: list[tuple[str, str]] = []
    for line, (path, label) in enumerate(
        zip(frame[image_column], frame[label_column], strict=True), start=2
    ):
        path, label = str(path).strip(), str(label).strip()
        if not path or not label:
            raise DataError(f"{where} line {line}: empty image path or label; fill or remove it")
        entries.append((path, label))
    return entries


def read_unlabelled_npz(path: Path, name: str) -> np.ndarray:
    """Every image array of an npz (``images``, ``train_images``, ``val_images`` …), stacked.

    Raises:
        DataError: no image arrays, or arrays of different image shapes.
    """
    try:
        archive = np.load(path, allow_pickle=False)
        keys = [k for k in archive.files if k == "images" or k.endswith("_images")]
        arrays = [as_images(archive[k], f"{name}[{k}]") for k in sorted(keys)]
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise DataError(
            f"{name}: not a readable .npz archive ({' '.join(str(exc).split())[:80]})"
        ) from None
    if not arrays:
        raise DataError(f"{name}: no image arrays (images or *_images); add them")
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"{name}: image arrays of different shapes {sorted(shapes)}")
    return np.concatenate(arrays)

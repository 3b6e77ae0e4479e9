"""One's own data: images/ and masks/ with matching file stems, split lists or a seeded split ratio."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from model import IGNORE_INDEX
from .base import DatasetError, SegmentationDataset, Transform, identity_lut, labelled_paths, make_lut, read_list, \
    require_dir
from .voc import voc_palette

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
SPLIT_SEED = 0  # fixed, so that train and val built from val_fraction never overlap across runs


def _stems(folder: Path, suffixes: set[str] | None) -> dict[str, Path]:
    """stem -> file for the files in `folder` (optionally only those with the given suffixes); stems must be unique."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and (suffixes is None or path.suffix.lower() in suffixes):
            if path.stem in found:
                raise DatasetError(f"two files with stem '{path.stem}' in {folder}: "
                                   f"{found[path.stem].name}, {path.name}")
            found[path.stem] = path
    return found


def split_names(all_names: list[str], split: str, val_fraction: float) -> list[str]:
    """Deterministic train/val partition of `all_names` (sorted, shuffled with SPLIT_SEED)."""
    if split not in ("train", "val"):
        raise DatasetError(f"folder split '{split}' needs a split list <data_dir>/{split}.txt")
    if not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction must be in (0, 1) without split lists, got {val_fraction}")
    names = sorted(all_names)
    random.Random(SPLIT_SEED).shuffle(names)
    num_val = max(1, round(len(names) * val_fraction))
    chosen = names[:num_val] if split == "val" else names[num_val:]
    if not chosen:
        raise DatasetError(f"val_fraction {val_fraction} leaves no '{split}' images out of {len(names)}")
    return sorted(chosen)


def mask_lut(mask_values: dict[str, int] | None, num_classes: int) -> np.ndarray:
    """Lookup table from stored mask values to classes: `mask_values` (e.g. {"0": 0, "255": 1}) or identity."""
    if mask_values is None:
        return identity_lut(num_classes)
    mapping = {}
    for raw, cls in mask_values.items():
        if not (str(raw).isdigit() and int(raw) < 256):
            raise DatasetError(f"mask_values key {raw!r} is not a pixel value 0..255")
        if not (isinstance(cls, int) and (0 <= cls < num_classes or cls == IGNORE_INDEX)):
            raise DatasetError(f"mask_values[{raw!r}] = {cls!r} is not a class 0..{num_classes - 1} or {IGNORE_INDEX}")
        mapping[int(raw)] = cls
    return make_lut(mapping)


class FolderSegmentation(SegmentationDataset):
    """data_dir/images/<stem>.<ext> with data_dir/masks/<stem>.png; split from data_dir/<split>.txt (one stem per
    line) when present, else from `val_fraction`. A `test` split may have no masks."""

    def __init__(self, root: Path, split: str, transform: Transform, num_classes: int,
                 mask_values: dict[str, int] | None, val_fraction: float, class_names: list[str] | None) -> None:
        require_dir(root, "folder data_dir")
        image_files = _stems(require_dir(root / "images", "folder images directory"), IMAGE_SUFFIXES)
        mask_dir = root / "masks"
        list_path = root / f"{split}.txt"
        if list_path.is_file():
            names = read_list(list_path)
            missing = [n for n in names if n not in image_files]
            if missing:
                raise DatasetError(f"'{missing[0]}' listed in {list_path} has no image in {root / 'images'}")
        else:
            names = split_names(list(image_files), split, val_fraction)
        if not names:
            raise DatasetError(f"no images for split '{split}' in {root}")
        masks = _stems(mask_dir, None) if mask_dir.is_dir() else {}
        labels = labelled_paths(names, lambda n: masks.get(n, mask_dir / f"{n}.png"), list_path if
                                list_path.is_file() else root / "images", optional=split == "test")
        if class_names is not None and len(class_names) != num_classes:
            raise DatasetError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
        self.classes = class_names or [f"class_{i}" for i in range(num_classes)]
        self.palette = voc_palette(num_classes)
        super().__init__(names, [image_files[n] for n in names], labels, mask_lut(mask_values, num_classes), transform)

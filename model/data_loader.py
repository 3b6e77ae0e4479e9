"""Files on disk -> batches for the model: the params this room reads, data set construction, DataLoaders.

    dataset = build_dataset(params, params.train_split, train=True)   # (image 3×H×W float32, label H×W int64)
    loader = build_dataloader(dataset, batch_size, train=True, num_workers=params.num_workers)
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from model.datasets import (IGNORE_INDEX, CamVidSegmentation, CityscapesSegmentation, DatasetError,
                            FolderSegmentation, SyntheticSegmentation, VOCAugSegmentation, VOCSegmentation)
from model.datasets.base import Transform, check_num_classes
from model.transforms import colorize, denormalize, eval_transform, train_transform

__all__ = ["DATA_PARAMS", "DATASETS", "IGNORE_INDEX", "DatasetError", "build_dataset", "build_dataloader",
           "colorize", "denormalize"]

DATA_PARAMS: dict[str, tuple[tuple[type, ...], Any]] = {
    "dataset": ((str,), ...),
    "data_dir": ((str,), ...),
    "num_classes": ((int,), ...),
    "crop_size": ((int,), 512),
    "scale_range": ((list,), [0.5, 2.0]),
    "flip": ((bool,), True),
    "color_jitter": ((float, int), 0.0),
    "num_workers": ((int,), 4),
    "train_split": ((str,), "train"),
    "val_split": ((str,), "val"),
    "mask_values": ((dict, type(None)), None),
    "val_fraction": ((float,), 0.2),
    "class_names": ((list, type(None)), None),
    "synthetic_seed": ((int,), 0),
    "synthetic_image_size": ((int,), 128),
    "synthetic_train_images": ((int,), 1000),
    "synthetic_val_images": ((int,), 100),
}


def _voc(params: Any, split: str, transform: Transform) -> Dataset:
    return VOCSegmentation(Path(params.data_dir), split, transform)


def _voc_aug(params: Any, split: str, transform: Transform) -> Dataset:
    return VOCAugSegmentation(Path(params.data_dir), split, transform)


def _cityscapes(params: Any, split: str, transform: Transform) -> Dataset:
    return CityscapesSegmentation(Path(params.data_dir), split, transform)


def _camvid(params: Any, split: str, transform: Transform) -> Dataset:
    return CamVidSegmentation(Path(params.data_dir), split, transform)


def _folder(params: Any, split: str, transform: Transform) -> Dataset:
    return FolderSegmentation(Path(params.data_dir), split, transform, params.num_classes, params.mask_values,
                              params.val_fraction, params.class_names)


def _synthetic(params: Any, split: str, transform: Transform) -> Dataset:
    length = params.synthetic_train_images if split == "train" else params.synthetic_val_images
    if length < 1 or params.synthetic_image_size < 8:
        raise DatasetError(f"synthetic split '{split}' needs >= 1 image of >= 8 px, got {length} images of "
                           f"{params.synthetic_image_size} px")
    return SyntheticSegmentation(split, transform, params.synthetic_seed, length, params.synthetic_image_size)


DATASETS: dict[str, Callable[[Any, str, Transform], Dataset]] = {
    "voc": _voc, "voc_aug": _voc_aug, "cityscapes": _cityscapes, "camvid": _camvid, "folder": _folder,
    "synthetic": _synthetic,
}


def _get(params: Any, key: str) -> Any:
    """params.<key>, or the DATA_PARAMS default for an optional key (params may be a bare SimpleNamespace)."""
    if hasattr(params, key):
        return getattr(params, key)
    default = DATA_PARAMS[key][1]
    if default is ...:
        raise DatasetError(f"params lacks the required data key '{key}'")
    return default


def _augmentation(p: SimpleNamespace) -> Transform:
    scale = p.scale_range
    if not (len(scale) == 2 and all(isinstance(s, (int, float)) for s in scale) and 0 < scale[0] <= scale[1]):
        raise DatasetError(f"scale_range must be [low, high] with 0 < low <= high, got {scale}")
    if p.crop_size < 1:
        raise DatasetError(f"crop_size must be positive, got {p.crop_size}")
    if p.color_jitter < 0:
        raise DatasetError(f"color_jitter must be >= 0, got {p.color_jitter}")
    return train_transform(p.crop_size, scale, p.flip, float(p.color_jitter))


def build_dataset(params: Any, split: str, train: bool) -> Dataset:
    """The data set `params.dataset` for `split`: augmented fixed-size crops if `train`, else whole images.

    The returned data set has .classes, .palette, .names and .has_labels; its class count must equal
    params.num_classes.
    """
    p = SimpleNamespace(**{key: _get(params, key) for key in DATA_PARAMS})
    if p.dataset not in DATASETS:
        raise DatasetError(f"unknown dataset '{p.dataset}'; choose one of {sorted(DATASETS)}")
    transform = _augmentation(p) if train else eval_transform()
    dataset = DATASETS[p.dataset](p, split, transform)
    check_num_classes(p.dataset, len(dataset.classes), p.num_classes)
    return dataset


def build_dataloader(dataset: Dataset, batch_size: int, sampler: Sampler, num_workers: int,
                     drop_last: bool = False, pin_memory: bool | None = None) -> DataLoader:
    """Batches in the sampler's order; workers persist across epochs; memory is pinned when CUDA is available."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      persistent_workers=num_workers > 0)

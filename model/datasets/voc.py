"""PASCAL VOC 2012 (`voc`) and its SBD-augmented training set (`voc_aug`)."""
from __future__ import annotations

from pathlib import Path

from .base import (DatasetError, SegmentationDataset, Transform, identity_lut, labelled_paths, read_list, require_dir,
                   require_files)

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
TRAIN_AUG_SPLITS = ("train", "train_aug")


def voc_palette(num_colors: int) -> list[tuple[int, int, int]]:
    """The VOC colour map (bit-interleaved class index), also used for data sets without their own colours."""
    palette = []
    for index in range(num_colors):
        rgb, c = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << shift
            c >>= 3
        palette.append(tuple(rgb))
    return palette


class VOCSegmentation(SegmentationDataset):
    """VOCdevkit/VOC2012: JPEGImages/<id>.jpg, <label_dir>/<id>.png palette PNGs, ImageSets/Segmentation/<list>.txt.

    The `test` split may come without labels (has_labels False, labels all 255); other splits need all of them.
    """

    classes = VOC_CLASSES
    palette = voc_palette(len(VOC_CLASSES))

    def __init__(self, root: Path, split: str, transform: Transform, label_dir: str = "SegmentationClass",
                 list_name: str | None = None) -> None:
        require_dir(root, "VOC data_dir", "python data/download.py voc")
        if split == "train_aug" and list_name is None:
            raise DatasetError("dataset 'voc' has no split 'train_aug' (SBD + VOC train is dataset 'voc_aug'): set "
                               "train_split to \"train\", or dataset to \"voc_aug\"")
        list_path = root / "ImageSets" / "Segmentation" / f"{list_name or split}.txt"
        names = read_list(list_path)
        images = [root / "JPEGImages" / f"{name}.jpg" for name in names]
        require_files(images, list_path)
        labels = labelled_paths(names, lambda name: root / label_dir / f"{name}.png", list_path,
                                optional=split == "test")
        super().__init__(names, images, labels, identity_lut(len(self.classes)), transform)


class VOCAugSegmentation(VOCSegmentation):
    """Training on train_aug (SegmentationClassAug/, built by data/build_voc_aug.py); other splits as `voc`."""

    def __init__(self, root: Path, split: str, transform: Transform) -> None:
        if split in TRAIN_AUG_SPLITS:
            aug_list = root / "ImageSets" / "Segmentation" / "train_aug.txt"
            if root.is_dir() and not aug_list.is_file():
                raise DatasetError(f"{aug_list} not found; build it with: python data/download.py sbd && "
                                   f"python -m data.build_voc_aug")
            super().__init__(root, split, transform, label_dir="SegmentationClassAug", list_name="train_aug")
        else:
            super().__init__(root, split, transform)

"""Cityscapes fine annotations: labelIds mapped to the 19 train ids, everything else void."""
from __future__ import annotations

from pathlib import Path

from model import IGNORE_INDEX
from .base import DatasetError, SegmentationDataset, Transform, labelled_paths, make_lut, require_dir

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle"]
CITYSCAPES_PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
                      (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                      (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]
# labelId -> trainId for the 19 evaluated classes; the other ids 0..33 (and 255) are void.
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
             27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_IDS = range(34)
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


class CityscapesSegmentation(SegmentationDataset):
    """leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png with gtFine/<split>/<city>/<stem>_gtFine_labelIds.png."""

    classes = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE

    def __init__(self, root: Path, split: str, transform: Transform) -> None:
        image_dir = require_dir(root / "leftImg8bit" / split, "Cityscapes image folder",
                                "python data/download.py cityscapes (it prints the manual steps)")
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise DatasetError(f"no *{IMAGE_SUFFIX} files in {image_dir}/<city>/")
        names = [f"{p.parent.name}/{p.name[:-len(IMAGE_SUFFIX)]}" for p in images]
        label_dir = root / "gtFine" / split
        labels = labelled_paths(names, lambda name: label_dir / f"{name}{LABEL_SUFFIX}", image_dir,
                                optional=split == "test")
        lut = make_lut({**{i: TRAIN_IDS.get(i, IGNORE_INDEX) for i in LABEL_IDS}, IGNORE_INDEX: IGNORE_INDEX})
        super().__init__(names, images, labels, lut, transform)

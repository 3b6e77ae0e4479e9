"""CamVid in the SegNet tutorial layout: 11 classes, label 11 (void) -> 255."""
from __future__ import annotations

from pathlib import Path

from .base import IGNORE_INDEX, DatasetError, SegmentationDataset, Transform, make_lut, read_list, require_dir, \
    require_files

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist"]
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
CAMVID_VOID = 11


def _resolve(listed: str, root: Path) -> Path:
    """'/SegNet/CamVid/train/x.png' -> root/train/x.png (the list's absolute prefix is the tutorial's machine)."""
    return root.joinpath(*Path(listed).parts[-2:])


class CamVidSegmentation(SegmentationDataset):
    """<split>.txt lines 'IMAGE LABEL' (absolute SegNet paths, resolved under data_dir); a line without LABEL
    (a split with no ground truth) is allowed only if no line has one."""

    classes = CAMVID_CLASSES
    palette = CAMVID_PALETTE

    def __init__(self, root: Path, split: str, transform: Transform) -> None:
        require_dir(root, "CamVid data_dir")
        list_path = root / f"{split}.txt"
        rows = [line.split() for line in read_list(list_path)]
        widths = {len(row) for row in rows}
        if not widths <= {1, 2} or len(widths) != 1:
            raise DatasetError(f"{list_path}: every line must hold 'IMAGE LABEL' (or only IMAGE for all lines)")
        images = [_resolve(row[0], root) for row in rows]
        labels = [_resolve(row[1], root) for row in rows] if widths == {2} else None
        require_files(images + (labels or []), list_path)
        lut = make_lut({**{c: c for c in range(len(CAMVID_CLASSES))}, CAMVID_VOID: IGNORE_INDEX,
                        IGNORE_INDEX: IGNORE_INDEX})
        super().__init__([p.stem for p in images], images, labels, lut, transform)

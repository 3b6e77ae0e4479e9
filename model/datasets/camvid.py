"""CamVid in the SegNet tutorial layout: 11 classes, label 11 (void) -> 255."""
from __future__ import annotations

from pathlib import Path

from model import IGNORE_INDEX
from .base import DatasetError, SegmentationDataset, Transform, is_safe_id, make_lut, read_list, require_dir, \
    require_files

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist"]
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
CAMVID_VOID = 11
SEGNET_LISTS = ("train", "val", "test")  # the SegNet tutorial's split lists, searched for split_sequences


def _resolve(listed: str, root: Path, list_path: Path | str) -> Path:
    """'/SegNet/CamVid/train/x.png' -> root/train/x.png (the list's absolute prefix is the tutorial's machine)."""
    tail = "/".join(Path(listed).parts[-2:])
    if not is_safe_id(tail):
        raise DatasetError(f"{list_path}: {listed!r} does not name a file inside {root} ('..')")
    return root / tail


def sequence_of(frame: str) -> str:
    """The drive a frame belongs to: '0001TP_006690' -> '0001TP', 'Seq05VD_f00000' -> 'Seq05VD'."""
    return frame.split("_")[0]


def _read_rows(list_path: Path) -> list[list[str]]:
    rows = [line.split() for line in read_list(list_path, ids=False)]  # absolute SegNet paths: checked by _resolve
    widths = {len(row) for row in rows}
    if not widths <= {1, 2} or len(widths) != 1:
        raise DatasetError(f"{list_path}: every line must hold 'IMAGE LABEL' (or only IMAGE for all lines)")
    return rows


def _rows_of_sequences(root: Path, split: str, sequences: list[str]) -> tuple[list[list[str]], str]:
    """The labelled frames of every SegNet list whose drive is in `sequences` (each frame once)."""
    lists = [root / f"{name}.txt" for name in SEGNET_LISTS if (root / f"{name}.txt").is_file()]
    rows = {Path(row[0]).stem: row for path in lists for row in _read_rows(path) if len(row) == 2}
    found = sorted({sequence_of(frame) for frame in rows})
    for sequence in sequences:
        if sequence not in found:
            raise DatasetError(f"split_sequences: sequence {sequence!r} of split {split!r} has no labelled frames in "
                               f"{', '.join(p.name for p in lists) or 'any SegNet list'} under {root} "
                               f"(sequences there: {', '.join(found)})")
    return [row for frame, row in sorted(rows.items()) if sequence_of(frame) in sequences], \
        f"the {split!r} sequences {', '.join(sequences)} of {root}"


class CamVidSegmentation(SegmentationDataset):
    """<split>.txt lines 'IMAGE LABEL' (absolute SegNet paths, resolved under data_dir); a line without LABEL
    (a split with no ground truth) is allowed only if no line has one. With `sequences`, the split is instead
    every labelled frame of those drives, from all SegNet lists (a split that shares no drive with another)."""

    classes = CAMVID_CLASSES
    palette = CAMVID_PALETTE

    def __init__(self, root: Path, split: str, transform: Transform, sequences: list[str] | None = None) -> None:
        require_dir(root, "CamVid data_dir", "python data/download.py camvid")
        if sequences is None:
            list_path = root / f"{split}.txt"
            rows = _read_rows(list_path)
        else:
            rows, list_path = _rows_of_sequences(root, split, sequences)
        widths = {len(row) for row in rows}
        images = [_resolve(row[0], root, list_path) for row in rows]
        labels = [_resolve(row[1], root, list_path) for row in rows] if widths == {2} else None
        require_files(images + (labels or []), list_path)
        lut = make_lut({**{c: c for c in range(len(CAMVID_CLASSES))}, CAMVID_VOID: IGNORE_INDEX,
                        IGNORE_INDEX: IGNORE_INDEX})
        super().__init__([p.stem for p in images], images, labels, lut, transform)

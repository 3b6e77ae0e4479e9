"""What every segmentation data set shares: file checks, decoding, label mapping, the (image, label) item."""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from errors import UserError
from model import IGNORE_INDEX

INVALID = -1  # marks raw label values that are neither a class nor void in a label lookup table

Transform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[Tensor, Tensor]]


class DatasetError(UserError):
    """Bad data on disk or a bad data parameter; the message is one line naming the file, key or value."""

    def __init__(self, message: str) -> None:
        super().__init__(_strip_worker_traceback(message))


def _strip_worker_traceback(message: str) -> str:
    """A DataLoader worker re-raises as DatasetError("Caught DatasetError ... Traceback ..."): keep its last line."""
    if not message.startswith("Caught DatasetError"):
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split("DatasetError: ", 1)[-1]


def require_dir(path: Path, what: str, get_it: str | None = None) -> Path:
    """Return `path` if it is a directory, else raise DatasetError naming it (and the command `get_it` that
    downloads it)."""
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}" + (f"; download it with: {get_it}" if get_it else ""))
    return path


def read_list(path: Path, ids: bool = True) -> list[str]:
    """Non-empty, stripped lines of a split list file; with `ids`, each must be a relative name inside the data set
    (no absolute path, no '..'), else DatasetError naming the list, the line and the id."""
    if not path.is_file():
        raise DatasetError(f"split list not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not a name
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"unreadable split list {path}: {err}") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DatasetError(f"split list is empty: {path}")
    for number, line in lines if ids else ():
        if not is_safe_id(line):
            raise DatasetError(f"{path}, line {number}: id {line!r} is not a name inside the data set (an absolute "
                               f"path or '..')")
    return [line for _, line in lines]


def is_safe_id(name: str) -> bool:
    """Whether a listed id is a relative name that stays inside its folder (and so does any output named after it)."""
    path = PurePosixPath(name)
    return bool(path.parts) and not path.is_absolute() and "\0" not in name and ".." not in path.parts


def require_files(paths: Sequence[Path], listed_in: Path | str) -> None:
    """Raise DatasetError naming the first path that is not a file."""
    for path in paths:
        if not path.is_file():
            raise DatasetError(f"file listed in {listed_in} not found: {path}")


def make_lut(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry lookup table: raw value -> class index or IGNORE_INDEX; unmapped values -> INVALID."""
    lut = np.full(256, INVALID, dtype=np.int16)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


def identity_lut(num_classes: int) -> np.ndarray:
    """Labels stored as class indices 0..num_classes-1 with 255 = void."""
    return make_lut({**{c: c for c in range(num_classes)}, IGNORE_INDEX: IGNORE_INDEX})


def read_image(path: Path) -> Tensor:
    """Decode an image file to a uint8 RGB tensor 3×H×W (grayscale is replicated; memory stays H×W×3)."""
    if not path.is_file():  # Image.open would block on a FIFO
        raise DatasetError(f"unreadable image {path}: not a regular file")
    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"unreadable image {path}: {err}") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from an image file's header, or DatasetError naming the file."""
    if not path.is_file():  # Image.open would block on a FIFO
        raise DatasetError(f"unreadable image {path}: not a regular file")
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"unreadable image {path}: {err}") from None


# Label image modes read as the values stored in them: 1-bit (0/1), 8-bit grayscale or palette indices, and 16- or
# 32-bit integers whose values are 0..255. Colour (RGB) and alpha modes are refused: a pixel's class is not its colour.
LABEL_MODES = ("1", "L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I")


def read_label(path: Path, lut: np.ndarray, num_classes: int) -> np.ndarray:
    """Read a single-channel label image as the values it stores (never via RGB: a 1-bit mask reads 0 and 1) and map
    it through `lut` to uint8; other modes, and 16/32-bit values above 255, are a DatasetError naming the file."""
    if not path.is_file():  # Image.open would block on a FIFO
        raise DatasetError(f"unreadable label {path}: not a regular file")
    try:
        with Image.open(path) as img:
            mode = img.mode
            raw = np.array(img) if mode in LABEL_MODES else None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"unreadable label {path}: {err}") from None
    if raw is None:
        raise DatasetError(f"label {path} has mode {mode}; expected stored class values: a palette (P), grayscale "
                           f"(L), 1-bit (1) or 16/32-bit integer (I;16, I) image with values 0..255 (colour masks "
                           f"are refused: convert each colour to its class value first)")
    if raw.dtype not in (np.uint8, bool) and (raw.min() < 0 or raw.max() > 255):  # 16/32-bit integers
        bad = np.unique(raw[(raw < 0) | (raw > 255)])[:5].tolist()
        raise DatasetError(f"label {path} ({mode}) holds value(s) {bad} outside 0..255; store class values "
                           f"0..{num_classes - 1} and {IGNORE_INDEX} (void)")
    raw = raw.astype(np.uint8, copy=False)  # a 1-bit mask's True is 1
    mapped = np.take(lut, raw)
    if mapped.min() == INVALID:
        bad = np.unique(raw[mapped == INVALID])[:5].tolist()
        raise DatasetError(f"label {path} holds value(s) {bad} that are not classes 0..{num_classes - 1} "
                           f"or {IGNORE_INDEX} (void); for your own masks (dataset 'folder') map each stored value "
                           f"to a class with mask_values, e.g. {{\"0\": 0, \"{bad[0]}\": 1}}, or check num_classes")
    return mapped.astype(np.uint8)


class SegmentationDataset(Dataset):
    """Items (image uint8 3×H×W, label uint8 H×W) from image/label file pairs.

    Subclasses fill `classes`, `palette` and call __init__ with the file lists and a label lookup table.
    `label_paths` is None for a split without ground truth (then every label pixel is 255).
    """

    classes: list[str]
    palette: list[tuple[int, int, int]]

    def __init__(self, names: list[str], image_paths: list[Path], label_paths: list[Path] | None,
                 lut: np.ndarray, transform: Transform) -> None:
        self.names = names
        self.image_paths = image_paths
        self.label_paths = label_paths
        self.lut = lut
        self.transform = transform

    @property
    def has_labels(self) -> bool:
        return self.label_paths is not None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = read_image(self.image_paths[index])
        if self.label_paths is None:
            label = torch.full(image.shape[-2:], IGNORE_INDEX, dtype=torch.uint8)
        else:
            path = self.label_paths[index]
            label = torch.from_numpy(read_label(path, self.lut, self.num_classes))
            if tuple(label.shape) != tuple(image.shape[-2:]):
                raise DatasetError(f"label {path} is {label.shape[1]}x{label.shape[0]} but image "
                                   f"{self.image_paths[index]} is {image.shape[2]}x{image.shape[1]} (WxH)")
        return self.transform(tv_tensors.Image(image), tv_tensors.Mask(label))


def check_num_classes(dataset_name: str, expected: int, given: int) -> None:
    """The params' num_classes must equal the data set's own class count."""
    if given != expected:
        raise DatasetError(f"num_classes is {given} but dataset '{dataset_name}' has {expected} classes")


def labelled_paths(names: list[str], label_of: Callable[[str], Path], listed_in: Path | str,
                   optional: bool) -> list[Path] | None:
    """Label paths for `names`; with `optional`, None when none exists (e.g. a test split), else all must exist."""
    paths = [label_of(name) for name in names]
    if optional and not any(p.is_file() for p in paths):
        return None
    require_files(paths, listed_in)
    return paths

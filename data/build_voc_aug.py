"""Build VOC2012/SegmentationClassAug/ and ImageSets/Segmentation/train_aug.txt from SBD (the `voc_aug` data set).

    python -m data.build_voc_aug --voc data/VOCdevkit/VOC2012 --sbd data/benchmark_RELEASE/dataset

train_aug = (SBD train ∪ SBD val ∪ VOC train) − VOC val: 10,582 images with the full data sets. A label is
the official VOC mask where VOC has one (it keeps the 255 void borders), else SBD's cls/<id>.mat
(GTcls.Segmentation, classes 0..20, no void). Written as palette PNGs; the script then re-reads the list and
fails if any VOC val id leaked into it. Exit status 0 done, 2 on bad input (one line on stderr).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

if not __package__:  # run as a file: the repository's modules are importable only from its root
    sys.exit("error: run it from the repository root as a module: python -m data.build_voc_aug ...")

import utils  # noqa: E402
from errors import UserError  # noqa: E402
from model.datasets.base import DatasetError, image_size, is_safe_id  # noqa: E402
from model.datasets.voc import voc_palette  # noqa: E402

NUM_CLASSES = 21


class BuildError(UserError):
    """Bad or inconsistent input; the message is one line naming the file."""


def read_ids(path: Path) -> list[str]:
    """The ids of a split list; one that is not a plain name (an absolute path, '..') is refused, naming the line."""
    if not path.is_file():
        raise BuildError(f"split list not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BuildError(f"unreadable split list {path}: {err}") from None
    ids = []
    for number, line in enumerate(lines, 1):
        if line.strip() and not is_safe_id(line.strip()):
            raise BuildError(f"{path}, line {number}: id {line.strip()!r} is not a name inside the data set "
                             f"(an absolute path or '..')")
        ids += [line.strip()] if line.strip() else []
    return ids


def sbd_label(mat_path: Path) -> np.ndarray:
    """GTcls.Segmentation of an SBD cls/*.mat file as uint8 class indices."""
    try:
        segmentation = scipy.io.loadmat(str(mat_path))["GTcls"][0, 0]["Segmentation"]
    except (OSError, ValueError, KeyError, IndexError, TypeError, scipy.io.matlab.MatReadError) as err:
        raise BuildError(f"cannot read GTcls.Segmentation from {mat_path}: {err}") from None
    if not np.issubdtype(segmentation.dtype, np.integer) or segmentation.size == 0:
        raise BuildError(f"{mat_path}: GTcls.Segmentation is not an integer class map")
    if segmentation.max() >= NUM_CLASSES or segmentation.min() < 0:  # -1 would silently become 255 (void)
        bad = int(segmentation.max() if segmentation.max() >= NUM_CLASSES else segmentation.min())
        raise BuildError(f"{mat_path} holds class {bad}, not one of 0..{NUM_CLASSES - 1}")
    return segmentation.astype(np.uint8)


def build_voc_aug(voc_dir: Path, sbd_dir: Path) -> list[str]:
    """Write the SegmentationClassAug labels and the train_aug list; return the train_aug ids."""
    lists = voc_dir / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_ids(lists / "train.txt"), set(read_ids(lists / "val.txt"))
    sbd_ids = read_ids(sbd_dir / "train.txt") + read_ids(sbd_dir / "val.txt")
    train_aug = sorted((set(sbd_ids) | set(voc_train)) - voc_val)
    out_dir = voc_dir / "SegmentationClassAug"
    out_dir.mkdir(exist_ok=True)
    palette = [c for rgb in voc_palette(256) for c in rgb]
    from_voc = 0
    for name in tqdm(train_aug, desc="SegmentationClassAug", unit="label"):
        image_path = voc_dir / "JPEGImages" / f"{name}.jpg"
        if not image_path.is_file():
            raise BuildError(f"image for train_aug id {name} not found: {image_path}")
        voc_label = voc_dir / "SegmentationClass" / f"{name}.png"
        (out_dir / f"{name}.png").unlink(missing_ok=True)  # a link planted there is replaced, never written through
        if voc_label.is_file():
            shutil.copyfile(voc_label, out_dir / f"{name}.png")
            from_voc += 1
            continue
        label = sbd_label(sbd_dir / "cls" / f"{name}.mat")
        try:
            size = image_size(image_path)
        except DatasetError as err:
            raise BuildError(str(err)) from None
        if size != (label.shape[1], label.shape[0]):
            raise BuildError(f"{sbd_dir / 'cls' / name}.mat is {label.shape[1]}x{label.shape[0]} but "
                             f"{image_path} is {size[0]}x{size[1]}")
        png = Image.fromarray(label)
        png.putpalette(palette)
        png.save(out_dir / f"{name}.png")
    list_path = lists / "train_aug.txt"
    list_path.unlink(missing_ok=True)
    list_path.write_text("\n".join(train_aug) + "\n")
    check_no_leak(list_path, voc_val)
    print(f"train_aug: {len(train_aug)} ids in {list_path} ({from_voc} VOC masks, {len(train_aug) - from_voc} "
          f"from SBD; {len(set(sbd_ids) & voc_val)} SBD ids in VOC val left out)")
    return train_aug


def check_no_leak(list_path: Path, voc_val: set[str]) -> None:
    """Fail if the written training list shares any id with VOC val."""
    leaked = sorted(set(read_ids(list_path)) & voc_val)
    if leaked:
        raise BuildError(f"{list_path} contains {len(leaked)} VOC val ids, e.g. {leaked[0]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voc", type=Path, default=Path(__file__).resolve().parent / "VOCdevkit" / "VOC2012",
                        help="the VOC2012 folder (default: data/VOCdevkit/VOC2012)")
    parser.add_argument("--sbd", type=Path, default=Path(__file__).resolve().parent / "benchmark_RELEASE" / "dataset",
                        help="SBD's dataset folder with cls/, train.txt, val.txt "
                             "(default: data/benchmark_RELEASE/dataset)")
    args = parser.parse_args(argv)
    # OSError: a read-only folder, a full disk
    return utils.run_cli(lambda: build(args.voc, args.sbd))


def build(voc_dir: Path, sbd_dir: Path) -> int:
    build_voc_aug(voc_dir, sbd_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

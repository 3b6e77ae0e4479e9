"""Data-set statistics of an experiment: images per split, image sizes, class pixel shares, absent classes and
median-frequency class weights ready for params.json's `class_weights`.

    python -m data.stats --model_dir experiments/camvid [--data_dir D] [--split train val] [--json stats.json]
    python -m data.stats --model_dir experiments/camvid --browse 8   # also 8 augmented training samples as PNGs

Labels are read straight from their files (no image decoding); generated data sets (synthetic) are iterated.
Exit status 0 done, 2 on bad params or data (one line on stderr).
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

if not __package__:  # run as a file: the repository's modules are importable only from its root
    sys.exit("error: run it from the repository root as a module: python -m data.stats ...")

import settings  # noqa: E402
import utils  # noqa: E402
from model import IGNORE_INDEX, visualize  # noqa: E402
from model.data_loader import DataConfig, EpochSampler, SeededItems, build_dataset  # noqa: E402
from model.datasets.base import SegmentationDataset, image_size, read_label  # noqa: E402


@dataclass
class SplitStats:
    """Counts over one split. Void (255) pixels count in an image's total but in no class."""

    num_classes: int
    labelled: bool = True
    images: int = 0
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    void_pixels: int = 0
    class_pixels: np.ndarray = field(init=False)  # per class
    images_with: np.ndarray = field(init=False)  # per class: images holding at least one pixel of it
    pixels_of_images_with: np.ndarray = field(init=False)  # per class: all pixels (void included) of those images

    def __post_init__(self) -> None:
        self.class_pixels, self.images_with, self.pixels_of_images_with = np.zeros((3, self.num_classes), np.int64)

    def add(self, label: np.ndarray) -> None:
        """Count one label map (H×W class indices, 255 = void)."""
        counts = np.bincount(label.ravel(), minlength=256)
        present = counts[:self.num_classes] > 0
        self.class_pixels += counts[:self.num_classes]
        self.images_with += present
        self.pixels_of_images_with += present * label.size
        self.void_pixels += int(counts[IGNORE_INDEX])

    @property
    def total_pixels(self) -> int:
        return sum(w * h * n for (w, h), n in self.sizes.items())

    def absent(self, classes: Sequence[str]) -> list[str]:
        """The classes with no pixel in this split (none without ground truth)."""
        return [name for name, images in zip(classes, self.images_with) if images == 0] if self.labelled else []

    def record(self, classes: Sequence[str]) -> dict:
        """Every count, for --json."""
        return {"images": self.images, "sizes": [[w, h, n] for (w, h), n in self.sizes.most_common()],
                "labelled": self.labelled, "total_pixels": self.total_pixels, "void_pixels": self.void_pixels,
                "absent_classes": self.absent(classes),
                "classes": {name: {"pixels": int(p), "images": int(i), "pixels_of_images_with": int(t)}
                            for name, p, i, t in zip(classes, self.class_pixels, self.images_with,
                                                     self.pixels_of_images_with)}}


def median_frequency_weights(class_pixels: np.ndarray, pixels_of_images_with: np.ndarray) -> list[float]:
    """Median-frequency balancing (Eigen & Fergus, 2015), as SegNet computed CamVid's weights:
    freq(c) = pixels of class c / all pixels, void included, of the images in which c is present;
    weight(c) = median over the present classes of freq / freq(c). A class absent from the split gets 1.0."""
    present = pixels_of_images_with > 0
    freq = class_pixels[present] / pixels_of_images_with[present]
    weights = np.ones(len(class_pixels))
    weights[present] = np.median(freq) / freq
    return [round(float(w), 4) for w in weights]


def count_split(dataset, num_classes: int, split: str) -> SplitStats:
    """Images, sizes and pixel counts of `split`: labels from their files, or generated items (synthetic)."""
    stats = SplitStats(num_classes, dataset.has_labels)
    for index in tqdm(range(len(dataset)), desc=f"reading {split}", unit="image", leave=False):
        stats.images += 1
        if not stats.labelled:  # no ground truth: only the image's size, from its header
            stats.sizes[image_size(dataset.image_paths[index])] += 1
            continue
        if isinstance(dataset, SegmentationDataset):
            label = read_label(dataset.label_paths[index], dataset.lut, num_classes)
        else:
            label = dataset[index][1].numpy()
        stats.sizes[label.shape[1], label.shape[0]] += 1
        stats.add(label)
    return stats


def image_count(count: int) -> str:
    """'1 image', '367 images'."""
    return f"{count} image" + "s" * (count != 1)


def describe_sizes(sizes: Counter) -> str:
    """'480×360 (367 images)' for a few distinct sizes, else min / median / max of widths and heights."""
    if len(sizes) <= 4:
        return ", ".join(f"{w}×{h} ({image_count(n)})" for (w, h), n in sizes.most_common())
    widths, heights = (np.repeat([s[i] for s in sizes], list(sizes.values())) for i in (0, 1))
    return (f"{len(sizes)} distinct; width min/median/max {widths.min()}/{np.median(widths):g}/{widths.max()}, "
            f"height {heights.min()}/{np.median(heights):g}/{heights.max()}")


def report(split: str, stats: SplitStats, classes: Sequence[str], warn: bool) -> None:
    """Print one split's statistics; with `warn`, absent classes are also a warning on stderr."""
    print(f"\nsplit '{split}': {image_count(stats.images)}; image sizes (W×H): {describe_sizes(stats.sizes)}")
    if not stats.labelled:
        print("  no ground truth")
        return
    total, width = stats.total_pixels, max(map(len, classes)) + 2
    print(f"  {'class':<{width}}{'pixels':>9}{'images':>8}")
    for name, pixels, holding in zip(classes, stats.class_pixels, stats.images_with):
        print(f"  {name:<{width}}{100 * pixels / total:8.3f}%{holding:8d}")
    print(f"  {'void':<{width}}{100 * stats.void_pixels / total:8.3f}%")
    absent = stats.absent(classes)
    print(f"  absent classes: {', '.join(absent) or 'none'}")
    if absent and warn:
        print(f"WARNING: split '{split}' has no pixel of class(es) {', '.join(absent)}", file=sys.stderr)


def browse(params: settings.Params, model_dir: Path, count: int) -> list[Path]:
    """Save the first `count` training samples of epoch 0, augmented as train.py augments them, as PNGs."""
    dataset = build_dataset(params.config(DataConfig), params.num_classes, params.train_split, train=True)
    items, paths = SeededItems(dataset), []
    for number, key in zip(range(count), EpochSampler(len(dataset), 1, params.seed)):
        image, label = items[key]
        picture = visualize.sample_picture(image, label, dataset.palette, dataset.classes)
        paths.append(model_dir / "browse" / f"{number:02d}_{dataset.names[key[0]]}.png")
        utils.write_png(paths[-1], visualize.picture_png(picture))
    return paths


def parse_args(argv: Sequence[str] | None):
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))  # the first sentence
    parser.add_argument("--model_dir", required=True, help="experiment folder holding params.json")
    parser.add_argument("--data_dir", default=None, help="overrides params.json's data_dir")
    parser.add_argument("--split", nargs="+", default=None,
                        help="splits to report (default: train_split val_split); class weights come from the first")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every number to this JSON file")
    parser.add_argument("--browse", type=int, default=0, metavar="N",
                        help="save N augmented training samples (image | label | overlay) in <model_dir>/browse/")
    return parser.parse_args(argv)


def describe_data(args) -> int:
    model_dir = Path(args.model_dir)
    params = settings.load_params(model_dir, {"data_dir": args.data_dir} if args.data_dir else {})
    splits = args.split or [params.train_split, params.val_split]
    print(f"data set '{params.dataset}'" + (f" in {params.data_dir}" if params.dataset != "synthetic" else ""))
    record: dict = {"dataset": params.dataset, "data_dir": params.data_dir, "splits": {}}
    weights = None
    for split in splits:
        dataset = build_dataset(params.config(DataConfig), params.num_classes, split, train=False)
        stats = count_split(dataset, params.num_classes, split)
        report(split, stats, dataset.classes, warn=split in (params.train_split, params.val_split))
        record["splits"][split] = stats.record(dataset.classes)
        if split == splits[0] and stats.labelled:
            weights = median_frequency_weights(stats.class_pixels, stats.pixels_of_images_with)
    if weights is not None:
        record["class_weights"] = {"split": splits[0], "weights": weights}
        print(f"\nclass_weights (median frequency, split {splits[0]}):\n{json.dumps(weights)}")
        if params.class_weights is not None:
            print("(the same as params.json's class_weights)" if params.class_weights == weights else
                  f"(params.json's class_weights differ: {json.dumps(params.class_weights)})")
    if args.json:
        utils.write_json(Path(args.json), record)
        print(f"\nwrote {args.json}")
    if args.browse > 0:
        paths = browse(params, model_dir, args.browse)
        print(f"\nsaved {len(paths)} augmented training samples (image | label | overlay):")
        print("\n".join(f"  {path}" for path in paths))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return utils.run_cli(lambda: describe_data(args))


if __name__ == "__main__":
    sys.exit(main())

"""Training-pipeline throughput (decode + augmentation + collate) in images/s, per DataLoader worker.

    python -m benchmarks.bench_data                                  # generated 500×375 VOC-like JPEGs
    python -m benchmarks.bench_data --voc_dir ../shared/data/voc2012_2007subset/VOCdevkit/VOC2012

Prints, for each worker count, the median over --repeats epochs of images/s in total and per worker
(0 workers: the main process does the work, on one thread like a worker, and counts as one).
"""
from __future__ import annotations

import sys

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import RandomSampler
from PIL import Image, ImageDraw

if not __package__:  # run as a file: the repository's modules are importable only from its root
    sys.exit("error: run it from the repository root as a module: python -m benchmarks.bench_data ...")

from model.data_loader import DataConfig, build_dataloader, build_dataset  # noqa: E402
from model.datasets.voc import voc_palette  # noqa: E402


def make_voc_tree(root: Path, count: int, seed: int = 0) -> Path:
    """A VOC2012-layout folder of `count` natural-looking 500×375 JPEGs (quality 90) with palette-PNG labels."""
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:375, 0:500]
    palette = [c for rgb in voc_palette(256) for c in rgb]
    names = [f"bench_{i:04d}" for i in range(count)]
    for name in names:
        base = rng.uniform(40, 220, 3) + 40 * np.sin(x[..., None] / rng.uniform(20, 90) + rng.uniform(0, 6, 3))
        image = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
        label = Image.new("P", (500, 375), 0)
        label.putpalette(palette)
        draw_image, draw_label = ImageDraw.Draw(image), ImageDraw.Draw(label)
        for _ in range(3):
            x0, y0 = rng.integers(0, 400), rng.integers(0, 300)
            box = [int(x0), int(y0), int(x0 + rng.integers(40, 200)), int(y0 + rng.integers(40, 150))]
            draw_image.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
            draw_label.ellipse(box, fill=int(rng.integers(1, 21)), outline=255, width=5)
        image.save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        label.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
    return root


def images_per_second(voc_dir: Path, workers: int, repeats: int, batch_size: int, crop_size: int) -> list[float]:
    """Per-epoch throughput (after one warm-up epoch that starts the persistent workers)."""
    dataset = build_dataset(DataConfig("voc", str(voc_dir), crop_size=crop_size), 21, "train", train=True)
    loader = build_dataloader(dataset, batch_size, RandomSampler(dataset), num_workers=workers, drop_last=True,
                              pin_memory=False)
    rates = []
    for epoch in range(repeats + 1):
        start, seen = time.perf_counter(), 0
        for images, _ in loader:
            seen += images.shape[0]
        if epoch > 0:
            rates.append(seen / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voc_dir", type=Path, help="a VOC2012 folder to read (default: generate one)")
    parser.add_argument("--images", type=int, default=160, help="images to generate (default 160)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--crop_size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker (and the 0-worker run is then comparable)
    with tempfile.TemporaryDirectory() as tmp:
        voc_dir = args.voc_dir or make_voc_tree(Path(tmp) / "VOC2012", args.images)
        print(f"data: {voc_dir}  crop {args.crop_size}  batch {args.batch_size}  median of {args.repeats} epochs")
        for workers in args.workers:
            rates = images_per_second(voc_dir, workers, args.repeats, args.batch_size, args.crop_size)
            total = statistics.median(rates)
            print(f"workers={workers}: {total:7.1f} images/s total, {total / max(workers, 1):7.1f} images/s per worker "
                  f"(epochs: {', '.join(f'{r:.1f}' for r in rates)})")


if __name__ == "__main__":
    main()

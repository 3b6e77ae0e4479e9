"""Segment one's own images: python predict.py --model_dir experiments/demo [--restore_file best] INPUT... --out DIR

INPUT is an image file, a folder (searched recursively for .jpg/.jpeg/.png/.bmp/.tif/.tiff/.webp) or a quoted glob.
For every image, DIR/labels/<name>.png is the label map (a palette PNG at the image's size: pixel value = class index,
colours = the training set's) and DIR/overlays/<name>.png the image with the prediction blended in and a legend;
<name> is the image's path relative to the folder holding all inputs. An unreadable file is reported on stderr and
skipped; the exit status is then 1 (2 for bad arguments or checkpoints).
"""
from __future__ import annotations

import glob
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

import settings
import utils
from checkpoints import checkpoint_path, load_trained_model
from errors import UserError
from model import visualize
from model.datasets.base import DatasetError, read_image
from model.datasets.folder import IMAGE_SUFFIXES
from model.inference import predict_logits
from terminal import progress_bar

GLOB_CHARS = "*?["


def find_images(inputs: Sequence[str], exclude: Path) -> dict[Path, Path]:
    """Image files -> output names (relative paths ending in .png), in input order.

    Files are taken as given, folders searched recursively (hidden files and anything under `exclude` left out),
    globs expanded; only regular files are read (a FIFO or device given by name is refused, matched by a glob left
    out). Names are paths relative to the deepest folder holding every input, so a/x.jpg and b/x.jpg stay apart;
    x.jpg and x.png in one folder become x.jpg.png and x.png.png. Names that still collide are refused.
    """
    files: list[Path] = []
    roots: list[Path] = []
    for text in inputs:
        pattern = any(c in text for c in GLOB_CHARS) and not Path(text).exists()
        matches = sorted(glob.glob(text, recursive=True)) if pattern else [text]
        if not matches:
            raise UserError(f"{text}: the pattern matches nothing")
        for path in (Path(m).absolute() for m in matches):
            if not path.exists():
                raise UserError(f"{text}: no such file or folder")
            if not (path.is_dir() or path.is_file()):
                if pattern:
                    continue
                raise UserError(f"{text}: not a regular file or folder (a FIFO or device is never read)")
            roots.append(path if path.is_dir() else path.parent)
            files += _folder_images(path, exclude.absolute()) if path.is_dir() else [path]
    files = list(dict.fromkeys(files))
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(inputs)}")
    base = Path(os.path.commonpath(roots))
    stems = [f.relative_to(base).with_suffix(".png") for f in files]
    taken = Counter(stems)
    names = {f: stem if taken[stem] == 1 else stem.with_name(f.name + ".png") for f, stem in zip(files, stems)}
    counts = Counter(names.values())
    clashes = [f for f, name in names.items() if counts[name] > 1]
    if clashes:
        raise UserError(f"{clashes[0]} and {clashes[1]} would both be written as {names[clashes[0]]}; "
                        f"rename one of them or segment them separately")
    return names


def _folder_images(folder: Path, exclude: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts)
                  and exclude not in f.parents)


def size_batches(files: Sequence[Path], batch_size: int) -> tuple[list[list[Path]], list[str]]:
    """Batches of up to batch_size images of one size (read from the file headers), and one error line per file
    that is not a readable image."""
    by_size: dict[tuple[int, int], list[Path]] = {}
    errors = []
    for path in files:
        try:
            if not path.is_file():  # Image.open would block on a FIFO
                raise OSError("not a regular file")
            with Image.open(path) as image:
                by_size.setdefault(image.size, []).append(path)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            errors.append(f"unreadable image {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    return [group[i:i + batch_size] for group in by_size.values() for i in range(0, len(group), batch_size)], errors


def read_images(files: Sequence[Path]) -> tuple[dict[Path, torch.Tensor], list[str]]:
    """Decode files to uint8 RGB 3×H×W tensors (as the data sets do), and one error line per file that fails."""
    images, errors = {}, []
    for path in files:
        try:
            images[path] = read_image(path)
        except DatasetError as err:
            errors.append(str(err))
    return images, errors


def parse_args(argv: Sequence[str] | None):
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or quoted globs")
    parser.add_argument("--out", required=True, metavar="DIR", help="where labels/ and overlays/ are written")
    parser.add_argument("--model_dir", default="experiments/base_model", help="folder holding the checkpoint")
    parser.add_argument("--restore_file", default="best",
                        help="best | last | path to a checkpoint or an export.py weights file")
    parser.add_argument("--tta", action="store_true", help="average over the checkpoint's tta_scales and flips")
    parser.add_argument("--window", type=int, default=None, metavar="N",
                        help="score images larger than N pixels in overlapping N×N windows")
    parser.add_argument("--gaussian", action="store_true",
                        help="with --window: Gaussian-weighted window average (default: the checkpoint's "
                             "gaussian_windows, else uniform)")
    parser.add_argument("--batch_size", type=int, default=4, help="images of one size scored together")
    parser.add_argument("--eval_precision", choices=settings.EVAL_PRECISIONS, default=None,
                        help="what the network computes in (default: the checkpoint's eval_precision, float32 unless "
                             "set; bfloat16/float16 only where the device has them natively)")
    return parser.parse_intermixed_args(argv)  # inputs may come before and after options


def predict_images(args) -> int:
    if args.batch_size < 1 or (args.window is not None and args.window < 1):
        raise UserError("--batch_size and --window must be positive integers")
    trained = load_trained_model(checkpoint_path(Path(args.model_dir), args.restore_file))
    out = Path(args.out)
    names = find_images(args.inputs, out)
    for folder in (out, out / "labels", out / "overlays"):
        utils.output_folder(folder, "--out")
    utils.check_output_names(out / kind / name for name in names.values() for kind in ("labels", "overlays"))
    batches, errors = size_batches(list(names), args.batch_size)

    device = utils.default_device()
    config, eval_config = trained.train_config, trained.eval_config
    placement = utils.Placement(device, config.channels_last, utils.eval_autocast_dtype(
        device, args.eval_precision or eval_config.eval_precision))
    model = placement.module(trained.net)
    scales, flip = (eval_config.tta_scales, eval_config.tta_flip) if args.tta else ((1.0,), False)
    print(f"Segmenting {len(names)} files with {trained.path} ({model.config.backbone}, {len(trained.class_names)} "
          f"classes) on {device} in {placement.precision}{' with TTA' if args.tta else ''}")
    for line in errors:
        print(line, file=sys.stderr)
    written = 0
    with progress_bar(total=sum(map(len, batches)), unit="img", leave=True) as bar:
        for batch in batches:
            images, unreadable = read_images(batch)
            for line in unreadable:
                bar.write(line, file=sys.stderr)
            errors += unreadable
            if images:
                x = placement.images(torch.stack(list(images.values())))
                with placement.autocast():
                    preds = predict_logits(model, x, scales, flip, args.window,
                                           args.gaussian or eval_config.gaussian_windows).argmax(1).cpu()
                for (file, image), pred in zip(images.items(), preds):
                    overlay = visualize.overlay_picture(image, pred, trained.palette, trained.class_names)
                    utils.write_png(out / "labels" / names[file], visualize.label_png(pred, trained.palette))
                    utils.write_png(out / "overlays" / names[file], visualize.picture_png(overlay))
                written += len(images)
            bar.update(len(batch))
    print(f"Wrote {written} label maps and overlays to {out}" + (f"; skipped {len(errors)} unreadable file(s)"
                                                                  if errors else ""))
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return utils.run_cli(lambda: predict_images(args))


if __name__ == "__main__":
    sys.exit(main())

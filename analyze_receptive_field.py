"""The valid receptive field of trained models (the paper's argument for large kernels), as pictures and numbers:
python analyze_receptive_field.py --model_dir experiments/camvid [--model_dir ...] [--restore_file best] [IMAGE...]

For each chosen output pixel (--pixel ROW,COL, repeatable; default: the image centre) the gradient of its winning
class score with respect to the input image and to the res-5 features, |gradient| summed over channels, is drawn as
a heat map over the image, with the head's k×k kernel on the res-5 grid marked (a square) and the radius holding
`--mass` (90 %) of the gradient mass (a circle). Without IMAGE, the first image of the experiment's val split.
Writes <model_dir>/receptive_field/<image>_<row>_<col>.png and <model_dir>/metrics_receptive_field_<checkpoint>.json;
--compare PATH also draws every model side by side for the first image and pixel.
"""
from __future__ import annotations

import logging
import statistics
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

import errors
import settings
import utils
from checkpoints import checkpoint_path, load_trained_model
from model import normalise
from model.data_loader import DataConfig, build_dataset
from model.datasets.base import read_image
from model.net import GCN, GCNConfig
from model.transforms import denormalise

RES5_STRIDE = 32  # torchvision ResNet: res-5 feature j sits on image pixel 32·j (docs/model.md: Pixel-exact geometry)


class Gradients(NamedTuple):
    """|d score / d input| (H×W) and |d score / d res-5| (h×w), summed over channels, and the class scored."""
    image: Tensor
    res5: Tensor
    class_index: int


def score_gradients(model: GCN, image: Tensor, pixel: tuple[int, int]) -> Gradients:
    """The gradients of output pixel `pixel`'s winning class score w.r.t. the (normalised, 1×3×H×W) input and the
    res-5 features (the output of model.backbone["layer4"])."""
    features: list[Tensor] = []
    hook = model.backbone["layer4"].register_forward_hook(lambda _m, _i, out: features.append(out) or out.retain_grad())
    try:
        x = image.detach().clone().requires_grad_(True)
        logits = model(x)
    finally:
        hook.remove()
    row, col = pixel
    class_index = int(logits[0, :, row, col].argmax())
    logits[0, class_index, row, col].backward()
    return Gradients(x.grad.abs().sum(1)[0], features[0].grad.abs().sum(1)[0], class_index)


def mass_radius(weights: Tensor, centre: tuple[float, float], fraction: float) -> float:
    """The smallest Euclidean radius around `centre` (row, col in cell units) whose cells hold at least `fraction`
    of the total of `weights` (H×W, non-negative)."""
    height, width = weights.shape
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    distances = torch.hypot(rows - centre[0], cols - centre[1]).flatten()
    order = distances.argsort(stable=True)
    cumulative = weights.double().flatten()[order].cumsum(0)
    index = int(torch.searchsorted(cumulative, fraction * cumulative[-1]))
    return float(distances[order][min(index, len(order) - 1)])


def head_kernel(config: GCNConfig) -> int:
    """The k of the res-5 head (1 for the 1×1 baseline)."""
    return 1 if config.head == "1x1" else config.kernel_size


class Analysis(NamedTuple):
    name: str
    image: Tensor  # uint8 3×H×W
    pixel: tuple[int, int]
    gradients: Gradients
    input_radius: float  # px
    res5_radius: float  # res-5 cells


def analyse(model: GCN, name: str, image: Tensor, pixel: tuple[int, int], fraction: float) -> Analysis:
    """One output pixel of one (normalised) image: its gradients and their `fraction`-mass radii."""
    gradients = score_gradients(model, image, pixel)
    row, col = pixel
    return Analysis(name, denormalise(image[0]), pixel, gradients,
                    mass_radius(gradients.image, (row, col), fraction),
                    mass_radius(gradients.res5, (row / RES5_STRIDE, col / RES5_STRIDE), fraction))


def draw(ax, analysis: Analysis, kernel: int, which: str, title: str) -> None:
    """One panel: the image, the `which` ("image" or "res5") gradient as a heat map over it (colour and opacity
    scaled to its 99.5th percentile), the output pixel (a cross), the head's k×k res-5 kernel around it (a square of
    32·k px) and the mass radius (a circle). A kernel larger than the image widens the view to show all of it
    (grey: beyond the image)."""
    from matplotlib import colormaps  # noqa: PLC0415
    from matplotlib.patches import Circle, Rectangle  # noqa: PLC0415

    height, width = analysis.image.shape[-2:]
    ax.imshow(analysis.image.permute(1, 2, 0).numpy(), alpha=0.55)
    heat = getattr(analysis.gradients, which).numpy()
    if which == "res5":  # feature j covers pixels 32·j ± 16
        heat = np.kron(heat, np.ones((RES5_STRIDE, RES5_STRIDE)))
        offset = -RES5_STRIDE / 2
        radius = analysis.res5_radius * RES5_STRIDE
    else:
        offset, radius = -0.5, analysis.input_radius
    strength = np.clip(heat / (np.percentile(heat, 99.5) or heat.max() or 1.0), 0, 1)  # a few peaks saturate
    overlay = colormaps["inferno"](strength)
    overlay[..., 3] = 0.9 * np.sqrt(strength)  # transparent where the gradient is zero
    ax.imshow(overlay, extent=(offset, offset + heat.shape[1], offset + heat.shape[0], offset))
    row, col = analysis.pixel
    side = kernel * RES5_STRIDE
    left, top = col - side / 2, row - side / 2
    ax.add_patch(Rectangle((left, top), side, side, fill=False, color="cyan", lw=1.5))
    ax.add_patch(Circle((col, row), radius, fill=False, color="lime", lw=1.5, ls="--"))
    ax.plot(col, row, "+", color="white", ms=10, mew=2)
    margin = 0.02 * side  # the square's edges drawn inside the view, not on its border
    ax.set_xlim(min(-0.5, left - margin), max(width - 0.5, left + side + margin))
    ax.set_ylim(max(height - 0.5, top + side + margin), min(-0.5, top - margin))
    ax.set_facecolor("0.8")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def figure(columns: Sequence[tuple[str, Analysis, int]], path: Path) -> None:
    """Columns of (label, analysis, kernel): the input gradient above the res-5 gradient, with a legend line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    height, width = columns[0][1].image.shape[-2:]
    panel = 3.2
    fig = Figure(figsize=(panel * len(columns), 2 * panel * height / width + 0.9), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(columns), squeeze=False)
    for index, (label, analysis, kernel) in enumerate(columns):
        draw(axes[0, index], analysis, kernel, "image",
             f"{label}\n∂score/∂input: 90 % within {analysis.input_radius:.0f} px")
        draw(axes[1, index], analysis, kernel, "res5",
             f"∂score/∂res-5: 90 % within {analysis.res5_radius:.1f} cells")
    fig.suptitle("+: output pixel; cyan: k×k head kernel (res-5 cells\nof 32 px; grey beyond the image); "
                 "green: 90 % of |gradient|", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png"))


def parse_pixel(text: str) -> tuple[int, int]:
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise errors.UserError(f"--pixel {text!r}: expected ROW,COL, e.g. --pixel 180,240") from None
    return row, col


def load_images(paths: Sequence[str], model_dir: Path) -> list[tuple[str, Tensor]]:
    """(name, normalised 1×3×H×W) of each image file, or of the first val image of the experiment."""
    if paths:
        return [(Path(p).stem, normalise(read_image(Path(p)))[None]) for p in paths]
    params = settings.load_params(model_dir)
    dataset = build_dataset(params.config(DataConfig), params.num_classes, params.val_split, train=False)
    image, _ = dataset[0]
    return [(Path(str(dataset.names[0])).name, normalise(image)[None])]


def parse_args(argv: Sequence[str] | None):
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help="image files (default: the first image of the val split)")
    parser.add_argument("--model_dir", action="append", required=True, help="experiment folder; repeatable")
    parser.add_argument("--restore_file", default="best", help="best | last | path to a checkpoint")
    parser.add_argument("--pixel", action="append", type=str, default=[], metavar="ROW,COL",
                        help="output pixel to analyse; repeatable (default: the image centre)")
    parser.add_argument("--mass", type=float, default=0.9, help="fraction of the gradient mass the radius holds")
    parser.add_argument("--compare", default=None, metavar="PNG", help="also draw every model side by side here")
    return parser.parse_args(argv)


def analyze_receptive_field(args) -> dict[str, Any]:
    if not 0 < args.mass <= 1:
        raise errors.UserError(f"--mass {args.mass}: expected a fraction in (0, 1]")
    pixels = [parse_pixel(p) for p in args.pixel]
    images = load_images(args.images, Path(args.model_dir[0]))
    comparison: list[tuple[str, Analysis, int]] = []
    results = {}
    for model_dir in map(Path, args.model_dir):
        trained = load_trained_model(checkpoint_path(model_dir, args.restore_file))
        model, path = trained.net, trained.path
        kernel = head_kernel(model.config)
        records = []
        for name, image in images:
            height, width = image.shape[-2:]
            for row, col in pixels or [(height // 2, width // 2)]:
                if not (0 <= row < height and 0 <= col < width):
                    raise errors.UserError(f"--pixel {row},{col} is outside {name} ({height}×{width})")
                analysis = analyse(model, name, image, (row, col), args.mass)
                label = f"{model_dir.name}: {model.config.head}, k = {kernel}"
                figure([(label, analysis, kernel)], model_dir / "receptive_field" / f"{name}_{row}_{col}.png")
                if not records:  # each model's first image and pixel
                    comparison.append((label, analysis, kernel))
                records.append({"image": name, "pixel": [row, col],
                                "class": trained.class_names[analysis.gradients.class_index],
                                "input_radius_px": analysis.input_radius, "res5_radius_cells": analysis.res5_radius})
        result = {"checkpoint": str(path), "head": model.config.head, "kernel_size": kernel, "mass": args.mass,
                  "res5_stride": RES5_STRIDE, "pixels": records,
                  "mean_input_radius_px": statistics.fmean(r["input_radius_px"] for r in records),
                  "mean_res5_radius_cells": statistics.fmean(r["res5_radius_cells"] for r in records)}
        utils.write_json(model_dir / f"metrics_receptive_field_{path.name.split('.')[0]}.json", result)
        logging.info("%s: %d%% of the gradient within %.1f px of the input, %.2f res-5 cells (k = %d)", model_dir,
                     round(100 * args.mass), result["mean_input_radius_px"], result["mean_res5_radius_cells"], kernel)
        results[str(model_dir)] = result
    if args.compare:
        figure(comparison, Path(args.compare))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    utils.set_logger(None)

    def run() -> int:
        analyze_receptive_field(args)
        return 0
    return utils.run_cli(run)


if __name__ == "__main__":
    sys.exit(main())

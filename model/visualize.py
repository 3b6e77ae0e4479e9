"""Labels and predictions -> pictures people can read: side-by-side panels or an overlay with a legend, confusion
matrices.

Pictures are uint8 3×H×W tensors (TensorBoard's add_image takes them as they are), files PNG bytes (`picture_png`,
`label_png`, `confusion_matrix_png`), which the programs write with utils.write_png.
Small images are enlarged by an integer nearest-neighbour factor, so every label pixel stays one exact block.
"""
from __future__ import annotations

import io
import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import draw_segmentation_masks

from model import IGNORE_INDEX
from model.transforms import colorize

VOID_COLOR = (255, 255, 255)    # as colorize draws void; the canvas is dark so it stands out
# Wrong pixels of the errors panel: red, unless a class colour (or void's white) is within WRONG_COLOR_DISTANCE of it
# (the synthetic set's disc 220,50,50, VOC's 192,0,0, Cityscapes' rider 255,0,0): then cyan or magenta, the farther
WRONG_COLORS = ((255, 0, 0), (0, 255, 255), (255, 0, 255))
WRONG_COLOR_DISTANCE = 100  # RGB (Euclidean) distance from every class colour; CamVid's nearest, 128,0,0, is 127
BACKGROUND = (40, 40, 40)
TEXT_COLOR = (240, 240, 240)
MIN_PANEL_SIDE = 256            # images whose longer side is shorter are enlarged (integer factor) towards this
OVERLAY_ALPHA = 0.5             # opacity of the class colours in an overlay picture


def error_mask(label: Tensor, pred: Tensor) -> Tensor:
    """Bool H×W: True exactly where `label` is a class (not void) and `pred` differs from it."""
    if label.shape != pred.shape:
        raise ValueError(f"label shape {tuple(label.shape)} != pred shape {tuple(pred.shape)}")
    label, pred = label.long(), pred.long()
    return (label != IGNORE_INDEX) & (pred != label)


def wrong_color(palette: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """The colour of wrong pixels (errors panel and legend) for these class colours: WRONG_COLORS' first that is at
    least WRONG_COLOR_DISTANCE from each of them and from void's, else the farthest of the others."""
    def distance(color: tuple[int, int, int]) -> float:
        return min(math.dist(color, c) for c in (*palette, VOID_COLOR))
    preferred, *others = WRONG_COLORS
    return preferred if distance(preferred) >= WRONG_COLOR_DISTANCE else max(others, key=distance)


def legend_entries(label: Tensor | None, pred: Tensor, palette: Sequence[Sequence[int]],
                   class_names: Sequence[str]) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) for every class present in the truth or the prediction, in class order; then "void" if
    void (or any value that is not a class, which colorize also draws as void) is present; then "wrong" (in
    wrong_color's colour) if there is an errors panel (a label was given)."""
    values = pred.flatten() if label is None else torch.cat([label.flatten(), pred.flatten()])
    present = set(values.long().unique().tolist())
    entries = [(name, tuple(int(v) for v in palette[c])) for c, name in enumerate(class_names) if c in present]
    if present - set(range(len(class_names))):
        entries.append(("void", VOID_COLOR))
    if label is not None:
        entries.append(("wrong", wrong_color(palette)))
    return entries


def prediction_picture(image: Tensor, label: Tensor | None, pred: Tensor, palette: Sequence[Sequence[int]],
                       class_names: Sequence[str]) -> Tensor:
    """uint8 3×H'×W' picture: panels "image | truth | prediction | errors" (without a label "image | prediction"),
    each titled, and a legend below. `image` is uint8 3×H×W (denormalised), label/pred are H×W class indices.
    Panel positions: `picture_layout(H, W, num_panels).panel_origin(i)`."""
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"image must be uint8 3×H×W, got {image.dtype} {tuple(image.shape)}")
    image, pred = image.cpu(), pred.cpu()
    if pred.shape != image.shape[1:]:
        raise ValueError(f"pred shape {tuple(pred.shape)} != image size {tuple(image.shape[1:])}")
    panels = [("image", image)]
    if label is not None:
        label = label.cpu()
        wrong, labelled = error_mask(label, pred).sum().item(), (label.long() != IGNORE_INDEX).sum().item()
        errors_title = f"errors {100 * wrong / labelled:.1f}%" if labelled else "errors"
        panels.append(("truth", colorize(label, palette, VOID_COLOR)))
    panels.append(("prediction", colorize(pred, palette, VOID_COLOR)))
    if label is not None:
        panels.append((errors_title, _errors_panel(image, label, pred, wrong_color(palette))))
    return _titled_panels(panels, legend_entries(label, pred, palette, class_names))


def sample_picture(image: Tensor, label: Tensor, palette: Sequence[Sequence[int]],
                   class_names: Sequence[str]) -> Tensor:
    """uint8 3×H'×W' picture of one (augmented) sample: panels "image | label | overlay" (void in VOID_COLOR; the
    overlay blends the label's colours half into the image, void left clear, so a misaligned edge shows), titled,
    with a legend of the classes present below; the layout is `picture_layout(H, W, 3)`'s."""
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"image must be uint8 3×H×W, got {image.dtype} {tuple(image.shape)}")
    image, label = image.cpu(), label.cpu()
    colors = colorize(label, palette, VOID_COLOR)
    overlay = torch.where(label.long() == IGNORE_INDEX, image, ((image.int() + colors.int()) // 2).to(torch.uint8))
    panels = [("image", image), ("label", colors), ("overlay", overlay)]
    return _titled_panels(panels, legend_entries(None, label, palette, class_names))


def overlay_picture(image: Tensor, pred: Tensor, palette: Sequence[Sequence[int]], class_names: Sequence[str],
                    alpha: float = OVERLAY_ALPHA) -> Tensor:
    """uint8 3×H'×W' picture: the image with the prediction blended in (torchvision's draw_segmentation_masks,
    `alpha` of the class colour; a black class, VOC's background, is left untinted rather than darkened) and a
    legend of the classes present below it. `image` is uint8 3×H×W, `pred` H×W class indices; small images are
    enlarged by an integer factor as in `prediction_picture`."""
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8 or pred.shape != image.shape[1:]:
        raise ValueError(f"expected a uint8 3×H×W image and an H×W prediction, got {image.dtype} "
                         f"{tuple(image.shape)} and {tuple(pred.shape)}")
    image, pred = image.cpu(), pred.cpu().long()
    present = [c for c in pred.unique().tolist() if any(palette[c])]
    masks = pred[None] == torch.tensor(present).view(-1, 1, 1)
    colors = [tuple(int(v) for v in palette[c]) for c in present]
    blended = draw_segmentation_masks(image, masks, alpha, colors) if present else image
    lay = picture_layout(image.shape[1], image.shape[2], 1)
    canvas, _, _ = _canvas_with_legend(lay, legend_entries(None, pred, palette, class_names), lay.gap)
    _paste_enlarged(canvas, blended, lay.scale, lay.gap, lay.gap)
    return _to_tensor(canvas)


def picture_png(picture: Tensor) -> bytes:
    """A uint8 3×H×W picture as PNG bytes (never JPEG: it smears label colours)."""
    return _png_bytes(Image.fromarray(picture.detach().cpu().permute(1, 2, 0).numpy()))


def label_png(label: Tensor, palette: Sequence[Sequence[int]]) -> bytes:
    """An H×W label map as palette PNG bytes: pixel values are the class indices, colours the data set's."""
    png = Image.fromarray(label.detach().cpu().to(torch.uint8).numpy())  # mode L; a palette makes it P
    png.putpalette([c for rgb in palette for c in rgb])
    return _png_bytes(png)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def row_normalised(matrix: Tensor | np.ndarray) -> np.ndarray:
    """Confusion matrix (rows = truth, columns = prediction) with each row divided by its sum: float64;
    rows without pixels are all NaN (no class to normalise by), never a division warning."""
    counts = np.asarray(matrix.detach().cpu() if isinstance(matrix, Tensor) else matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)


def confusion_matrix_png(matrix: Tensor | np.ndarray, class_names: Sequence[str], title: str | None = None) -> bytes:
    """The row-normalised confusion matrix as PNG bytes: names on both axes, percentages in the cells when they fit,
    a colour bar; rows of classes absent from the truth are grey."""
    from matplotlib import colormaps  # noqa: PLC0415 -- matplotlib is slow to import; only this figure needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415 -- no pyplot: no global backend or figure state

    fractions = row_normalised(matrix)
    n = len(class_names)
    if fractions.shape != (n, n):
        raise ValueError(f"matrix shape {fractions.shape} does not match {n} class names")
    side = max(5.0, 0.42 * n + 2.5)
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["Blues"].with_extremes(bad=(0.82, 0.82, 0.82))
    shown = ax.imshow(np.ma.masked_invalid(100 * fractions), cmap=cmap, vmin=0.0, vmax=100.0)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, label="% of the true class's pixels")
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title or "confusion matrix (rows normalised)")
    for t in np.flatnonzero(np.isnan(fractions).all(axis=1)):
        ax.text((n - 1) / 2, t, "no pixels of this class", ha="center", va="center", color="dimgrey")
    if n <= 30:     # cell percentages fit
        for t, p in zip(*np.nonzero(np.nan_to_num(fractions) >= 0.005)):
            value = fractions[t, p]
            ax.text(p, t, f"{100 * value:.0f}", ha="center", va="center", fontsize=9 if n > 12 else 11,
                    color="white" if value > 0.55 else "black")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


class Layout(NamedTuple):
    """Geometry of a prediction picture: panels of panel_height × panel_width in one row, titles above."""
    scale: int          # nearest-neighbour enlargement of the image
    font_size: int
    gap: int            # margin around and between panels
    title_height: int
    panel_height: int
    panel_width: int
    num_panels: int

    @property
    def width(self) -> int:
        return self.gap + self.num_panels * (self.panel_width + self.gap)

    def panel_origin(self, index: int) -> tuple[int, int]:
        """(top, left) of panel `index` in the picture."""
        return self.gap + self.title_height, self.gap + index * (self.panel_width + self.gap)


def picture_layout(height: int, width: int, num_panels: int) -> Layout:
    """The layout `prediction_picture` uses for an H×W image and `num_panels` panels."""
    scale = max(1, MIN_PANEL_SIDE // max(height, width))
    panel_h, panel_w = height * scale, width * scale
    font_size = min(22, max(15, round(max(panel_h, panel_w) / 24)))
    gap = max(6, font_size // 2)
    return Layout(scale, font_size, gap, font_size + gap, panel_h, panel_w, num_panels)


def _titled_panels(panels: list[tuple[str, Tensor]], legend: list[tuple[str, tuple[int, int, int]]]) -> Tensor:
    """Equal-size uint8 3×H×W panels side by side, each titled above, with the legend's rows below."""
    height, width = panels[0][1].shape[1:]
    lay = picture_layout(height, width, len(panels))
    canvas, draw, font = _canvas_with_legend(lay, legend, lay.gap + lay.title_height)
    for index, (title, panel) in enumerate(panels):
        top, left = lay.panel_origin(index)
        _paste_enlarged(canvas, panel, lay.scale, left, top)
        draw.text((left + lay.panel_width / 2, top - lay.gap // 2), title, fill=TEXT_COLOR, font=font, anchor="md")
    return _to_tensor(canvas)


def _canvas_with_legend(lay: Layout, legend: list[tuple[str, tuple[int, int, int]]],
                        panels_top: int) -> tuple[Image.Image, ImageDraw.ImageDraw, ImageFont.ImageFont]:
    """A blank picture as wide as `lay`, tall enough for panels from `panels_top` and the legend's rows below them,
    the legend drawn; returns it with its drawing context and font."""
    font = _font(lay.font_size)
    legend_rows = _legend_rows(legend, font, lay)
    legend_top = panels_top + lay.panel_height + lay.gap
    row_height = lay.font_size + lay.gap // 2
    canvas = Image.new("RGB", (_canvas_width(legend_rows, font, lay), legend_top + len(legend_rows) * row_height
                               + lay.gap), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _draw_legend(draw, legend_rows, legend_top, font, lay)
    return canvas, draw, font


def _paste_enlarged(canvas: Image.Image, picture: Tensor, scale: int, left: int, top: int) -> None:
    """Paste uint8 3×H×W `picture`, enlarged `scale`× (nearest neighbour), with its top-left corner at (left, top)."""
    big = picture.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    canvas.paste(Image.fromarray(big.permute(1, 2, 0).numpy()), (left, top))


def _errors_panel(image: Tensor, label: Tensor, pred: Tensor, wrong_rgb: tuple[int, int, int]) -> Tensor:
    """Wrong pixels `wrong_rgb`, void pixels VOID_COLOR, the rest the image as dimmed grey (0..127)."""
    r, g, b = image.long()
    grey = ((299 * r + 587 * g + 114 * b) // 2000).to(torch.uint8).expand(3, -1, -1).clone()
    wrong = error_mask(label, pred)
    grey[:, wrong] = torch.tensor(wrong_rgb, dtype=torch.uint8).view(3, 1)
    void = label.long() == IGNORE_INDEX
    grey[:, void] = torch.tensor(VOID_COLOR, dtype=torch.uint8).view(3, 1)
    return grey


def _legend_rows(entries: list[tuple[str, tuple[int, int, int]]], font, lay: Layout) -> list[list[tuple]]:
    """The legend's entries as rows of (x, name, colour) that fit the picture's width."""
    rows: list[list[tuple]] = [[]]
    x = lay.gap
    for name, color in entries:
        width = lay.font_size + 4 + int(font.getlength(name)) + 2 * lay.gap
        if rows[-1] and x + width > lay.width:
            rows.append([])
            x = lay.gap
        rows[-1].append((x, name, color))
        x += width
    return rows if rows[0] else []


def _canvas_width(rows: list[list[tuple]], font, lay: Layout) -> int:
    """The picture's width, widened where one legend entry is wider than a narrow image (never cut off)."""
    ends = [x + lay.font_size + 4 + int(math.ceil(font.getlength(name))) + lay.gap
            for row in rows for x, name, _ in row]
    return max([lay.width, *ends])


def _draw_legend(draw: ImageDraw.ImageDraw, rows: list[list[tuple]], top: int, font, lay: Layout) -> None:
    """A colour swatch and a name per entry, rows from `_legend_rows` starting at `top`."""
    row_height = lay.font_size + lay.gap // 2
    for row, entries in enumerate(rows):
        y = top + row * row_height
        for x, name, color in entries:
            side = lay.font_size
            draw.rectangle([x, y, x + side - 1, y + side - 1], fill=color, outline=(160, 160, 160))
            draw.text((x + side + 4, y + side / 2), name, fill=TEXT_COLOR, font=font, anchor="lm")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):     # Pillow < 10.1 or no FreeType: small bitmap font
        return ImageFont.load_default()


def _to_tensor(canvas: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()

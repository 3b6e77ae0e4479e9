"""Segmentation metrics: a dataset-level confusion matrix and the paper's boundary analysis.

All counting happens on the tensors' device (CPU or CUDA) in int64; only `compute()` copies the
few counts to the host. Pass predictions and labels at the ORIGINAL image resolution.

Definitions (standard, as in the VOC devkit and torchvision's references/segmentation):
- confusion matrix M[t, p]: number of labelled pixels of true class t predicted as p;
- IoU_c = M[c,c] / (row_c + col_c - M[c,c]), undefined (None) when class c is in neither the ground
  truth nor the predictions; mIoU averages the defined IoUs;
- accuracy_c = M[c,c] / row_c, undefined when c is absent from the ground truth; mean accuracy
  averages the defined ones; pixel accuracy = trace / total;
- frequency-weighted IoU = sum_c (row_c / total) * IoU_c.

Boundary analysis (Table 5 of "Large Kernel Matters"): a labelled pixel is in the boundary band
when some pixel with a different label lies within `width` pixels of it, distance measured by
default in the Chebyshev (chessboard, L-infinity) metric, i.e. inside the (2*width+1)^2 square
centred on it (`distance="euclidean"`: inside the disc of radius `width`); at a straight edge the
band is `width` pixels deep on each side. The other labelled pixels form the interior. By default
the void label counts as a label of its own: in VOC the 255 band is the object outline, so object
and background pixels next to it are boundary pixels (`void="ignored"`: only a different class
makes a boundary). The paper says only "within 7 pixels of an edge"; the metrics record which
definition was used. Void pixels themselves belong to neither band nor interior. The image border is not a
boundary. Consequently labels padded with void (to batch images of different sizes) would create
false boundaries: pass such images one at a time, uncropped and unpadded.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import IGNORE_INDEX

_BOUNDARY_STATS = 4  # boundary correct, boundary total, interior correct, interior total
_INVALID = 1  # pixels whose prediction or label was not a class (or ignore_index), counted where not checked at once


def _check_label_tensor(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise ValueError(f"{name} must hold integer class indices, got dtype {tensor.dtype}")


def _check_ignore_index(num_classes: int, ignore_index: int) -> None:
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a valid class index "
                         f"(num_classes={num_classes})")


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Return the int64 C×C matrix (rows = true class, columns = predicted) of one batch.

    Pixels whose target is `ignore_index` are skipped; `pred` and `target` may have any common
    shape. Every prediction must be a class index and every target a class index or
    `ignore_index` (which must lie outside [0, num_classes)); anything else raises ValueError.
    """
    pred, target = _checked_labels(pred, target, num_classes, ignore_index)
    _check_values(pred, target, num_classes, ignore_index)
    return _confusion_bins(pred, target, num_classes, ignore_index)[:num_classes * num_classes].view(
        num_classes, num_classes)


def _checked_labels(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                    ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pred and target as int64, after the checks that need no look at their values (shape, dtype)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    _check_label_tensor("pred", pred)
    _check_label_tensor("target", target)
    _check_ignore_index(num_classes, ignore_index)
    return pred.long(), target.long()


def _check_values(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every prediction a class, every target a class or ignore_index, else ValueError naming the values (a look at
    the values: on a GPU, the host waits for it)."""
    lowest, highest = pred.aminmax() if pred.numel() else (0, 0)
    if lowest < 0 or highest >= num_classes:
        bad = pred[(pred < 0) | (pred >= num_classes)].unique().tolist()
        raise ValueError(f"predictions must lie in [0, {num_classes}), found {bad}")
    is_class = (target >= 0) & (target < num_classes)
    if not (is_class | (target == ignore_index)).all():
        bad = target[~is_class & (target != ignore_index)].unique().tolist()
        raise ValueError(f"labels must lie in [0, {num_classes}) or equal ignore_index "
                         f"{ignore_index}, found {bad}")


def _confusion_bins(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The C×C confusion counts (flat), then the ignored pixels, then the invalid ones (a prediction that is not a
    class, or a target neither a class nor ignore_index), counted on the tensors' device without a host
    synchronisation (scatter_add_, not bincount, whose output size depends on the values)."""
    cells = num_classes * num_classes
    valid_pred = (pred >= 0) & (pred < num_classes)
    is_class = (target >= 0) & (target < num_classes)
    # As ignore_index lies outside [0, num_classes), a pixel counts iff its target is a class.
    index = torch.where(valid_pred & is_class, torch.add(pred, target, alpha=num_classes),
                        torch.where(valid_pred & (target == ignore_index), cells, cells + 1)).flatten()
    bins = torch.zeros(cells + 2, dtype=torch.int64, device=index.device)
    return bins.scatter_add_(0, index, torch.ones_like(index))


BOUNDARY_DISTANCES = ("chebyshev", "euclidean")  # the band's neighbourhood: a square or a disc of radius `width`
BOUNDARY_VOIDS = ("label", "ignored")  # void next to a pixel makes it a boundary pixel, or is not looked at


def _window_max(x: torch.Tensor, width: int, distance: str) -> torch.Tensor:
    """Maximum over the pixels within `width` of each pixel of x (N×C×H×W, float; -inf outside the image): the
    (2*width+1)^2 square ("chebyshev") or the disc dy² + dx² <= width² ("euclidean", as one row maximum of
    half-width isqrt(width² - dy²) per row offset dy)."""
    if distance == "chebyshev":
        size = 2 * width + 1
        x = F.max_pool2d(x, (1, size), stride=1, padding=(0, width))
        return F.max_pool2d(x, (size, 1), stride=1, padding=(width, 0))
    height = x.shape[-2]
    padded = F.pad(x, (0, 0, width, width), value=-math.inf)
    rows: dict[int, torch.Tensor] = {}
    out = None
    for dy in range(-width, width + 1):
        half = math.isqrt(width * width - dy * dy)
        if half not in rows:
            rows[half] = F.max_pool2d(padded, (1, 2 * half + 1), stride=1, padding=(0, half))
        shifted = rows[half][..., width + dy:width + dy + height, :]
        out = shifted if out is None else torch.maximum(out, shifted)
    return out


def boundary_band(target: torch.Tensor, width: int = 7, ignore_index: int = IGNORE_INDEX,
                  distance: str = "chebyshev", void: str = "label") -> torch.Tensor:
    """Return a bool mask (same shape as target, N×H×W or H×W) of the labelled pixels within `width` pixels
    (`distance`: Chebyshev or Euclidean) of a pixel with a different label: any label, void included, or
    (void "ignored") a different class.

    Void pixels are always False. Labels must be exactly representable in float32 (< 2**24).
    """
    if target.dim() not in (2, 3):
        raise ValueError(f"target must be H×W or N×H×W, got shape {tuple(target.shape)}")
    _check_label_tensor("target", target)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"boundary width must be a positive int, got {width!r}")
    _check_band_definition(distance, void)
    labels = target.reshape(-1, 1, *target.shape[-2:]).float()
    stacked = torch.cat([labels, -labels], dim=1)
    if void == "ignored":  # void never wins a maximum, so it is never the "different label"
        stacked = stacked.masked_fill((labels == ignore_index).expand_as(stacked), -math.inf)
    # max(x) + max(-x) = max - min over the window: positive iff the window holds two labels.
    pooled = _window_max(stacked, width, distance)
    band = (pooled[:, 0] + pooled[:, 1] > 0).view(target.shape)
    return band & (target != ignore_index)


def _check_band_definition(distance: str, void: str) -> None:
    if distance not in BOUNDARY_DISTANCES:
        raise ValueError(f"boundary distance {distance!r}: choose one of {BOUNDARY_DISTANCES}")
    if void not in BOUNDARY_VOIDS:
        raise ValueError(f"boundary void {void!r}: choose one of {BOUNDARY_VOIDS}")


class SegmentationMetrics:
    """Accumulates confusion-matrix and boundary/interior counts over a whole data set.

    Call `update(pred, target)` per batch, `all_reduce()` once on every rank when distributed,
    then `compute()`. All counts live in one flat int64 tensor; it starts on `device` (CPU when
    None; this matters only for a rank that sees no data) and follows the inputs' device.
    """

    def __init__(self, num_classes: int, class_names: list[str] | None = None,
                 ignore_index: int = IGNORE_INDEX, boundary_width: int = 7,
                 device: torch.device | str | None = None, boundary_distance: str = "chebyshev",
                 boundary_void: str = "label") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        _check_ignore_index(num_classes, ignore_index)
        if isinstance(boundary_width, bool) or not isinstance(boundary_width, int) \
                or boundary_width < 1:
            raise ValueError(f"boundary_width must be a positive int, got {boundary_width!r}")
        _check_band_definition(boundary_distance, boundary_void)
        if class_names is None:
            class_names = [str(index) for index in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.boundary_width = boundary_width
        self.boundary_distance, self.boundary_void = boundary_distance, boundary_void
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        size = self.num_classes * self.num_classes + _BOUNDARY_STATS + _INVALID
        self._counts = torch.zeros(size, dtype=torch.int64, device=self._device)
        self._reduced = False

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of predictions and labels (N×H×W or H×W, original resolution).

        Values that are not classes (or ignore_index) raise ValueError here on the CPU; on a GPU, where looking at
        them would make the host wait for every batch, they are counted and compute() raises."""
        if self._reduced:
            raise RuntimeError("update() after all_reduce() would mix global and local counts; "
                               "call reset() first")
        if pred.device != self._counts.device:  # follow the data, e.g. when device=None
            self._counts = self._counts.to(pred.device)
        band = boundary_band(target, self.boundary_width, self.ignore_index, self.boundary_distance,
                             self.boundary_void)
        pred, target = _checked_labels(pred, target, self.num_classes, self.ignore_index)
        if pred.device.type == "cpu":
            _check_values(pred, target, self.num_classes, self.ignore_index)
        bins = _confusion_bins(pred, target, self.num_classes, self.ignore_index)
        interior = (target != self.ignore_index) & ~band
        correct = pred == target
        cells = self.num_classes * self.num_classes
        self._counts[:cells] += bins[:cells]
        self._counts[cells:] += torch.stack([(correct & band).sum(), band.sum(), (correct & interior).sum(),
                                             interior.sum(), bins[-1]])

    def all_reduce(self) -> None:
        """Sum the counts over all ranks (one collective); a no-op without torch.distributed.

        Every rank must call it, also ranks that saw no data; call it once before compute().
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._reduced:
            raise RuntimeError("all_reduce() called twice without reset(): counts would be "
                               "summed again")
        if dist.get_backend() == "nccl" and self._counts.device.type != "cuda":
            self._counts = self._counts.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(self._counts, op=dist.ReduceOp.SUM)
        self._reduced = True

    def compute(self) -> dict:
        """Return the metrics as plain Python floats in [0, 1] (None where undefined)."""
        counts = self._counts.tolist()
        cells = self.num_classes * self.num_classes
        matrix = [counts[row * self.num_classes:(row + 1) * self.num_classes]
                  for row in range(self.num_classes)]
        boundary_correct, boundary_total, interior_correct, interior_total, invalid = counts[cells:]
        if invalid:
            raise ValueError(f"{invalid} pixel(s) given to update() had a prediction outside [0, {self.num_classes}) "
                             f"or a label neither a class nor ignore_index {self.ignore_index}")
        total = sum(counts[:cells])
        if total == 0:
            raise ValueError("no labelled pixels were accumulated: every target pixel was "
                             f"ignore_index ({self.ignore_index}) or update() was never called")
        true_pixels = [sum(row) for row in matrix]
        predicted_pixels = [sum(column) for column in zip(*matrix)]
        hits = [matrix[c][c] for c in range(self.num_classes)]
        unions = [true_pixels[c] + predicted_pixels[c] - hits[c] for c in range(self.num_classes)]
        ious = [hits[c] / unions[c] if unions[c] else None for c in range(self.num_classes)]
        accuracies = [hits[c] / true_pixels[c] if true_pixels[c] else None
                      for c in range(self.num_classes)]
        defined_ious = [iou for iou in ious if iou is not None]
        defined_accuracies = [accuracy for accuracy in accuracies if accuracy is not None]
        return {
            "miou": sum(defined_ious) / len(defined_ious),
            "pixel_accuracy": sum(hits) / total,
            "mean_accuracy": sum(defined_accuracies) / len(defined_accuracies),
            "fw_iou": sum(true_pixels[c] / total * ious[c]
                          for c in range(self.num_classes) if true_pixels[c]),
            "per_class_iou": dict(zip(self.class_names, ious)),
            "per_class_accuracy": dict(zip(self.class_names, accuracies)),
            "per_class_pixel_share": {name: true_pixels[c] / total for c, name in enumerate(self.class_names)},
            "boundary_accuracy": boundary_correct / boundary_total if boundary_total else None,
            "interior_accuracy": interior_correct / interior_total if interior_total else None,
            "boundary_band": {"width": self.boundary_width, "distance": self.boundary_distance,
                              "void": self.boundary_void},
            "confusion_matrix": {"classes": self.class_names, "counts": matrix},
        }

"""Logits of whole images at their own resolution: test-time augmentation (scales, flips) and sliding windows."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2.functional import pil_to_tensor

from model import normalise

WINDOW_BATCH = 8  # windows scored in one forward pass


def window_weights(window: int, gaussian: bool) -> Tensor:
    """The window×window weight of each window's logits: ones (a uniform average), or a Gaussian of σ = window/8
    about the centre (as nnU-Net and MONAI), which trusts a window's centre over its borders; max 1."""
    if not gaussian:
        return torch.ones(window, window)
    offsets = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    profile = torch.exp(-offsets ** 2 / (2 * (window / 8) ** 2))
    return (profile[:, None] * profile[None, :] / profile.max() ** 2).float()


def sliding_window_logits(model: nn.Module, image: Tensor, window: int, gaussian: bool = False,
                          batch: int = WINDOW_BATCH) -> Tensor:
    """Logits of a large image from overlapping window×window tiles (stride 2/3 of the window), averaged (weighted
    by window_weights); `batch` windows (of every image of the batch) go through the model at once."""
    n, _, h, w = image.shape
    padded = F.pad(image, (0, max(window - w, 0), 0, max(window - h, 0)))
    ph, pw = padded.shape[-2:]
    stride = max(window * 2 // 3, 1)
    origins = [(top, left) for top in sorted({*range(0, ph - window, stride), ph - window})
               for left in sorted({*range(0, pw - window, stride), pw - window})]
    weight = window_weights(window, gaussian).to(image.device)
    logits = weights = None
    for start in range(0, len(origins), batch):
        chunk = origins[start:start + batch]
        tiles = torch.cat([padded[..., top:top + window, left:left + window] for top, left in chunk])
        scores = model(tiles).float().unflatten(0, (len(chunk), n))
        if logits is None:
            logits = scores.new_zeros(n, scores.shape[2], ph, pw)
            weights = scores.new_zeros(1, 1, ph, pw)
        for (top, left), tile in zip(chunk, scores):
            logits[..., top:top + window, left:left + window] += tile * weight
            weights[..., top:top + window, left:left + window] += weight
    return (logits / weights)[..., :h, :w]


@torch.no_grad()
def predict_logits(model: nn.Module, image: Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
                   window: int | None = None, gaussian: bool = False) -> Tensor:
    """Float logits N×C×H×W at the image's own resolution, averaged over scales (and horizontal flips) if asked;
    images larger than `window` are scored in overlapping windows (Gaussian-weighted if `gaussian`).

    Each scale resizes to a whole number of pixels (antialiased when shrinking, as training's random scaling) and
    maps the logits back from exactly that size, so pixel centres line up at any scale.
    """
    size = image.shape[-2:]
    total = None
    for scale in scales:
        scaled_size = [max(1, round(side * scale)) for side in size]
        scaled = image if scaled_size == list(size) else F.interpolate(
            image, size=scaled_size, mode="bilinear", align_corners=False, antialias=scale < 1)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            big = window is not None and max(x.shape[-2:]) > window
            logits = sliding_window_logits(model, x, window, gaussian) if big else model(x).float()
            logits = logits.flip(-1) if flipped else logits
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
    return total / (len(scales) * (2 if flip else 1))


def padded_logits(score: Callable[[Tensor], Tensor], image: Tensor, size: int | None) -> Tensor:
    """`score`'s logits of `image` (N×3×H×W, normalised) zero-padded at the bottom and right to at least size×size
    (0 is the mean colour after normalisation), cropped back to H×W: the paper's protocol of padding every input
    to 512×512. A side already at least `size` is not padded; None: the image as it is."""
    if size is None:
        return score(image)
    height, width = image.shape[-2:]
    return score(F.pad(image, (0, max(size - width, 0), 0, max(size - height, 0))))[..., :height, :width]


@torch.no_grad()
def segment(model: nn.Module, image: Image.Image | Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
            window: int | None = None, gaussian: bool = False) -> Tensor:
    """The label map (H×W int64, on the CPU) of one image: a PIL image (any mode; converted to RGB as the data
    sets do), a uint8 RGB 3×H×W tensor, or a float one in [0, 1] (torchvision's to_tensor/to_image convention).

    >>> labels = segment(model, Image.open("street.jpg"))
    """
    if isinstance(image, Image.Image):
        image = pil_to_tensor(image.convert("RGB"))
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image 3×H×W, got shape {tuple(image.shape)}")
    if image.is_floating_point():
        image = image * 255
    elif image.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 (0..255) or float (0..1) image, got {image.dtype}")
    device = next(model.parameters()).device
    logits = predict_logits(model.eval(), normalise(image.to(device))[None], scales, flip, window, gaussian)
    return logits.argmax(1)[0].cpu()

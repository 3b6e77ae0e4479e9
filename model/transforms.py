"""Joint image/label transforms (torchvision.transforms.v2 on tv_tensors), padding, and images back from normalised.

Everything runs on uint8 tensors, and items stay uint8: a crop is padded to its full size with the mean colour in
the image and 255 (void) in the label, and the image is normalised on the device (model.normalise, called by
utils.Placement and model/inference.py), after the DataLoader sent a quarter of float32's bytes.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from model import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

MEAN_COLOR = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104): within 0.01 of 0 once normalised
_MEAN_COLOR_PIXEL = torch.tensor(MEAN_COLOR, dtype=torch.uint8).view(3, 1, 1)  # for filling 3×H×W margins


class RandomScale(v2.Transform):
    """Resize image (bilinear, antialiased) and mask (nearest) by one factor drawn uniformly from scale_range."""

    def __init__(self, scale_range: Sequence[float]) -> None:
        super().__init__()
        self.low, self.high = float(scale_range[0]), float(scale_range[1])

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        factor = self.low + (self.high - self.low) * float(torch.rand(()))
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            # NEAREST_EXACT samples at pixel centres like bilinear does (plain NEAREST is shifted by up to half a
            # pixel). Resized as a plain tensor: until pytorch/vision#9188 was fixed (0.26 has the bug) torchvision
            # resized a Mask with NEAREST whatever one asked, which shifted labels against the image.
            mask = inpt.as_subclass(Tensor)
            resized = TF.resize(mask.unsqueeze(0) if mask.dim() == 2 else mask, size=params["size"],
                                interpolation=InterpolationMode.NEAREST_EXACT)
            return tv_tensors.wrap(resized.view(*mask.shape[:-2], *resized.shape[-2:]), like=inpt)
        return self._call_kernel(TF.resize, inpt, size=params["size"], interpolation=InterpolationMode.BILINEAR,
                                 antialias=True)


class RandomCropAtMost(v2.Transform):
    """Crop a random window of min(size, H) × min(size, W): no padding yet, so the crop stays uint8."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = min(self.size, height), min(self.size, width)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.crop, inpt, **params)


class PadToSize(v2.Transform):
    """uint8 image padded to size × size at a random offset with MEAN_COLOR; mask -> uint8 padded with 255.
    Returns plain uint8 tensors. size None: no padding."""

    def __init__(self, size: int | None = None) -> None:
        super().__init__()
        self.size = size

    def forward(self, image: tv_tensors.Image, label: tv_tensors.Mask) -> tuple[Tensor, Tensor]:
        height, width = image.shape[-2:]
        top = left = 0
        out_h, out_w = height, width
        if self.size is not None:
            out_h, out_w = max(self.size, height), max(self.size, width)
            top = int(torch.randint(0, out_h - height + 1, ()))
            left = int(torch.randint(0, out_w - width + 1, ()))
        window = (slice(top, top + height), slice(left, left + width))
        out_image = _fill_margins(torch.empty(3, out_h, out_w, dtype=torch.uint8), window, _MEAN_COLOR_PIXEL)
        out_label = _fill_margins(torch.empty(out_h, out_w, dtype=torch.uint8), window, IGNORE_INDEX)
        out_image[(slice(None), *window)] = image.as_subclass(Tensor)
        out_label[window] = label.as_subclass(Tensor)
        return out_image, out_label


def _fill_margins(out: Tensor, window: tuple[slice, slice], value: int | Tensor) -> Tensor:
    """Fill everything of `out` (…×H×W) outside the rows/columns `window` with `value` (a number, or one per
    channel: C×1×1), each element written once."""
    rows, cols = window
    out[..., :rows.start, :] = value
    out[..., rows.stop:, :] = value
    out[..., rows, :cols.start] = value
    out[..., rows, cols.stop:] = value
    return out


def train_transform(crop_size: int, scale_range: Sequence[float], flip: bool,
                    color_jitter: float) -> v2.Compose:
    """Random scale, random crop padded to crop_size (image MEAN_COLOR, label 255), flip, jitter."""
    steps: list[v2.Transform] = [RandomScale(scale_range), RandomCropAtMost(crop_size)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                    hue=min(0.5, color_jitter / 4)))
    steps.append(PadToSize(crop_size))
    return v2.Compose(steps)


def eval_transform() -> v2.Compose:
    """The whole image at its original resolution (uint8 image and label); no augmentation."""
    return v2.Compose([PadToSize()])


def denormalise(image: Tensor) -> Tensor:
    """Undo the ImageNet normalisation of a 3×H×W image: uint8 3×H×W for pictures."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image.float() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


def colorize(label: Tensor, palette: Sequence[Sequence[int]], ignore_color: Sequence[int] = (255, 255, 255)) -> Tensor:
    """Class indices H×W -> uint8 RGB 3×H×W using `palette`; 255 (void) and out-of-range values -> ignore_color."""
    table = torch.tensor([*palette] + [ignore_color] * (256 - len(palette)), dtype=torch.uint8, device=label.device)
    index = label.long()
    index = index.where((index >= 0) & (index < 256), IGNORE_INDEX)
    return table[index].permute(2, 0, 1).contiguous()

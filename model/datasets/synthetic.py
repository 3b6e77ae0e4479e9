"""An embedded data set generated on the fly: textured shapes of four classes over cluttered backgrounds.

Each class has its own shape, colour family and texture, objects overlap, and object borders are void (255)
as in VOC. Item i of a split is a pure function of (seed, split, i), so any worker order gives the same data.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from model import IGNORE_INDEX
from .base import Transform

SYNTHETIC_CLASSES = ["background", "disc", "box", "triangle", "cross"]
SYNTHETIC_PALETTE = [(0, 0, 0), (220, 50, 50), (50, 180, 60), (50, 80, 220), (220, 190, 40)]
OBJECT_COLORS = np.array(SYNTHETIC_PALETTE[1:], dtype=np.float32)
NOISE_STD = 8.0
BORDER_RADIUS = 1  # a pixel is void when its (2r+1)² neighbourhood spans more than one class
SHAPE_REACH = 1.2  # every shape lies within this many radii of its centre (the box's corners: 0.8·√2 ≈ 1.13)


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray, radius: float, aspect: float) -> np.ndarray:
    """Inside test in object coordinates (u, v) for class `kind` (1 disc, 2 box, 3 triangle, 4 cross)."""
    if kind == 1:
        return (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1
    if kind == 2:
        return (np.abs(u) <= 0.8 * radius) & (np.abs(v) <= 0.8 * radius * aspect)
    if kind == 3:
        inside = np.ones(u.shape, dtype=bool)
        for angle in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= u * np.cos(angle) + v * np.sin(angle) <= radius / 2
        return inside
    arm = radius / 3
    return ((np.abs(u) <= radius) & (np.abs(v) <= arm)) | ((np.abs(u) <= arm) & (np.abs(v) <= radius))


def _texture(kind: int, x: np.ndarray, y: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Per-class brightness pattern in [0.6, 1]: stripes, checks, diagonal stripes, dots."""
    if kind == 1:
        on = np.sin(2 * np.pi * y / period + phase) > 0
    elif kind == 2:
        on = (np.floor(x / period) + np.floor(y / period)) % 2 == 0
    elif kind == 3:
        on = np.sin(2 * np.pi * (x + y) / period + phase) > 0
    else:
        on = np.sin(2 * np.pi * x / period + phase) * np.sin(2 * np.pi * y / period + phase) > -0.3
    return np.where(on, 1.0, 0.6)


def _rotated(dx: np.ndarray, dy: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (dx, dy) in a frame rotated by `angle`."""
    return dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)


def _around(cx: float, cy: float, reach: float, size: int) -> tuple[slice, slice]:
    """The rows and columns of a size × size image within `reach` of (cx, cy), and a pixel more: an object drawn
    there alone gets exactly the pixels it would get tested everywhere."""
    def span(centre: float) -> slice:
        return slice(max(0, int(np.floor(centre - reach)) - 1), min(size, int(np.ceil(centre + reach)) + 2))
    return span(cy), span(cx)


def _colour_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A blocky greyish colour field, float32 size × size × 3."""
    coarse = rng.uniform(60, 190, (4, 4, 1)) + rng.uniform(-15, 15, (4, 4, 3))
    cells = np.clip((np.arange(size) * 4) // size, 0, 3)
    image = coarse[cells[:, None], cells[None, :]].astype(np.float32)
    return (image + np.roll(image, size // 8, 0) + np.roll(image, size // 8, 1)) / 3


def _background(rng: np.random.Generator, size: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The colour field with desaturated clutter (bars and blobs)."""
    image = _colour_field(rng, size)
    for _ in range(rng.integers(4, 12)):
        grey = rng.uniform(30, 230) + rng.uniform(-12, 12, 3)
        cx, cy = rng.uniform(0, size, 2)
        angle = rng.uniform(0, np.pi)
        if rng.random() < 0.6:  # a bar
            half_length, half_width = rng.uniform(0.025, 0.15) * size, rng.uniform(1, 4)
            box = _around(cx, cy, np.hypot(half_length, half_width), size)
            u, v = _rotated(x[box] - cx, y[box] - cy, angle)
            clutter = (np.abs(u) <= half_length) & (np.abs(v) <= half_width)
        else:  # a blob
            blob_radius = 2 * rng.uniform(1, 4)
            box = _around(cx, cy, blob_radius, size)
            u, v = _rotated(x[box] - cx, y[box] - cy, angle)
            clutter = u ** 2 + v ** 2 <= blob_radius ** 2
        image[box][clutter] = grey
    return image


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 H×W×3) and its label (uint8 H×W, 255 on object borders)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rng, size, x, y)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 5)):
        kind = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        radius, aspect, angle = rng.uniform(0.12, 0.3) * size, rng.uniform(0.6, 1.0), rng.uniform(0, 2 * np.pi)
        box = _around(cx, cy, SHAPE_REACH * radius, size)
        u, v = _rotated(x[box] - cx, y[box] - cy, angle)
        inside = _shape_mask(kind, u, v, radius, aspect)
        color = OBJECT_COLORS[kind - 1] + rng.uniform(-25, 25, 3)
        shade = _texture(kind, u, v, rng.uniform(3, 7), rng.uniform(0, 2 * np.pi))
        image[box][inside] = shade[inside, None] * color
        label[box][inside] = kind
    image += rng.normal(0, NOISE_STD, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), void_borders(label)


def void_borders(label: np.ndarray) -> np.ndarray:
    """Mark 255 where the label changes within BORDER_RADIUS pixels."""
    r = BORDER_RADIUS
    padded = np.pad(label, r, mode="edge")
    height, width = label.shape
    border = np.zeros(label.shape, dtype=bool)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            border |= padded[dy:dy + height, dx:dx + width] != label
    return np.where(border, IGNORE_INDEX, label).astype(np.uint8)


class SyntheticSegmentation(Dataset):
    """`length` generated items of a split; deterministic per (seed, split, index)."""

    classes = SYNTHETIC_CLASSES
    palette = SYNTHETIC_PALETTE
    has_labels = True

    def __init__(self, split: str, transform: Transform, seed: int, length: int, image_size: int) -> None:
        self.split_key = zlib.crc32(split.encode())
        self.seed, self.image_size, self.transform = seed, image_size, transform
        self.names = [f"synthetic_{split}_{i:05d}" for i in range(length)]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        image, label = render(np.random.default_rng([self.seed, self.split_key, index]), self.image_size)
        return self.transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),
                              tv_tensors.Mask(torch.from_numpy(label)))

"""Sliding windows (model/inference.py): batched windows equal one-at-a-time windows, both blends equal a plain
forward where they must (a pointwise model), and each blend equals a brute-force weighted average."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.inference import predict_logits, sliding_window_logits
from model.net import GCN, GCNConfig


class WindowMean(nn.Module):
    """Each window's per-channel mean everywhere in it: its output depends on which window a pixel is in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1), keepdim=True).expand_as(x).clone()


def brute_force(model: nn.Module, image: torch.Tensor, window: int, gaussian: bool) -> torch.Tensor:
    """One window at a time, each pixel's weight written out: exp(-d²/2σ²) per axis, σ = window/8, or 1."""
    _, _, h, w = image.shape
    stride = window * 2 // 3
    tops = sorted({*range(0, h - window, stride), h - window})
    lefts = sorted({*range(0, w - window, stride), w - window})
    centre, sigma = (window - 1) / 2, window / 8
    weight = torch.tensor([[math.exp(-((i - centre) ** 2 + (j - centre) ** 2) / (2 * sigma ** 2)) if gaussian else 1.0
                            for j in range(window)] for i in range(window)])
    total, weights = torch.zeros_like(image), torch.zeros(h, w)
    for top in tops:
        for left in lefts:
            tile = model(image[..., top:top + window, left:left + window])
            total[..., top:top + window, left:left + window] += tile * weight
            weights[top:top + window, left:left + window] += weight
    return total / weights


@pytest.mark.parametrize("gaussian", [False, True])
def test_both_blends_equal_a_plain_forward_for_a_pointwise_model(gaussian):
    torch.manual_seed(0)
    image = torch.randn(2, 3, 37, 13)  # narrower than the window: padded, then cropped back
    model = nn.Conv2d(3, 4, 1)
    whole = model(image)
    tiled = predict_logits(model, image, window=16, gaussian=gaussian)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gaussian", [False, True])
def test_each_blend_is_the_weighted_average_of_the_windows(gaussian):
    torch.manual_seed(0)
    image = torch.randn(2, 3, 41, 53)
    expected = brute_force(WindowMean(), image, 16, gaussian)
    torch.testing.assert_close(sliding_window_logits(WindowMean(), image, 16, gaussian), expected)
    if gaussian:
        assert not torch.allclose(expected, brute_force(WindowMean(), image, 16, False), atol=1e-3)


def test_batched_windows_equal_one_at_a_time():
    gaussian = True  # the blends share the batching; the weights are checked above
    torch.manual_seed(0)
    model = GCN(GCNConfig(num_classes=3, backbone="resnet18", kernel_size=3)).eval()
    image = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        one_at_a_time = sliding_window_logits(model, image, 32, gaussian, batch=1)
        for batch in (3, 8):  # 6 windows: a partial last batch, and all at once
            torch.testing.assert_close(sliding_window_logits(model, image, 32, gaussian, batch=batch), one_at_a_time,
                                       rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sliding_window_logits(model, image[:1], 32, gaussian, batch=1), one_at_a_time[:1],
                                   rtol=1e-4, atol=1e-5)

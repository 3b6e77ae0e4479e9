"""Pixel geometry: every stage's scores land on the image pixels they were computed from, upsampling keeps
constants up to the border, and test-time augmentation maps predictions back exactly."""
import pytest
import torch
from torch import nn


from model import net
from model.inference import predict_logits
from model.net import GCN, GCNConfig, Upsample2x


def probe_model(backbone: str, upsample: str, stage: int) -> GCN:
    """A linear, position-neutral GCN whose output is stage `stage`'s score map alone.

    Every convolution averages its inputs (weights 1/fan_in), batch norm is the identity, the max-pool becomes an
    average-pool of the same geometry, the heads are 1×1 convolutions, there is no BR, and the other stages'
    heads are zero. The gradient of one output pixel is then a positive weighting of the input pixels it was
    computed from.
    """
    model = GCN(GCNConfig(1, backbone, kernel_size=1, head="1x1", boundary_refine=False, upsample=upsample)).eval()
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.fill_(1 / module.weight[0].numel())
        for index, head in enumerate(model.heads):
            head.weight.fill_(1 / head.weight[0].numel() if index == stage else 0.0)
            head.bias.zero_()
    model.backbone["stem"][3] = nn.AvgPool2d(3, stride=2, padding=1)
    return model


def gradient_centroid(model: nn.Module, height: int, width: int, row: int, col: int) -> tuple[float, float]:
    """The input-gradient-weighted centroid (row, col) of output pixel (row, col)."""
    x = torch.ones(1, 3, height, width, requires_grad=True)
    model(x)[0, 0, row, col].backward()
    weight = x.grad.sum(1)[0]
    assert (weight >= 0).all() and weight.sum() > 0
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    total = weight.double().sum()
    return ((weight * rows).sum() / total).item(), ((weight * cols).sum() / total).item()


@pytest.mark.parametrize("upsample", net.UPSAMPLES)
@pytest.mark.parametrize("backbone,height,width,row,col", [
    ("resnet18", 256, 256, 128, 128),
    ("resnet18", 255, 263, 127, 131),
    ("resnet50", 257, 250, 128, 125),
])
def test_every_stage_scores_the_pixels_it_was_computed_from(backbone, height, width, row, col, upsample):
    for stage in range(4):
        centroid = gradient_centroid(probe_model(backbone, upsample, stage), height, width, row, col)
        offset = (centroid[0] - row, centroid[1] - col)
        assert max(map(abs, offset)) <= 0.5, f"res-{stage + 2} is off by {offset} px"


@pytest.mark.parametrize("mode", net.UPSAMPLES)
@pytest.mark.parametrize("coarse,fine", [((6, 8), (12, 16)), ((6, 8), (11, 15)), ((1, 1), (2, 1)), ((5, 3), (9, 6))])
def test_upsampling_a_constant_map_gives_the_constant_everywhere(mode, coarse, fine):
    constants = torch.tensor([1.5, -2.0, 7.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        y = Upsample2x(3, mode)(constants.expand(2, 3, *coarse).contiguous(), fine)
    assert y.shape == (2, 3, *fine)
    torch.testing.assert_close(y, constants.expand(2, 3, *fine), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", net.UPSAMPLES)
def test_upsampling_puts_coarse_pixel_j_on_fine_pixel_2j_and_interpolates_between(mode):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 7)
    with torch.no_grad():
        y = Upsample2x(2, mode)(x, (10, 13))
    torch.testing.assert_close(y[..., ::2, ::2], x[..., :, :7], rtol=0, atol=1e-6)
    torch.testing.assert_close(y[..., 1:-1:2, ::2], (x[..., :-1, :] + x[..., 1:, :]) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(y[..., ::2, 1::2], (x[..., :, :-1] + x[..., :, 1:]) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(y[..., -1, ::2], x[..., -1, :], rtol=0, atol=1e-6)  # the replicated edge


@pytest.mark.parametrize("scales,flip", [((0.5,), False), ((0.75,), True), ((0.5, 0.75, 1.0, 1.25, 1.5), True),
                                         ((0.37,), False)])
def test_test_time_augmentation_maps_a_ramp_back_exactly(scales, flip):
    """An identity 'model' on a linear ramp: any scale and flip must give the ramp back at every pixel not
    within reach of the border (where resizing must clamp)."""
    height, width = 375, 497
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    ramp = torch.stack([rows, cols, 0.3 * rows - 0.7 * cols])[None]
    out = predict_logits(nn.Identity(), ramp, scales, flip)
    assert out.shape == ramp.shape
    margin = int(3 / min(scales)) + 1
    inner = (..., slice(margin, -margin), slice(margin, -margin))
    torch.testing.assert_close(out[inner], ramp[inner], rtol=0, atol=0.1)  # px: antialiasing rounds a little


def test_test_time_augmentation_antialiases_when_shrinking():
    """A one-pixel checkerboard averages to its mean at half scale (plain bilinear sampling would alias it)."""
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float().expand(1, 1, 64, 64)
    shrunk_and_back = predict_logits(nn.Identity(), checker, (0.5,))
    torch.testing.assert_close(shrunk_and_back[..., 4:-4, 4:-4], torch.full((1, 1, 56, 56), 0.5), rtol=0, atol=1e-3)

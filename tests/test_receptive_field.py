"""analyze_receptive_field.py on a network whose receptive field is known exactly, and its command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import analyze_receptive_field as arf
import checkpoints
import utils
from model.net import GCN, GCNConfig


def uniform_(conv: nn.Conv2d) -> nn.Conv2d:
    with torch.no_grad():
        conv.weight.fill_(1 / conv.weight[0].numel())
        if conv.bias is not None:
            conv.bias.zero_()
    return conv


def known_field_model(kernel: int) -> GCN:
    """A GCN whose res-5 cell (a, b) is the mean of input block [32a, 32a + 32) × [32b, 32b + 32) (non-overlapping
    averaging convolutions), whose res-5 head is a uniform k×k GCN and whose other heads are zero; no BR, fixed
    bilinear upsampling. Output pixel (32a, 32b) is then the mean of the k×k res-5 cells around (a, b): its
    gradient is uniform on those cells and on the 32k × 32k input square they cover, and zero elsewhere."""
    model = GCN(GCNConfig(1, "resnet18", kernel_size=kernel, head="gcn", boundary_refine=False, upsample="bilinear"))
    model.backbone["stem"] = uniform_(nn.Conv2d(3, 64, 4, stride=4))
    model.backbone["layer1"] = nn.Identity()
    for stage, (cin, cout) in zip(("layer2", "layer3", "layer4"), ((64, 128), (128, 256), (256, 512))):
        model.backbone[stage] = uniform_(nn.Conv2d(cin, cout, 2, stride=2))
    for index, head in enumerate(model.heads):
        for conv in head.modules():
            if isinstance(conv, nn.Conv2d):
                uniform_(conv)
                if index < 3:
                    with torch.no_grad():
                        conv.weight.zero_()
    return model.eval()


def brute_force_radius(cells: list[tuple[int, int]], centre: tuple[float, float], fraction: float) -> float:
    """Equal-weight cells: the distance of the ceil(fraction · n)-th nearest."""
    distances = sorted(((r - centre[0]) ** 2 + (c - centre[1]) ** 2) ** 0.5 for r, c in cells)
    return distances[int(np.ceil(fraction * len(distances) - 1e-9)) - 1]


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_the_gradients_cover_exactly_the_known_receptive_field(kernel):
    a, b = 4, 5
    image = torch.randn(1, 3, 9 * 32, 11 * 32)
    analysis = arf.analyse(known_field_model(kernel), "x", image, (32 * a, 32 * b), 0.9)
    half = kernel // 2
    res5 = torch.zeros(9, 11, dtype=torch.bool)
    res5[a - half:a + half + 1, b - half:b + half + 1] = True
    assert torch.equal(analysis.gradients.res5 > 0, res5)
    # Each branch averages k·k·512 values and the two are summed: 2 / k² per cell over the 512 channels.
    torch.testing.assert_close(analysis.gradients.res5[res5], torch.full((kernel ** 2,), 2 / kernel ** 2), rtol=1e-4,
                               atol=0)
    pixels = torch.zeros(9 * 32, 11 * 32, dtype=torch.bool)
    pixels[32 * (a - half):32 * (a + half + 1), 32 * (b - half):32 * (b + half + 1)] = True
    grad = analysis.gradients.image
    assert torch.equal(grad > 0, pixels)
    torch.testing.assert_close(grad[pixels], torch.full_like(grad[pixels], grad[pixels].mean().item()), rtol=1e-4,
                               atol=0)
    cells = [(r, c) for r in range(a - half, a + half + 1) for c in range(b - half, b + half + 1)]
    assert analysis.res5_radius == pytest.approx(brute_force_radius(cells, (a, b), 0.9), abs=1e-9)
    square = [tuple(p) for p in pixels.nonzero().tolist()]
    assert analysis.input_radius == pytest.approx(brute_force_radius(square, (32 * a, 32 * b), 0.9), abs=1e-9)


def test_mass_radius_by_hand():
    weights = torch.zeros(5, 5)
    weights[2, 2], weights[2, 4] = 9.0, 1.0
    assert arf.mass_radius(weights, (2, 2), 0.9) == 0.0
    assert arf.mass_radius(weights, (2, 2), 0.95) == 2.0
    assert arf.mass_radius(torch.ones(3, 3), (1, 1), 0.9) == pytest.approx(2 ** 0.5)


def test_the_command_writes_pictures_and_metrics_for_each_model_and_a_comparison(experiment, tmp_path):
    dirs = []
    for name, head, kernel in (("k3", "gcn", 3), ("one", "1x1", 1)):
        model_dir = experiment(name, head=head, kernel_size=kernel)
        torch.manual_seed(0)
        model = GCN(GCNConfig(5, "resnet18", kernel_size=kernel, head=head))
        checkpoints.save_checkpoint({"state_dict": model.state_dict(), "model_config": vars(model.config),
                               "class_names": list("abcde"), "palette": [[i, i, i] for i in range(5)]},
                              model_dir / utils.BEST_CHECKPOINT)
        dirs += ["--model_dir", str(model_dir)]
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 97, 3), dtype=np.uint8)).save(photo)
    compare = tmp_path / "compare.png"
    assert arf.main([*dirs, str(photo), "--pixel", "10,20", "--pixel", "69,96", "--compare", str(compare)]) == 0
    for name, kernel in (("k3", 3), ("one", 1)):
        metrics = json.loads((tmp_path / name / "metrics_receptive_field_best.json").read_text())
        assert metrics["kernel_size"] == kernel and [p["pixel"] for p in metrics["pixels"]] == [[10, 20], [69, 96]]
        assert all(p["input_radius_px"] > 0 and p["class"] in "abcde" for p in metrics["pixels"])
        assert sorted(p.name for p in (tmp_path / name / "receptive_field").iterdir()) == ["photo_10_20.png",
                                                                                          "photo_69_96.png"]
    assert Image.open(compare).size[0] > Image.open(tmp_path / "k3" / "receptive_field" / "photo_10_20.png").size[0]
    assert arf.main([*dirs[:2], "--pixel", "48,0"]) == 2  # the synthetic val image is 48×48
    assert arf.main([*dirs[:2], "--pixel", "1-2"]) == 2
    assert arf.main([*dirs[:2]]) == 0  # the first val image, its centre


@pytest.mark.parametrize("kernel, size", [(3, (40, 56)), (1, (70, 97))])
def test_the_kernel_square_the_legend_promises_is_drawn_even_around_a_small_image(kernel, size, tmp_path):
    """k = 3 spans 96 px of res-5 cells, more than a 40 × 56 image: the view widens to show the whole square."""
    height, width = size
    generator = torch.Generator().manual_seed(0)
    gradients = arf.Gradients(torch.rand(height, width, generator=generator),
                              torch.rand(-(-height // 32), -(-width // 32), generator=generator), 0)
    image = torch.full((3, height, width), 128, dtype=torch.uint8)
    analysis = arf.Analysis("small", image, (height // 2, width // 2), gradients, 10.0, 1.0)
    arf.figure([(f"k = {kernel}", analysis, kernel)], tmp_path / "field.png")
    rgb = np.asarray(Image.open(tmp_path / "field.png").convert("RGB")).astype(int)
    cyan = (rgb[..., 0] < 40) & (rgb[..., 1] > 215) & (rgb[..., 2] > 215)
    rows, cols = np.nonzero(cyan)
    assert cyan.sum() > 100, "no cyan kernel square drawn"
    # In both panels (above and below the widest band of rows without cyan) the cyan spans a square: all four edges
    drawn = np.unique(rows)
    gap = drawn[np.argmax(np.diff(drawn))]
    for panel in (rows <= gap, rows > gap):
        extent_rows, extent_cols = np.ptp(rows[panel]), np.ptp(cols[panel])
        assert abs(extent_rows - extent_cols) <= 3 and extent_rows > 20

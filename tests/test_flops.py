"""model/summary.py: the FLOPs `python -m model.net --size H W` prints, against a count by hand of every convolution."""
from __future__ import annotations

import re
import sys

import torch

from model import net
from model.summary import count_flops, inference_flops
from model.net import GCN, GCNConfig


def conv(c_in: int, c_out: int, kernel: tuple[int, int], pixels: int) -> int:
    """A convolution's FLOPs: 2 per multiply-add, the whole kernel at each of `pixels` output pixels."""
    return 2 * c_in * c_out * kernel[0] * kernel[1] * pixels


def test_a_tiny_gcn_counts_what_a_hand_count_of_its_convolutions_gives(monkeypatch, capsys):
    """ResNet-18, k = 3, 2 classes, one 64×64 image: stages at 16², 8², 4², 2² pixels."""
    n, k = 2, 3
    stages = [(64, 16 * 16), (128, 8 * 8), (256, 4 * 4), (512, 2 * 2)]
    backbone = conv(3, 64, (7, 7), 32 * 32) + 4 * conv(64, 64, (3, 3), 16 * 16)  # stem, layer1's two blocks
    for (c_in, _), (c, pixels) in zip(stages, stages[1:]):  # layer2..4: a strided block with a 1×1 shortcut, a plain
        backbone += conv(c_in, c, (3, 3), pixels) + conv(c_in, c, (1, 1), pixels) + 3 * conv(c, c, (3, 3), pixels)
    refine = [2 * conv(n, n, (3, 3), pixels) for pixels in (16 * 16, 8 * 8, 4 * 4, 2 * 2, 32 * 32, 64 * 64)]
    heads = sum(2 * conv(c, n, (k, 1), pixels) + 2 * conv(n, n, (k, 1), pixels) for c, pixels in stages)
    heads += sum(refine[:4])  # each head's BR
    # Decoder: five ×2 deconvolutions (3×3; a transposed convolution counts its input pixels: the map with its last
    # row and column replicated) from 2², 4², 8², 16², 32², each followed by a BR at the size it reaches
    decoder = sum(conv(n, n, (3, 3), (side + 1) ** 2) for side in (2, 4, 8, 16, 32))
    decoder += sum(refine[2::-1]) + sum(refine[4:])

    def build() -> GCN:
        return GCN(GCNConfig(n, "resnet18", k))

    expected = {"backbone": backbone, "heads": heads, "decoder": decoder, "total": backbone + heads + decoder}
    assert inference_flops(build, 64, 64) == expected
    model = build().eval()  # the meta device counts what a real forward pass does
    with torch.no_grad():
        assert count_flops(model, lambda: model(torch.zeros(1, 3, 64, 64))) == expected

    monkeypatch.setattr(sys, "argv", ["model.net", "--backbone", "resnet18", "--num_classes", "2", "--kernel_size",
                                      "3", "--size", "64", "64"])
    net.main()
    printed = capsys.readouterr().out.split("FLOPs of one 64×64 image")[1]
    shown = {m.group(1): float(m.group(2).replace(",", "")) for m in re.finditer(
        r"^(backbone|heads|decoder|total)\s+([\d,.]+)$", printed, re.M)}
    assert shown == {part: round(flops / 1e6, 2) for part, flops in expected.items()}

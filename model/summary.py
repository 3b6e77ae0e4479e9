"""A network's parameters and FLOPs by part (the GCN's backbone, heads with their BR, decoder): what
`python -m model.net --size H W` prints for paper tables. FLOPs are counted with torch.utils.flop_counter, as
benchmarks/benchmark.py counts those it divides by a step's time."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# The GCN's parts, as GCN.parameter_groups names them, by the submodules that compute them
PARTS = {"backbone": ("backbone",), "heads": ("heads", "head_refines"), "decoder": ("upsamples", "decoder_refines")}


def count_flops(model: nn.Module, run: Callable[[], object]) -> dict[str, int]:
    """The FLOPs of run() (a forward pass of `model`, or a forward and backward one) by part of `model` (PARTS; 0 for a
    model without them) and in all ("total").

    torch.utils.flop_counter's convention: convolutions and matrix products only (no bias, batch norm, ReLU, sum or
    interpolation), 2 FLOPs per multiply-add (papers that quote multiply-adds give half), the whole kernel at every
    output pixel (padding included).
    """
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    by_module = counter.get_flop_counts()  # every called module by its path, e.g. "GCN.heads.0"
    root = type(model).__name__

    def part(children: tuple[str, ...]) -> int:  # a ModuleDict or ModuleList is never called: sum its children
        prefixes = [f"{root}.{child}." for child in children]
        return sum(sum(ops.values()) for name, ops in by_module.items() for prefix in prefixes
                   if name.startswith(prefix) and "." not in name[len(prefix):])
    return {**{name: part(children) for name, children in PARTS.items()}, "total": counter.get_total_flops()}


def inference_flops(build: Callable[[], nn.Module], height: int, width: int) -> dict[str, int]:
    """count_flops of one height×width image's forward pass through the network build() makes, built and run on the
    meta device: shapes only, no memory or arithmetic (a ResNet-152 at 2048² counts at once)."""
    with torch.device("meta"):
        model = build().eval()
    with torch.no_grad():
        return count_flops(model, lambda: model(torch.empty(1, 3, height, width, device="meta")))


def parameter_summary(model: nn.Module) -> str:
    """A per-part parameter count table (model.parameter_groups(): backbone, heads incl. their BR, decoder), total."""
    counts = {part: sum(p.numel() for p in params) for part, params in model.parameter_groups().items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    width = max(len(k) for k in counts)
    return "\n".join(f"{part:<{width}}  {n:>12,}" for part, n in counts.items())


def flops_summary(flops: dict[str, int], height: int, width: int) -> str:
    """inference_flops' count as a table, in GFLOPs (MFLOPs below 1 GFLOP in all)."""
    unit, scale = ("G", 1e9) if flops["total"] >= 1e9 else ("M", 1e6)
    title = f"{unit}FLOPs of one {height}×{width} image's forward pass (2 per multiply-add, torch.utils.flop_counter):"
    return "\n".join([title, *(f"{part:<8}  {n / scale:>12,.2f}" for part, n in flops.items())])

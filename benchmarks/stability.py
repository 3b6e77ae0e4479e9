"""From-scratch stability probe: does a setting diverge, and which part's gradients grow first?

    python -m benchmarks.stability --data_dir ../shared/data/voc2012_2007subset/VOCdevkit/VOC2012 [--seeds 230 1 2]
        [--head 1x1 --kernel_size 1] [--no_br] [--upsample bilinear] [--only_res5] [--clip 5] [--model fcn_resnet50]

Trains the demo's settings (ResNet-18, k = 7, lr 0.02, momentum 0.9, batch 4, 96² crops, random scale 0.75-1.25)
on a VOC train split for --iterations steps per seed, and prints per step the loss, the largest |logit| and the
gradient norm of the backbone, the heads (with their BR blocks) and the decoder; then, per seed, whether the loss
diverged (NaN, or above 10 at the end). docs/training.md, "Training from scratch", quotes its figures.
"""
from __future__ import annotations

import sys

import argparse
import math

import torch
import torchvision
from torch import nn

if not __package__:  # run as a file: the repository's modules are importable only from its root
    sys.exit("error: run it from the repository root as a module: python -m benchmarks.stability ...")

from benchmarks.benchmark import LogitsOnly  # noqa: E402
from model.data_loader import DataConfig, EpochSampler, build_dataloader, build_dataset  # noqa: E402
from model.net import GCN, GCNConfig, cross_entropy_loss  # noqa: E402


def build_model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, list[nn.Parameter]]]:
    """The model and its parameters by part (one part for torchvision's FCN)."""
    if args.model == "fcn_resnet50":
        fcn = LogitsOnly(torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None,
                                                                      num_classes=21))
        return fcn, {"all": list(fcn.parameters())}
    gcn = GCN(GCNConfig(21, "resnet18", args.kernel_size, head=args.head, boundary_refine=not args.no_br,
                        upsample=args.upsample))
    if args.only_res5:  # one score map: the other stages' heads are zero and frozen
        for head in list(gcn.heads)[:3]:
            for param in head.parameters():
                param.data.zero_()
                param.requires_grad_(False)
    return gcn, gcn.parameter_groups()


def probe(args: argparse.Namespace, seed: int) -> bool:
    """Train one seed; True if it diverged."""
    torch.manual_seed(seed)
    dataset = build_dataset(DataConfig("voc", args.data_dir, crop_size=96, scale_range=[0.75, 1.25]), 21, "train",
                            train=True)
    sampler = EpochSampler(len(dataset), 4, seed)
    loader = build_dataloader(dataset, 4, sampler, num_workers=0, drop_last=True, pin_memory=False)
    model, parts = build_model(args)
    model.to(memory_format=torch.channels_last).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.02, momentum=0.9, weight_decay=1e-4)
    step, loss_value = 0, 0.0
    while step < args.iterations:
        sampler.set_epoch(step)
        for images, labels in loader:
            logits = model(images.contiguous(memory_format=torch.channels_last))
            loss = cross_entropy_loss(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norms = {part: torch.norm(torch.stack(grads)).item() for part, params in parts.items()
                     if (grads := [p.grad.norm() for p in params if p.grad is not None])}
            if args.clip:
                nn.utils.clip_grad_norm_(trained, args.clip)
            optimizer.step()
            step, loss_value = step + 1, loss.item()
            print(f"seed {seed} step {step:3d}: loss {loss_value:10.3f}  max |logit| {logits.abs().max().item():10.1f}"
                  "  gradient norms " + "  ".join(f"{part} {n:8.2f}" for part, n in norms.items()), flush=True)
            if not math.isfinite(loss_value) or step >= args.iterations:
                break
        if not math.isfinite(loss_value):
            break
    return not math.isfinite(loss_value) or loss_value > 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="a VOC2012 folder (JPEGImages, SegmentationClass, ...)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[230, 1, 2])
    parser.add_argument("--iterations", type=int, default=78, help="default: one epoch of 311 images at batch 4")
    parser.add_argument("--model", default="gcn", choices=("gcn", "fcn_resnet50"))
    parser.add_argument("--head", default="gcn")
    parser.add_argument("--kernel_size", type=int, default=7)
    parser.add_argument("--no_br", action="store_true", help="no Boundary Refinement blocks")
    parser.add_argument("--upsample", default="deconv", choices=("deconv", "bilinear"))
    parser.add_argument("--only_res5", action="store_true", help="only the res-5 score map (an FCN-32s-like GCN)")
    parser.add_argument("--clip", type=float, default=None, help="clip the gradient norm to this value")
    args = parser.parse_args()
    diverged = [seed for seed in args.seeds if probe(args, seed)]
    print(f"{len(diverged)} of {len(args.seeds)} seeds diverged" + (f" ({diverged})" if diverged else ""))


if __name__ == "__main__":
    main()

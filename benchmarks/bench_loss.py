"""The training loss on channels-last logits, forward + backward: over pixel rows or over channels, per class count.

    python -m benchmarks.bench_loss [--device cuda] [--classes 5 11 16 19 21] [--json out.json]

model.net.cross_entropy_loss reads NHWC logits as (pixels × classes) rows from ROW_LOSS_MIN_CLASSES classes on
and over the channel dimension below; this prints both on the machine at hand, under train.py's autocast, with
the median time of each and which one the loss takes.
"""
from __future__ import annotations

import sys

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

if not __package__:  # run as a file: the repository's modules are importable only from its root
    sys.exit("error: run it from the repository root as a module: python -m benchmarks.bench_loss ...")

import utils  # noqa: E402
from benchmarks.benchmark import median_seconds  # noqa: E402
from model import IGNORE_INDEX  # noqa: E402
from model.net import ROW_LOSS_MIN_CLASSES  # noqa: E402


def summed_loss(logits: Tensor, labels: Tensor, layout: str) -> Tensor:
    """The cross entropy summed over pixels, computed over pixel rows ("rows") or over channels ("channels")."""
    if layout == "rows":
        logits, labels = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]), labels.reshape(-1)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def time_layouts(num_classes: int, batch_size: int, crop: int, device: torch.device, dtype: torch.dtype | None,
                 repeats: int) -> dict:
    """Seconds per forward + backward of each layout, and the loss of each (they must agree)."""
    generator = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(batch_size, num_classes, crop, crop, generator=generator).to(device, dtype or torch.float32)
    logits = logits.contiguous(memory_format=torch.channels_last).requires_grad_()
    labels = torch.randint(0, num_classes, (batch_size, crop, crop), generator=generator).to(device)
    labels[:, :crop // 8] = IGNORE_INDEX
    result: dict = {"chosen": "rows" if num_classes >= ROW_LOSS_MIN_CLASSES else "channels"}
    for layout in ("rows", "channels"):
        def step(layout: str = layout) -> Tensor:
            with utils.autocast(device, dtype):
                loss = summed_loss(logits, labels, layout)
            loss.backward()
            return loss
        result[f"{layout}_s"] = median_seconds(step, device, warmup=2, repeats=repeats)
        result[f"{layout}_loss"] = step().item()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, nargs="+", default=[5, 11, 16, 19, 21])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--no_amp", action="store_true", help="float32 logits instead of train.py's amp")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = utils.autocast_dtype(device, not args.no_amp)
    results = {str(c): time_layouts(c, args.batch_size, args.crop, device, dtype, args.repeats) for c in args.classes}
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})",
               "dtype": str(dtype or torch.float32), "batch_size": args.batch_size, "crop": args.crop,
               "classes": results}
    print(f"device {summary['device']}, logits {summary['dtype']} {args.batch_size}×C×{args.crop}², channels_last")
    print("classes  rows ms  channels ms  cross_entropy_loss takes")
    for classes, r in results.items():
        print(f"{classes:>7}  {r['rows_s'] * 1e3:7.2f}  {r['channels_s'] * 1e3:11.2f}  {r['chosen']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()

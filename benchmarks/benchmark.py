"""Training/inference speed of the GCN next to torchvision's FCN and DeepLabV3, on CPU or CUDA.

    python -m benchmarks.benchmark --backbone resnet50 --crop 512 --batch_size 8 [--json out.json]

Reports, all measured in this one run: training-step images/s and peak memory for GCN, fcn_resnet50 and
deeplabv3_resnet50 (and their time ratios), inference latency and throughput at --eval_size, the achieved
fraction of this device's measured dense matmul rate (whole model and backbone-only FLOPs, counted with
torch.utils.flop_counter), and the data pipeline's images/s with --workers, next to the step rate. Meanwhile a
progress bar (on a terminal) names the stage being measured.
"""
from __future__ import annotations

import sys

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

if not __package__:  # run as a file: the repository's modules are importable only from its root
    sys.exit("error: run it from the repository root as a module: python -m benchmarks.benchmark ...")

import train_step  # noqa: E402
import utils  # noqa: E402
from benchmarks.bench_data import images_per_second, make_voc_tree  # noqa: E402
from model.net import GCN, GCNConfig, SegmentationLoss, cross_entropy_loss  # noqa: E402
from model.summary import count_flops  # noqa: E402
from terminal import progress_bar  # noqa: E402


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of step() after warm-up (device-synchronised)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        synchronise(device)
        start = time.perf_counter()
        step()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rates(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> dict[str, float]:
    """Measured dense matmul FLOP/s of this device for a size³ product (median), by two kernels.

    torch.matmul runs the BLAS library; the same product as a 1×1 convolution runs oneDNN / cuDNN, which can be
    much faster (on the AMD development CPU: 0.22 vs 0.4–0.5 TFLOP/s in float32). The benchmark's reference is the
    faster of the two, the dense rate this device can actually reach, so no fraction can exceed 100%.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    pixels, weight = conv1x1_operands(a, b)
    seconds = {"torch.matmul": median_seconds(lambda: a @ b, device, warmup=2, repeats=repeats),
               "conv1x1": median_seconds(lambda: F.conv2d(pixels, weight), device, warmup=2, repeats=repeats)}
    return {kernel: 2 * size ** 3 / s for kernel, s in seconds.items()}


def conv1x1_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, weight) such that F.conv2d(input, weight)[0, :, 0, :] is (a @ b).T: an M×K by K×N product as a
    1×1 convolution of a channels_last 1×K×1×M image (a GEMM in oneDNN / cuDNN)."""
    pixels = a.view(1, 1, *a.shape).permute(0, 3, 1, 2)
    weight = b.t().contiguous().view(b.shape[1], b.shape[0], 1, 1)  # a strided weight would be re-laid every call
    return pixels, weight


class LogitsOnly(nn.Module):
    """torchvision segmentation models return a dict; keep the 'out' logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def build_models(backbone: str, num_classes: int, kernel_size: int, pad_scores: bool = True) -> dict[str, nn.Module]:
    seg = torchvision.models.segmentation
    gcn = GCN(GCNConfig(num_classes, backbone, kernel_size))
    if not pad_scores:
        gcn.score_channel_multiple = 1
    return {
        f"gcn_{backbone}": gcn,
        "fcn_resnet50": LogitsOnly(seg.fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes)),
        "deeplabv3_resnet50": LogitsOnly(seg.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                 num_classes=num_classes)),
    }


def train_step_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, amp_dtype: torch.dtype | None,
                  cuda_graph: bool = False) -> Callable[[], torch.Tensor]:
    """train.py's step (train_step.py: fused SGD, poly schedule; captured in a CUDA graph with cuda_graph)."""
    device = images.device
    placement = utils.Placement(device, images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last),
                                amp_dtype)
    optimizer = train_step.build_sgd([{"params": list(model.parameters()), "lr": 1e-3}], 0.9, 1e-4, placement)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1 - it / 10 ** 6) ** 0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=placement.needs_grad_scaler)
    step_class = train_step.CudaGraphStep if cuda_graph else train_step.EagerStep
    step = step_class(model, optimizer, scheduler, scaler, SegmentationLoss().to(device), placement, None)
    return lambda: step(images, labels)


def count_train_flops(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(whole-model, backbone-only) FLOPs of one forward + backward pass."""
    flops = count_flops(model, lambda: cross_entropy_loss(model(images), labels).backward())
    model.zero_grad(set_to_none=True)
    return flops["total"], flops["backbone"]


def benchmark_model(name: str, model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    model.to(device).train()
    amp_dtype = utils.autocast_dtype(device, not args.no_amp)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    images = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (args.batch_size, args.crop, args.crop), device=device)
    flops, backbone_flops = count_train_flops(model, images, labels)
    runner = torch.compile(model) if args.compile else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graph = args.cuda_graph and device.type == "cuda"  # elsewhere (gpu_checks.sh --cpu) the eager step
    step = train_step_fn(runner, images, labels, amp_dtype, graph)
    step_s = median_seconds(step, device, max(args.warmup, train_step.GRAPH_WARMUP_STEPS + 1 if graph else 0),
                            args.repeats)
    result = {"model": name, "train_step_s": step_s, "train_images_per_s": args.batch_size / step_s,
              "train_tflops": flops / step_s / 1e12, "flops_per_step": flops, "backbone_flops_per_step": backbone_flops,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    if args.profile:
        table, kernel_s = profile_step(step, device)
        print(f"{name}: the ops that take most of a training step's time\n{table}")
        if kernel_s is not None:  # on CUDA: how much of the (unprofiled) step the GPU spends running kernels
            result.update(kernel_s_per_step=kernel_s, kernel_fraction=kernel_s / step_s)
            print(f"{name}: kernels run {kernel_s * 1e3:.1f} ms of the {step_s * 1e3:.1f} ms step "
                  f"({kernel_s / step_s:.0%})")
    if name.startswith("gcn"):
        result.update(benchmark_inference(runner, args, device, amp_dtype))
    model.to("cpu")
    return result


def profile_step(step: Callable[[], object], device: torch.device, steps: int = 5,
                 rows: int = 25) -> tuple[str, float | None]:
    """torch.profiler's table of the ops with the most self time (device time on CUDA) over `steps` steps, and on
    CUDA the seconds per step during which the GPU ran a kernel, copy or memset (None elsewhere)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronise(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=rows)
    if device.type != "cuda":
        return table, None
    # The device's own events, as profiler tables count them (annotations span kernels, so they are left out)
    intervals = [(event.time_range.start, event.time_range.end) for event in profiler.events()
                 if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation]
    return table, union_length(intervals) / 1e6 / steps


def union_length(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end] intervals (overlapping kernels on several streams count once)."""
    total, covered_to = 0.0, float("-inf")
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, covered_to))
        covered_to = max(covered_to, end)
    return total


@torch.no_grad()
def benchmark_inference(model: nn.Module, args: argparse.Namespace, device: torch.device,
                        amp_dtype: torch.dtype | None) -> dict:
    model.eval()
    seconds = {}
    for batch in (1, args.batch_size):
        x = torch.randn(batch, 3, args.eval_size, args.eval_size, device=device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def forward() -> None:
            with utils.autocast(device, amp_dtype):
                model(x)
        seconds[batch] = median_seconds(forward, device, args.warmup, args.repeats)
    model.train()
    return {"inference_latency_s": seconds[1], "inference_images_per_s": args.batch_size / seconds[args.batch_size]}


def data_pipeline_rate(args: argparse.Namespace) -> float:
    """Training-pipeline images/s (VOC-sized JPEGs, crop --crop) with --workers DataLoader workers."""
    with tempfile.TemporaryDirectory() as tmp:
        voc = make_voc_tree(Path(tmp), args.data_images)
        rates = images_per_second(voc, args.workers, repeats=2, batch_size=args.batch_size, crop_size=args.crop)
    return statistics.median(rates)


def parse_args(argv=None) -> argparse.Namespace:
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--kernel_size", type=int, default=15)
    parser.add_argument("--num_classes", type=int, default=21)
    parser.add_argument("--crop", type=int, default=512, help="training crop (square)")
    parser.add_argument("--eval_size", type=int, default=512, help="inference resolution (square)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_amp", action="store_true",
                        help="float32 instead of train.py's amp (bf16/fp16 on CUDA, bf16 on CPUs with native bf16)")
    parser.add_argument("--cuda_graph", action="store_true",
                        help="CUDA: replay the step from a CUDA graph (elsewhere: ignored, eager)")
    parser.add_argument("--no_pad_scores", dest="pad_scores", action="store_false",
                        help="CUDA: score maps on num_classes channels, not padded to a multiple of 8")
    parser.add_argument("--no_channels_last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--models", nargs="+", default=None, help="subset of models to time (default: all)")
    parser.add_argument("--profile", action="store_true", help="print each model's costliest ops (torch.profiler)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul_size", type=int, default=None, help="default 8192 on CUDA, 2048 on CPU")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers for the data-pipeline rate")
    parser.add_argument("--data_images", type=int, default=64, help="JPEGs generated for the data-pipeline rate")
    parser.add_argument("--skip_data", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    dtype = utils.autocast_dtype(device, not args.no_amp) or torch.float32
    models = {name: model for name, model in build_models(args.backbone, args.num_classes, args.kernel_size,
                                                          args.pad_scores).items()
              if args.models is None or name in args.models}
    with progress_bar(total=1 + len(models) + (not args.skip_data), desc="benchmark", unit="stage") as bar:
        bar.set_postfix_str("matmul rate")
        rates = matmul_rates(device, dtype, args.matmul_size or (8192 if device.type == "cuda" else 2048),
                             args.repeats)
        rows = []
        for name, model in models.items():
            bar.update()
            bar.set_postfix_str(name)
            rows.append(benchmark_model(name, model, args, device))
        if not args.skip_data:
            bar.update()
            bar.set_postfix_str(f"data pipeline, {args.workers} workers")
            data_rate = data_pipeline_rate(args)
        bar.update()
    rate = max(rates.values())
    gcn = rows[0] if rows[0]["model"].startswith("gcn") else None
    for row in rows:
        row["matmul_fraction"] = row["train_tflops"] * 1e12 / rate
        if gcn:
            row["step_time_vs_gcn"] = row["train_step_s"] / gcn["train_step_s"]
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
               "torch": torch.__version__, "dtype": str(dtype), "matmul_tflops": rate / 1e12,
               "matmul_tflops_by_kernel": {kernel: r / 1e12 for kernel, r in rates.items()},
               "batch_size": args.batch_size, "crop": args.crop, "eval_size": args.eval_size,
               "channels_last": args.channels_last,
               "compile": args.compile, "cuda_graph": args.cuda_graph and device.type == "cuda",
               "pad_scores": args.pad_scores and device.type == "cuda",
               "models": rows}
    if gcn:
        summary["gcn_backbone_matmul_fraction"] = gcn["backbone_flops_per_step"] / gcn["train_step_s"] / rate
    if not args.skip_data:
        summary["data_images_per_s"] = data_rate
        summary["data_workers"] = args.workers
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_table(summary: dict) -> None:
    print(f"device {summary['device']}, torch {summary['torch']}, {summary['dtype']}, batch {summary['batch_size']}, "
          f"crop {summary['crop']}, matmul {summary['matmul_tflops']:.3f} TFLOP/s (best of "
          + ", ".join(f"{kernel} {r:.3f}" for kernel, r in summary["matmul_tflops_by_kernel"].items()) + ")")
    print(f"{'model':<22}{'step s':>9}{'img/s':>9}{'TFLOP/s':>9}{'of mm':>7}{'×GCN':>7}{'mem GiB':>9}")
    for row in summary["models"]:
        memory = f"{row['peak_memory_gib']:.2f}" if row["peak_memory_gib"] is not None else "—"
        ratio = f"{row['step_time_vs_gcn']:.2f}" if "step_time_vs_gcn" in row else "—"
        print(f"{row['model']:<22}{row['train_step_s']:>9.3f}{row['train_images_per_s']:>9.2f}"
              f"{row['train_tflops']:>9.3f}{row['matmul_fraction']:>7.1%}{ratio:>7}{memory:>9}")
    if "gcn_backbone_matmul_fraction" in summary:
        gcn = summary["models"][0]
        print(f"GCN backbone FLOPs only: {summary['gcn_backbone_matmul_fraction']:.1%} of the matmul rate; "
              f"inference at {summary['eval_size']}²: {gcn['inference_latency_s'] * 1e3:.1f} ms latency (batch 1), "
              f"{gcn['inference_images_per_s']:.1f} img/s (batch {summary['batch_size']})")
    if "data_images_per_s" in summary:
        step_rate = summary["models"][0]["train_images_per_s"]
        print(f"data pipeline: {summary['data_images_per_s']:.1f} img/s with {summary['data_workers']} workers "
              f"vs {step_rate:.1f} img/s consumed by the training step"
              f"{' — DATA-BOUND' if summary['data_images_per_s'] < step_rate else ''}")


if __name__ == "__main__":
    main()

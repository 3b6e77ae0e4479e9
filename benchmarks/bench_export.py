"""CPU latency of an exported ONNX model (onnxruntime) next to the PyTorch model it came from, at batch 1.

    python export.py --model_dir experiments/demo --format onnx
    python -m benchmarks.bench_export --checkpoint experiments/demo/best.pth.tar --onnx experiments/demo/best.onnx \
        [--height 375 --width 500 --threads 1 --repeats 15]

Both run float32 on the same random normalised input with the same number of threads; the timings are interleaved
(one PyTorch run, one ONNX Runtime run, ...) so that a load change on the machine hits both alike. Prints the
median latency of each, their ratio and the largest logit difference.
"""
from __future__ import annotations

import sys

import argparse
import statistics
import time
from pathlib import Path

import onnxruntime
import torch

if not __package__:  # run as a file: the repository's modules are importable only from its root
    sys.exit("error: run it from the repository root as a module: python -m benchmarks.bench_export ...")

from checkpoints import load_trained_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="train.py checkpoint or export.py weights")
    parser.add_argument("--onnx", type=Path, required=True, help="export.py --format onnx output of that checkpoint")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = load_trained_model(args.checkpoint).net.to(memory_format=torch.channels_last)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = onnxruntime.InferenceSession(str(args.onnx), options, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, args.height, args.width, generator=torch.Generator().manual_seed(0))
    x_last, x_numpy = x.contiguous(memory_format=torch.channels_last), x.numpy()

    def run_torch() -> torch.Tensor:
        with torch.no_grad():
            return model(x_last)

    def run_onnx() -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": x_numpy})[0])

    seconds: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
    outputs = {"pytorch": run_torch(), "onnxruntime": run_onnx()}  # warm-up
    for _ in range(args.repeats):
        for name, run in (("pytorch", run_torch), ("onnxruntime", run_onnx)):
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    print(f"{args.height}×{args.width}, batch 1, {args.threads} thread(s), median of {args.repeats}: "
          f"PyTorch {medians['pytorch'] * 1e3:.0f} ms, ONNX Runtime {medians['onnxruntime'] * 1e3:.0f} ms "
          f"(ONNX / PyTorch {medians['onnxruntime'] / medians['pytorch']:.2f}); max |logit difference| "
          f"{(outputs['pytorch'] - outputs['onnxruntime']).abs().max().item():.1e}")


if __name__ == "__main__":
    main()

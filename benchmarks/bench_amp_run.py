"""Whole train.py runs with amp off (float32) and on (bf16 on CPUs where it pays), in interleaved rounds.

train.py trains on CUDA where there is a GPU (amp: bf16 or fp16 there), else on the CPU; so does this.

    python -m benchmarks.bench_amp_run [--experiment experiments/cpu_amp_timing] [--rounds 3]
                                       [--set num_iterations=160] [--json out.json]

Each round trains the experiment from scratch twice in a temporary folder, amp false then amp true, and records
the training time train.py reports (train_complete.json's wall_time_s), the whole command's time (start-up, data
and validation included) and the best val mIoU. The ratios are float32 time / amp time: above 1, amp is faster.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if not __package__:  # run as a file: the repository's modules are importable only from its root
    sys.exit("error: run it from the repository root as a module: python -m benchmarks.bench_amp_run ...")

import utils  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_training(experiment: Path, amp: bool, overrides: list[str], workdir: Path) -> dict:
    """Train `experiment` once from scratch with amp set; its times and best val mIoU."""
    model_dir = workdir / f"amp_{str(amp).lower()}"
    model_dir.mkdir()
    (model_dir / utils.PARAMS_FILE).write_bytes((experiment / utils.PARAMS_FILE).read_bytes())
    command = [sys.executable, "train.py", "--model_dir", str(model_dir), "--set", f"amp={str(amp).lower()}"]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    command_s = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    complete = json.loads((model_dir / utils.COMPLETE_MARKER).read_text())
    return {"training_s": complete["wall_time_s"], "command_s": round(command_s, 1), "best_miou": complete["best_miou"]}


def ratios(rounds: list[dict], key: str) -> list[float]:
    """float32 / amp for `key` in each round."""
    return [r["float32"][key] / r["amp"][key] for r in rounds]


def main(argv: list[str] | None = None) -> dict:
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=REPO / "experiments" / "cpu_amp_timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed on to train.py's --set in every run (repeatable)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not (args.experiment / utils.PARAMS_FILE).is_file():
        parser.error(f"--experiment {args.experiment}: no {utils.PARAMS_FILE} there")
    rounds = []
    for index in range(args.rounds):
        with tempfile.TemporaryDirectory() as workdir:
            rounds.append({name: run_training(args.experiment, amp, args.overrides, Path(workdir))
                           for name, amp in (("float32", False), ("amp", True))})
        print(f"round {index + 1}: " + ", ".join(f"{name} {r['training_s']} s training, {r['command_s']} s command, "
                                                 f"mIoU {r['best_miou']:.4f}" for name, r in rounds[-1].items()))
    device = utils.default_device()  # as train.py chooses
    capabilities = torch.cpu.get_capabilities()
    summary = {"device": device.type, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cpu_bf16": [name for name in utils.CPU_BF16_CAPABILITIES if capabilities.get(name, False)],
               "cpu_bf16_probe_speedup": utils.cpu_bf16_speedup() if utils.cpu_has_native_bf16() else None,
               "amp_dtype": str(utils.autocast_dtype(device, True) or torch.float32),
               "experiment": str(args.experiment), "overrides": args.overrides, "rounds": rounds,
               "median_training_ratio": statistics.median(ratios(rounds, "training_s")),
               "median_command_ratio": statistics.median(ratios(rounds, "command_s"))}
    native = ", ".join(summary["cpu_bf16"]) or "none"
    if summary["cpu_bf16_probe_speedup"] is not None:
        native += f"; probe: bf16 {summary['cpu_bf16_probe_speedup']:.2f}× as fast as float32"
    per_round = " / ".join(f"{r:.2f}×" for r in ratios(rounds, "training_s"))
    print(f"amp on {device.type}: {summary['amp_dtype']} (CPU's bf16 instructions: {native}); float32 / amp training "
          f"time, per round: {per_round} (median {summary['median_training_ratio']:.2f}×); whole command: median "
          f"{summary['median_command_ratio']:.2f}×")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()

"""The pieces of benchmarks/gpu_checks.sh that are Python: the data-rate check and the report of a part.

    python -m benchmarks.gpu_report data --workers 4 8 16 --json WORK/data.json
    python -m benchmarks.gpu_report report WORK --part 1 --out OUT_DIR   # reads WORK/checks.tsv, pytest.log,
        # device.txt, benchmark_*.json, data.json, loss.json, train_{eager,graph}/; writes OUT_DIR/partN.{json,md}

Runs on CPU too (gpu_checks.sh --cpu dry-runs everything at tiny sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: the repository's modules are importable only from its root
    sys.exit("error: run it from the repository root as a module: python -m benchmarks.gpu_report ...")

from benchmarks.bench_data import images_per_second, make_voc_tree  # noqa: E402

TARGET_IMAGES_PER_S = 600  # what a GCN-R50 step at batch 8 × 512² could consume on an H200 (the data must keep up)


def data_rates(workers: list[int], images: int, crop: int, batch_size: int) -> dict:
    """Training-pipeline images/s (VOC-sized JPEGs) for each worker count, and per worker."""
    with tempfile.TemporaryDirectory() as tmp:
        voc = make_voc_tree(Path(tmp), images)
        rates = {n: statistics.median(images_per_second(voc, n, repeats=2, batch_size=batch_size, crop_size=crop))
                 for n in workers}
    return {"cpu_cores": os.cpu_count(), "crop": crop, "batch_size": batch_size,
            "target_images_per_s": TARGET_IMAGES_PER_S,
            "images_per_s": {str(n): r for n, r in rates.items()},
            "per_worker": {str(n): r / max(n, 1) for n, r in rates.items()}}


def loss_curve(model_dir: Path) -> dict[int, float]:
    """train/loss by iteration from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415
    events = EventAccumulator(str(model_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")} if "train/loss" in events.Tags()["scalars"] else {}


def compare_curves(eager: dict[int, float], graph: dict[int, float]) -> dict:
    """How closely the graphed run's loss curve follows the eager one's (same seed, same data)."""
    steps = sorted(set(eager) & set(graph))
    if not steps:
        return {"points": 0, "close": False}
    differences = [abs(graph[s] - eager[s]) / max(abs(eager[s]), 1e-12) for s in steps]
    tail = steps[-max(1, len(steps) // 5):]
    eager_tail, graph_tail = (statistics.mean(c[s] for s in tail) for c in (eager, graph))
    return {"points": len(steps), "first_loss": [eager[steps[0]], graph[steps[0]]],
            "last_loss": [eager[steps[-1]], graph[steps[-1]]], "tail_mean_loss": [eager_tail, graph_tail],
            "max_relative_difference": max(differences), "median_relative_difference": statistics.median(differences),
            # bf16 and cuDNN's non-deterministic kernels let the curves drift apart a little, not more
            "close": abs(graph_tail - eager_tail) <= 0.1 * abs(eager_tail) and eager_tail < eager[steps[0]]}


def checks(work: Path) -> list[dict]:
    """The part's checks as gpu_checks.sh recorded them (checks.tsv: name, exit status, seconds)."""
    rows = [line.split("\t") for line in (work / "checks.tsv").read_text().splitlines() if line.strip()]
    return [{"name": name, "passed": status == "0", "status": int(status), "seconds": int(seconds),
             "timed_out": status == "124"} for name, status, seconds in rows]


def pytest_summary(log: Path) -> str | None:
    """pytest's closing line (e.g. '12 passed, 2 skipped in 40.1s'), or None."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    closing = re.compile(r"\d+ (passed|failed|errors?|skipped)")
    return next((line.strip("= ") for line in reversed(lines) if closing.search(line)), None)


def report(work: Path, part: int, out: Path) -> dict:
    """Collect a part's checks and figures from gpu_checks.sh's WORK folder into OUT/partN.json and partN.md."""
    benchmarks = {path.stem.removeprefix("benchmark_"): json.loads(path.read_text())
                  for path in sorted(work.glob("benchmark_*.json"))}
    device_text = (work / "device.txt").read_text().strip() if (work / "device.txt").is_file() else ""
    result: dict = {"part": part, "device": device_text, "checks": checks(work),
                    "pytest": pytest_summary(work / "pytest.log"), "benchmarks": {}}
    for name, summary in benchmarks.items():
        rows = {row["model"]: row for row in summary["models"]}
        gcn = next((row for model, row in rows.items() if model.startswith("gcn")), None)
        fcn = rows.get("fcn_resnet50")
        result["benchmarks"][name] = {
            "batch_size": summary["batch_size"], "cuda_graph": summary.get("cuda_graph"),
            "pad_scores": summary.get("pad_scores"), "dtype": summary["dtype"],
            "gcn_step_s": gcn and gcn["train_step_s"], "gcn_images_per_s": gcn and gcn["train_images_per_s"],
            "gcn_peak_memory_gib": gcn and gcn["peak_memory_gib"],
            "gcn_inference_latency_s": gcn and gcn.get("inference_latency_s"),
            "gcn_kernel_fraction": gcn and gcn.get("kernel_fraction"),
            "fcn_step_s": fcn and fcn["train_step_s"],
            "gcn_vs_fcn": gcn and fcn and gcn["train_step_s"] / fcn["train_step_s"]}
    if (work / "data.json").exists():
        result["data"] = json.loads((work / "data.json").read_text())
    if (work / "loss.json").exists():
        result["loss"] = json.loads((work / "loss.json").read_text())
    if (work / "train_eager").is_dir() and (work / "train_graph").is_dir():
        result["training"] = compare_curves(loss_curve(work / "train_eager"), loss_curve(work / "train_graph"))
    (out / f"part{part}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"part{part}.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    def cell(value, spec: str) -> str:
        return "—" if value is None else format(value, spec)
    lines = [f"# GPU checks, part {result['part']}", "", "Device: " + result["device"].replace("\n", "; "), "",
             "| check | result | seconds |", "|---|---|---|"]
    lines += [f"| {c['name']} | {'pass' if c['passed'] else 'FAIL (timed out)' if c['timed_out'] else 'FAIL'} | "
              f"{c['seconds']} |" for c in result["checks"]]
    if result["pytest"]:
        lines += ["", f"pytest: {result['pytest']}"]
    if result["benchmarks"]:
        lines += ["", "| run | batch | graph | padded | GCN step ms | GCN img/s | GCN kernels % of step | "
                      "fcn_resnet50 ms | GCN/FCN | GCN GiB | latency ms |", "|---" * 11 + "|"]
    for name, b in result["benchmarks"].items():
        lines.append(f"| {name} | {b['batch_size']} | {b['cuda_graph']} | {b['pad_scores']} | "
                     f"{cell(b['gcn_step_s'] and b['gcn_step_s'] * 1e3, '.1f')} | "
                     f"{cell(b['gcn_images_per_s'], '.0f')} | {cell(b['gcn_kernel_fraction'], '.0%')} | "
                     f"{cell(b['fcn_step_s'] and b['fcn_step_s'] * 1e3, '.1f')} | {cell(b['gcn_vs_fcn'], '.2f')} | "
                     f"{cell(b['gcn_peak_memory_gib'], '.2f')} | "
                     f"{cell(b['gcn_inference_latency_s'] and b['gcn_inference_latency_s'] * 1e3, '.1f')} |")
    if "data" in result:
        data = result["data"]
        lines += ["", f"Data pipeline ({data['cpu_cores']} CPU cores, crop {data['crop']}, target "
                      f"{data['target_images_per_s']} img/s):", "",
                  "| workers | img/s | per worker |", "|---|---|---|"]
        lines += [f"| {n} | {r:.0f} | {data['per_worker'][n]:.0f} |" for n, r in data["images_per_s"].items()]
    if "loss" in result:
        loss = result["loss"]
        lines += ["", f"Loss forward + backward ({loss['dtype']} logits, {loss['batch_size']} × C × {loss['crop']}², "
                      "channels_last):", "", "| classes | pixel rows ms | channels ms | cross_entropy_loss takes |",
                  "|---|---|---|---|"]
        lines += [f"| {c} | {r['rows_s'] * 1e3:.2f} | {r['channels_s'] * 1e3:.2f} | {r['chosen']} |"
                  for c, r in loss["classes"].items()]
    if "training" in result:
        t = result["training"]
        lines += ["", f"Training from scratch (experiments/gpu_check), eager vs graph: {t['points']} loss points, "
                      f"close: {t['close']}" + (f", last {t['last_loss'][0]:.4f} vs {t['last_loss'][1]:.4f}, tail "
                                                f"mean {t['tail_mean_loss'][0]:.4f} vs {t['tail_mean_loss'][1]:.4f}, "
                                                f"max relative difference {t['max_relative_difference']:.3f}"
                                                if t["points"] else "")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="the data-pipeline rate per worker count")
    data.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16])
    data.add_argument("--images", type=int, default=96)
    data.add_argument("--crop", type=int, default=512)
    data.add_argument("--batch_size", type=int, default=8)
    data.add_argument("--json", type=Path, required=True)
    collect = commands.add_parser("report", help="partN.json + partN.md from gpu_checks.sh's work folder; exit "
                                                 "status 1 if a check failed")
    collect.add_argument("work", type=Path)
    collect.add_argument("--part", type=int, choices=(1, 2), required=True)
    collect.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "data":
        rates = data_rates(args.workers, args.images, args.crop, args.batch_size)
        args.json.write_text(json.dumps(rates, indent=2) + "\n")
        print(json.dumps(rates))
        return 0
    result = report(args.work, args.part, args.out)
    print(markdown(result))
    return 0 if result["checks"] and all(c["passed"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/benchmark.py runs on CPU at tiny sizes and its figures are consistent with each other."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import utils
from benchmarks import bench_amp_run, bench_loss, benchmark
from model.net import ROW_LOSS_MIN_CLASSES

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_reports_consistent_figures_on_cpu(tmp_path, capsys, terminal):
    out = tmp_path / "bench.json"
    screen = terminal()
    summary = benchmark.main(["--backbone", "resnet18", "--kernel_size", "3", "--num_classes", "5", "--crop", "64",
                              "--eval_size", "64", "--batch_size", "2", "--device", "cpu", "--warmup", "1",
                              "--repeats", "1", "--matmul_size", "256", "--workers", "0", "--data_images", "4",
                              "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    names = [row["model"] for row in summary["models"]]
    assert names == ["gcn_resnet18", "fcn_resnet50", "deeplabv3_resnet50"]
    gcn, fcn = summary["models"][:2]
    # fcn_resnet50 is dilated (output stride 8): far more FLOPs than a GCN-R18 at the same input (times are the
    # benchmark's to report, not a unit test's to assert)
    assert fcn["flops_per_step"] > 5 * gcn["flops_per_step"] and fcn["step_time_vs_gcn"] > 0
    # The backbone FLOPs are those of torchvision's ResNet-18 trunk, counted independently: forward + backward is
    # about 3× the forward (the first convolution needs no input gradient, hence a little less).
    trunk = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])
    counter = FlopCounterMode(display=False)
    with counter:
        trunk(torch.randn(2, 3, 64, 64))
    assert 2.8 * counter.get_total_flops() < gcn["backbone_flops_per_step"] < 3.0 * counter.get_total_flops()
    assert gcn["backbone_flops_per_step"] < gcn["flops_per_step"]  # heads and decoder count too
    assert set(summary["matmul_tflops_by_kernel"]) == {"torch.matmul", "conv1x1"}
    amp = utils.autocast_dtype(torch.device("cpu"), True) or torch.float32  # bf16 where it pays on this CPU
    assert 1e-4 < summary["matmul_tflops"] < 100 and summary["dtype"] == str(amp)
    assert summary["data_images_per_s"] > 0 and gcn["inference_latency_s"] > 0
    printed = capsys.readouterr().out
    assert "gcn_resnet18" in printed and "data pipeline" in printed
    # Meanwhile, a terminal showed which of the 5 stages was being measured, and how long it had taken
    drawn = screen.getvalue()
    assert "benchmark:   0%|" in drawn and "| 0/5 [" in drawn
    for stage in ("matmul rate", "gcn_resnet18", "deeplabv3_resnet50", "data pipeline, 0 workers"):
        assert stage in drawn


def test_conv1x1_reference_computes_the_same_product_as_matmul():
    torch.manual_seed(0)
    a, b = torch.randn(12, 7), torch.randn(7, 5)  # M × K by K × N, all different
    pixels, weight = benchmark.conv1x1_operands(a, b)
    assert pixels.is_contiguous(memory_format=torch.channels_last) and weight.is_contiguous()
    torch.testing.assert_close(F.conv2d(pixels, weight)[0, :, 0, :].t(), a @ b)


@pytest.mark.parametrize("module", ["benchmarks.benchmark", "benchmarks.bench_data", "benchmarks.bench_export",
                                    "benchmarks.bench_loss", "benchmarks.bench_amp_run", "benchmarks.stability"])
def test_the_readme_runs_the_benchmarks_as_modules(module):
    """`python -m benchmarks.benchmark ...` from the repository root, as the README writes it (no sys.path edits)."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_loss_benchmark_times_both_layouts_which_agree(tmp_path):
    out = tmp_path / "loss.json"
    classes = [3, ROW_LOSS_MIN_CLASSES]
    summary = bench_loss.main(["--device", "cpu", "--classes", *map(str, classes), "--batch_size", "2", "--crop", "12",
                               "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == summary
    few, many = (summary["classes"][str(c)] for c in classes)
    assert (few["chosen"], many["chosen"]) == ("channels", "rows")
    for result in (few, many):
        assert result["rows_s"] > 0 and result["channels_s"] > 0
        # summed over 2 × 12 × 12 pixels less the void top rows: both layouts give the same loss (bf16 logits
        # where the CPU has it: the loss itself is float32 under autocast)
        assert result["rows_loss"] == pytest.approx(result["channels_loss"], rel=1e-5) and result["rows_loss"] > 0


def test_union_length_equals_the_covered_length_counted_point_by_point():
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        starts = torch.randint(0, 90, (6,), generator=rng)
        intervals = [(float(a), float(a + torch.randint(0, 15, (), generator=rng))) for a in starts]
        covered = torch.zeros(110, dtype=torch.bool)  # unit cells [t, t + 1): integer ends make this exact
        for start, end in intervals:
            covered[int(start):int(end)] = True
        assert benchmark.union_length(intervals) == covered.sum().item()
    assert benchmark.union_length([]) == 0


def test_amp_run_benchmark_trains_both_settings_and_reports_their_ratio(experiment, tmp_path):
    out = tmp_path / "amp_run.json"
    summary = bench_amp_run.main(["--experiment", str(experiment(num_epochs=1)), "--rounds", "1",
                                  "--set", "synthetic_train_images=8", "--json", str(out)])
    assert json.loads(out.read_text()) == summary
    (only_round,) = summary["rounds"]
    float32, amp = only_round["float32"], only_round["amp"]
    for run in (float32, amp):
        assert 0 < run["training_s"] < run["command_s"] and 0 <= run["best_miou"] <= 1
    assert summary["median_training_ratio"] == pytest.approx(float32["training_s"] / amp["training_s"])
    assert summary["overrides"] == ["synthetic_train_images=8"]
    probe = summary["cpu_bf16_probe_speedup"]  # the figure amp's choice rests on where AVX512-BF16 decides
    assert (probe > 0) if utils.cpu_has_native_bf16() else probe is None


@pytest.mark.parametrize(("args", "message"), [(["--rounds", "0"], "--rounds must be at least 1, got 0"),
                                                (["--experiment", "no_such_folder"], "no params.json there")])
def test_amp_run_benchmark_refuses_bad_arguments_in_one_line(args, message, capsys):
    with pytest.raises(SystemExit):
        bench_amp_run.main(args)
    assert message in capsys.readouterr().err


def test_a_gpu_checks_part_fits_the_device_tool_and_fails_when_a_check_fails(tmp_path):
    """benchmarks/gpu_checks.sh --cpu (the dry run) of part 1, with the graphed training made to fail (through the
    $PYTHON it runs): the other checks still run, the part's exit status says it failed, and OUT_DIR holds the
    three regular files the device tool brings back (at most 8, no folder), no checkpoint; the report lists every
    check with its result and time, and pytest's summary."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase "$*" in *cuda_graph=true*) echo "made to fail" >&2; exit 3 ;; esac\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "--cpu", "--part", "1", str(out)], cwd=REPO,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": str(python), "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["part1.json", "part1.md", "part1_logs.tar.gz"]
    assert all(p.is_file() for p in out.iterdir())
    checks = {c["name"]: (c["passed"], c["status"]) for c in json.loads((out / "part1.json").read_text())["checks"]}
    assert checks == {"pytest": (True, 0), "train_eager": (True, 0), "train_graph": (False, 3)}
    markdown = (out / "part1.md").read_text()
    assert "| train_graph | FAIL |" in markdown and "| train_eager | pass |" in markdown
    assert "pytest: " in markdown and "skipped" in markdown  # tests/test_cuda.py, skipped without a GPU
    logs = subprocess.run(["tar", "-tzf", str(out / "part1_logs.tar.gz")], capture_output=True, text=True).stdout
    assert "train_graph.log" in logs and ".pth" not in logs


@pytest.mark.parametrize("args, message", [([], "--part 1 or --part 2 is required"),
                                           (["--part", "3", "out"], "--part 1 or --part 2 is required"),
                                           (["--part", "1"], "OUT_DIR is required")])
def test_gpu_checks_explains_itself(args, message):
    usage = subprocess.run(["bash", "benchmarks/gpu_checks.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 0 and usage.stdout.startswith("Usage: bash benchmarks/gpu_checks.sh")
    wrong = subprocess.run(["bash", "benchmarks/gpu_checks.sh", *args], cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr == f"gpu_checks.sh: {message} (see --help)\n"

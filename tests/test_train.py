"""train.py end to end on tiny synthetic runs: learning, the run folder, command-line overrides, refusals that touch
nothing, divergence, the schedule, and two-process DDP (gloo)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import export
import settings
import train
import utils
from model.datasets import DatasetError
from model.net import SegmentationLoss
from test_data import make_folder, save_index_png

REPO = Path(__file__).resolve().parents[1]


def run_train(model_dir: Path, *extra: str) -> int:
    return train.main(["--model_dir", str(model_dir), *extra])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_demo_scale_run_learns_and_fills_its_folder(experiment):
    model_dir = experiment(synthetic_image_size=64, crop_size=64, synthetic_train_images=96, synthetic_val_images=12,
                           scale_range=[1.0, 1.0], color_jitter=0.0, kernel_size=7, batch_size=8, num_epochs=4,
                           learning_rate=0.02)
    assert run_train(model_dir) == 0
    metrics = read_json(model_dir / utils.METRICS_BEST)
    assert metrics["miou"] > 0.6, metrics
    assert set(metrics["per_class_iou"]) == {"background", "disc", "box", "triangle", "cross"}
    assert metrics["confusion_matrix"]["classes"] == list(metrics["per_class_iou"])
    complete = read_json(model_dir / utils.COMPLETE_MARKER)
    assert complete["iterations"] == 4 * 12 and complete["epochs"] == 4
    assert complete["best_miou"] == metrics["miou"] and complete["best_epoch"] == metrics["epoch"]
    log = (model_dir / utils.TRAIN_LOG).read_text()
    assert log.count(": val mIoU") == 4 and f"best val mIoU {metrics['miou']:.4f} at epoch {metrics['epoch']}" in log
    assert list(model_dir.glob("events.out.tfevents.*"))
    checkpoint = torch.load(model_dir / utils.BEST_CHECKPOINT, weights_only=True)
    assert checkpoint["class_names"] == list(metrics["per_class_iou"]) and len(checkpoint["palette"]) == 5
    assert checkpoint["model_config"]["kernel_size"] == 7 and checkpoint["params"]["learning_rate"] == 0.02
    assert sorted(p.name for p in model_dir.iterdir() if p.name.startswith(".")) == [utils.LOCK_FILE]


def test_set_overrides_change_the_run_and_are_recorded(experiment):
    model_dir = experiment(num_epochs=1)
    assert run_train(model_dir, "--set", "batch_size=8", "--set", "scale_range=[1.0, 1.0]",
                     "--data-dir", "") == 0  # a dashed spelling works too
    assert read_json(model_dir / utils.COMPLETE_MARKER)["iterations"] == 2  # 16 images / batch 8
    record = read_json(model_dir / utils.RESOLVED_PARAMS_FILE)
    assert record["overrides"] == {"batch_size": 8, "scale_range": [1.0, 1.0], "data_dir": ""}
    assert record["params"]["batch_size"] == 8 and record["params"]["momentum"] == 0.9  # defaults filled in
    assert record["arguments"]["set"] == ["batch_size=8", "scale_range=[1.0, 1.0]"]
    assert record["command"][0] == sys.executable and record["torch"] == torch.__version__
    precision = utils.Placement(torch.device("cpu"), dtype=utils.autocast_dtype(torch.device("cpu"), True)).precision
    assert record["params"]["amp"] and record["precision"] == precision  # what amp chose on this CPU, recorded
    assert f"× 1 in {precision}" in (model_dir / utils.TRAIN_LOG).read_text()
    assert json.loads((model_dir / "params.json").read_text())["batch_size"] == 4  # the definition is untouched


def stop_after_first_step(monkeypatch) -> None:
    """Make the next in-process run stop after its first step, as SIGTERM would (saving last.pth.tar)."""
    original, sent = train.synchronise, []

    def synchronise(monitor, stop, progress, world_size):
        if not sent:
            sent.append(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # StopSignal's handler only raises its flag
        return original(monitor, True, progress, world_size)
    monkeypatch.setattr(train, "synchronise", synchronise)


def test_resume_keeps_the_runs_own_settings_and_refuses_only_a_contradiction(experiment, capsys, monkeypatch,
                                                                             tmp_path):
    model_dir = experiment()
    with monkeypatch.context() as patch:
        stop_after_first_step(patch)
        assert run_train(model_dir, "--set", "num_iterations=3", "--set", "color_jitter=0.1") == 128 + signal.SIGTERM
    assert run_train(model_dir, "--restore_file", "last", "--set", "color_jitter=0.2") == 2
    assert "was trained with other settings: color_jitter=0.1 (--set: 0.2)" in capsys.readouterr().err
    (model_dir / "params.json").write_text(json.dumps({**read_json(model_dir / "params.json"), "momentum": 0.5}))
    assert run_train(model_dir, "--restore_file", "last") == 2  # params.json edited since: refused, naming it
    assert f"momentum=0.9 ({model_dir / 'params.json'}: 0.5)" in capsys.readouterr().err
    (model_dir / "params.json").write_text(json.dumps({**read_json(model_dir / "params.json"), "momentum": 0.9}))
    # No --set retyped; one that agrees and an execution setting are fine
    assert run_train(model_dir, "--restore_file", "last", "--set", "color_jitter=0.1", "--set", "num_workers=1") == 0
    record = read_json(model_dir / utils.RESOLVED_PARAMS_FILE)
    assert record["params"]["num_iterations"] == 3 and record["params"]["color_jitter"] == 0.1
    assert record["params"]["num_workers"] == 1
    assert record["overrides"] == {"num_iterations": 3, "color_jitter": 0.1, "num_workers": 1}
    assert read_json(model_dir / utils.COMPLETE_MARKER)["iterations"] == 3

    # The resolved settings fed back: a fresh folder reruns the same run, bitwise (CPU)
    rerun = tmp_path / "rerun"
    assert run_train(rerun, "--params", str(model_dir / utils.RESOLVED_PARAMS_FILE)) == 0
    assert read_json(rerun / utils.RESOLVED_PARAMS_FILE)["params"] == record["params"]
    first, second = weights(model_dir / utils.LAST_CHECKPOINT), weights(rerun / utils.LAST_CHECKPOINT)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # ...into a folder that stands alone: its own params.json, which evaluate.py and a requeued job read
    assert read_json(rerun / "params.json") == record["params"]
    assert evaluate.main(["--model_dir", str(rerun), "--restore_file", "last"]) == 0
    capsys.readouterr()
    assert run_train(rerun, "--restore_file", "auto", "--params", str(model_dir / utils.RESOLVED_PARAMS_FILE)) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_params_from_another_file_never_replace_a_folders_own_params_json(experiment, tmp_path, capsys):
    model_dir = experiment()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**read_json(model_dir / "params.json"), "kernel_size": 5, "seed": 4}))
    before = (model_dir / "params.json").read_bytes()
    assert run_train(model_dir, "--params", str(other)) == 2
    err = capsys.readouterr().err
    assert f"{model_dir / 'params.json'} holds other settings than {other} (kernel_size, seed)" in err
    assert sorted(os.listdir(model_dir)) == ["params.json"] and (model_dir / "params.json").read_bytes() == before


def test_keep_best_weights_keeps_a_weights_only_best_and_no_last(experiment, capsys):
    model_dir = experiment(num_iterations=2, keep_checkpoints="best_weights")
    assert run_train(model_dir) == 0
    assert not (model_dir / utils.LAST_CHECKPOINT).exists()
    best = torch.load(model_dir / utils.BEST_CHECKPOINT, weights_only=True)
    assert sorted(best) == sorted(export.WEIGHTS_KEYS)  # no optimiser: half the size
    assert evaluate.main(["--model_dir", str(model_dir), "--restore_file", "best"]) == 0
    capsys.readouterr()
    assert run_train(model_dir, "--restore_file", "auto") == 0  # a sweep or a requeued job: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert run_train(model_dir, "--restore_file", "best") == 2
    assert "holds no training state" in capsys.readouterr().err


def test_own_label_values_are_checked_before_training_and_later_errors_reach_train_log(tmp_path, capsys):
    make_folder(tmp_path / "own", [f"case_{i}" for i in range(8)])
    for mask in (tmp_path / "own" / "masks").iterdir():  # stored as 0/128, as some tools write binary masks
        save_index_png(mask, np.where(np.arange(140).reshape(10, 14) % 3 == 0, 128, 0).astype(np.uint8),
                       palette=False)
    model_dir = tmp_path / "exp"
    model_dir.mkdir()
    (model_dir / "params.json").write_text(json.dumps({
        "dataset": "folder", "data_dir": str(tmp_path / "own"), "num_classes": 2, "crop_size": 8, "batch_size": 2,
        "num_workers": 0, "backbone": "resnet18", "kernel_size": 3, "num_iterations": 1, "val_fraction": 0.25}))
    assert run_train(model_dir) == 2
    err = capsys.readouterr().err
    assert "holds value(s) [128]" in err and "mask_values" in err and "Training" not in err
    assert sorted(os.listdir(model_dir)) == ["params.json"]  # before any work
    for image in (tmp_path / "own" / "images").iterdir():  # unreadable images only surface when loaded
        image.write_bytes(b"not a png")
    assert run_train(model_dir, "--set", 'mask_values={"0": 0, "128": 1}') == 2
    assert "error: unreadable image" in (model_dir / utils.TRAIN_LOG).read_text()


def test_compile_on_the_cpu_is_one_line_before_any_work(experiment, capsys):
    model_dir = experiment()
    assert run_train(model_dir, "--set", "compile=true") == 2
    assert "compile: true is for CUDA" in capsys.readouterr().err
    assert sorted(os.listdir(model_dir)) == ["params.json"]


def test_help_params_lists_every_setting_from_the_dataclasses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help-params"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for config_class in settings.EXPERIMENT_CONFIGS:
        comments = settings.field_comments(config_class)
        for name, setting in settings.settings_of(config_class).items():
            line = next(line for line in lines if line.startswith(f"  {name} ("))
            default = "required" if setting.default is settings.REQUIRED else f"default {json.dumps(setting.default)}"
            assert line.startswith(f"  {name} ({default}; {setting.describe({})}"), line
            assert line.endswith(f": {comments[name]}"), f"{name} has no comment in {config_class.__name__}"
    listed = sum(line.startswith("  ") for line in lines)
    assert listed == len(settings.experiment_settings(settings.EXPERIMENT_CONFIGS))
    assert "  kernel_size (default 15; an odd integer >= 1 and <= 255): k of gcn (and conv/stack) heads" in lines


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    (json.dumps({"dataset": "synthetic", "data_dir": ""}), "missing required key(s) 'num_classes'"),
    (json.dumps({"dataset": "synthetic", "data_dir": "", "num_classes": 5, "batch_size": 0}),
     "'batch_size' is 0; expected an integer >= 1"),
    (json.dumps({"dataset": "synthetic", "data_dir": "", "num_classes": 5, "head": "GCN"}),
     "'head' is \"GCN\"; expected one of \"gcn\", \"conv\", \"stack\", \"1x1\""),
    (json.dumps({"dataset": "synthetic", "data_dir": "", "num_classes": 5, "learning_rat": 0.1}),
     "did you mean 'learning_rate'"),
])
def test_bad_params_are_one_line_before_any_work_and_write_nothing(tmp_path, content, expected):
    model_dir = tmp_path / "exp"
    model_dir.mkdir()
    (model_dir / "params.json").write_text(content)
    result = subprocess.run([sys.executable, "train.py", "--model_dir", str(model_dir)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert expected in result.stderr and str(model_dir / "params.json") in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(model_dir)) == ["params.json"]


def test_train_with_no_arguments_leaves_no_empty_log(tmp_path):
    (tmp_path / "experiments").mkdir()
    shutil.copytree(REPO / "experiments" / "base_model", tmp_path / "experiments" / "base_model")
    result = subprocess.run([sys.executable, str(REPO / "train.py")], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and "VOC data_dir not found" in result.stderr
    assert "python data/download.py voc" in result.stderr
    assert sorted(os.listdir(tmp_path / "experiments" / "base_model")) == ["params.json"]


def test_refusals_touch_nothing(experiment, tmp_path, capsys):
    model_dir = experiment(num_epochs=1)
    assert run_train(model_dir) == 0
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}

    assert run_train(model_dir) == 2  # a fresh run over existing checkpoints refuses
    assert "holds a previous run (last.pth.tar, best.pth.tar, " in capsys.readouterr().err
    assert run_train(model_dir, "--force", "--restore_file", "auto") == 2
    assert "pass one of them" in capsys.readouterr().err
    (model_dir / utils.LAST_CHECKPOINT).rename(tmp_path / "last")
    (model_dir / utils.COMPLETE_MARKER).rename(tmp_path / "complete")
    assert run_train(model_dir, "--restore_file", "auto") == 2  # nothing to resume, but a best to keep
    assert "holds a previous run (best.pth.tar, " in capsys.readouterr().err
    (tmp_path / "last").rename(model_dir / utils.LAST_CHECKPOINT)
    (tmp_path / "complete").rename(model_dir / utils.COMPLETE_MARKER)
    assert run_train(model_dir, "--force", "--data_dir", str(tmp_path / "typo"), "--set", "dataset=\"voc\"") == 2
    assert "VOC data_dir not found" in capsys.readouterr().err  # --force checks its input before deleting
    assert run_train(model_dir, "--restore_file", "last") == 0  # resuming a finished run changes nothing
    assert "nothing to do" in capsys.readouterr().out
    (model_dir / "params.json").write_text(json.dumps({**json.loads((model_dir / "params.json").read_text()),
                                                       "kernel_size": 5}))
    assert run_train(model_dir, "--restore_file", "last") == 2
    assert f"kernel_size=3 ({model_dir / 'params.json'}: 5)" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(before[utils.LAST_CHECKPOINT][:1000])
    assert run_train(model_dir, "--restore_file", str(corrupt)) == 2
    assert f"checkpoint {corrupt} is corrupted" in capsys.readouterr().err
    unchanged = {"params.json", utils.LOCK_FILE}  # edited above / rewritten by every run with its pid
    after = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file() and p.name not in unchanged}
    assert after == {k: v for k, v in before.items() if k not in unchanged}


def test_force_starts_afresh_and_clears_the_previous_run(experiment):
    model_dir = experiment(num_epochs=1)
    assert run_train(model_dir) == 0
    (model_dir / utils.BEST_CHECKPOINT).write_bytes(b"an old best")
    (model_dir / ".last.pth.tar.tmp").write_bytes(b"left by a killed save")
    evaluated = [model_dir / "metrics_test_best_weights.json", model_dir / "confusion_test_best.png"]
    for path in evaluated:
        path.write_bytes(b"an evaluation of the old run")
    assert run_train(model_dir, "--force", "--set", "num_iterations=1") == 0
    assert read_json(model_dir / utils.COMPLETE_MARKER)["iterations"] == 1
    assert torch.load(model_dir / utils.BEST_CHECKPOINT, weights_only=True)["progress"]["iteration"] == 1
    assert len(list(model_dir.glob("events.out.tfevents.*"))) == 1 and not list(model_dir.glob(".*.tmp"))
    assert not any(path.exists() for path in evaluated)


def test_a_failing_validation_keeps_the_trained_epoch(experiment, capsys):
    model_dir = experiment(num_epochs=1)
    original = evaluate.predict_logits
    calls = []

    def unreadable_second_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise DatasetError("unreadable image val/1.png: broken data stream")
        return original(*args, **kwargs)

    evaluate.predict_logits = unreadable_second_image
    try:
        assert run_train(model_dir) == 2
    finally:
        evaluate.predict_logits = original
    assert "unreadable image val/1.png" in capsys.readouterr().err
    checkpoint = torch.load(model_dir / utils.LAST_CHECKPOINT, weights_only=True)
    assert checkpoint["progress"]["iteration"] == 4 and checkpoint["progress"]["validation_pending"]
    assert run_train(model_dir, "--restore_file", "last") == 0  # validates the saved epoch, trains nothing again
    assert read_json(model_dir / utils.METRICS_BEST)["epoch"] == 1
    assert read_json(model_dir / utils.COMPLETE_MARKER)["iterations"] == 4


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(experiment, monkeypatch, capsys):
    model_dir = experiment(num_epochs=3)
    calls = []
    forward = SegmentationLoss.forward

    def nan_on_sixth_call(self, logits, labels):
        calls.append(1)
        loss = forward(self, logits, labels)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(SegmentationLoss, "forward", nan_on_sixth_call)
    assert run_train(model_dir) == 2
    err = capsys.readouterr().err
    assert "loss is nan at iteration 6 (epoch 2)" in err and "Traceback" not in err
    checkpoint = torch.load(model_dir / utils.LAST_CHECKPOINT, weights_only=True)  # end of epoch 1
    assert (checkpoint["progress"]["iteration"], checkpoint["progress"]["epoch"]) == (4, 1)
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_poly_schedule_with_warmup():
    factor = train.poly_lr_lambda(100, 0.9, warmup=10)
    assert factor(0) == pytest.approx(0.1 * 1.0)
    assert factor(9) == pytest.approx(0.91 ** 0.9)
    assert factor(50) == pytest.approx(0.5 ** 0.9)
    assert factor(100) == 0.0


def test_head_layers_learn_faster_than_the_backbone(experiment):
    params = settings.Params(json.loads((experiment(head_lr_multiplier=10.0) / "params.json").read_text()),
                          (train.DataConfig, train.GCNConfig, settings.TrainConfig, settings.EvalConfig))
    model = train.GCN(params.config(train.GCNConfig))
    backbone, new = train.build_optimizer(model, params.config(settings.TrainConfig),
                                          utils.Placement(torch.device("cpu"))).param_groups
    assert (backbone["lr"], new["lr"]) == (0.01, 0.1)
    assert len(backbone["params"]) + len(new["params"]) == len(list(model.parameters()))


TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(model_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", "train.py", "--model_dir",
                           str(model_dir), *extra], cwd=REPO, capture_output=True, text=True, env=TORCHRUN_ENV,
                          timeout=300)


def two_nodes(model_dir: Path) -> list[tuple[int, str]]:
    """train.py on two nodes of one process each, launched as docs/training.md's Slurm lines do (one torchrun per node,
    --node_rank, the first node's address and port), both nodes on this machine: [(status, stderr)] per node."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "train.py", "--model_dir",
                               str(model_dir)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=TORCHRUN_ENV) for rank in (0, 1)]
    try:
        return [(node.wait(timeout=300), node.stderr.read()) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
            node.stderr.close()


def test_ddp_two_processes_match_single_process_validation(experiment):
    model_dir = experiment(num_epochs=1, synthetic_val_images=5)
    result = torchrun(model_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Grad strides do not match" not in result.stderr  # the 1×k weights' gradients fit DDP's buckets
    distributed = read_json(model_dir / utils.METRICS_LAST)
    assert read_json(model_dir / utils.COMPLETE_MARKER)["iterations"] == 2  # 16 images / (2 ranks × batch 4)
    assert evaluate.main(["--model_dir", str(model_dir), "--restore_file", "last"]) == 0
    single = read_json(model_dir / "metrics_val_last.json")
    for key in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "boundary_accuracy", "interior_accuracy"):
        assert distributed[key] == pytest.approx(single[key], abs=1e-9), key
    assert distributed["loss"] == pytest.approx(single["loss"], rel=1e-5)

    # Two nodes of one process each train exactly as one node of two processes
    nodes_dir = experiment("two_nodes", num_epochs=1, synthetic_val_images=5)
    for status, stderr in two_nodes(nodes_dir):
        assert status == 0, stderr[-2000:]
        assert "Grad strides do not match" not in stderr
    assert read_json(nodes_dir / utils.RESOLVED_PARAMS_FILE)["world_size"] == 2
    assert read_json(nodes_dir / utils.METRICS_LAST) == distributed
    first, second = weights(model_dir / utils.LAST_CHECKPOINT), weights(nodes_dir / utils.LAST_CHECKPOINT)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_ddp_with_more_ranks_than_validation_images_completes(experiment):
    model_dir = experiment(num_epochs=1, synthetic_val_images=1)
    result = torchrun(model_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_json(model_dir / utils.METRICS_LAST)["epoch"] == 1


def test_the_demo_settings_train_an_epoch_of_real_voc_because_gradients_are_clipped(shared_data, tmp_path, capsys):
    """From scratch, lr 0.02 diverges on real VOC within an epoch (docs/training.md: Training from scratch): the demo's
    settings at batch 4 on the 311 real VOC train images reach NaN without grad_clip_norm and train with it."""
    source = shared_data / "voc2012_2007subset" / "VOCdevkit" / "VOC2012"
    voc = tmp_path / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for folder in ("JPEGImages", "SegmentationClass"):
        (voc / folder).symlink_to(source / folder)
    shutil.copy(source / "ImageSets" / "Segmentation" / "train.txt", voc / "ImageSets" / "Segmentation")
    val_ids = (source / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:8]  # a quick validation
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(val_ids) + "\n")
    demo = json.loads((REPO / "experiments" / "demo" / "params.json").read_text())
    demo = {k: v for k, v in demo.items() if not k.startswith("synthetic_")}
    for name, clip in (("unclipped", None), ("demo", demo["grad_clip_norm"])):
        model_dir = tmp_path / name
        model_dir.mkdir()
        (model_dir / "params.json").write_text(json.dumps({**demo, "dataset": "voc", "data_dir": str(voc),
                                                           "num_classes": 21, "batch_size": 4, "num_epochs": 1,
                                                           "grad_clip_norm": clip}))
        status = run_train(model_dir)
        if clip is None:
            assert status == 2 and re.search(r"loss is (nan|inf|-inf) at iteration", capsys.readouterr().err)
        else:
            assert status == 0 and read_json(model_dir / utils.COMPLETE_MARKER)["iterations"] == 77


def test_a_folder_name_that_is_not_utf8_is_one_line(tmp_path, capsys):
    model_dir = tmp_path / "exp\udcff"  # the byte 0xff, as a Latin-1 file name reaches Python
    model_dir.mkdir()
    (model_dir / "params.json").write_text(json.dumps({"dataset": "synthetic", "data_dir": "", "num_classes": 5}))
    assert run_train(model_dir) == 2
    assert "the folder name is not valid UTF-8" in capsys.readouterr().err
    assert sorted(os.listdir(model_dir)) == ["params.json"]

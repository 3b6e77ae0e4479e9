"""train.py / evaluate.py end to end on tiny synthetic runs: learning, resume, signals, errors, DDP, evaluation."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train
from model.net import SegmentationLoss

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "dataset": "synthetic", "data_dir": "", "num_classes": 5, "synthetic_image_size": 48,
    "synthetic_train_images": 16, "synthetic_val_images": 6, "crop_size": 48, "scale_range": [1.0, 1.0],
    "num_workers": 0, "backbone": "resnet18", "kernel_size": 3, "batch_size": 4, "num_epochs": 2,
    "head_lr_multiplier": 1.0, "save_summary_steps": 2, "seed": 3,
}


def make_experiment(tmp_path: Path, **overrides) -> Path:
    model_dir = tmp_path / "exp"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "params.json").write_text(json.dumps({**TINY, **overrides}))
    return model_dir


def run_train(model_dir: Path, *extra: str) -> int:
    return train.main(["--model_dir", str(model_dir), *extra])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_demo_scale_run_learns_the_synthetic_set(tmp_path):
    model_dir = make_experiment(tmp_path, synthetic_image_size=64, crop_size=64, synthetic_train_images=96,
                                synthetic_val_images=12, kernel_size=7, batch_size=8, num_epochs=4,
                                learning_rate=0.02)
    assert run_train(model_dir) == 0
    metrics = read_json(model_dir / "metrics_val_best_weights.json")
    assert metrics["miou"] > 0.6, metrics
    for key in ("miou", "pixel_accuracy", "mean_accuracy", "loss", "per_class_iou", "boundary_accuracy", "epoch"):
        assert key in metrics
    assert set(metrics["per_class_iou"]) == {"background", "disc", "box", "triangle", "cross"}
    complete = read_json(model_dir / "train_complete.json")
    assert complete["iterations"] == 4 * 12 and complete["epochs"] == 4
    assert list(model_dir.glob("events.out.tfevents.*")) and (model_dir / "train.log").read_text().count(": val mIoU") == 4


def test_resume_at_epoch_boundary_gives_identical_weights_and_metrics(tmp_path, monkeypatch):
    straight = make_experiment(tmp_path / "a", num_epochs=3)
    assert run_train(straight) == 0

    interrupted = make_experiment(tmp_path / "b", num_epochs=3)
    original = train.Trainer.train_epoch

    def stop_after_first_epoch(self):
        finished = original(self)
        if self.epoch == 0:
            self.stop.signum = signal.SIGTERM
            return False
        return finished

    monkeypatch.setattr(train.Trainer, "train_epoch", stop_after_first_epoch)
    assert run_train(interrupted) == 128 + signal.SIGTERM
    monkeypatch.setattr(train.Trainer, "train_epoch", original)
    assert torch.load(interrupted / "last.pth.tar", weights_only=True)["iteration"] == 4
    assert run_train(interrupted, "--restore_file", "last") == 0

    a, b = weights(straight / "last.pth.tar"), weights(interrupted / "last.pth.tar")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(straight / "metrics_val_last_weights.json") == read_json(interrupted / "metrics_val_last_weights.json")


def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes(tmp_path, monkeypatch):
    model_dir = make_experiment(tmp_path)
    original = train.Trainer._synchronise

    def signal_at_iteration_3(self, loss):
        if self.iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler must turn this into a clean stop
        return original(self, loss)

    monkeypatch.setattr(train.Trainer, "_synchronise", signal_at_iteration_3)
    assert run_train(model_dir) == 128 + signal.SIGTERM
    checkpoint = torch.load(model_dir / "last.pth.tar", weights_only=True)
    assert (checkpoint["iteration"], checkpoint["batch_in_epoch"], checkpoint["epoch"]) == (3, 3, 0)
    assert not (model_dir / "train_complete.json").exists()
    monkeypatch.setattr(train.Trainer, "_synchronise", original)
    assert run_train(model_dir, "--restore_file", "last") == 0
    assert read_json(model_dir / "train_complete.json")["iterations"] == 8  # 2 epochs × 4 batches, none repeated
    assert torch.load(model_dir / "last.pth.tar", weights_only=True)["iteration"] == 8


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    model_dir = make_experiment(tmp_path, num_epochs=3)
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
    checkpoint = torch.load(model_dir / "last.pth.tar", weights_only=True)  # end of epoch 1, not the NaN state
    assert (checkpoint["iteration"], checkpoint["epoch"]) == (4, 1)
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    (json.dumps({k: v for k, v in TINY.items() if k != "num_classes"}), "missing required key(s) 'num_classes'"),
    (json.dumps({**TINY, "batch_size": "8"}), "key 'batch_size' must be int"),
    (json.dumps({**TINY, "learning_rat": 0.1}), "did you mean 'learning_rate'"),
])
def test_bad_params_give_one_clear_line(tmp_path, content, expected):
    model_dir = tmp_path / "exp"
    model_dir.mkdir()
    (model_dir / "params.json").write_text(content)
    result = subprocess.run([sys.executable, "train.py", "--model_dir", str(model_dir)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert expected in result.stderr and str(model_dir / "params.json") in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_checkpoint_errors_are_clear_and_nothing_is_overwritten(tmp_path, capsys):
    model_dir = make_experiment(tmp_path, num_epochs=1)
    assert run_train(model_dir) == 0
    saved = (model_dir / "last.pth.tar").read_bytes()

    assert run_train(model_dir) == 2  # a fresh run over existing checkpoints refuses
    assert "last.pth.tar exists" in capsys.readouterr().err
    assert (model_dir / "last.pth.tar").read_bytes() == saved

    marker = (model_dir / "train_complete.json").read_bytes()
    assert run_train(model_dir, "--restore_file", "last") == 0  # resuming a finished run changes nothing
    assert (model_dir / "train_complete.json").read_bytes() == marker
    assert (model_dir / "last.pth.tar").read_bytes() == saved

    (model_dir / "params.json").write_text(json.dumps({**TINY, "num_epochs": 1, "kernel_size": 5}))
    assert run_train(model_dir, "--restore_file", "last") == 2
    assert "kernel_size=3 (this model: 5)" in capsys.readouterr().err

    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(saved[: len(saved) // 2])
    assert run_train(model_dir, "--restore_file", str(corrupt)) == 2
    assert f"checkpoint {corrupt} is corrupted" in capsys.readouterr().err
    assert run_train(model_dir, "--restore_file", str(tmp_path / "missing.pth.tar")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (model_dir / "last.pth.tar").read_bytes() == saved


def test_evaluate_writes_metrics_and_predictions_and_tta_runs(tmp_path):
    model_dir = make_experiment(tmp_path, num_epochs=1, tta_scales=[1.0, 1.5])
    assert run_train(model_dir) == 0
    out = tmp_path / "predictions"
    assert evaluate.main(["--model_dir", str(model_dir), "--restore_file", "last",
                          "--save_predictions", str(out)]) == 0
    metrics = read_json(model_dir / "metrics_val_last.json")
    trained = read_json(model_dir / "metrics_val_last_weights.json")
    assert metrics["miou"] == pytest.approx(trained["miou"]) and metrics["loss"] == pytest.approx(trained["loss"])
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 6
    first = Image.open(pngs[0])
    assert first.mode == "P" and first.size == (48, 48) and np.array(first).max() < 5
    assert len(list((out / "pictures").glob("*.jpg"))) == 4
    assert evaluate.main(["--model_dir", str(model_dir), "--restore_file", "last", "--tta"]) == 0
    tta = read_json(model_dir / "metrics_val_last.json")
    assert 0 <= tta["miou"] <= 1 and tta["loss"] != pytest.approx(metrics["loss"])


def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    image = torch.randn(1, 3, 37, 53)
    model = torch.nn.Conv2d(3, 4, 1)
    whole = evaluate.predict_logits(model, image)
    tiled = evaluate.predict_logits(model, image, window=16)
    assert tiled.shape == whole.shape and torch.allclose(tiled, whole, atol=1e-6)
    flipped = evaluate.predict_logits(model, image, scales=(1.0,), flip=True)
    assert torch.allclose(flipped, whole, atol=1e-6)  # a 1×1 conv commutes with flipping


def test_epoch_sampler_shards_cover_every_image_and_skip_resumes():
    shards = [list(train.EpochSampler(10, 2, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards) and set(sum(shards, [])) == set(range(10))
    sampler = train.EpochSampler(10, 2, seed=1)
    sampler.set_epoch(5)
    full = list(sampler)
    sampler.set_epoch(5, skip_batches=2)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(6)
    assert list(sampler) != full


def test_poly_schedule_with_warmup():
    factor = train.poly_lr_lambda(100, 0.9, warmup=10)
    assert factor(0) == pytest.approx(0.1 * 1.0)
    assert factor(50) == pytest.approx(0.5 ** 0.9)
    assert factor(100) == 0.0


def test_ddp_two_processes_match_single_process_validation(tmp_path):
    model_dir = make_experiment(tmp_path, num_epochs=1, synthetic_val_images=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", "--model_dir", str(model_dir)], cwd=REPO, capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    distributed = read_json(model_dir / "metrics_val_last_weights.json")
    assert read_json(model_dir / "train_complete.json")["iterations"] == 2  # 16 images / (2 ranks × batch 4)
    assert evaluate.main(["--model_dir", str(model_dir), "--restore_file", "last"]) == 0
    single = read_json(model_dir / "metrics_val_last.json")
    for key in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "boundary_accuracy", "interior_accuracy"):
        assert distributed[key] == pytest.approx(single[key], abs=1e-9), key
    assert distributed["loss"] == pytest.approx(single["loss"], rel=1e-5)


def make_tiny_voc(root: Path) -> list[str]:
    """A VOC2012 tree: train/val ids with palette masks, test ids with images only (no ground truth)."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"2008_{i:06d}" for i in range(6)]
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        if i < 4:
            mask = Image.fromarray(rng.choice([0, 1, 15, 255], (30, 40)).astype(np.uint8), mode="P")
            mask.putpalette([0] * 768)
            mask.save(root / "SegmentationClass" / f"{name}.png")
    for split, ids in (("train", names[:2]), ("val", names[2:4]), ("test", names[4:])):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return names[4:]


def test_evaluate_on_a_split_without_ground_truth_writes_voc_server_layout(tmp_path):
    voc = tmp_path / "VOC2012"
    test_ids = make_tiny_voc(voc)
    model_dir = make_experiment(tmp_path, dataset="voc", data_dir=str(voc), num_classes=21, crop_size=32,
                                batch_size=2, num_epochs=1)
    assert run_train(model_dir) == 0
    out = tmp_path / "submission"
    assert evaluate.main(["--model_dir", str(model_dir), "--split", "test", "--save_predictions", str(out)]) == 0
    server = out / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
    assert sorted(p.stem for p in server.glob("*.png")) == test_ids
    assert Image.open(server / f"{test_ids[0]}.png").size == (40, 30)
    assert not list(model_dir.glob("metrics_test_*.json"))  # no ground truth: predictions only

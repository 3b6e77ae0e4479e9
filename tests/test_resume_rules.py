"""What a resumed run may change and what it keeps: every setting's rule as one table, evaluation settings that change
and are used, and a run whose pretrained file moved or changed since it started."""
from __future__ import annotations

import hashlib
import json
import signal

import pytest
import torch
import torchvision

import errors
import settings
import train
import utils
from test_train import read_json, run_train, stop_after_first_step

EXPERIMENT = settings.EXPERIMENT_CONFIGS
BASE = {"dataset": "synthetic", "data_dir": "", "num_classes": 5, "crop_size": 64}

# Every setting, a value other than BASE's, and whether a resumed run may take it. May change: how to run (workers,
# speed, logging, what to keep, where the data lives) and how the val split is scored (evaluation only): neither
# changes what is trained. May not: what is trained (data, augmentation, model, optimisation, schedule, seed, which
# split is validated, how often): a resumed run with another would be neither the old run nor a new one.
RESUME_RULES: dict[str, tuple[object, bool]] = {
    # how to run
    "data_dir": ("/elsewhere", True), "num_workers": (2, True), "amp": (False, True), "channels_last": (False, True),
    "compile": (True, True), "cuda_graph": (True, True), "save_summary_steps": (5, True),
    "keep_checkpoints": ("best_weights", True), "tracker": ("tensorboard+mlflow", True),
    "tracking_uri": ("file:/tmp/x", True), "num_logged_images": (0, True),
    # how the val split is scored
    "tta_scales": ([1.0, 1.5], True), "tta_flip": (False, True), "sliding_window": (True, True),
    "gaussian_windows": (True, True), "eval_pad_size": (512, True), "boundary_distance": ("euclidean", True),
    "boundary_void": ("ignored", True), "eval_precision": ("bfloat16", True),
    # what is trained: the data and its augmentation
    "dataset": ("folder", False), "crop_size": (96, False), "scale_range": ([1.0, 1.0], False),
    "flip": (False, False), "color_jitter": (0.1, False), "train_split": ("trainval", False),
    "val_split": ("test", False), "mask_values": ({"0": 0}, False), "val_fraction": (0.5, False),
    "class_names": (["a", "b", "c", "d", "e"], False), "split_sequences": ({"train": ["a"]}, False),
    "synthetic_seed": (1, False), "synthetic_image_size": (64, False), "synthetic_train_images": (50, False),
    "synthetic_val_images": (5, False),
    # the model
    "num_classes": (3, False), "backbone": ("resnet18", False), "kernel_size": (7, False), "head": ("conv", False),
    "boundary_refine": (False, False), "upsample": ("bilinear", False), "stack_channels": (16, False),
    "pretrained": (True, False), "frozen_bn": (True, False),
    # optimisation, schedule, seed, validation interval
    "learning_rate": (0.02, False), "head_lr_multiplier": (1.0, False), "momentum": (0.5, False),
    "weight_decay": (0.0, False), "batch_size": (4, False), "num_epochs": (3, False), "num_iterations": (10, False),
    "lr_power": (1.0, False), "warmup_iterations": (5, False), "loss": ("cross_entropy+dice", False),
    "class_weights": ([1, 1, 1, 1, 2], False), "dice_weight": (0.5, False), "grad_clip_norm": (5.0, False),
    "sync_bn": (True, False), "seed": (1, False), "val_every_epochs": (2, False),
}


def test_the_resume_table_names_every_setting():
    assert set(RESUME_RULES) == set(settings.experiment_settings(EXPERIMENT))


@pytest.mark.parametrize("key", RESUME_RULES)
def test_every_setting_changes_on_resume_or_is_refused_naming_it(key):
    value, may_change = RESUME_RULES[key]
    saved = settings.Params(BASE, EXPERIMENT).dict
    assert saved[key] != value
    changed = settings.Params(BASE, EXPERIMENT, "params.json", {key: value})
    if may_change:
        resumed, overrides = changed.resumed(saved, {}, {key: value}, "last.pth.tar")
        assert getattr(resumed, key) == value and overrides == {key: value}
    else:
        with pytest.raises(errors.ParamsError, match=rf"^last\.pth\.tar was trained with other settings: {key}="):
            changed.resumed(saved, {}, {key: value}, "last.pth.tar")


def test_changed_evaluation_settings_are_used_by_the_resumed_runs_validation(experiment, monkeypatch):
    model_dir = experiment(num_iterations=2, num_epochs=1)
    with monkeypatch.context() as patch:
        stop_after_first_step(patch)
        assert run_train(model_dir) == 128 + signal.SIGTERM
    used = []
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda model, loader, criterion, config, *args, **kwargs: (
        used.append(config), real(model, loader, criterion, config, *args, **kwargs))[1])
    assert run_train(model_dir, "--restore_file", "last", "--set", "eval_pad_size=64", "--set",
                     "boundary_distance=euclidean", "--set", "gaussian_windows=true") == 0
    assert [(c.eval_pad_size, c.boundary_distance, c.gaussian_windows) for c in used] == [(64, "euclidean", True)]
    assert read_json(model_dir / utils.RESOLVED_PARAMS_FILE)["params"]["eval_pad_size"] == 64


def backbone_file(path, seed: int) -> dict:
    """A torchvision ResNet-18 state dict at `path`; the record a run makes of it."""
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_a_run_resumes_after_its_pretrained_file_changed_or_went_and_keeps_its_record(experiment, tmp_path,
                                                                                       monkeypatch):
    weights = tmp_path / "resnet18.pth"
    record = backbone_file(weights, 0)
    model_dir = experiment(num_iterations=3, num_epochs=1, pretrained=str(weights))
    for attempt in range(2):  # stopped at iterations 1 and 2; the file is replaced in between
        with monkeypatch.context() as patch:
            stop_after_first_step(patch)
            assert run_train(model_dir, *(["--restore_file", "last"] if attempt else [])) == 128 + signal.SIGTERM
        assert torch.load(model_dir / utils.LAST_CHECKPOINT, weights_only=True)["pretrained_weights"] == record
        assert read_json(model_dir / utils.RESOLVED_PARAMS_FILE)["pretrained_weights"] == record
        backbone_file(weights, 1)  # another file at the same path: not the run's starting point
    weights.unlink()  # moved or deleted: the checkpoint holds every weight
    assert run_train(model_dir, "--restore_file", "last") == 0
    assert read_json(model_dir / utils.COMPLETE_MARKER)["iterations"] == 3
    for name in (utils.LAST_CHECKPOINT, utils.BEST_CHECKPOINT):
        assert torch.load(model_dir / name, weights_only=True)["pretrained_weights"] == record
    assert read_json(model_dir / utils.RESOLVED_PARAMS_FILE)["pretrained_weights"] == record
    assert json.loads((model_dir / "params.json").read_text())["pretrained"] == str(weights)

"""utils.py: settings validated once (every key with a bad value), command-line helpers, the run folder (atomic
writes with the umask's permissions, the lock, checkpoints), logging and mixed precision."""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import checkpoints
import settings
import utils
from checkpoints import CheckpointError
from errors import ParamsError, UserError
from model.data_loader import DataConfig
from model.net import GCNConfig
from settings import Params

EXPERIMENT = (DataConfig, GCNConfig, settings.TrainConfig, settings.EvalConfig)
MINIMAL = {"dataset": "synthetic", "data_dir": "", "num_classes": 5}


@dataclass
class Demo:
    """A small config with every kind of rule."""

    dataset: str = field(metadata={"choices": ("voc", "sbd")})
    crop_size: int = field(default=512, metadata={"at_least": 1})
    scale_range: list = field(default_factory=lambda: [0.5, 2.0], metadata={"items": (float, int), "length": 2})
    learning_rate: float = field(default=0.01, metadata={"above": 0})
    amp: bool = False
    class_weights: list | None = field(default=None, metadata={"items": (float, int), "length": "num_classes"})
    num_classes: int = 2


DEFAULTS = {"crop_size": 512, "scale_range": [0.5, 2.0], "learning_rate": 0.01, "amp": False, "class_weights": None,
            "num_classes": 2}


def write_json(path, values) -> str:
    path.write_text(json.dumps(values))
    return str(path)


# ---------------------------------------------------------------- Params

def test_params_fills_defaults_and_builds_each_config(tmp_path):
    params = Params.load(write_json(tmp_path / "params.json", {"dataset": "voc", "crop_size": 321}), (Demo,))
    assert params.dict == {**DEFAULTS, "dataset": "voc", "crop_size": 321}
    assert params.crop_size == 321 and params.dataset == "voc"
    assert params.config(Demo) == Demo(dataset="voc", crop_size=321)


def test_params_defaults_are_copies(tmp_path):
    first = Params({"dataset": "voc"}, (Demo,))
    first.scale_range.append(9)
    assert Params({"dataset": "voc"}, (Demo,)).scale_range == [0.5, 2.0]


def test_overrides_win_and_are_validated_as_the_file(tmp_path):
    path = write_json(tmp_path / "params.json", {"dataset": "voc", "crop_size": 100})
    params = Params.load(path, (Demo,), {"crop_size": 64, "amp": True})
    assert params.crop_size == 64 and params.amp is True
    with pytest.raises(ParamsError, match=r"^--set: 'crop_size' is 0; expected an integer >= 1$"):
        Params.load(path, (Demo,), {"crop_size": 0})
    with pytest.raises(ParamsError, match=r"^--set: unknown key 'crop'"):
        Params.load(path, (Demo,), {"crop": 1})


def assert_params_error(values, *fragments, configs=(Demo,)):
    path = None
    if isinstance(values, dict):
        values = {"dataset": "voc", **values} if configs == (Demo,) else {**MINIMAL, **values}
    with pytest.raises(ParamsError) as info:
        Params.load(values, configs) if not isinstance(values, dict) else Params(values, configs, "p.json")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    return message, path


def test_params_file_errors(tmp_path):
    assert_params_error(tmp_path / "missing.json", "missing.json", "no such")
    (tmp_path / "bad.json").write_text('{"dataset": "voc",')
    assert_params_error(tmp_path / "bad.json", "bad.json", "JSON")
    assert_params_error(write_json(tmp_path / "list.json", ["dataset"]), "list.json", "object")
    (tmp_path / "latin1.json").write_bytes('{"dataset": "vöc"}'.encode("latin-1"))
    assert_params_error(tmp_path / "latin1.json", "latin1.json", "JSON")


def test_missing_required_and_unknown_keys():
    with pytest.raises(ParamsError, match=r"p\.json: missing required key\(s\) 'dataset'"):
        Params({"crop_size": 3}, (Demo,), "p.json")
    message, _ = assert_params_error({"learning_rat": 0.1}, "'learning_rat'", "did you mean 'learning_rate'")
    message, _ = assert_params_error({"zzz": 1}, "'zzz'")
    assert "did you mean" not in message


@pytest.mark.parametrize("key,value,allowed", [
    ("crop_size", True, "an integer >= 1"),   # JSON true is no number
    ("crop_size", 512.0, "an integer >= 1"),
    ("crop_size", "512", "an integer >= 1"),
    ("crop_size", 0, "an integer >= 1"),
    ("dataset", "VOC", 'one of "voc", "sbd"'),
    ("scale_range", [0.5], "a list of 2 numbers"),
    ("scale_range", ["a", "b"], "a list of 2 numbers"),
    ("learning_rate", 0, "a number > 0"),
    ("amp", 1, "true or false"),
    ("class_weights", [1, 2, 3], "a list of 2 numbers (one per class: num_classes = 2) or null"),
])
def test_a_bad_value_names_the_file_key_value_and_what_is_allowed(key, value, allowed):
    message, _ = assert_params_error({key: value}, "p.json", repr(key), json.dumps(value), allowed)
    assert message == f"p.json: {key!r} is {json.dumps(value)}; expected {allowed}"


@pytest.mark.parametrize("key,value", [("learning_rate", 1), ("class_weights", [1, 2.5]), ("class_weights", None),
                                       ("amp", True), ("scale_range", [1, 1])])
def test_allowed_values_pass_unchanged(key, value):
    params = Params({"dataset": "voc", key: value}, (Demo,))
    assert getattr(params, key) == value and type(getattr(params, key)) is type(value)


# Every key of a real experiment with values it must refuse (a new setting without an entry fails the test below).
BAD_VALUES = {
    "dataset": ["GCN", 3], "data_dir": [3, None], "crop_size": [0, 1.5, 4097, 200000],
    "scale_range": [[2, 1], [0.5], [0, 1], [0.5, 1e300]],
    "flip": ["yes"], "color_jitter": [-0.1, 1.01, 1e300], "num_workers": [-1, 65, 100000],
    "train_split": [None], "val_split": [1],
    "mask_values": [{"x": 1}, {"300": 1}, [0, 1]], "val_fraction": [0, 1, 1.5], "class_names": [["a", "b"], [1] * 5],
    "split_sequences": [{"train": ["a"], "val": ["a"]}, {"train": "a"}, {"train": []}],
    "synthetic_seed": [0.5, -5, 2**32], "synthetic_image_size": [4, 60000],
    "synthetic_train_images": [0, 10**6 + 1, 10**12],
    "synthetic_val_images": [0, 10**6 + 1], "num_classes": [0, -3, 2.0, 256], "backbone": ["resnet200"],
    "kernel_size": [8, 0, -3, 257, 400001], "head": ["GCN", "dense"],
    "boundary_refine": [1], "upsample": ["nearest"], "stack_channels": [0, 4097], "pretrained": [3],
    "learning_rate": [-0.1, 0, "0.1", float("nan"), float("inf")], "head_lr_multiplier": [0],
    "momentum": [1.0, -0.1], "weight_decay": [-1e-4],
    "batch_size": [0, -2, 1025], "num_epochs": [0], "num_iterations": [-5, 0], "lr_power": [-1],
    "warmup_iterations": [-1], "loss": ["dice", "cross entropy"], "class_weights": [["a"] * 5, [1, 2], [-1] * 5],
    "dice_weight": [-1], "grad_clip_norm": [0, -5], "sync_bn": ["false"], "seed": [1.5, -1, 2**32, 2**70],
    "val_every_epochs": [0], "amp": [0], "channels_last": [None], "compile": ["true"], "cuda_graph": [1],
    "save_summary_steps": [0],
    "keep_checkpoints": ["best"], "tracker": ["mlflow", None], "tracking_uri": [None, 3], "num_logged_images": [-1, 65],
    "tta_scales": [[], [0], [1, -1], [float("nan")], [1, 1e6]], "tta_flip": [2],
    "sliding_window": [[]], "gaussian_windows": ["yes"],
    "frozen_bn": ["yes"], "eval_pad_size": [0, 1.5, 4097, 100000],
    "boundary_distance": ["manhattan"], "boundary_void": [True], "eval_precision": ["fp32", "bf16", None],
}


def test_every_setting_has_bad_values_below():
    assert set(BAD_VALUES) == set(settings.experiment_settings(EXPERIMENT))


@pytest.mark.parametrize("key,value", [(k, v) for k, values in BAD_VALUES.items() for v in values])
def test_every_setting_refuses_a_bad_value_in_one_line(tmp_path, key, value):
    path = write_json(tmp_path / "params.json", {**MINIMAL, key: value})
    with pytest.raises(ParamsError) as info:
        Params.load(path, EXPERIMENT)
    message = str(info.value)
    assert message.startswith(f"{path}: {key!r} is {json.dumps(value)}; expected "), message
    assert "\n" not in message


# Both ends of every bounded range pass.
EDGE_VALUES = {"crop_size": [1, 4096], "color_jitter": [0, 1], "seed": [0, 2**32 - 1], "synthetic_seed": [0, 2**32 - 1],
               "synthetic_image_size": [8, 4096], "num_classes": [1, 255], "kernel_size": [1, 255],
               "stack_channels": [1, 4096], "scale_range": [[1e-3, 8]], "tta_scales": [[1e-3, 8]],
               "num_workers": [0, 64], "eval_pad_size": [1, 4096], "synthetic_train_images": [1, 10**6],
               "synthetic_val_images": [1, 10**6], "batch_size": [2, 1024], "num_logged_images": [0, 64]}


@pytest.mark.parametrize("key,value", [(k, v) for k, values in EDGE_VALUES.items() for v in values])
def test_both_ends_of_every_range_are_allowed(key, value):
    assert getattr(Params({**MINIMAL, "num_classes": 2, key: value}, EXPERIMENT), key) == value


@pytest.mark.parametrize("key,value,memory", [("crop_size", 200000, "480 GB per float image"),
                                              ("synthetic_image_size", 60000, "54 GB to draw one image"),
                                              ("kernel_size", 400001, "GB of weights per class"),
                                              ("stack_channels", 100000, "360 GB")])
def test_a_size_above_its_bound_names_the_memory_it_would_need(key, value, memory):
    assert_params_error({key: value}, "<= ", memory, configs=EXPERIMENT)


def test_batch_size_1_with_a_crop_of_one_stride_32_cell_is_refused_naming_the_fix():
    message, _ = assert_params_error({"batch_size": 1, "crop_size": 32}, configs=EXPERIMENT)
    assert message.startswith("p.json: 'batch_size' is 1; expected") and "batch_size >= 2 or crop_size >= 33" in message
    for fine in ({"batch_size": 2, "crop_size": 32}, {"batch_size": 1, "crop_size": 33}):
        Params({**MINIMAL, **fine}, EXPERIMENT)


def test_a_bad_key_that_another_refers_to_is_named_first():
    with pytest.raises(ParamsError,
                       match=r"^p\.json: 'num_classes' is \"five\"; expected an integer >= 1 and <= 255$"):
        Params({**MINIMAL, "num_classes": "five", "class_weights": [1.0]}, EXPERIMENT, "p.json")


def test_a_setting_declared_in_two_configs_is_refused():
    @dataclass
    class Other:
        crop_size: int = 3

    with pytest.raises(TypeError, match="'crop_size' is declared twice"):
        settings.experiment_settings((Demo, Other))


def test_resumed_params_are_the_checkpoints_with_this_runs_execution_settings():
    saved = {**MINIMAL, "learning_rate": 0.01, "crop_size": 64, "num_workers": 0, "momentum": 0.5}
    params = Params({**MINIMAL, "learning_rate": 0.01, "num_workers": 2}, EXPERIMENT, "p.json", {"amp": False})
    resumed, overrides = params.resumed(saved, {"crop_size": 64, "momentum": 0.5}, {"amp": False}, "last.pth")
    assert resumed.crop_size == 64 and resumed.momentum == 0.5  # the run's own --set, not retyped
    assert resumed.num_workers == 2 and resumed.amp is False  # how to run: this command's
    assert overrides == {"crop_size": 64, "momentum": 0.5, "amp": False}
    with pytest.raises(ParamsError, match=r"^last\.pth was trained with other settings: crop_size=64 \(--set: 32\);"):
        Params({**MINIMAL, "learning_rate": 0.01}, EXPERIMENT, "p.json", {"crop_size": 32}).resumed(
            saved, {"crop_size": 64, "momentum": 0.5}, {"crop_size": 32}, "last.pth")
    with pytest.raises(ParamsError, match=r"crop_size=64 \(defaults: 512\), momentum=0\.5 \(defaults: 0\.9\)"):
        params.resumed(saved, {}, {}, "last.pth")  # not from the run's --set: params.json was edited since
    with pytest.raises(ParamsError, match=r"learning_rate=0\.01 \(p\.json: 0\.02\)"):
        Params({**MINIMAL, "learning_rate": 0.02}, EXPERIMENT, "p.json").resumed(saved, {"crop_size": 64,
                                                                                    "momentum": 0.5}, {}, "x")


def test_a_resolved_params_file_is_valid_params_input(tmp_path):
    params = Params({**MINIMAL, "learning_rate": 0.02}, EXPERIMENT, "p.json")
    path = tmp_path / utils.RESOLVED_PARAMS_FILE
    path.write_text(json.dumps(utils.run_record(params.dict, {"learning_rate": 0.02}, {}, torch.device("cpu"))))
    assert Params.load(path, EXPERIMENT).dict == params.dict


# ---------------------------------------------------------------- command lines

def test_dashed_spellings_are_aliases_and_overrides_parse_json():
    parser = utils.ArgumentParser()
    parser.add_argument("--model_dir")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(["--model-dir", "x", "--set", "lr=1e-3", "--set", "name=abc", "--set", "r=[1, 2]",
                              "--set", "flag=true", "--set", "none=null"])
    assert args.model_dir == "x"
    assert settings.parse_overrides(args.set) == {"lr": 1e-3, "name": "abc", "r": [1, 2], "flag": True, "none": None}
    with pytest.raises(ParamsError, match="--set 'lr': expected key=value"):
        settings.parse_overrides(["lr"])


def test_run_cli_turns_user_errors_into_one_line_and_status_2(capsys):
    class DataProblem(UserError):  # each module's errors derive from the one base
        pass

    def fail(exc):
        def run():
            raise exc
        return run

    assert utils.run_cli(fail(UserError("bad key 'x'"))) == 2
    assert utils.run_cli(fail(DataProblem("bad file y"))) == 2
    assert utils.run_cli(fail(FileNotFoundError(2, "No such file or directory", "x.png"))) == 2
    assert capsys.readouterr().err == ("error: bad key 'x'\nerror: bad file y\n"
                                       "error: [Errno 2] No such file or directory: 'x.png'\n")
    for bug in (KeyError("bug"), ValueError("bug")):  # bugs keep their tracebacks
        with pytest.raises(type(bug)):
            utils.run_cli(fail(bug))
    assert utils.run_cli(lambda: 0) == 0


# ---------------------------------------------------------------- run folder: atomic writes and the lock

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_are_written_with_the_umask_permissions(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        utils.write_json(tmp_path / "metrics.json", {"miou": 0.5})
        checkpoints.save_checkpoint({"state_dict": {}, "model_config": {}}, tmp_path / "last.pth.tar")
    finally:
        os.umask(previous)
    for name in ("metrics.json", "last.pth.tar"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode


def write_to_dev_full(monkeypatch):
    """Every write fails with ENOSPC, as on a full disk."""
    monkeypatch.setattr(utils, "open_new", lambda path: open("/dev/full", "wb"))


def test_a_full_disk_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    checkpoints.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "model_config": {}}, tmp_path / "last.pth.tar")
    before = (tmp_path / "last.pth.tar").read_bytes()
    write_to_dev_full(monkeypatch)
    with pytest.raises(CheckpointError, match=r"^cannot write checkpoint .*last\.pth\.tar: No space left on device; "
                                              r"the previous one is kept$"):
        checkpoints.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "model_config": {}},
                                    tmp_path / "last.pth.tar")
    assert (tmp_path / "last.pth.tar").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.pth.tar"]  # the temporary is gone


def test_a_metrics_file_on_a_full_disk_or_in_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    write_to_dev_full(monkeypatch)
    with pytest.raises(UserError, match=r"^cannot write .*metrics\.json: No space left on device$"):
        utils.write_json(tmp_path / "metrics.json", {"miou": 0.5})
    assert sorted(os.listdir(tmp_path)) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^cannot lock .*file/run: Not a directory$"):
        with utils.RunLock(tmp_path / "file" / "run"):
            pass


def test_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / ".last.pth.tar.tmp").write_bytes(b"x" * 100)
    (tmp_path / ".best.onnx.tmp").write_bytes(b"export.py, writing")
    (tmp_path / "keep.json").write_text("{}")
    utils.remove_stale_temporary_files(tmp_path, ["last.pth.tar", "best.pth.tar"])
    assert sorted(os.listdir(tmp_path)) == [".best.onnx.tmp", "keep.json"]


HOLD_LOCK = "import sys, time, utils\nwith utils.RunLock(__import__('pathlib').Path(sys.argv[1])):\n" \
            "    print('locked', flush=True)\n    time.sleep(60)\n"


def test_the_folder_lock_refuses_a_second_writer_naming_it_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(utils.__file__))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"{tmp_path} is in use by pid {holder.pid} on "):
            with utils.RunLock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with utils.RunLock(tmp_path):  # a killed holder cannot keep the folder
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            with utils.RunLock(tmp_path):
                pass


# ---------------------------------------------------------------- checkpoints

def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


CONFIG = {"num_classes": 2, "backbone": "resnet18", "kernel_size": 15}


def save_tiny(path, seed=0, **extra):
    checkpoints.save_checkpoint({"state_dict": tiny_model(seed).state_dict(), "model_config": CONFIG,
                           "class_names": ["a", "b"], "palette": [[0, 0, 0], [9, 9, 9]], **extra}, path)


def test_checkpoint_round_trip(tmp_path):
    save_tiny(tmp_path / "last.pth.tar", progress={"epoch": 7})  # no progress class: any dict
    checkpoint = checkpoints.load_checkpoint(tmp_path / "last.pth.tar")
    assert checkpoint["progress"] == {"epoch": 7} and checkpoint["model_config"] == CONFIG
    for (name, expected), actual in zip(tiny_model(0).state_dict().items(), checkpoint["state_dict"].values()):
        assert torch.equal(actual, expected), name


def assert_checkpoint_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


class NotWeights:
    """A custom class: unpickling it needs code execution, which weights_only loading must refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    assert_checkpoint_error(tmp_path / "missing.pth.tar", "does not exist")
    save_tiny(tmp_path / "last.pth.tar")
    data = (tmp_path / "last.pth.tar").read_bytes()
    (tmp_path / "half.pth.tar").write_bytes(data[: len(data) // 2])
    assert_checkpoint_error(tmp_path / "half.pth.tar", "corrupted")
    (tmp_path / "random.pth.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    assert_checkpoint_error(tmp_path / "random.pth.tar", "corrupted")
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": {}, "model_config": {}, "class_names": [], "palette": [],
                "extra": NotWeights(str(marker))}, tmp_path / "evil.pth.tar")
    assert_checkpoint_error(tmp_path / "evil.pth.tar")
    assert not marker.exists()
    torch.save(tiny_model(0).state_dict(), tmp_path / "weights.pth")
    assert_checkpoint_error(tmp_path / "weights.pth", "has no state_dict, model_config, class_names, palette")
    torch.save({"state_dict": {}, "model_config": {}}, tmp_path / "old.pth.tar")
    assert_checkpoint_error(tmp_path / "old.pth.tar", "has no class_names, palette: not written by this train.py")


def full_checkpoint(**changes):
    """Every key a checkpoint may hold, all valid, with `changes` on top (None deletes a key)."""
    checkpoint = {"state_dict": tiny_model(0).state_dict(), "model_config": dict(CONFIG), "class_names": ["a", "b"],
                  "palette": [[0, 0, 0], [9, 9, 9]], "params": {"dataset": "voc", "seed": 3, "class_weights": [1, 2]},
                  "progress": {"epoch": 3, "best_miou": 0.5}, "optimizer": {}, "scheduler": {}, "scaler": {},
                  "pretrained_weights": {"file": "/weights/resnet18.pth", "sha256": "0" * 64}}
    checkpoint.update(changes)
    return {k: v for k, v in checkpoint.items() if v is not None}


# Every key a checkpoint holds, broken: each is refused at load, in one line naming the key.
BAD_CHECKPOINTS = {
    "unknown key": ({"epoch": 3}, "holds unknown key(s) 'epoch'"),
    "model_config a list": ({"model_config": [1, 2]}, "model_config is a list, not a dict"),
    "model_config unknown key": ({"model_config": {**CONFIG, "depth": 3}}, "model_config: unknown key 'depth'"),
    "model_config no num_classes": ({"model_config": {"backbone": "resnet18"}}, "missing key(s) 'num_classes'"),
    "bad backbone": ({"model_config": {**CONFIG, "backbone": "vgg16"}}, "'backbone' is \"vgg16\"; expected one of"),
    "huge kernel": ({"model_config": {**CONFIG, "kernel_size": 400001}}, "'kernel_size' is 400001; expected an odd"),
    "even kernel": ({"model_config": {**CONFIG, "kernel_size": 4}}, "'kernel_size' is 4"),
    "state_dict of lists": ({"state_dict": {"w": [1.0]}}, "state_dict is not a non-empty dict of named tensors"),
    "empty state_dict": ({"state_dict": {}}, "state_dict is not a non-empty dict"),
    "short palette": ({"palette": [[0, 0, 0]]}, "palette is not a list of 2 RGB triples"),
    "palette value 256": ({"palette": [[0, 0, 0], [256, 0, 0]]}, "palette is not a list of 2 RGB triples"),
    "palette pairs": ({"palette": [[0, 0], [1, 1]]}, "palette is not"),
    "class names not text": ({"class_names": [1, 2]}, "class_names is not a list of 2 names"),
    "one class name": ({"class_names": ["a"]}, "class_names is not a list of 2 names"),
    "params a list": ({"params": [1]}, "params is a list"),
    "params unknown key": ({"params": {"lr": 0.1}}, "params: unknown key 'lr'"),
    "params bad seed": ({"params": {"seed": -1}}, "params: 'seed' is -1"),
    "params bad length": ({"params": {"class_weights": [1, 2, 3]}}, "'class_weights' is [1, 2, 3]; expected a list "
                                                                    "of 2 numbers"),
    "progress extra key": ({"progress": {"epoch": 1, "lap": 2}}, "progress: unknown key 'lap'"),
    "progress wrong type": ({"progress": {"epoch": "one"}}, "progress: 'epoch' is \"one\"; expected an integer"),
    "optimizer a list": ({"optimizer": [1]}, "optimizer is a list, not a dict"),
    "scheduler a tensor": ({"scheduler": torch.zeros(2)}, "scheduler is a Tensor, not a dict"),
    "scaler text": ({"scaler": "x"}, "scaler is a str, not a dict"),
    "weights record a list": ({"pretrained_weights": ["x"]}, "pretrained_weights is neither null nor a record"),
    "weights record of numbers": ({"pretrained_weights": {"file": 3}}, "pretrained_weights is neither null nor"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_every_key_of_a_checkpoint_is_validated_at_load_in_one_line(tmp_path, case):
    changes, fragment = BAD_CHECKPOINTS[case]
    path = tmp_path / "x.pth.tar"
    torch.save(full_checkpoint(**changes), path)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_checkpoint(path)
    assert str(info.value).startswith(f"checkpoint {path}") and "\n" not in str(info.value)
    assert fragment in str(info.value), str(info.value)


def test_a_valid_checkpoint_with_every_key_loads(tmp_path):
    torch.save(full_checkpoint(), tmp_path / "x.pth.tar")
    assert checkpoints.load_checkpoint(tmp_path / "x.pth.tar")["progress"]["epoch"] == 3


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def stepped(optimizer, model):
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def test_a_foreign_optimiser_scheduler_or_scaler_state_is_refused_in_one_line(tmp_path):
    model, other = tiny_model(0), nn.Sequential(nn.Conv2d(3, 4, 5), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    optimizer = sgd(model)
    twin = tiny_model(0)
    own = stepped(sgd(twin), twin)
    checkpoints.restore_state(tmp_path / "x", "optimizer", optimizer, own)  # its own kind loads
    assert torch.equal(optimizer.state_dict()["state"][0]["momentum_buffer"], own["state"][0]["momentum_buffer"])
    foreign = {
        "another model's": stepped(sgd(other), other),
        "Adam's": torch.optim.Adam(model.parameters()).state_dict(),
        "two groups'": torch.optim.SGD([{"params": [p]} for p in list(model.parameters())[:2]], lr=1).state_dict(),
    }
    for what, state in foreign.items():
        match = r"^checkpoint .*x: its optimizer state does not fit this run"
        with pytest.raises(CheckpointError, match=match) as info:
            checkpoints.restore_state(tmp_path / "x", "optimizer", sgd(model), state)
        assert "\n" not in str(info.value), what
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    step_lr = torch.optim.lr_scheduler.StepLR(sgd(model), 3).state_dict()
    with pytest.raises(CheckpointError, match="its scheduler state does not fit"):
        checkpoints.restore_state(tmp_path / "x", "scheduler", scheduler, step_lr)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(CheckpointError, match="its scaler state does not fit"):
        checkpoints.restore_state(tmp_path / "x", "scaler", scaler, {"scale": "big"})


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys(tmp_path):
    with pytest.raises(CheckpointError, match=r"x\.pth\.tar was built for another model: num_classes=5 \(this model: "
                                              r"2\), backbone='resnet50' \(this model: 'resnet18'\)$"):
        checkpoints.check_same_architecture(tmp_path / "x.pth.tar",
                                            {**CONFIG, "num_classes": 5, "backbone": "resnet50"}, CONFIG)
    checkpoints.check_same_architecture(tmp_path / "x.pth.tar", dict(CONFIG), CONFIG)


# ---------------------------------------------------------------- logging, precision

@pytest.fixture
def clean_root_logger():
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def test_set_logger_appends_without_duplicates_and_creates_no_empty_file(tmp_path, clean_root_logger):
    log = tmp_path / "train.log"
    utils.set_logger(log)
    utils.set_logger(log)
    assert not log.exists()  # nothing logged yet: no empty file left behind by a run that stopped early
    logging.info("first message")
    utils.set_logger(log)
    logging.info("second message")
    for handler in clean_root_logger.handlers:
        handler.flush()
    text = log.read_text()
    assert text.count("first message") == 1 and text.count("second message") == 1


def test_mixed_precision_is_decided_in_one_place(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert utils.autocast_dtype(cuda, False) is None and utils.autocast_dtype(cpu, False) is None
    monkeypatch.setattr(utils, "cpu_bf16_pays", lambda: False)
    assert utils.autocast_dtype(cpu, True) is None
    monkeypatch.setattr(utils, "cpu_bf16_pays", lambda: True)
    assert utils.autocast_dtype(cpu, True) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert utils.autocast_dtype(cuda, True) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert utils.autocast_dtype(cuda, True) == torch.float16
    # A pre-Ampere GPU (T4, V100): bf16 only emulated, which is_bf16_supported() counts by default.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert utils.autocast_dtype(cuda, True) == torch.float16
    with utils.autocast(cpu, None):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_more_torchrun_ranks_than_gpus_is_one_line_naming_the_cause(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"local rank 1 has no GPU: this machine shows 1 GPU\(s\); start at most 1 "
                                        r"processes per node"):
        utils.init_distributed("cuda")


def test_run_record_names_versions_overrides_and_command(tmp_path):
    params = Params(MINIMAL, EXPERIMENT)
    record = utils.run_record(params.dict, {"learning_rate": 0.5}, {"set": ["learning_rate=0.5"]}, torch.device("cpu"))
    assert record["params"]["learning_rate"] == 0.01 and record["params"]["batch_size"] == 8  # defaults filled in
    assert record["overrides"] == {"learning_rate": 0.5} and record["torch"] == torch.__version__
    assert record["command"][0] == sys.executable and record["arguments"] == {"set": ["learning_rate=0.5"]}
    assert record["git_commit"] is None or len(record["git_commit"]) == 40
    assert time.strptime(record["date"], "%Y-%m-%d %H:%M:%S")


def test_the_settings_reference_documents_every_setting_and_its_resume_rule():
    reference = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text()
    known = settings.experiment_settings(EXPERIMENT)
    undocumented = [key for key in known if f"`{key}`" not in reference]
    assert not undocumented, f"docs/settings.md's settings tables lack {undocumented}"
    may_change = {key for key, setting in known.items() if setting.may_change_on_resume}
    assert "## What a resumed run may change" in reference and "Every other setting" in reference
    listed = reference.split("## What a resumed run may change")[1].split("Every other setting")[0]
    assert set(re.findall(r"`(\w+)`", listed)) & set(known) == may_change


def test_eval_precision_is_float32_unless_asked_and_then_only_where_native(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert utils.eval_autocast_dtype(cpu, "float32") is None and utils.eval_autocast_dtype(cuda, "float32") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",  # e.g. a V100: bf16 only emulated
                        lambda including_emulation=True: including_emulation)
    assert utils.eval_autocast_dtype(cuda, "float16") == torch.float16
    with pytest.raises(ParamsError, match='eval_precision "bfloat16": this cuda has no native bfloat16'):
        utils.eval_autocast_dtype(cuda, "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert utils.eval_autocast_dtype(cuda, "bfloat16") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})  # an AMD EPYC with AVX-512
    assert utils.eval_autocast_dtype(cpu, "bfloat16") == torch.bfloat16
    with pytest.raises(ParamsError, match='eval_precision "float16": this cpu has no native float16'):
        utils.eval_autocast_dtype(cpu, "float16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_fp16": True})
    assert utils.eval_autocast_dtype(cpu, "float16") == torch.float16

"""utils.py: Params validation, RunningAverage, set_logger, atomic checkpoints, safe checkpoint loading, seeding."""
import json
import logging
import os
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

import utils
from utils import CheckpointError, Params, ParamsError, RunningAverage, UserError

SPEC = {
    "dataset": ((str,), ...),
    "crop_size": ((int,), 512),
    "scale_range": ((list,), [0.5, 2.0]),
    "learning_rate": ((float, int), 0.01),
    "momentum": ((float,), 0.9),
    "amp": ((bool,), False),
    "class_weights": ((list, type(None)), None),
}
DEFAULTS = {"crop_size": 512, "scale_range": [0.5, 2.0], "learning_rate": 0.01, "momentum": 0.9, "amp": False,
            "class_weights": None}


def write_json(path, values) -> str:
    path.write_text(json.dumps(values))
    return str(path)


# ---------------------------------------------------------------- Params

def test_params_fills_defaults_and_exposes_attributes(tmp_path):
    params = Params(write_json(tmp_path / "params.json", {"dataset": "voc", "crop_size": 321}), SPEC)
    assert params.dict == {**DEFAULTS, "dataset": "voc", "crop_size": 321}
    assert params.crop_size == 321 and params.momentum == 0.9 and params.dataset == "voc"


def test_params_save_then_load_round_trips(tmp_path):
    values = {"dataset": "sbd", "crop_size": 257, "scale_range": [0.75, 1.25], "learning_rate": 3,
              "momentum": 0.99, "amp": True, "class_weights": [1.0, 2.5]}
    params = Params(write_json(tmp_path / "params.json", values), SPEC)
    out = tmp_path / "sub" / "saved.json"
    params.save(out)
    assert json.loads(out.read_text()) == values
    assert Params(out, SPEC).dict == values
    assert [p.name for p in out.parent.iterdir()] == ["saved.json"]


def test_params_defaults_are_copies_not_the_spec_itself(tmp_path):
    first = Params(write_json(tmp_path / "params.json", {"dataset": "voc"}), SPEC)
    first.scale_range.append(9)
    assert SPEC["scale_range"][1] == [0.5, 2.0]
    assert Params(write_json(tmp_path / "params.json", {"dataset": "voc"}), SPEC).scale_range == [0.5, 2.0]


def test_params_update_and_set_override(tmp_path):
    params = Params(write_json(tmp_path / "a.json", {"dataset": "voc"}), SPEC)
    params.update(write_json(tmp_path / "b.json", {"crop_size": 400, "amp": True}))
    assert params.dict == {**DEFAULTS, "dataset": "voc", "crop_size": 400, "amp": True}
    params.set({"learning_rate": 0.5})
    assert params.learning_rate == 0.5 and params.crop_size == 400


def assert_params_error(path, key_fragment, spec=SPEC):
    with pytest.raises(ParamsError) as info:
        Params(path, spec)
    message = str(info.value)
    assert str(path) in message
    assert key_fragment in message
    assert "\n" not in message
    return message


def test_params_errors_are_user_errors():
    assert issubclass(ParamsError, UserError) and issubclass(ParamsError, ValueError)
    assert issubclass(CheckpointError, UserError)


def test_params_missing_file(tmp_path):
    assert_params_error(tmp_path / "missing.json", "no such")


def test_params_bad_json(tmp_path):
    path = tmp_path / "params.json"
    path.write_text('{"dataset": "voc",')
    assert_params_error(path, "JSON")


def test_params_not_an_object(tmp_path):
    assert_params_error(write_json(tmp_path / "params.json", ["dataset", "voc"]), "object")


def test_params_missing_required_key(tmp_path):
    assert_params_error(write_json(tmp_path / "params.json", {"crop_size": 3}), "'dataset'")


@pytest.mark.parametrize("key,value", [
    ("crop_size", True),          # bool is not an int
    ("crop_size", 512.0),
    ("crop_size", "512"),
    ("momentum", "0.9"),          # string for a float
    ("momentum", 1),              # int only where the spec lists int too
    ("amp", 1),
    ("scale_range", None),
    ("dataset", 3),
])
def test_params_wrong_type(tmp_path, key, value):
    path = write_json(tmp_path / "params.json", {"dataset": "voc", key: value})
    assert_params_error(path, repr(key))


@pytest.mark.parametrize("key,value", [("learning_rate", 1), ("learning_rate", 0.1), ("class_weights", None),
                                       ("class_weights", [1, 2]), ("amp", False)])
def test_params_accepts_allowed_types(tmp_path, key, value):
    params = Params(write_json(tmp_path / "params.json", {"dataset": "voc", key: value}), SPEC)
    assert getattr(params, key) == value and type(getattr(params, key)) is type(value)


def test_params_unknown_key_suggests_close_match(tmp_path):
    message = assert_params_error(write_json(tmp_path / "params.json", {"dataset": "voc", "learning_rat": 0.1}),
                                  "'learning_rat'")
    assert "did you mean 'learning_rate'" in message
    message = assert_params_error(write_json(tmp_path / "p2.json", {"dataset": "voc", "zzz": 1}), "'zzz'")
    assert "did you mean" not in message


def test_params_set_rejects_bad_values(tmp_path):
    params = Params(write_json(tmp_path / "params.json", {"dataset": "voc"}), SPEC)
    with pytest.raises(ParamsError, match="'crop_size'"):
        params.set({"crop_size": False})
    with pytest.raises(ParamsError, match="'momentun'.*did you mean 'momentum'"):
        params.set({"momentun": 0.5})
    assert params.crop_size == 512


# ---------------------------------------------------------------- RunningAverage

def test_running_average_is_weighted_mean():
    average = RunningAverage()
    assert average() == 0.0
    average.update(2.0, 3)
    average.update(4.0)
    average.update(10.0, 0)
    assert average() == pytest.approx((2.0 * 3 + 4.0) / 4)
    average.update(-1.0, 6)
    assert average() == pytest.approx((6.0 + 4.0 - 6.0) / 10)


# ---------------------------------------------------------------- set_logger

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


def file_handlers(root: logging.Logger, directory) -> list[logging.FileHandler]:
    """The root logger's file handlers writing into directory (pytest adds its own elsewhere)."""
    return [h for h in root.handlers
            if isinstance(h, logging.FileHandler) and os.path.dirname(h.baseFilename) == str(directory)]


def test_set_logger_writes_file_without_duplicate_handlers(tmp_path, clean_root_logger):
    root = clean_root_logger
    log = tmp_path / "train.log"
    utils.set_logger(log)
    logging.info("first message")
    n_handlers = len(root.handlers)
    utils.set_logger(log)
    logging.info("second message")
    assert len(root.handlers) == n_handlers
    assert len(file_handlers(root, tmp_path)) == 1
    text = log.read_text()
    assert text.count("first message") == 1 and text.count("second message") == 1
    assert text.index("first message") < text.index("second message")
    other = tmp_path / "other.log"
    utils.set_logger(other)
    logging.info("third message")
    for handler in root.handlers:
        handler.flush()
    assert [h.baseFilename for h in file_handlers(root, tmp_path)] == [str(other)]
    assert "third message" not in log.read_text()
    assert other.read_text().count("third message") == 1


# ---------------------------------------------------------------- checkpoints

def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


CONFIG = {"num_classes": 21, "backbone": "resnet18", "kernel_size": 15}


def checkpoint_state(model: nn.Module, epoch: int = 3, config: dict = CONFIG) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "model_config": dict(config)}


def test_save_checkpoint_writes_best_only_when_best(tmp_path):
    utils.save_checkpoint(checkpoint_state(tiny_model(0), epoch=1), is_best=False, checkpoint_dir=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["last.pth.tar"]
    utils.save_checkpoint(checkpoint_state(tiny_model(0), epoch=2), is_best=True, checkpoint_dir=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["best.pth.tar", "last.pth.tar"]
    assert utils.load_checkpoint(tmp_path / "best.pth.tar")["epoch"] == 2
    utils.save_checkpoint(checkpoint_state(tiny_model(0), epoch=3), is_best=False, checkpoint_dir=tmp_path)
    assert utils.load_checkpoint(tmp_path / "last.pth.tar")["epoch"] == 3
    assert utils.load_checkpoint(tmp_path / "best.pth.tar")["epoch"] == 2


def test_save_checkpoint_is_atomic_when_write_fails(tmp_path, monkeypatch):
    utils.save_checkpoint(checkpoint_state(tiny_model(0), epoch=1), is_best=True, checkpoint_dir=tmp_path)
    last_before = (tmp_path / "last.pth.tar").read_bytes()
    best_before = (tmp_path / "best.pth.tar").read_bytes()

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(utils.torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        utils.save_checkpoint(checkpoint_state(tiny_model(1), epoch=2), is_best=True, checkpoint_dir=tmp_path)
    assert (tmp_path / "last.pth.tar").read_bytes() == last_before
    assert (tmp_path / "best.pth.tar").read_bytes() == best_before
    assert sorted(os.listdir(tmp_path)) == ["best.pth.tar", "last.pth.tar"]


def test_load_checkpoint_round_trip_restores_weights(tmp_path):
    source = tiny_model(0)
    with torch.no_grad():
        source[1].running_mean.normal_()
    utils.save_checkpoint(checkpoint_state(source, epoch=7), is_best=False, checkpoint_dir=tmp_path)
    target = tiny_model(1)
    assert not torch.equal(target[0].weight, source[0].weight)
    checkpoint = utils.load_checkpoint(tmp_path / "last.pth.tar", target, CONFIG)
    assert checkpoint["epoch"] == 7 and "optimizer" in checkpoint
    for (name, expected), actual in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(actual, expected), name


def assert_checkpoint_error(path, *fragments, model=None, config=None):
    with pytest.raises(CheckpointError) as info:
        utils.load_checkpoint(path, model, config)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    return message


def test_load_checkpoint_missing_file(tmp_path):
    assert_checkpoint_error(tmp_path / "last.pth.tar")


def test_load_checkpoint_truncated_file(tmp_path):
    utils.save_checkpoint(checkpoint_state(tiny_model(0)), is_best=False, checkpoint_dir=tmp_path)
    path = tmp_path / "last.pth.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_checkpoint_error(path)


def test_load_checkpoint_random_bytes(tmp_path):
    path = tmp_path / "random.pth.tar"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_checkpoint_error(path)


class NotWeights:
    """A custom class: unpickling it needs code execution, which weights_only loading must refuse."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": tiny_model(0).state_dict(), "extra": NotWeights(str(marker))}, path)
    assert_checkpoint_error(path)
    assert not marker.exists()


def test_load_checkpoint_without_state_dict(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(tiny_model(0).state_dict(), path)
    assert_checkpoint_error(path, "state_dict")


@pytest.mark.parametrize("key,saved_value", [("num_classes", 5), ("backbone", "resnet50")])
def test_load_checkpoint_rejects_other_model_config(tmp_path, key, saved_value):
    source = tiny_model(0)
    utils.save_checkpoint(checkpoint_state(source, config={**CONFIG, key: saved_value}), is_best=False,
                          checkpoint_dir=tmp_path)
    target = tiny_model(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    assert_checkpoint_error(tmp_path / "last.pth.tar", key, repr(saved_value), model=target, config=CONFIG)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


# ---------------------------------------------------------------- seeding

def draw() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 10**6, (2,)).tolist()


@pytest.mark.parametrize("seed", [0, 123, 2**40 + 7])
def test_seed_everything_is_reproducible(seed):
    utils.seed_everything(seed)
    first = draw()
    utils.seed_everything(seed)
    assert draw() == first
    utils.seed_everything(seed + 1)
    second = draw()
    assert all(a != b for a, b in zip(first, second))

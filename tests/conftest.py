"""Shared fixtures: the real data sets beside the clone, tiny experiments, and CPU-only programs outside
tests/test_cuda.py."""
from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


if torch.cuda.is_available():
    torch.cuda.init()  # this process keeps its GPU (tests/test_metrics.py uses it) when the fixture below hides it


@pytest.fixture(autouse=True)
def programs_run_on_the_cpu(request, monkeypatch):
    """On a GPU box train.py, evaluate.py and predict.py would pick CUDA, where results are not bitwise
    reproducible (cuDNN autotuning, atomic adds, TF32) and torchrun's ranks outnumber one GPU. The suite checks
    exact results, so outside tests/test_cuda.py (the CUDA paths' own tests) they see no GPU, in this process
    and in the ones it starts."""
    if request.module.__name__.rpartition(".")[2] != "test_cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the clone (real VOC and CamVid files). A user's clone has none: the test is skipped,
    saying so; .ci/run sets GCN_REQUIRE_SHARED_DATA=1 where it exists, and then a missing folder fails."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("GCN_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"GCN_REQUIRE_SHARED_DATA=1 but {SHARED_DATA} does not exist")
        pytest.skip(f"needs the real data sets in {SHARED_DATA} (not part of a clone)")
    return SHARED_DATA


def optional_package(name: str, require: str):
    """The optional package `name` (mlflow, wandb), imported. A clone without it skips the test, saying so; .ci/run
    installs it and sets the environment variable `require` to 1, and there a missing package fails."""
    import importlib  # noqa: PLC0415

    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get(require) == "1":
            pytest.fail(f"{require}=1 but {name} is not installed")
        pytest.skip(f"needs {name} (pip install {name}), an optional dependency")


@pytest.fixture
def no_hang():
    """Fail instead of blocking for good: a FIFO opened for reading or writing waits for its other end."""
    def alarm(*_):
        raise TimeoutError("blocked: a FIFO was opened")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(180)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def child_signals(*ignored: signal.Signals) -> Callable[[], None]:
    """A preexec_fn for a child that a test signals: SIGINT and SIGHUP at their defaults, as a terminal's shell starts
    a program, whatever the suite inherited (under nohup SIGHUP is ignored, in a background job of a
    non-interactive shell SIGINT too, and a child keeps an ignored signal ignored); then `ignored` ignored, as
    nohup (SIGHUP) does."""
    def preexec() -> None:
        for signum in (signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
    return preexec


class Terminal(io.StringIO):
    """stderr as a terminal: what was written to it, and isatty() True (progress bars are drawn only there)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal(monkeypatch) -> Callable[[], Terminal]:
    """terminal() replaces sys.stderr by a new Terminal for the code under test to draw on, and returns it. Call it
    in the test's body: pytest's output capture sets sys.stderr anew as the test starts."""
    def install() -> Terminal:
        screen = Terminal()
        monkeypatch.setattr(sys, "stderr", screen)
        return screen
    return install


# A tiny synthetic experiment: 16 training images of 48², random scale, 32² crops, flips and colour jitter (so that
# resuming can only match an uninterrupted run if every sample's augmentation is reproduced), 4 val images.
TINY = {
    "dataset": "synthetic", "data_dir": "", "num_classes": 5, "synthetic_image_size": 48,
    "synthetic_train_images": 16, "synthetic_val_images": 4, "crop_size": 32, "scale_range": [0.75, 1.25],
    "color_jitter": 0.2, "num_workers": 0, "backbone": "resnet18", "kernel_size": 3, "batch_size": 4,
    "num_epochs": 2, "head_lr_multiplier": 1.0, "save_summary_steps": 2, "seed": 3,
}


@pytest.fixture
def experiment(tmp_path):
    """make(name="exp", **overrides) -> a folder holding a TINY params.json with the overrides."""
    def make(name: str = "exp", **overrides) -> Path:
        model_dir = tmp_path / name
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "params.json").write_text(json.dumps({**TINY, **overrides}))
        return model_dir
    return make

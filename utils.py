"""Params, logging, checkpoints, seeding and distributed helpers (imports nothing of model/)."""
from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# A spec maps each params.json key to (allowed types, default); a default of ... (Ellipsis) means required.
ParamSpec = dict[str, tuple[tuple[type, ...], Any]]

NUMBER = (float, int)
# params.json keys of training and evaluation (the data and model rooms declare their own).
TRAIN_PARAMS: ParamSpec = {
    "learning_rate": (NUMBER, 0.01),
    "momentum": (NUMBER, 0.9),
    "weight_decay": (NUMBER, 1e-4),
    "batch_size": ((int,), 8),
    "num_epochs": ((int,), 30),
    "num_iterations": ((int, type(None)), None),
    "lr_power": (NUMBER, 0.9),
    "warmup_iterations": ((int,), 0),
    "head_lr_multiplier": (NUMBER, 10.0),
    "loss": ((str,), "cross_entropy"),
    "class_weights": ((list, type(None)), None),
    "dice_weight": (NUMBER, 1.0),
    "grad_clip_norm": ((float, int, type(None)), None),
    "amp": ((bool,), True),
    "channels_last": ((bool,), True),
    "compile": ((bool,), False),
    "sync_bn": ((bool,), False),
    "seed": ((int,), 230),
    "save_summary_steps": ((int,), 20),
    "val_every_epochs": ((int,), 1),
    "num_logged_images": ((int,), 4),
    "tta_scales": ((list,), [0.75, 1.0, 1.25]),
    "tta_flip": ((bool,), True),
    "sliding_window": ((bool,), False),
}


class UserError(ValueError):
    """Bad input from the user (a file, a key, a value): reported as one line, without a traceback."""


class ParamsError(UserError):
    """params.json is missing, unreadable, or holds a missing/unknown key or a value of the wrong type."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or was built for another model."""


class Params:
    """Hyper-parameters loaded from a params.json, validated against a spec; values are attributes.

    >>> params = Params("experiments/demo/params.json", spec)
    >>> params.learning_rate
    """

    def __init__(self, json_path: str | os.PathLike, spec: ParamSpec) -> None:
        self._path = Path(json_path)
        self._spec = spec
        self.__dict__.update({k: copy.deepcopy(default) for k, (_, default) in spec.items() if default is not ...})
        self.update(json_path)
        missing = [k for k, (_, default) in spec.items() if default is ... and k not in self.__dict__]
        if missing:
            raise ParamsError(f"{self._path}: missing required key(s) {', '.join(map(repr, missing))}")

    def update(self, json_path: str | os.PathLike) -> None:
        """Load (and validate) the values of another params.json over the current ones."""
        path = Path(json_path)
        if not path.is_file():
            raise ParamsError(f"{path}: no such params file")
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ParamsError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(values, dict):
            raise ParamsError(f"{path}: expected a JSON object of key/value pairs")
        self.set(values, source=path)

    def set(self, values: dict[str, Any], source: str | os.PathLike = "<override>") -> None:
        """Validate and set several values (e.g. command-line overrides)."""
        for key, value in values.items():
            self.__dict__[key] = check_param(key, value, self._spec, source)

    def save(self, json_path: str | os.PathLike) -> None:
        atomic_write_text(Path(json_path), json.dumps(self.dict, indent=4) + "\n")

    @property
    def dict(self) -> dict[str, Any]:
        """The values as a plain dict (e.g. params.dict['learning_rate'])."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def check_param(key: str, value: Any, spec: ParamSpec, source: str | os.PathLike) -> Any:
    """Return value if spec allows it for key, else raise a ParamsError naming the key and source."""
    if key not in spec:
        close = difflib.get_close_matches(key, spec, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ParamsError(f"{source}: unknown key {key!r}{hint}")
    types, _ = spec[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ParamsError(f"{source}: key {key!r} must be {names}, got {json.dumps(value)}")
    return value


class RunningAverage:
    """Weighted running mean, e.g. of the loss over pixels or images."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, value: float, weight: int = 1) -> None:
        self.total += value * weight
        self.count += weight

    def __call__(self) -> float:
        return self.total / max(self.count, 1)


def set_logger(log_path: str | os.PathLike | None, level: int = logging.INFO) -> logging.Logger:
    """Log to the terminal and (if given) to log_path, appending; idempotent across calls."""
    logger = logging.getLogger()
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if getattr(handler, "_gcn", False):
            logger.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_path is not None:
        handlers.append(logging.FileHandler(log_path))
    for handler in handlers:
        handler._gcn = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    return logger


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to path through a temporary file and a rename, so readers never see half a file."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], is_best: bool, checkpoint_dir: str | os.PathLike) -> None:
    """Atomically write last.pth.tar (and best.pth.tar when is_best); a crash mid-write keeps the old files."""
    directory = Path(checkpoint_dir)
    _atomic_write(directory / "last.pth.tar", lambda f: torch.save(state, f))
    if is_best:
        _atomic_write(directory / "best.pth.tar", lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module | None = None,
                    model_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True, check it matches model_config, load its weights into model.

    Returns the whole checkpoint dict (optimizer, scheduler, epoch, ... for resuming).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- truncated files, pickles with code, random bytes...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupted or not a plain tensor checkpoint ({reason})") from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no 'state_dict': not a checkpoint written by train.py")
    if model_config is not None:
        saved = checkpoint.get("model_config", {})
        diffs = [f"{k}={saved.get(k)!r} (this model: {v!r})" for k, v in model_config.items() if saved.get(k) != v]
        if diffs:
            raise CheckpointError(f"checkpoint {path} was built for another model: {', '.join(diffs)}")
    if model is not None:
        model.load_state_dict(checkpoint["state_dict"])
    return checkpoint


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def init_distributed(device_type: str) -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; returns (rank, world_size)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()

"""What a checkpoint holds, and saving, loading, validating and restoring it.

A checkpoint (train.py's last.pth.tar and best.pth.tar, export.py's weights-only file) is a dict of plain tensors and
values, read with torch.load(weights_only=True) and checked key by key before anything is built:

- always: `state_dict` (the network's weights), `model_config` (GCNConfig's settings: the network is rebuilt from
  them), `class_names` and `palette` (one name and one RGB triple per class);
- to resume (train.py's): `optimizer`, `scheduler`, `scaler` (their state dicts), `progress` (Progress: where the run
  stands) and `params` (every setting the run was trained with);
- records: `overrides` (the run's --set settings) and `pretrained_weights` (where the backbone's weights came from).
"""
from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import utils
from errors import UserError
from model.net import GCN, GCNConfig
from settings import (EXPERIMENT_CONFIGS, REQUIRED, EvalConfig, Setting, TrainConfig, experiment_settings,
                      is_instance, json_text, settings_of)

CHECKPOINT_NAMES = {"last": utils.LAST_CHECKPOINT, "best": utils.BEST_CHECKPOINT}
CHECKPOINT_KEYS = ("state_dict", "model_config", "class_names", "palette")  # what every checkpoint holds
TRAINING_STATE_KEYS = ("optimizer", "scheduler", "scaler", "progress", "params")  # train.py's, for resuming
# What a checkpoint may hold beside: the --set settings of the run (a subset of params) and where the backbone's
# weights came from (null, or names to strings).
RECORD_KEYS = ("overrides", "pretrained_weights")


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or was built for another experiment."""


@dataclass
class Progress:
    """Where a run stands; every checkpoint of train.py holds it, so that a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    iteration: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained
    best_miou: float = -1.0
    best_epoch: int = 0
    validation_pending: bool = False  # the last epoch is saved but not validated yet
    seconds: float = 0.0  # wall time spent training and validating, over every resumption


def checkpoint_path(model_dir: Path, restore_file: str) -> Path:
    """last/best -> <model_dir>/last.pth.tar or best.pth.tar; anything else is a path."""
    return model_dir / CHECKPOINT_NAMES[restore_file] if restore_file in CHECKPOINT_NAMES else Path(restore_file)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically torch.save `state`; a full disk or a crash mid-write keeps the previous file.

    The checkpoint is serialised in memory first, so that a write error surfaces as itself (No space left on
    device) rather than as torch's zip writer's "file write failed".
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        utils.atomic_write(path, lambda f: f.write(buffer.getbuffer()), what="checkpoint")
    except UserError as exc:
        raise CheckpointError(f"{exc}; the previous one is kept") from exc


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by train.py or export.py, loaded with weights_only=True (no code runs) and its structure
    validated before anything is built: every key known, `model_config` (GCNConfig's rules), `params` and
    `overrides` under the rules params.json gets, class names and palette one per class, `progress` with Progress's
    fields, state dicts of tensors. A fault is one line naming the file and the key."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- truncated files, pickles with code, random bytes...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupted or not a plain tensor checkpoint ({reason})") from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint of train.py")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)}: not written by this train.py or "
                              f"export.py")
    unknown = [repr(key) for key in checkpoint if key not in (*CHECKPOINT_KEYS, *TRAINING_STATE_KEYS, *RECORD_KEYS)]
    if unknown:
        raise CheckpointError(f"checkpoint {path} holds unknown key(s) {', '.join(unknown)}")
    _check_checkpoint(path, checkpoint)
    return checkpoint


def _check_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    def fail(key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {key} {problem}")

    for key in ("model_config", "params", "overrides", "progress", "optimizer", "scheduler", "scaler"):
        if key in checkpoint and not isinstance(checkpoint[key], dict):
            raise fail(key, f"is a {type(checkpoint[key]).__name__}, not a dict")
    weights = checkpoint.get("pretrained_weights")
    if weights is not None and not (isinstance(weights, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in weights.items())):
        raise fail("pretrained_weights", "is neither null nor a record of names to strings")
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise fail("state_dict", "is not a non-empty dict of named tensors")
    config = checkpoint["model_config"]
    check_values(config, settings_of(GCNConfig), f"checkpoint {path}: model_config", complete=True)
    num_classes = config["num_classes"]
    names = checkpoint["class_names"]
    if not (isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names)):
        raise fail("class_names", f"is not a list of {num_classes} names (num_classes = {num_classes})")
    palette = checkpoint["palette"]
    if not (isinstance(palette, list) and len(palette) == num_classes and all(
            isinstance(c, (list, tuple)) and len(c) == 3 and all(is_instance(v, (int,)) and 0 <= v <= 255 for v in c)
            for c in palette)):
        raise fail("palette", f"is not a list of {num_classes} RGB triples of 0..255 (num_classes = {num_classes})")
    settings = experiment_settings(EXPERIMENT_CONFIGS)
    for key in ("params", "overrides"):
        if key in checkpoint:
            check_values(checkpoint[key], settings, f"checkpoint {path}: {key}", complete=False, context=config)
    if "progress" in checkpoint:
        check_values(checkpoint["progress"], settings_of(Progress), f"checkpoint {path}: progress", complete=False)


def check_values(values: dict[str, Any], settings: dict[str, Setting], source: str, complete: bool,
                 context: dict[str, Any] | None = None) -> None:
    """Refuse (CheckpointError) an unknown key, a missing required one (if `complete`) or a value `settings` do not
    allow; absent keys take their defaults, then `context` (e.g. the model config a list's length refers to)."""
    for key in values:
        if key not in settings:
            raise CheckpointError(f"{source}: unknown key {key!r}")
    missing = [k for k, s in settings.items() if complete and s.default is REQUIRED and k not in values]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {', '.join(map(repr, missing))}")
    full = {**{k: s.default for k, s in settings.items() if s.default is not REQUIRED}, **(context or {}), **values}
    for key in sorted(values, key=lambda k: settings[k].cross_checked):
        if not settings[key].allows(values[key], full):
            raise CheckpointError(f"{source}: {key!r} is {json_text(values[key])}; expected "
                                  f"{settings[key].describe(full)}")



def restore_state(path: Path, key: str, target: Any, state: dict[str, Any]) -> None:
    """target.load_state_dict(state) (an optimiser, scheduler or scaler) after checking that `state` has the
    structure of target's own: a foreign state (another optimiser, schedule or model) is one line naming the file."""
    if isinstance(target, torch.optim.Optimizer):
        problem = _optimizer_difference(target, state)
    else:
        problem = _structure_difference(target.state_dict(), state, key)
    if problem is None:
        try:
            target.load_state_dict(state)
            return
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise CheckpointError(f"checkpoint {path}: its {key} state does not fit this run ({problem})")


def _optimizer_difference(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> str | None:
    """Where an optimiser state differs from what `optimizer` holds: its groups, or a per-parameter tensor whose
    shape is not its parameter's (the state of another model or optimiser)."""
    fresh = optimizer.state_dict()
    if saved.keys() != fresh.keys():
        return f"optimizer has keys {sorted(map(str, saved))}, not {sorted(fresh)}"
    problem = _structure_difference(fresh["param_groups"], saved["param_groups"], "optimizer.param_groups")
    if problem or not isinstance(saved["state"], dict):
        return problem or "optimizer.state is not a dict"
    shapes = {index: param.shape for ids, group in zip(fresh["param_groups"], optimizer.param_groups)
              for index, param in zip(ids["params"], group["params"])}
    for index, entry in saved["state"].items():
        if index not in shapes or not isinstance(entry, dict):
            return f"optimizer.state names a parameter {index!r} this model lacks"
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shapes[index]:
                return f"optimizer.state[{index}].{name} has shape {list(value.shape)}, its parameter " \
                       f"{list(shapes[index])}"
    return None


def _structure_difference(fresh: Any, saved: Any, where: str) -> str | None:
    """Where `saved` differs in structure from `fresh` (dict keys, list lengths, tensor shapes, numbers against
    text or flags); None if it does not. None on either side matches anything (an unset option)."""
    if fresh is None or saved is None:
        return None
    if isinstance(fresh, dict):
        if not isinstance(saved, dict) or saved.keys() != fresh.keys():
            keys = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
            return f"{where} has keys {keys}, not {sorted(map(str, fresh))}"
        return next((p for k in fresh if (p := _structure_difference(fresh[k], saved[k], f"{where}.{k}"))), None)
    if isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(fresh):
            return f"{where} is not a list of {len(fresh)}"
        return next((p for i, (a, b) in enumerate(zip(fresh, saved))
                     if (p := _structure_difference(a, b, f"{where}[{i}]"))), None)
    if isinstance(fresh, torch.Tensor):
        ok = isinstance(saved, torch.Tensor) and saved.shape == fresh.shape
        return None if ok else f"{where} is not a tensor of shape {list(fresh.shape)}"
    if _value_kind(fresh) is _value_kind(saved):
        return None
    return f"{where} is a {type(saved).__name__}, not a {type(fresh).__name__}"


def _value_kind(value: Any) -> type:
    """A state value's kind: a bool, a number (int or float alike) or its own type."""
    return bool if isinstance(value, bool) else float if isinstance(value, (int, float)) else type(value)


def check_same_architecture(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model config differs from the one about to be built, naming the keys."""
    diffs = [f"{k}={saved.get(k)!r} (this model: {v!r})" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was built for another model: {', '.join(diffs)}")


@dataclass
class TrainedModel:
    """A checkpoint, loaded: `net` is on the CPU in eval mode."""

    path: Path
    net: GCN
    class_names: list[str]
    palette: list[tuple[int, int, int]]  # one RGB triple per class
    train_config: TrainConfig  # as trained (defaults where the checkpoint holds no params)
    eval_config: EvalConfig
    checkpoint: dict[str, Any]  # everything the file holds

    @property
    def epoch(self) -> int | None:
        """Epochs trained (None for a weights-only file)."""
        return self.checkpoint.get("progress", {}).get("epoch")


def load_trained_model(path: Path, architecture: dict[str, Any] | None = None) -> TrainedModel:
    """The model of a checkpoint (train.py's, or export.py's weights-only file), loaded with weights_only=True;
    with `architecture` (GCNConfig.architecture()), a checkpoint built for another model is refused. Every key is
    validated before the network is built (load_checkpoint), and its weights must fit it."""
    checkpoint = load_checkpoint(path)
    if architecture is not None:
        check_same_architecture(path, checkpoint["model_config"], architecture)
    params = checkpoint.get("params", {})
    net = GCN.from_checkpoint(checkpoint, f"checkpoint {path}").eval()
    return TrainedModel(path, net, list(checkpoint["class_names"]), [tuple(c) for c in checkpoint["palette"]],
                        _config(TrainConfig, params), _config(EvalConfig, params), checkpoint)


def _config(config_class: type, params: dict[str, Any]) -> Any:
    return config_class(**{f.name: params[f.name] for f in dataclasses.fields(config_class) if f.name in params})

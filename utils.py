"""Settings (Params), the run folder (file names, lock, atomic writes, checkpoints), logging, mixed precision and
placement, stop signals, distributed helpers and what every entry point shares on its command line. Imports nothing
of model/."""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import fcntl
import functools
import io
import json
import logging
import math
import os
import platform
import signal
import socket
import stat
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

# The run folder: the files a run writes into its experiment folder, by name (sweeps and synthesis read them too).
PARAMS_FILE = "params.json"
RESOLVED_PARAMS_FILE = "params_resolved.json"
LAST_CHECKPOINT = "last.pth.tar"
BEST_CHECKPOINT = "best.pth.tar"
COMPLETE_MARKER = "train_complete.json"
TRAIN_LOG = "train.log"
EVALUATE_LOG = "evaluate.log"
METRICS_LAST = "metrics_val_last_weights.json"
METRICS_BEST = "metrics_val_best_weights.json"
LOCK_FILE = ".train.lock"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # a run saves and stops on these (Ctrl-C, Slurm, hang-up)
CHECKPOINT_NAMES = {"last": LAST_CHECKPOINT, "best": BEST_CHECKPOINT}
CHECKPOINT_KEYS = ("state_dict", "model_config", "class_names", "palette")  # what every checkpoint holds
# The scalar metrics of a validation (metrics JSON, TensorBoard's val/..., the sweep tables); `loss` is the training
# objective (class-weighted cross entropy, + Dice if asked), so that val/loss and train/loss compare.
SCALAR_METRICS = ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "boundary_accuracy", "interior_accuracy",
                  "loss")
RUN_RECORD_KEYS = {"params", "overrides", "command"}  # params_resolved.json: the settings beside the run record


class UserError(ValueError):
    """Bad input from the user (a file, a key, a value): reported as one line, without a traceback."""


class ParamsError(UserError):
    """params.json (or a --set override) is missing, unreadable, or holds an unknown key or a value not allowed."""


KEEP_CHECKPOINTS = ("all", "best_weights")  # what a finished run keeps (TrainConfig.keep_checkpoints)
TRACKERS = ("tensorboard", "tensorboard+mlflow", "tensorboard+wandb",  # where a run's scalars go
            "tensorboard+mlflow+wandb")  # (TrainConfig.tracker; tracking.py)
EVAL_PRECISIONS = ("float32", "bfloat16", "float16")  # what evaluation and prediction compute in (EvalConfig)


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or was built for another experiment."""


# ----------------------------------------------------------------------------------------------- settings

MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both take 0 .. 2**32 - 1
BACKBONE_STRIDE = 32  # the ResNet's smallest feature map is 1/32 of the input (rounded up)
MAX_BATCH_SIZE = 1024  # batch_size per process


def _stride_32_values(batch_size: int, crop_size: int) -> int:
    return batch_size * math.ceil(crop_size / BACKBONE_STRIDE) ** 2


def _batch_norm_has_statistics(batch_size: int, crop_size: int) -> bool:
    return _stride_32_values(batch_size, crop_size) > 1


def _batch_norm_needs(values: dict[str, Any]) -> str:
    return (f"with crop_size {values['crop_size']} the stride-{BACKBONE_STRIDE} feature map is 1×1, so batch norm "
            f"would see one value per channel: use batch_size >= 2 or crop_size >= {BACKBONE_STRIDE + 1}")


@dataclass
class TrainConfig:
    """The training settings (params.json's training keys); metadata says which values are allowed.

    `may_change_on_resume` marks settings that say how to run, not what: a resumed run may change them.
    """

    learning_rate: float = field(default=0.01, metadata={"above": 0})  # backbone lr (batch of batch_size per process)
    head_lr_multiplier: float = field(default=10.0, metadata={"above": 0})  # heads, BR and decoder learn faster
    momentum: float = field(default=0.9, metadata={"at_least": 0, "below": 1})  # SGD
    weight_decay: float = field(default=1e-4, metadata={"at_least": 0})  # SGD
    batch_size: int = field(default=8, metadata={  # images per process and step
        "at_least": 1, "at_most": MAX_BATCH_SIZE, "with": ("crop_size", _batch_norm_needs, _batch_norm_has_statistics),
        "memory": lambda v: f"it would need {v * 512 * 512 * 3 * 4 / 1e9:.3g} GB per batch of 512² float crops"})
    num_epochs: int = field(default=30, metadata={"at_least": 1})  # budget in epochs...
    num_iterations: int | None = field(default=None, metadata={"at_least": 1})  # ...or iterations (overrides it)
    lr_power: float = field(default=0.9, metadata={"at_least": 0})  # poly decay, stepped every iteration
    warmup_iterations: int = field(default=0, metadata={"at_least": 0})  # linear warm-up
    loss: str = field(default="cross_entropy", metadata={  # +dice: small foregrounds, binary tasks
        "choices": ("cross_entropy", "cross_entropy+dice")})
    class_weights: list | None = field(default=None, metadata={  # per-class cross-entropy weights (data/stats.py)
        "items": (float, int), "length": "num_classes", "at_least": 0})
    dice_weight: float = field(default=1.0, metadata={"at_least": 0})  # the Dice term's weight with +dice
    grad_clip_norm: float | None = field(default=None, metadata={"above": 0})  # clip the gradient norm (from scratch)
    sync_bn: bool = False  # SyncBatchNorm under torchrun
    seed: int = field(default=230, metadata={"at_least": 0, "at_most": MAX_SEED})  # init, data order, augmentation
    val_every_epochs: int = field(default=1, metadata={"at_least": 1})  # validation interval; the last is validated
    amp: bool = field(default=True, metadata={  # bf16 autocast on CUDA (fp16 without bf16), on CPUs where it pays
        "may_change_on_resume": True})
    channels_last: bool = field(default=True, metadata={"may_change_on_resume": True})  # NHWC memory format
    compile: bool = field(default=False, metadata={"may_change_on_resume": True})  # torch.compile (CUDA only)
    cuda_graph: bool = field(default=False, metadata={  # CUDA: replay the step from a CUDA graph (unverified: off)
        "may_change_on_resume": True})
    save_summary_steps: int = field(default=20, metadata={  # logging (and divergence check) interval
        "at_least": 1, "may_change_on_resume": True})
    keep_checkpoints: str = field(default="all", metadata={  # best_weights: best as weights only, no last once done
        "choices": KEEP_CHECKPOINTS, "may_change_on_resume": True})
    tracker: str = field(default="tensorboard", metadata={  # +mlflow, +wandb: scalars, settings, results there too
        "choices": TRACKERS, "may_change_on_resume": True})
    tracking_uri: str = field(default="", metadata={  # MLflow's store; "": $MLFLOW_TRACKING_URI, else MLflow's default
        "may_change_on_resume": True})

    @property
    def dice_term_weight(self) -> float:
        """The Dice term's weight in the loss: dice_weight if `loss` includes Dice, else 0."""
        return self.dice_weight if self.loss == "cross_entropy+dice" else 0.0


MAX_EVAL_PAD_SIZE = 4096  # eval_pad_size: Cityscapes' 2048×1024 fits; a 4096² float image is 0.2 GB, activations more
MAX_LOGGED_IMAGES = 64  # num_logged_images: validation keeps its pictures in memory until they are logged


@dataclass
class EvalConfig:
    """The evaluation settings (params.json's evaluation keys). They say how the val split is scored, not what is
    trained, so a resumed run may change every one of them (its next validation uses the new value)."""

    num_logged_images: int = field(default=4, metadata={  # validation pictures (TensorBoard, evaluate.py)
        "at_least": 0, "at_most": MAX_LOGGED_IMAGES, "may_change_on_resume": True,
        "memory": lambda v: f"validation keeps them in memory: {v * 4 * 2048 * 1024 * 3 / 1e9:.3g} GB at 2048×1024"})
    tta_scales: list = field(default_factory=lambda: [0.75, 1.0, 1.25], metadata={  # --tta's scales
        "items": (float, int), "above": 0, "at_most": 8, "may_change_on_resume": True})
    tta_flip: bool = field(default=True, metadata={"may_change_on_resume": True})  # --tta also averages flips
    sliding_window: bool = field(default=False, metadata={  # score images larger than crop_size in windows
        "may_change_on_resume": True})
    gaussian_windows: bool = field(default=False, metadata={  # windows averaged with Gaussian weights, not uniform
        "may_change_on_resume": True})
    eval_pad_size: int | None = field(default=None, metadata={  # pad inputs to this size to score them
        "at_least": 1, "at_most": MAX_EVAL_PAD_SIZE, "may_change_on_resume": True,
        "memory": lambda v: f"it would need {v * v * 3 * 4 / 1e9:.3g} GB per padded float image"})
    boundary_distance: str = field(default="chebyshev", metadata={  # the boundary band's metric (Table 5)
        "choices": ("chebyshev", "euclidean"), "may_change_on_resume": True})
    boundary_void: str = field(default="label", metadata={  # void makes a boundary?
        "choices": ("label", "ignored"), "may_change_on_resume": True})
    eval_precision: str = field(default="float32", metadata={  # evaluation and prediction (not training's amp)
        "choices": EVAL_PRECISIONS, "may_change_on_resume": True})


REQUIRED = dataclasses.MISSING
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "an object", type(None): "null"}


@dataclass(frozen=True)
class Setting:
    """One params.json key: its types, its default and the values it allows (from a config dataclass field)."""

    name: str
    types: tuple[type, ...]
    default: Any
    rules: dict[str, Any]

    @property
    def may_change_on_resume(self) -> bool:
        return bool(self.rules.get("may_change_on_resume"))

    @property
    def cross_checked(self) -> bool:
        """Whether the value is checked against another setting's (which is then checked first)."""
        return isinstance(self.rules.get("length"), str) or "with" in self.rules

    def allows(self, value: Any, values: dict[str, Any]) -> bool:
        """Whether `value` is allowed, given the other settings' `values` (a list's length may name one)."""
        if value is None or not _is_instance(value, self.types) or json_depth(value) > MAX_JSON_DEPTH:
            return value is None and type(None) in self.types
        if isinstance(value, list) and "items" in self.rules:
            return (len(value) == self._length(values) if "length" in self.rules else len(value) > 0) and all(
                _is_instance(item, self.rules["items"]) and self._in_range(item) for item in value) and self._ok(value)
        return self._in_range(value) and self._ok(value) and self._fits(value, values)

    def describe(self, values: dict[str, Any]) -> str:
        """What is allowed, in words: e.g. 'an odd integer >= 1', "one of 'gcn', 'conv'", 'a list of 11 numbers'."""
        rules = self.rules
        if "choices" in rules:
            text = "one of " + ", ".join(json.dumps(c) for c in rules["choices"])
        elif "items" in rules:
            length = rules.get("length")
            count = (f"{length} " if isinstance(length, str) and length not in values  # e.g. 'num_classes numbers'
                     else f"{self._length(values)} " if length is not None else "one or more ")
            item = _TYPE_WORDS[rules["items"][0]].split(" ", 1)[1]
            text = f"a list of {count}{item}s{self._bounds()}"
            if rules.get("length") in values:
                text += f" (one per class: {rules['length']} = {self._length(values)})"
        else:
            words = [_TYPE_WORDS[t] for t in self.types
                     if t is not type(None) and not (t is int and float in self.types)]
            text = " or ".join(words) + self._bounds()
            if rules.get("odd"):
                text = text.replace("an integer", "an odd integer")
        if "rule" in rules:
            text += f" ({rules['rule'][0]})"
        value = values.get(self.name)
        if "memory" in rules and _is_instance(value, (int, float)) and value > rules.get("at_most", math.inf):
            text += f" ({rules['memory'](value)})"
        if "with" in rules and not self._fits(value, values):
            text += f" ({rules['with'][1](values)})"
        return text + (" or null" if type(None) in self.types else "")

    def _fits(self, value: Any, values: dict[str, Any]) -> bool:
        """The cross-check with another setting ("with": (its key, why, predicate(value, its value))); a value of
        another type has already failed its own check."""
        if "with" not in self.rules or value is None or not _is_instance(value, self.types):
            return True
        other, _, predicate = self.rules["with"]
        return other not in values or not _is_instance(values[other], (int, float)) or predicate(value, values[other])

    def _length(self, values: dict[str, Any]) -> int:
        length = self.rules["length"]
        return values[length] if isinstance(length, str) else length

    def _in_range(self, value: Any) -> bool:
        if not isinstance(value, (int, float)):
            return True
        if not math.isfinite(value):  # JSON's NaN and Infinity: no setting takes them
            return False
        r = self.rules
        return not (("at_least" in r and value < r["at_least"]) or ("above" in r and value <= r["above"])
                    or ("at_most" in r and value > r["at_most"])
                    or ("below" in r and value >= r["below"]) or (r.get("odd") and value % 2 == 0))

    def _ok(self, value: Any) -> bool:
        if "choices" in self.rules and value not in self.rules["choices"]:
            return False
        try:
            return "rule" not in self.rules or bool(self.rules["rule"][1](value))
        except (TypeError, ValueError, AttributeError, IndexError, KeyError):
            return False

    def _bounds(self) -> str:
        symbols = {"at_least": ">=", "above": ">", "below": "<", "at_most": "<="}
        return "".join(f" {symbols[k]} {self.rules[k]}" if i == 0 else f" and {symbols[k]} {self.rules[k]}"
                       for i, k in enumerate(k for k in symbols if k in self.rules))


def _is_instance(value: Any, types: Iterable[type]) -> bool:
    """isinstance, except that a bool is not an int (JSON's true is no number)."""
    return any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in types)


MAX_JSON_DEPTH = 32  # no setting nests deeper than 2; deeper JSON is refused before a recursive reader overflows


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply lists and objects nest in `value` (a number or text: 0), counted without recursion and only up to
    limit + 1."""
    depth, level = 0, [value]
    while depth <= limit:
        containers = [v for v in level if isinstance(v, (list, tuple, dict))]
        if not containers:
            break
        depth += 1
        level = [item for c in containers for item in (c.values() if isinstance(c, dict) else c)]
    return depth


def parse_json(text: str, source: str, **options: Any) -> Any:
    """json.loads(text, **options), refusing (ParamsError naming `source`) lists or objects nested deeper than
    MAX_JSON_DEPTH: deep enough input overflows json's own recursion, a little less every later reader's.
    Broken JSON raises json.JSONDecodeError, for the caller to handle."""
    try:
        value = json.loads(text, **options)
    except RecursionError:
        deep = True
    else:
        deep = json_depth(value) > MAX_JSON_DEPTH
    if deep:
        raise ParamsError(f"{source}: lists or objects nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def settings_of(config_class: type) -> dict[str, Setting]:
    """The params.json settings a config dataclass declares: types from its annotations (a float also takes an
    int), defaults from its fields, allowed values from each field's metadata."""
    hints = typing.get_type_hints(config_class)
    settings = {}
    for f in dataclasses.fields(config_class):
        types = typing.get_args(hints[f.name]) or (hints[f.name],)
        types = (*types, int) if float in types else types
        default = f.default_factory() if f.default_factory is not REQUIRED else f.default
        settings[f.name] = Setting(f.name, tuple(types), default, dict(f.metadata))
    return settings


def experiment_settings(config_classes: Sequence[type]) -> dict[str, Setting]:
    """Every setting of an experiment, each declared by exactly one config dataclass."""
    settings: dict[str, Setting] = {}
    for config_class in config_classes:
        for name, setting in settings_of(config_class).items():
            if name in settings:
                raise TypeError(f"setting {name!r} is declared twice (in {config_class.__name__} too)")
            settings[name] = setting
    return settings


class Params:
    """The settings of one experiment, validated once against the config dataclasses: every key is an
    attribute (params.learning_rate) and params.config(GCNConfig) builds one module's config.

    >>> params = Params.load("experiments/demo/params.json", (DataConfig, GCNConfig, TrainConfig, EvalConfig))
    """

    def __init__(self, values: dict[str, Any], config_classes: Sequence[type], source: str = "params",
                 overrides: dict[str, Any] | None = None) -> None:
        self._settings = experiment_settings(config_classes)
        self._config_classes = tuple(config_classes)
        overrides = overrides or {}
        self._check_keys(values, source)
        self._check_keys(overrides, "--set")
        for key, value in {**values, **overrides}.items():  # before anything recursive reads them
            if json_depth(value) > MAX_JSON_DEPTH:
                raise ParamsError(f"{'--set' if key in overrides else source}: {key!r} is {_json(value)}; expected "
                                  f"{self._settings[key].describe({})}")
        self._sources = {**dict.fromkeys(values, source), **dict.fromkeys(overrides, "--set")}
        values = {**values, **overrides}
        missing = [k for k, s in self._settings.items() if s.default is REQUIRED and k not in values]
        if missing:
            raise ParamsError(f"{source}: missing required key(s) {', '.join(map(repr, missing))}")
        self.__dict__.update({k: copy.deepcopy(s.default) for k, s in self._settings.items() if k not in values})
        self.__dict__.update(copy.deepcopy(values))
        values = self.dict
        for key in sorted(self._settings, key=lambda k: self._settings[k].cross_checked):  # num_classes first
            setting = self._settings[key]
            if not setting.allows(values[key], values):
                raise ParamsError(f"{self._sources.get(key, 'defaults')}: {key!r} is {_json(values[key])}; "
                                  f"expected {setting.describe(values)}")

    @classmethod
    def load(cls, path: str | os.PathLike, config_classes: Sequence[type],
             overrides: dict[str, Any] | None = None) -> Params:
        """params.json at `path` with `overrides` (e.g. --set key=value) on top, all validated before any work.

        A run's params_resolved.json is valid input too: its recorded settings are used (the run record aside)."""
        path = Path(path)
        if not path.is_file():
            raise ParamsError(f"{path}: no such params file")
        try:
            values = parse_json(path.read_text(encoding="utf-8"), str(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ParamsError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(values, dict):
            raise ParamsError(f"{path}: expected a JSON object of key/value pairs")
        if isinstance(values.get("params"), dict) and RUN_RECORD_KEYS <= values.keys():  # a params_resolved.json
            values = values["params"]
        return cls(values, config_classes, str(path), overrides)

    def _check_keys(self, values: dict[str, Any], source: str) -> None:
        for key in values:
            if key not in self._settings:
                close = difflib.get_close_matches(key, self._settings, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ParamsError(f"{source}: unknown key {key!r}{hint}")

    def config(self, config_class: type) -> Any:
        """One config dataclass (DataConfig, GCNConfig, TrainConfig, EvalConfig), filled from these settings."""
        return config_class(**{f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(config_class)})

    def resumed(self, saved: dict[str, Any], saved_overrides: dict[str, Any], overrides: dict[str, Any],
                source: str) -> tuple[Params, dict[str, Any]]:
        """The settings a resumed run continues with: the checkpoint's `saved` ones (`saved_overrides`: the --set
        values they include), with these params' execution settings (how to run: workers, speed, logging).

        Refused (ParamsError, naming the keys): a --set, or a params.json value the run did not get from --set,
        that contradicts the checkpoint. Returns the params and the run's overrides, accumulated.
        """
        recorded = {k: saved.get(k, getattr(self, k) if s.default is REQUIRED else copy.deepcopy(s.default))
                    for k, s in self._settings.items() if not s.may_change_on_resume}
        conflicts = []
        for key, value in recorded.items():
            source_of_key = "--set" if key in overrides else self._sources.get(key, "defaults")
            from_the_run = key in saved_overrides and key not in overrides  # the run's own --set, not retyped
            if getattr(self, key) != value and not from_the_run:
                conflicts.append(f"{key}={json.dumps(value)} ({source_of_key}: {json.dumps(getattr(self, key))})")
        if conflicts:
            raise ParamsError(f"{source} was trained with other settings: {', '.join(conflicts)}; resume without "
                              f"changing them (the checkpoint's settings are used), or start afresh with --force")
        execution = {k: getattr(self, k) for k, s in self._settings.items() if s.may_change_on_resume}
        resumed = Params({**recorded, **execution}, self._config_classes, source)
        resumed._sources = {k: self._sources.get(k, source) for k in execution} | dict.fromkeys(recorded, source)
        return resumed, {**saved_overrides, **overrides}

    @property
    def dict(self) -> dict[str, Any]:
        """The values as a plain dict (e.g. params.dict['learning_rate'])."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def load_params(model_dir: Path, configs: Sequence[type], overrides: dict[str, Any] | None = None,
                params_file: Path | None = None) -> Params:
    """An experiment's params.json (or `params_file`) with its overrides, validated against `configs` (e.g.
    DataConfig, GCNConfig) and the training and evaluation configs."""
    return Params.load(params_file or model_dir / PARAMS_FILE, experiment_configs(configs), overrides)


def experiment_configs(configs: Sequence[type]) -> tuple[type, ...]:
    """The config dataclasses of an experiment: `configs` (data, model) and the training and evaluation ones."""
    return (*configs, TrainConfig, EvalConfig)


def settings_listing(config_classes: Sequence[type]) -> str:
    """Every params.json key of these config dataclasses, one line each: its default, the values it allows and its
    meaning (the comment beside the field), grouped by dataclass (train.py --help-params)."""
    lines = []
    for config_class in config_classes:
        comments = field_comments(config_class)
        lines.append(f"{config_class.__name__} ({config_class.__module__.replace('.', '/')}.py):")
        for name, setting in settings_of(config_class).items():
            default = "required" if setting.default is REQUIRED else f"default {json.dumps(setting.default)}"
            execution = "; may change on resume" if setting.may_change_on_resume else ""
            meaning = f": {comments[name]}" if name in comments else ""
            lines.append(f"  {name} ({default}; {setting.describe({})}{execution}){meaning}")
    return "\n".join(lines)


def field_comments(config_class: type) -> dict[str, str]:
    """Each field's comment in the dataclass's source (`name: type = ...  # meaning`, the first comment of the
    field's statement); {} where the source is not available."""
    import inspect  # noqa: PLC0415 -- only for the settings listing
    import tokenize  # noqa: PLC0415

    try:
        source = inspect.getsource(config_class)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    statement: list[tokenize.TokenInfo] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            names = [t for t in statement if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.INDENT,
                                                              tokenize.DEDENT)]
            found = [t.string.lstrip("# ").strip() for t in statement if t.type == tokenize.COMMENT]
            if len(names) > 1 and names[0].type == tokenize.NAME and names[1].string == ":" and found:
                comments[names[0].string] = found[0]
            statement = []
        else:
            statement.append(token)
    fields = {f.name for f in dataclasses.fields(config_class)}
    return {k: v for k, v in comments.items() if k in fields}


# ----------------------------------------------------------------------------------------------- command lines

class ArgumentParser(argparse.ArgumentParser):
    """argparse that also accepts dashed spellings of underscored options (--model-dir for --model_dir)."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        aliases = [n.replace("_", "-") for n in names if n.startswith("--") and "_" in n]
        return super().add_argument(*names, *aliases, **kwargs)


class ListSettings(argparse.Action):
    """--help-params: print settings_listing(configs) and exit, like --help."""

    def __init__(self, option_strings: Sequence[str], dest: str, configs: Sequence[type], **kwargs: Any) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.configs = configs

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        print(settings_listing(self.configs))
        parser.exit()


def parse_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """--set key=value options -> {key: value}; values are JSON where they parse (1e-3, true, [0.5, 2]), else text."""
    overrides = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ParamsError(f"--set {assignment!r}: expected key=value, e.g. --set learning_rate=0.02")
        try:
            overrides[key] = parse_json(text, f"--set {key}")
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def run_cli(main: Callable[[], int], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run an entry point: a user error (UserError or one of `user_errors`) is one line on stderr and status 2."""
    try:
        return main()
    except (UserError, *user_errors) as exc:
        message = str(exc).encode("utf-8", "backslashreplace").decode("utf-8")  # file names that are not UTF-8
        print(f"error: {message}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------- run folder

# Every file an entry point writes goes through atomic_write (whole files: JSON, checkpoints, pictures, tables) or
# open_append (logs); neither ever writes through a link planted at its name, and a FIFO there never blocks.

def atomic_write(path: Path, write: Callable[[Any], Any], *, what: str = "") -> None:
    """Write `path` through `.<name>.tmp` and a rename: readers never see half a file, a crash keeps the old one.

    The file gets the umask's permissions; the fixed temporary name is reused, so a crash leaves at most one. No link
    is ever followed: a link (or FIFO) planted at the temporary name is removed, not written through, and one at
    `path` is replaced by the file. A folder that does not exist (e.g. a run folder deleted mid-run) is not recreated.
    Any failure (a folder in the way, a full disk) is a UserError naming the file (`what` it is, e.g. "checkpoint"),
    and leaves no temporary file behind.
    """
    name = f"{what} {path}" if what else str(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {name}: the folder {path.parent} does not exist (deleted while running?); "
                        f"not recreating it")
    check_output_names([path])
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open_new(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {name}: {exc.strerror or exc}") from exc
        raise


def open_new(path: Path) -> io.BufferedWriter:
    """`path` opened for writing as a new file: whatever is at the name (a stale file, a planted link) is removed
    first, and O_EXCL | O_NOFOLLOW refuse to write through anything that appears there meanwhile."""
    path.unlink(missing_ok=True)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666), "wb")


def open_append(path: Path) -> io.TextIOWrapper:
    """`path` opened to append text (a log), created if missing, never through a link: a link, FIFO or other
    non-file at the name is replaced by a new file (a link's target is untouched) and nothing blocks; a folder there
    is a UserError. The open itself does not follow links (O_NOFOLLOW), so none planted meanwhile is written through."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    check_output_names([path])
    try:
        fd = os.open(path, flags, 0o666)
    except OSError:
        if stat.S_ISREG(os.lstat(path).st_mode):  # a file that cannot be opened (permissions): not ours to replace
            raise
        fd = None  # a link (O_NOFOLLOW: ELOOP) or a FIFO without a reader (O_NONBLOCK: ENXIO)
    if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device that opened
        os.close(fd)
        fd = None
    if fd is None:
        path.unlink()
        fd = os.open(path, flags | os.O_EXCL, 0o666)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


def check_output_names(paths: Iterable[Path]) -> None:
    """Refuse (UserError) a folder at the name of an output file, e.g. before any work; a link, FIFO or file there
    is replaced when the file is written."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            raise UserError(f"cannot write {path}: a folder is in the way; remove or rename it")


def output_folder(path: Path, what: str) -> Path:
    """Create the output folder `path` (and its parents) or refuse in one line, before any work: a file or a broken
    link at its name (or at a parent's), or a place that cannot be written."""
    existing = next(p for p in (path, *path.absolute().parents) if os.path.lexists(p))
    if not existing.is_dir():
        where = "" if existing == path else f": {existing}"
        raise UserError(f"{what} {path}{where} is a {'broken link' if existing.is_symlink() else 'file'}, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {what} {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {what} {path}: permission denied")
    return path


def output_file(path: Path, what: str) -> Path:
    """Check an output file's name before any work: not a folder, in a folder that can be written (created if
    missing); a file or link at the name is replaced by the new file, never written through."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    output_folder(path.parent, f"the folder of {what}")
    return path


def write_json(path: Path, values: dict[str, Any]) -> None:
    """Atomically write `values` as indented JSON; a write error (full disk, read-only folder) is one line."""
    atomic_write(path, lambda f: f.write((json.dumps(values, indent=4) + "\n").encode()))


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
        atomic_write(path, lambda f: f.write(buffer.getbuffer()), what="checkpoint")
    except UserError as exc:
        raise CheckpointError(f"{exc}; the previous one is kept") from exc


TRAINING_STATE_KEYS = ("optimizer", "scheduler", "scaler", "progress", "params")  # train.py's, for resuming
# What a checkpoint may hold beside: the --set settings of the run (a subset of params) and where the backbone's
# weights came from (null, or names to strings).
RECORD_KEYS = ("overrides", "pretrained_weights")


def load_checkpoint(path: Path, model_config: type, data_config: type, progress: type | None = None) -> dict[str, Any]:
    """A checkpoint written by train.py or export.py, loaded with weights_only=True (no code runs) and its structure
    validated before anything is built: every key known, `model_config` and `params` under the rules params.json
    gets (the config dataclasses' field metadata), class names and palette one per class, `progress` (if given)
    with the fields of that dataclass, state dicts of tensors. A fault is one line naming the file and the key."""
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
    _check_checkpoint(path, checkpoint, model_config, data_config, progress)
    return checkpoint


def _check_checkpoint(path: Path, checkpoint: dict[str, Any], model_config: type, data_config: type,
                      progress: type | None) -> None:
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
    check_values(config, settings_of(model_config), f"checkpoint {path}: model_config", complete=True)
    num_classes = config["num_classes"]
    names = checkpoint["class_names"]
    if not (isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names)):
        raise fail("class_names", f"is not a list of {num_classes} names (num_classes = {num_classes})")
    palette = checkpoint["palette"]
    if not (isinstance(palette, list) and len(palette) == num_classes and all(
            isinstance(c, (list, tuple)) and len(c) == 3 and all(_is_instance(v, (int,)) and 0 <= v <= 255 for v in c)
            for c in palette)):
        raise fail("palette", f"is not a list of {num_classes} RGB triples of 0..255 (num_classes = {num_classes})")
    settings = experiment_settings(experiment_configs((data_config, model_config)))
    for key in ("params", "overrides"):
        if key in checkpoint:
            check_values(checkpoint[key], settings, f"checkpoint {path}: {key}", complete=False, context=config)
    if progress is not None and "progress" in checkpoint:
        check_values(checkpoint["progress"], settings_of(progress), f"checkpoint {path}: progress", complete=False)


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
            raise CheckpointError(f"{source}: {key!r} is {_json(values[key])}; expected "
                                  f"{settings[key].describe(full)}")


def _json(value: Any) -> str:
    """A value as JSON for a message; one nested too deeply to print is described instead."""
    if json_depth(value) > MAX_JSON_DEPTH:
        return f"a {type(value).__name__} nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return type(value).__name__


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


def remove_stale_temporary_files(folder: Path, names: Iterable[str]) -> None:
    """The `.<name>.tmp` files of these names that a killed writer left behind (call with the folder's lock held;
    other writers' temporaries, e.g. export.py's, may be in flight); a folder at such a name is a UserError."""
    temporaries = [folder / f".{name}.tmp" for name in names]
    check_output_names(temporaries)
    for path in temporaries:
        path.unlink(missing_ok=True)


class RunLock:
    """An exclusive lock on an experiment folder: a second writer is refused with one line naming the holder.

    flock is released by the OS when the holder dies, so a killed run never blocks the folder (local file
    systems; on NFS, flock may only be honoured within one machine).
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.file = None

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a link planted at the lock's name is refused, never followed (and so never overwritten).
            self.file = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666), "r+")
        except OSError as exc:
            planted = self.path.is_symlink()
            reason = f"a link is planted at {LOCK_FILE}; remove it" if planted else exc.strerror or exc
            raise UserError(f"cannot lock {self.path.parent}: {reason}") from exc
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"{self.path.parent} is in use by {holder}; wait for it to finish or stop it") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} ({Path(sys.argv[0]).name}, since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        self.file.flush()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.file.close()  # closing releases the lock


def set_logger(log_path: Path | None, level: int = logging.INFO) -> logging.Logger:
    """Log to the terminal and (if given) to log_path, appending, created at the first record; idempotent."""
    logger = logging.getLogger()
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if getattr(handler, "_gcn", False):
            logger.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_path is not None:
        check_output_names([log_path])
        handlers.append(AppendingLog(log_path, delay=True))
    for handler in handlers:
        handler._gcn = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    return logger


class AppendingLog(logging.FileHandler):
    """A log file opened by open_append when the first record comes: never through a link; a FIFO never blocks."""

    def _open(self) -> io.TextIOWrapper:
        return open_append(Path(self.baseFilename))


@contextlib.contextmanager
def errors_in_log(user_errors: tuple[type[BaseException], ...] = (UserError,)) -> Iterator[None]:
    """Within: a user error also goes to the log files (train.log), not only to stderr, where run_cli prints it."""
    try:
        yield
    except user_errors as exc:
        record = logging.makeLogRecord({"levelno": logging.ERROR, "levelname": "ERROR", "msg": f"error: {exc}"})
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        raise


def run_record(params: Params, overrides: dict[str, Any], arguments: dict[str, Any],
               device: torch.device) -> dict[str, Any]:
    """What params_resolved.json holds: every setting (defaults filled in), the overrides, the command line and its
    parsed arguments, the versions, the git commit and the device."""
    import torchvision  # noqa: PLC0415 -- only for its version

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    return {"params": params.dict, "overrides": overrides, "command": [sys.executable, *sys.argv],
            "arguments": arguments,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "git_commit": commit, "git_dirty": bool(git("status", "--porcelain")) if commit else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# ----------------------------------------------------------------------------------------------- devices

CPU_BF16_CAPABILITIES = ("amx_bf16", "avx512_bf16")  # native bf16 matrix units / dot products (PERF-NOTES)
CPU_BF16_MIN_SPEEDUP = 1.1  # without AMX, bf16 must beat float32 by this on cpu_bf16_speedup's probe


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AMX-BF16 or AVX512-BF16), from torch.cpu.get_capabilities().

    Not torch.ops.mkldnn._is_mkldnn_bf16_supported(): it says True where oneDNN only emulates bf16, 1.3-2.9x slower
    than float32 (and AVX2 training fails in channels_last)."""
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(name, False) for name in CPU_BF16_CAPABILITIES)


@functools.cache
def cpu_bf16_speedup(rounds: int = 5) -> float:
    """float32 time / bf16-autocast time of a channels-last 3x3 convolution's forward + backward (ResNet's first
    stage at 256² crops, batch 2; about 0.2 s in all), the fastest of interleaved rounds. Leaves the global random
    state alone."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 64, 64, 64, generator=generator).to(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(64, 64, 3, 3, generator=generator) / 24).to(memory_format=torch.channels_last)
    weight.requires_grad_()

    def seconds(dtype: torch.dtype | None) -> float:
        start = time.perf_counter()
        with autocast(torch.device("cpu"), dtype):
            output = torch.nn.functional.conv2d(images, weight, padding=1)
        torch.autograd.grad(output.float().sum(), (images, weight))
        return time.perf_counter() - start

    times: dict[torch.dtype | None, list[float]] = {None: [], torch.bfloat16: []}
    for _ in range(rounds + 1):  # the first round warms oneDNN's kernels up and is dropped
        for dtype, measured in times.items():
            measured.append(seconds(dtype))
    return min(times[None][1:]) / min(times[torch.bfloat16][1:])  # the least disturbed of each


def cpu_bf16_pays() -> bool:
    """Whether bf16 autocast speeds this CPU up: with AMX-BF16 always (a whole run 1.8x faster), with AVX512-BF16
    only where cpu_bf16_speedup measures at least CPU_BF16_MIN_SPEEDUP (an AMD EPYC's whole run is 1.4x faster, an
    Intel Xeon's without AMX 0.75-0.86x: docs/performance.md), never without bf16 instructions. Under torchrun bf16
    only if it pays on every rank, so that all decide alike."""
    capabilities = torch.cpu.get_capabilities()
    pays = torch.tensor(capabilities.get("amx_bf16", False) or (
        capabilities.get("avx512_bf16", False) and cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP))
    if dist.is_initialized():
        pays = pays.int()
        dist.all_reduce(pays, op=dist.ReduceOp.MIN)
    return bool(pays)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The mixed-precision dtype: on CUDA bf16 where the GPU computes it natively (Ampere and newer), else fp16 (which
    needs a GradScaler); on CPU bf16 where it pays (cpu_bf16_pays); None (plain float32) elsewhere or with amp off.

    Not torch.cuda.is_bf16_supported() alone: by default it counts emulation, True on every CUDA GPU, and emulated
    bf16 (T4, V100, P100) is slow or fails."""
    if not amp:
        return None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_pays() else None
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def eval_autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Evaluation's and prediction's autocast dtype (EvalConfig.eval_precision): None for "float32", the default, so
    that metrics and label maps are the same on every machine; bf16 or fp16 only where the device has it natively
    (else a ParamsError)."""
    if precision == "float32":
        return None
    dtype = getattr(torch, precision)
    if device.type == "cuda":
        native = dtype == torch.float16 or torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        capabilities = torch.cpu.get_capabilities()
        native = cpu_has_native_bf16() if dtype == torch.bfloat16 else any(
            capabilities.get(name, False) for name in ("amx_fp16", "avx512_fp16"))
    if not native:
        raise ParamsError(f"eval_precision {json.dumps(precision)}: this {device.type} has no native {precision}; "
                          f"use \"float32\"")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None, cache_enabled: bool = True) -> torch.autocast:
    """Autocast to `dtype` (from autocast_dtype); None: disabled. A CUDA graph's capture needs cache_enabled off."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None,
                          cache_enabled=cache_enabled)


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the input normalisation of torchvision's ImageNet backbones (RGB in 0..1)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _mean_std_255(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(values, device=device).view(3, 1, 1) * 255 for values in (IMAGENET_MEAN, IMAGENET_STD))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (3×H×W or N×3×H×W) -> float32 normalised with the ImageNet mean/std, what the network expects;
    on the images' device, in their memory layout."""
    mean, std = _mean_std_255(images.device)
    return images.to(torch.float32).sub_(mean).div_(std)


def default_device() -> torch.device:
    """Where the entry points compute: the GPU if there is one (this process's current GPU), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """How the network runs: on `device`, in channels-last memory if asked, under autocast to `dtype` (from
    autocast_dtype; None: float32). Training, evaluation and prediction feed it alike: the data loaders' uint8
    images travel as they are (a quarter of float32's bytes) and are normalised on the device."""

    device: torch.device
    channels_last: bool = False
    dtype: torch.dtype | None = None

    def module(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` moved to the device and memory layout (in place, as nn.Module.to)."""
        return module.to(self.device, memory_format=torch.channels_last if self.channels_last else
                         torch.contiguous_format)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×H×W on the device in the network's layout: uint8 normalised there, float taken as normalised."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return normalise(images) if images.dtype == torch.uint8 else images

    def batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images as `images` does; labels (uint8 from the data loaders) as int64 class indices on the device."""
        return self.images(images), labels.to(self.device, non_blocking=True).long()

    def autocast(self, cache_enabled: bool = True) -> torch.autocast:
        return autocast(self.device, self.dtype, cache_enabled)

    @property
    def needs_grad_scaler(self) -> bool:
        """Whether training needs a GradScaler: fp16's range loses small gradients unless the loss is scaled."""
        return self.dtype == torch.float16

    @property
    def precision(self) -> str:
        """What the forward passes compute in: "float32", or the autocast dtype ("bfloat16", "float16")."""
        return str(self.dtype or torch.float32).removeprefix("torch.")


def init_distributed(device_type: str) -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; returns (rank, world_size)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= gpus:
            raise UserError(f"local rank {local_rank} has no GPU: this machine shows {gpus} GPU(s); start at most "
                            f"{gpus} processes per node (torchrun --nproc_per_node {gpus})")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


# ----------------------------------------------------------------------------------------------- stop signals

@contextlib.contextmanager
def stop_signals_to(handler: Callable[[int, Any], None]):
    """While active, the stop signals (STOP_SIGNALS) call `handler(signum, frame)`; yields the previous handlers,
    which come back on exit. A signal already ignored (SIGHUP under nohup) stays ignored."""
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield previous
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class StopSignal:
    """While active, SIGINT/SIGTERM/SIGHUP only raise a flag, which the loops check; a second signal stops at once.

    The previous handlers come back on exit, so an in-process run leaves Ctrl-C working.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._stack = contextlib.ExitStack()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        self._previous = self._stack.enter_context(stop_signals_to(self._handle))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.close()

    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return bool(self.signum)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum:
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
        self.signum = signum

"""What params.json may hold: the training and evaluation settings (TrainConfig, EvalConfig) beside the rules that
check them, the settings engine (Setting, Params: params.json + --set overrides, validated once, before any work),
the resume rules (Params.resumed) and the settings listing of --help-params.

The data and model settings are declared beside the code they configure (model/data_loader.py's DataConfig,
model/net.py's GCNConfig); EXPERIMENT_CONFIGS names all four.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import io
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from errors import ParamsError
from utils import PARAMS_FILE
from model.data_loader import DataConfig
from model.metrics import BOUNDARY_DISTANCES, BOUNDARY_VOIDS
from model.net import GCNConfig

RUN_RECORD_KEYS = {"params", "overrides", "command"}  # params_resolved.json: the settings beside the run record
KEEP_CHECKPOINTS = ("all", "best_weights")  # what a finished run keeps (TrainConfig.keep_checkpoints)
TRACKERS = ("tensorboard", "tensorboard+mlflow", "tensorboard+wandb",  # where a run's scalars go
            "tensorboard+mlflow+wandb")  # (TrainConfig.tracker; tracking.py)
EVAL_PRECISIONS = ("float32", "bfloat16", "float16")  # what evaluation and prediction compute in (EvalConfig)

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
        "choices": BOUNDARY_DISTANCES, "may_change_on_resume": True})
    boundary_void: str = field(default="label", metadata={  # void makes a boundary?
        "choices": BOUNDARY_VOIDS, "may_change_on_resume": True})
    eval_precision: str = field(default="float32", metadata={  # evaluation and prediction (not training's amp)
        "choices": EVAL_PRECISIONS, "may_change_on_resume": True})


EXPERIMENT_CONFIGS = (DataConfig, GCNConfig, TrainConfig, EvalConfig)  # every setting of an experiment
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
        if value is None or not is_instance(value, self.types) or json_depth(value) > MAX_JSON_DEPTH:
            return value is None and type(None) in self.types
        if isinstance(value, list) and "items" in self.rules:
            return (len(value) == self._length(values) if "length" in self.rules else len(value) > 0) and all(
                is_instance(item, self.rules["items"]) and self._in_range(item) for item in value) and self._ok(value)
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
        if "memory" in rules and is_instance(value, (int, float)) and value > rules.get("at_most", math.inf):
            text += f" ({rules['memory'](value)})"
        if "with" in rules and not self._fits(value, values):
            text += f" ({rules['with'][1](values)})"
        return text + (" or null" if type(None) in self.types else "")

    def _fits(self, value: Any, values: dict[str, Any]) -> bool:
        """The cross-check with another setting ("with": (its key, why, predicate(value, its value))); a value of
        another type has already failed its own check."""
        if "with" not in self.rules or value is None or not is_instance(value, self.types):
            return True
        other, _, predicate = self.rules["with"]
        return other not in values or not is_instance(values[other], (int, float)) or predicate(value, values[other])

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


def is_instance(value: Any, types: Iterable[type]) -> bool:
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

    >>> params = Params.load("experiments/demo/params.json", EXPERIMENT_CONFIGS)
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
                raise ParamsError(f"{'--set' if key in overrides else source}: {key!r} is {json_text(value)}; expected "
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
                raise ParamsError(f"{self._sources.get(key, 'defaults')}: {key!r} is {json_text(values[key])}; "
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


def load_params(model_dir: Path, overrides: dict[str, Any] | None = None, params_file: Path | None = None,
                config_classes: Sequence[type] = EXPERIMENT_CONFIGS) -> Params:
    """An experiment's params.json (or `params_file`) with its overrides, validated against `config_classes`."""
    return Params.load(params_file or model_dir / PARAMS_FILE, config_classes, overrides)


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


def json_text(value: Any) -> str:
    """A value as JSON for a message; one nested too deeply to print is described instead."""
    if json_depth(value) > MAX_JSON_DEPTH:
        return f"a {type(value).__name__} nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return type(value).__name__


"""Settings (Params), the run folder (file names, lock, atomic writes, checkpoints), logging, seeding, mixed
precision, distributed helpers and what every entry point shares on its command line. Imports nothing of model/."""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import fcntl
import io
import json
import logging
import math
import os
import platform
import signal
import socket
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
RUN_RECORD_KEYS = {"params", "overrides", "command"}  # params_resolved.json: the settings beside the run record


class UserError(ValueError):
    """Bad input from the user (a file, a key, a value): reported as one line, without a traceback."""


class ParamsError(UserError):
    """params.json (or a --set override) is missing, unreadable, or holds an unknown key or a value not allowed."""


KEEP_CHECKPOINTS = ("all", "best_weights")  # what a finished run keeps (TrainConfig.keep_checkpoints)


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or was built for another experiment."""


# ----------------------------------------------------------------------------------------------- settings

@dataclass
class TrainConfig:
    """The training settings (params.json's training keys); metadata says which values are allowed.

    `execution` marks settings that say how to run, not what: a resumed run may change them.
    """

    learning_rate: float = field(default=0.01, metadata={"above": 0})  # backbone lr (batch of batch_size per process)
    head_lr_multiplier: float = field(default=10.0, metadata={"above": 0})  # heads, BR and decoder learn faster
    momentum: float = field(default=0.9, metadata={"at_least": 0, "below": 1})  # SGD
    weight_decay: float = field(default=1e-4, metadata={"at_least": 0})  # SGD
    batch_size: int = field(default=8, metadata={"at_least": 1})  # images per process and step
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
    seed: int = 230  # model init, data order and every sample's augmentation
    val_every_epochs: int = field(default=1, metadata={"at_least": 1})  # validation interval; the last is validated
    amp: bool = field(default=True, metadata={"execution": True})  # CUDA: bf16 autocast (fp16 without bf16)
    channels_last: bool = field(default=True, metadata={"execution": True})  # NHWC memory format
    compile: bool = field(default=False, metadata={"execution": True})  # torch.compile the model
    save_summary_steps: int = field(default=20, metadata={"at_least": 1, "execution": True})  # logging interval
    keep_checkpoints: str = field(default="all", metadata={  # best_weights: best as weights only, no last once done
        "choices": KEEP_CHECKPOINTS, "execution": True})


@dataclass
class EvalConfig:
    """The evaluation settings (params.json's evaluation keys)."""

    num_logged_images: int = field(default=4, metadata={  # validation pictures (TensorBoard, evaluate.py)
        "at_least": 0, "execution": True})
    tta_scales: list = field(default_factory=lambda: [0.75, 1.0, 1.25], metadata={  # --tta's scales
        "items": (float, int), "above": 0})
    tta_flip: bool = True  # --tta also averages horizontal flips
    sliding_window: bool = False  # evaluate images larger than crop_size in overlapping windows
    gaussian_windows: bool = False  # windows averaged with Gaussian weights (centres over borders), not uniform


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
    def execution(self) -> bool:
        return bool(self.rules.get("execution"))

    def allows(self, value: Any, values: dict[str, Any]) -> bool:
        """Whether `value` is allowed, given the other settings' `values` (a list's length may name one)."""
        if value is None or not _is_instance(value, self.types):
            return value is None and type(None) in self.types
        if isinstance(value, list) and "items" in self.rules:
            return (len(value) == self._length(values) if "length" in self.rules else len(value) > 0) and all(
                _is_instance(item, self.rules["items"]) and self._in_range(item) for item in value) and self._ok(value)
        return self._in_range(value) and self._ok(value)

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
        return text + (" or null" if type(None) in self.types else "")

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
                    or ("below" in r and value >= r["below"]) or (r.get("odd") and value % 2 == 0))

    def _ok(self, value: Any) -> bool:
        if "choices" in self.rules and value not in self.rules["choices"]:
            return False
        try:
            return "rule" not in self.rules or bool(self.rules["rule"][1](value))
        except (TypeError, ValueError, AttributeError, IndexError, KeyError):
            return False

    def _bounds(self) -> str:
        symbols = {"at_least": ">=", "above": ">", "below": "<"}
        return "".join(f" {symbols[k]} {self.rules[k]}" if i == 0 else f" and {symbols[k]} {self.rules[k]}"
                       for i, k in enumerate(k for k in symbols if k in self.rules))


def _is_instance(value: Any, types: Iterable[type]) -> bool:
    """isinstance, except that a bool is not an int (JSON's true is no number)."""
    return any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in types)


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
    """Every setting of an experiment, each declared by exactly one room's config dataclass."""
    settings: dict[str, Setting] = {}
    for config_class in config_classes:
        for name, setting in settings_of(config_class).items():
            if name in settings:
                raise TypeError(f"setting {name!r} is declared twice (in {config_class.__name__} too)")
            settings[name] = setting
    return settings


class Params:
    """The settings of one experiment, validated once against the rooms' config dataclasses: every key is an
    attribute (params.learning_rate) and params.config(GCNConfig) builds one room's config.

    >>> params = Params.load("experiments/demo/params.json", (DataConfig, GCNConfig, TrainConfig, EvalConfig))
    """

    def __init__(self, values: dict[str, Any], config_classes: Sequence[type], source: str = "params",
                 overrides: dict[str, Any] | None = None) -> None:
        self._settings = experiment_settings(config_classes)
        self._config_classes = tuple(config_classes)
        overrides = overrides or {}
        self._check_keys(values, source)
        self._check_keys(overrides, "--set")
        self._sources = {**dict.fromkeys(values, source), **dict.fromkeys(overrides, "--set")}
        values = {**values, **overrides}
        missing = [k for k, s in self._settings.items() if s.default is REQUIRED and k not in values]
        if missing:
            raise ParamsError(f"{source}: missing required key(s) {', '.join(map(repr, missing))}")
        self.__dict__.update({k: copy.deepcopy(s.default) for k, s in self._settings.items() if k not in values})
        self.__dict__.update(copy.deepcopy(values))
        values = self.dict
        cross_checked = [k for k, s in self._settings.items() if isinstance(s.rules.get("length"), str)]
        for key in sorted(self._settings, key=cross_checked.__contains__):  # e.g. num_classes before class_weights
            setting = self._settings[key]
            if not setting.allows(values[key], values):
                raise ParamsError(f"{self._sources.get(key, 'defaults')}: {key!r} is {json.dumps(values[key])}; "
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
            values = json.loads(path.read_text(encoding="utf-8"))
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
        """One room's config dataclass, filled from these settings."""
        return config_class(**{f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(config_class)})

    def resumed(self, saved: dict[str, Any], saved_overrides: dict[str, Any], overrides: dict[str, Any],
                source: str) -> tuple[Params, dict[str, Any]]:
        """The settings a resumed run continues with: the checkpoint's `saved` ones (`saved_overrides`: the --set
        values they include), with these params' execution settings (how to run: workers, speed, logging).

        Refused (ParamsError, naming the keys): a --set, or a params.json value the run did not get from --set,
        that contradicts the checkpoint. Returns the params and the run's overrides, accumulated.
        """
        recorded = {k: saved.get(k, getattr(self, k) if s.default is REQUIRED else copy.deepcopy(s.default))
                    for k, s in self._settings.items() if not s.execution}
        conflicts = []
        for key, value in recorded.items():
            source_of_key = "--set" if key in overrides else self._sources.get(key, "defaults")
            from_the_run = key in saved_overrides and key not in overrides  # the run's own --set, not retyped
            if getattr(self, key) != value and not from_the_run:
                conflicts.append(f"{key}={json.dumps(value)} ({source_of_key}: {json.dumps(getattr(self, key))})")
        if conflicts:
            raise ParamsError(f"{source} was trained with other settings: {', '.join(conflicts)}; resume without "
                              f"changing them (the checkpoint's settings are used), or start afresh with --force")
        execution = {k: getattr(self, k) for k, s in self._settings.items() if s.execution}
        resumed = Params({**recorded, **execution}, self._config_classes, source)
        resumed._sources = {k: self._sources.get(k, source) for k in execution} | dict.fromkeys(recorded, source)
        return resumed, {**saved_overrides, **overrides}

    @property
    def dict(self) -> dict[str, Any]:
        """The values as a plain dict (e.g. params.dict['learning_rate'])."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def load_params(model_dir: Path, room_configs: Sequence[type], overrides: dict[str, Any] | None = None,
                params_file: Path | None = None) -> Params:
    """An experiment's params.json (or `params_file`) with its overrides, validated against the rooms' configs and
    the run's own."""
    return Params.load(params_file or model_dir / PARAMS_FILE, experiment_configs(room_configs), overrides)


def experiment_configs(room_configs: Sequence[type]) -> tuple[type, ...]:
    """The config dataclasses of an experiment: the rooms' (data, model) and the run's own (training, evaluation)."""
    return (*room_configs, TrainConfig, EvalConfig)


def settings_listing(config_classes: Sequence[type]) -> str:
    """Every params.json key of these config dataclasses, one line each: its default, the values it allows and its
    meaning (the comment beside the field), grouped by dataclass (train.py --help-params)."""
    lines = []
    for config_class in config_classes:
        comments = field_comments(config_class)
        lines.append(f"{config_class.__name__} ({config_class.__module__.replace('.', '/')}.py):")
        for name, setting in settings_of(config_class).items():
            default = "required" if setting.default is REQUIRED else f"default {json.dumps(setting.default)}"
            execution = "; may change on resume" if setting.execution else ""
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
            overrides[key] = json.loads(text)
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

def atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write `path` through `.<name>.tmp` and a rename: readers never see half a file, a crash keeps the old one.

    The file gets the umask's permissions; the fixed temporary name is reused, so a crash leaves at most one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, values: dict[str, Any]) -> None:
    """Atomically write `values` as indented JSON; a write error (full disk, read-only folder) is one line."""
    try:
        atomic_write(path, lambda f: f.write((json.dumps(values, indent=4) + "\n").encode()))
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc


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
        atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}; the previous one is "
                              f"kept") from exc


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by train.py or export.py (CHECKPOINT_KEYS at least), loaded with weights_only=True: no
    code runs."""
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
    return checkpoint


def check_same_architecture(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model config differs from the one about to be built, naming the keys."""
    diffs = [f"{k}={saved.get(k)!r} (this model: {v!r})" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was built for another model: {', '.join(diffs)}")


def remove_stale_temporary_files(folder: Path, names: Iterable[str]) -> None:
    """The `.<name>.tmp` files of these names that a killed writer left behind (call with the folder's lock held;
    other writers' temporaries, e.g. export.py's, may be in flight)."""
    for name in names:
        (folder / f".{name}.tmp").unlink(missing_ok=True)


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
            self.file = open(self.path, "a+")
        except OSError as exc:
            raise UserError(f"cannot lock {self.path.parent}: {exc.strerror or exc}") from exc
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
        handlers.append(logging.FileHandler(log_path, delay=True))
    for handler in handlers:
        handler._gcn = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    return logger


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

def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The mixed-precision dtype: bf16 on CUDA where supported, else fp16 (which needs a GradScaler); None (plain
    float32) on CPU or with amp off."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype` (from autocast_dtype); None: disabled."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def seed_everything(seed: int) -> None:
    """Seed torch (all devices); the data pipeline seeds every sample itself (model/data_loader.py)."""
    torch.manual_seed(seed)


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

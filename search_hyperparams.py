"""Hyper-parameter sweeps: one child experiment per value combination, each trained by train.py.

The combinations come from <parent_dir>/search.json (a grid, or a list of grids) and --param; docs/sweeps.md
describes the child folders, re-runs, GPUs, signals and exit statuses.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from tqdm import tqdm

import errors
import settings
import utils
from terminal import progress_bar

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
SEARCH_FILE = "search.json"
CHILD_OUTPUT = "stdout.log"
CHILD_GITIGNORE = ("# A sweep child, generated from the parent's params.json and search.json: git ignores all of it.\n"
                   "*\n")
DEFAULT_LR_FACTORS = (0.1, 0.3, 1.0, 3.0)
TAIL_LINES = 12
MAX_CHILDREN = 10_000  # runs in one sweep: each is a training run and a folder
MAX_NAME_LENGTH = 120
KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+\-]")
PAIR_SEPARATOR = "__"  # between key_value pairs in a child's folder name: no commas, which shells and tools split
SPEC = settings.EXPERIMENT_CONFIGS  # what train.py accepts, checked before any folder exists
SWEEP_DEFAULTS = {"keep_checkpoints": "best_weights"}  # children keep their best weights only (unless the parent says)
MAY_CHANGE_ON_RESUME = {key for key, setting in settings.experiment_settings(SPEC).items()  # a trained child's too
                        if setting.may_change_on_resume}

Grid = dict[str, list[Any]]


class SweepError(errors.UserError):
    """A bad sweep definition or parent folder; the message names the file, key or value at fault."""


class Child(NamedTuple):
    """One run of the sweep: its folder and the full params.json it trains with."""
    directory: Path
    params: dict[str, Any]


class Outcome(NamedTuple):
    """What happened to a child ('skipped', 'trained', 'resumed', 'failed', 'interrupted') and why."""
    child: Child
    status: str
    detail: tuple[str, ...] = ()


def say(text: str, err: bool = False) -> None:
    """Print and flush, above the progress bar; a terminal closed under us (SIGHUP) must not stop the sweep waiting
    for its children."""
    stream = sys.stderr if err else sys.stdout
    with contextlib.suppress(OSError):
        tqdm.write(text, file=stream)
        stream.flush()


def load_json(path: Path) -> Any:
    """Parse a JSON file; a missing or broken file (or one nested too deeply) is a SweepError naming it."""
    try:
        return settings.parse_json(path.read_text(), str(path))
    except FileNotFoundError:
        raise SweepError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SweepError(f"{path} is not valid JSON: {exc}") from None
    except errors.ParamsError as exc:
        raise SweepError(str(exc)) from None


def parse_value(text: str, source: str = "--param") -> Any:
    """JSON where it parses (but NaN and Infinity stay text), else the literal text; nested too deeply: a
    SweepError naming `source`."""
    try:
        return settings.parse_json(text, source, parse_constant=str)
    except errors.ParamsError as exc:
        raise SweepError(str(exc)) from None
    except ValueError:  # not JSON
        return text


def parse_param_option(option: str) -> tuple[str, list[Any]]:
    """`key=v1,v2` -> (key, [v1, v2]): one JSON list if that parses, else each comma-separated piece on its own."""
    key, sep, values = option.partition("=")
    if not sep or not values:
        raise SweepError(f"--param {option!r}: expected key=value[,value...]")
    source = f"--param {key}"
    parsed = parse_value(f"[{values}]", source)
    return key, parsed if isinstance(parsed, list) else [parse_value(value, source) for value in values.split(",")]


def check_grid(grid: Any, where: str) -> Grid:
    """A grid is a non-empty object mapping params.json key names to non-empty lists of values."""
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{where}: expected a non-empty object {{\"key\": [values, ...]}}, got {grid!r}")
    for key, values in grid.items():
        if not KEY_PATTERN.fullmatch(key):
            raise SweepError(f"{where}: {key!r} is not a params.json key name (letters, digits, underscores)")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: {key!r} must map to a non-empty list of values, got {values!r}")
    return grid


def load_grids(parent_dir: Path, param_options: list[str], parent_params: dict[str, Any]) -> list[Grid]:
    """The sweep as a list of grids: search.json (object or list of objects) with the --param options added."""
    search_path = parent_dir / SEARCH_FILE
    grids: list[Grid] = []
    if search_path.exists():
        definition = load_json(search_path)
        entries = definition if isinstance(definition, list) else [definition]
        if not entries:
            raise SweepError(f"{search_path}: the list of grids is empty")
        grids = [check_grid(grid, f"{search_path} (grid {i})" if len(entries) > 1 else str(search_path))
                 for i, grid in enumerate(entries, 1)]
    overrides: Grid = {}
    for key, values in map(parse_param_option, param_options):
        if key in overrides:
            raise SweepError(f"--param {key} given more than once; list all its values in one option")
        overrides.update(check_grid({key: values}, f"--param {key}"))
    if grids or overrides:
        return [{**grid, **overrides} for grid in grids or [{}]]
    lr = parent_params.get("learning_rate")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise SweepError(f"no {SEARCH_FILE} and no --param given, and {parent_dir / utils.PARAMS_FILE} has no "
                         f"positive 'learning_rate' to sweep around (got {lr!r})")
    return [{"learning_rate": [float(f"{lr * factor:.3g}") for factor in DEFAULT_LR_FACTORS]}]


def child_name(combination: dict[str, Any]) -> str:
    """A readable folder name, e.g. `head_conv__kernel_size_7` (a list: `scale_range_0.5-2.0`); unsafe characters
    become '_', and when that (or truncation) loses information, a short hash keeps distinct combinations apart."""
    def text(value: Any) -> str:
        if isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value):
            return "-".join(map(text, value))
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)

    literal = PAIR_SEPARATOR.join(f"{key}_{text(value)}" for key, value in combination.items())
    name = UNSAFE_NAME_CHARS.sub("_", literal)
    if name != literal or len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(json.dumps(combination, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME_LENGTH]}-{digest}"
    return name


def plan_children(parent_dir: Path, parent_params: dict[str, Any], grids: list[Grid]) -> list[Child]:
    """One Child per combination of each grid, in definition order; two sharing a folder, or more than MAX_CHILDREN
    (counted before any is built), are a SweepError."""
    count = sum(math.prod(map(len, grid.values())) for grid in grids)
    if count > MAX_CHILDREN:
        raise SweepError(f"the sweep ({SEARCH_FILE} and --param) defines {count} runs, more than {MAX_CHILDREN}; "
                         f"sweep fewer values, or split it over several parent folders")
    children: dict[str, Child] = {}
    for combination in (dict(zip(g, values)) for g in grids for values in itertools.product(*g.values())):
        name = child_name(combination)
        if name.lower() in children:
            raise SweepError(f"the sweep defines {name!r} twice (a repeated value, or overlapping grids?)")
        children[name.lower()] = Child(parent_dir / name, {**SWEEP_DEFAULTS, **parent_params, **combination})
    return list(children.values())


def check_against_spec(parent_dir: Path, parent_params: dict[str, Any], grids: list[Grid], children: list[Child],
                       spec: Sequence[type], data_dir: str | None) -> None:
    """Every swept key and every child's settings as train.py would check them (settings.Params): a typo or a value
    not allowed is a SweepError before any folder exists."""
    known = settings.experiment_settings(spec)
    for key in dict.fromkeys(k for grid in grids for k in grid):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(f"the sweep ({SEARCH_FILE} or --param) sweeps {key!r}, which is not a params.json "
                             f"key{hint}; train.py --help-params lists them")
    data_dir_override = {"data_dir": data_dir} if data_dir is not None else {}
    try:
        settings.Params(parent_params, spec, str(parent_dir / utils.PARAMS_FILE), data_dir_override)
        for child in children:
            settings.Params(child.params, spec, f"sweep child {child.directory.name}", data_dir_override)
    except errors.ParamsError as exc:
        raise SweepError(str(exc)) from None


def prepare_child(child: Child) -> str:
    """Write the child's params.json and .gitignore; returns 'skipped', 'resumed' or 'trained'. A child that
    already trained with another params.json is a SweepError, so that results never mix two settings, unless the
    settings that differ are those a resumed run may change (train.py's rule): then its params.json is updated."""
    params_path = child.directory / utils.PARAMS_FILE
    complete = (child.directory / utils.COMPLETE_MARKER).exists()
    resume = (child.directory / utils.LAST_CHECKPOINT).exists()
    if not (complete or resume) or not params_path.exists():
        child.directory.mkdir(parents=True, exist_ok=True)
        utils.write_json(params_path, child.params)
        utils.write_text(child.directory / ".gitignore", CHILD_GITIGNORE)
    elif (existing := load_json(params_path)) != child.params and (
            not isinstance(existing, dict) or {**SWEEP_DEFAULTS, **existing} != child.params):  # an older sweep's
        existing = existing if isinstance(existing, dict) else {}
        changed = sorted(k for k in existing.keys() | child.params.keys() if existing.get(k) != child.params.get(k))
        fixed = [key for key in changed if key not in MAY_CHANGE_ON_RESUME]
        if fixed:
            raise SweepError(f"{params_path} differs from the sweep's settings in {', '.join(fixed)}; "
                             f"remove {child.directory} to retrain it, or restore the parent's params.json")
        utils.write_json(params_path, child.params)
    return "skipped" if complete else "resumed" if resume else "trained"


class Sweep:
    """Trains children on a thread pool whose every worker owns one slot: a GPU id, or None (no pinning)."""

    def __init__(self, train_script: Path, data_dir: str | None, gpus: list[str] | None) -> None:
        self.train_script, self.data_dir, self.slots = train_script, data_dir, gpus or [None]
        self.worker = threading.local()  # .slot: the pool thread's own slot, set once as the thread starts
        self.lock = threading.RLock()  # re-entrant: a second signal may arrive while the handler holds it
        self.running: set[subprocess.Popen] = set()
        self.stop_signal: int | None = None
        self.bar: tqdm | None = None  # runs done / left, while run() runs
        self.done: Counter[str] = Counter()  # outcomes so far, by status

    def run(self, children: list[Child]) -> list[Outcome]:
        """Every child's outcome, in sweep order, forwarding stop signals meanwhile (call from the main thread)."""
        slots = iter(self.slots)
        pool = ThreadPoolExecutor(len(self.slots), initializer=lambda: setattr(self.worker, "slot", next(slots)))
        with utils.stop_signals_to(self.forward), pool, progress_bar(total=len(children), desc="sweep",
                                                                     unit="run", leave=True) as self.bar:
            return list(pool.map(self.run_child, children))

    def forward(self, signum: int, _frame: Any) -> None:
        """Signal handler: pass the signal on to the running children, and from now on start no more."""
        with self.lock:
            self.stop_signal = self.stop_signal or signum
            for process in self.running:
                process.send_signal(signum)
        say(f"\nsearch_hyperparams: {signal.Signals(signum).name} received; forwarded to the running children, "
            "waiting for them to save and exit", err=True)

    def run_child(self, child: Child) -> Outcome:
        """Prepare one child, then train or resume it (run_child_process), and count its outcome on the bar."""
        outcome = self.run_child_process(child)
        with self.lock:
            self.done[outcome.status] += 1
            self.bar.set_postfix_str(", ".join(f"{n} {status}" for status, n in self.done.items()), refresh=False)
            self.bar.update()
        return outcome

    def run_child_process(self, child: Child) -> Outcome:
        """Prepare one child, then train or resume it on this worker's slot, in its own session, and wait for it."""
        name, output, slot = child.directory.name, child.directory / CHILD_OUTPUT, self.worker.slot
        try:
            status = prepare_child(child)
        except (errors.UserError, OSError) as exc:
            return Outcome(child, "failed", (str(exc),))
        if status == "skipped":
            say(f"{name}: already complete, skipped")
            return Outcome(child, status)
        command = [sys.executable, str(self.train_script), "--model_dir", str(child.directory),
                   *(["--data_dir", self.data_dir] if self.data_dir is not None else []),
                   *(["--restore_file", "last"] if status == "resumed" else [])]
        with self.lock:  # a stop signal either comes first (nothing starts) or finds the process in self.running
            if self.stop_signal is not None:
                return Outcome(child, "interrupted", ("not started",))
            try:
                with utils.open_append(output) as log:
                    log.write(f"\n=== search_hyperparams {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n")
                    log.flush()
                    offset = log.tell()
                    env = None if slot is None else dict(os.environ, CUDA_VISIBLE_DEVICES=slot)
                    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                               env=env, start_new_session=True)
            except (errors.UserError, OSError) as exc:
                return Outcome(child, "failed", (f"cannot start {shlex.join(command)}: {exc}",))
            self.running.add(process)
        on_gpu = "" if slot is None else f" on GPU {slot}"
        say(f"{name}: {'resuming' if status == 'resumed' else 'training'}{on_gpu} (output in {output})")
        started = time.monotonic()
        code = process.wait()
        with self.lock:
            self.running.discard(process)
        if code == 0 and (child.directory / utils.COMPLETE_MARKER).exists():
            outcome = Outcome(child, status)
        else:
            with output.open("rb") as log:  # this attempt's last lines; progress-bar carriage returns split lines
                log.seek(offset)
                lines = [line for line in re.split(r"[\r\n]+", log.read().decode(errors="replace")) if line.strip()]
            why = f"exit status {code}" + (f" but no {utils.COMPLETE_MARKER}" if code == 0 else "")
            detail = (f"{why}; full output in {output} and {utils.TRAIN_LOG}", *lines[-TAIL_LINES:])
            outcome = Outcome(child, "failed" if self.stop_signal is None else "interrupted", detail)
        say(f"{name}: {outcome.status} ({time.monotonic() - started:.0f} s)")
        return outcome


def report(outcomes: list[Outcome]) -> None:
    """A one-line-per-child summary on stdout, then each failure with its last output lines on stderr."""
    statuses = ("skipped", "trained", "resumed", "failed", "interrupted")
    counts = {s: sum(o.status == s for o in outcomes) for s in statuses}
    say("\nsweep summary: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    for outcome in outcomes:
        say(f"  {outcome.status:<11} {outcome.child.directory}")
    for outcome in (o for o in outcomes if o.status == "failed"):
        say("\n".join([f"\nFAILED: {outcome.child.directory}", *(f"  | {line}" for line in outcome.detail)]), err=True)


def main(argv: Sequence[str] | None = None, *, train_script: Path = TRAIN_SCRIPT,
         spec: Sequence[type] | None = SPEC) -> int:
    """Run the sweep; returns the exit status (0 all complete, 1 a child failed, 2 bad input, 128+N signal N).

    `spec`: the config dataclasses every child's settings are checked against (None: no check, for stand-ins of
    train.py with settings of their own)."""
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent_dir", required=True, help="folder with the base params.json (and search.json)")
    parser.add_argument("--data_dir", help="forwarded to train.py")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=V1,V2",
                        help="sweep KEY over these values (JSON where they parse, else strings); repeatable")
    parser.add_argument("--gpus", help="run one child per GPU at once, e.g. 0,1,2,3 (default: one at a time)")
    args = parser.parse_args(argv)
    return utils.run_cli(lambda: sweep(args, train_script, spec))


def sweep(args: argparse.Namespace, train_script: Path, spec: Sequence[type] | None) -> int:
    """Plan the children of --parent_dir, train them and report; the exit status (128+N if stopped by signal N)."""
    parent_dir = Path(args.parent_dir)
    gpus = None if args.gpus is None else [gpu.strip() for gpu in args.gpus.split(",")]
    if gpus is not None and (not all(gpu.isdigit() for gpu in gpus) or len(set(gpus)) != len(gpus)):
        raise SweepError(f"--gpus {args.gpus!r}: expected distinct GPU indices separated by commas, e.g. 0,1,2,3")
    parent_params = load_json(parent_dir / utils.PARAMS_FILE)
    if not isinstance(parent_params, dict):
        raise SweepError(f"{parent_dir / utils.PARAMS_FILE} must hold a JSON object")
    grids = load_grids(parent_dir, args.param, parent_params)
    children = plan_children(parent_dir, parent_params, grids)
    if spec is not None:
        check_against_spec(parent_dir, parent_params, grids, children, spec, args.data_dir)
    say(f"sweep of {len(children)} children in {parent_dir}")
    runner = Sweep(Path(train_script), args.data_dir, gpus)
    outcomes = runner.run(children)
    report(outcomes)
    if runner.stop_signal is not None:
        return 128 + runner.stop_signal
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

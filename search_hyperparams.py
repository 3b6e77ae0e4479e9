"""Hyper-parameter sweeps: one child experiment per value combination, each trained by train.py.

    python search_hyperparams.py --parent_dir experiments/learning_rate [--data_dir D]
        [--param key=v1,v2 ...] [--gpus 0,1,2,3]

The sweep is the grid over every key of `<parent_dir>/search.json` (a JSON object mapping a params.json key
to a list of values), or the union of several such grids when search.json holds a list of objects (for
tables whose rows are not a full grid). `--param key=v1,v2` adds a key to every grid, replacing that key's
values where search.json names it too. With neither, the sweep is `learning_rate` around the parent's value.

Each combination gets a child folder (e.g. `head_conv,kernel_size_7`) holding the parent's params.json
updated with the combination, and is trained by `train.py --model_dir <child>` in a subprocess started
from an argument list (never a shell). Re-running skips children with train_complete.json, resumes those
with last.pth.tar, and starts the others. A failing child is reported and the others go on; the exit
status is 0 when every child finished, 1 when any failed, 2 on a bad sweep definition, 128+N on signal N.

With `--gpus`, as many children run at once as GPUs are given, each seeing one GPU through
CUDA_VISIBLE_DEVICES. Children run in their own session: SIGINT/SIGTERM reach them once, forwarded by
this process, which then waits for them to save their checkpoints and exits without starting more.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
PARAMS_FILE = "params.json"
SEARCH_FILE = "search.json"
COMPLETE_MARKER = "train_complete.json"
LAST_CHECKPOINT = "last.pth.tar"
TRAIN_LOG = "train.log"
CHILD_OUTPUT = "stdout.log"
CHILD_GITIGNORE = "# A sweep child, generated from the parent's params.json and search.json: git ignores all of it.\n*\n"
DEFAULT_LR_FACTORS = (0.1, 0.3, 1.0, 3.0)
TAIL_LINES = 12
MAX_NAME_LENGTH = 120
KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+\-\[\],]")
POLL_SECONDS = 0.1


class SweepError(ValueError):
    """A bad sweep definition or parent folder; the message names the file, key or value at fault."""


@dataclass(frozen=True)
class Child:
    """One run of the sweep: its folder and the full params.json it trains with."""

    directory: Path
    params: dict[str, Any]


@dataclass
class Outcome:
    """What happened to one child: 'skipped' (already complete), 'trained', 'resumed', 'failed' or 'interrupted'."""

    child: Child
    status: str
    detail: list[str]


# ----------------------------------------------------------------------------- sweep definition

def load_json(path: Path) -> Any:
    """Parse a JSON file; a missing or broken file is a SweepError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SweepError(f"{path} is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_value(text: str) -> Any:
    """A command-line value: JSON where it parses (numbers, true/false, null, lists, "text"), else the literal text."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text


def split_values(text: str) -> list[str]:
    """Split on the commas that are outside double quotes and brackets: `[1,2],"a,b",c` -> 3 values."""
    values, start, depth, in_string, escaped = [], 0, 0, False, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = char == "\\", char != '"'
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    return values + [text[start:]]


def parse_param_option(option: str) -> tuple[str, list[Any]]:
    """`key=v1,v2` -> (key, [v1, v2]), each value parsed as JSON where possible, else kept as the literal string."""
    key, sep, values = option.partition("=")
    if not sep or not values:
        raise SweepError(f"--param {option!r}: expected key=value[,value...]")
    check_key(key, f"--param {option!r}")
    return key, [parse_value(v) for v in split_values(values)]


def check_key(key: Any, where: str) -> None:
    """Sweep keys are params.json key names: identifiers only."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise SweepError(f"{where}: {key!r} is not a params.json key name (letters, digits, underscores)")


def check_grid(grid: Any, where: str) -> dict[str, list[Any]]:
    """A grid is a non-empty object mapping keys to non-empty lists of distinct values."""
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{where}: expected a non-empty object {{\"key\": [values, ...]}}, got {grid!r}")
    for key, values in grid.items():
        check_key(key, where)
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: {key!r} must map to a non-empty list of values, got {values!r}")
        literals = [json.dumps(v, sort_keys=True) for v in values]
        duplicates = sorted({v for v in literals if literals.count(v) > 1})
        if duplicates:
            raise SweepError(f"{where}: {key!r} lists {', '.join(duplicates)} more than once")
    return grid


def default_grid(parent_params: dict[str, Any], params_path: Path) -> dict[str, list[Any]]:
    """The learning rate at a few multiples of the parent's, rounded to 3 significant digits."""
    lr = parent_params.get("learning_rate")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise SweepError(f"no {SEARCH_FILE} and no --param given, and {params_path} has no positive "
                         f"'learning_rate' to sweep around (got {lr!r})")
    return {"learning_rate": [float(f"{lr * f:.3g}") for f in DEFAULT_LR_FACTORS]}


def load_grids(parent_dir: Path, param_options: list[str], parent_params: dict[str, Any]) -> list[dict[str, list[Any]]]:
    """The sweep as a list of grids: search.json (object or list of objects) merged with --param options."""
    search_path = parent_dir / SEARCH_FILE
    grids: list[dict[str, list[Any]]] = []
    if search_path.exists():
        definition = load_json(search_path)
        entries = definition if isinstance(definition, list) else [definition]
        if not entries:
            raise SweepError(f"{search_path}: the list of grids is empty")
        grids = [dict(check_grid(g, f"{search_path} (grid {i + 1})" if len(entries) > 1 else str(search_path)))
                 for i, g in enumerate(entries)]
    overrides: dict[str, list[Any]] = {}
    for option in param_options:
        key, values = parse_param_option(option)
        if key in overrides:
            raise SweepError(f"--param {key} given more than once; list all its values in one option")
        overrides[key] = check_grid({key: values}, "--param")[key]
    if not grids and not overrides:
        return [default_grid(parent_params, parent_dir / PARAMS_FILE)]
    return [{**g, **overrides} for g in grids] if grids else [overrides]


def expand(grids: list[dict[str, list[Any]]]) -> list[dict[str, Any]]:
    """Every combination of every grid, in definition order."""
    return [dict(zip(grid, values)) for grid in grids for values in itertools.product(*grid.values())]


# ----------------------------------------------------------------------------- child folders

def format_value(value: Any) -> str:
    """A value as written in a folder name: strings bare, everything else as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)


def child_name(combination: dict[str, Any]) -> str:
    """A readable, file-system-safe folder name, e.g. `head_conv,kernel_size_7`.

    Characters outside [A-Za-z0-9._+-[],] become '_'. When that (or truncation) loses information, a short
    hash of the exact combination is appended so that distinct combinations never share a folder.
    """
    literal = ",".join(f"{key}_{format_value(value)}" for key, value in combination.items())
    name = UNSAFE_NAME_CHARS.sub("_", literal)
    if name != literal or len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(json.dumps(combination, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME_LENGTH]}-{digest}"
    return name


def plan_children(parent_dir: Path, parent_params: dict[str, Any], combinations: list[dict[str, Any]]) -> list[Child]:
    """One Child per combination; two combinations mapping to one folder are a SweepError."""
    children: dict[str, Child] = {}
    for combination in combinations:
        name = child_name(combination)
        if name.lower() in children:
            raise SweepError(f"the sweep defines {name!r} twice (overlapping grids in {parent_dir / SEARCH_FILE}?)")
        children[name.lower()] = Child(parent_dir / name, {**parent_params, **combination})
    return list(children.values())


def prepare_child(child: Child) -> str:
    """Write the child's params.json where safe and say what to do: 'complete', 'resume' or 'fresh'.

    A child that already trained (checkpoint or completion marker) keeps its params.json; if that differs
    from the sweep's, the child is not run, so that results never silently mix two settings.
    """
    params_path = child.directory / PARAMS_FILE
    trained = (child.directory / COMPLETE_MARKER).exists() or (child.directory / LAST_CHECKPOINT).exists()
    if trained and params_path.exists():
        existing = load_json(params_path)
        if not isinstance(existing, dict):
            raise SweepError(f"{params_path} must hold a JSON object")
        if existing != child.params:
            changed = sorted(k for k in existing.keys() | child.params.keys() if existing.get(k) != child.params.get(k))
            raise SweepError(f"{params_path} differs from the sweep's settings in {', '.join(changed)}; "
                             f"remove {child.directory} to retrain it, or restore the parent's params.json")
    else:
        child.directory.mkdir(parents=True, exist_ok=True)
        params_path.write_text(json.dumps(child.params, indent=4) + "\n")
        (child.directory / ".gitignore").write_text(CHILD_GITIGNORE)
    if (child.directory / COMPLETE_MARKER).exists():
        return "complete"
    return "resume" if (child.directory / LAST_CHECKPOINT).exists() else "fresh"


def train_command(train_script: Path, child: Child, resume: bool, data_dir: str | None) -> list[str]:
    """The argument list that trains (or resumes) one child."""
    command = [sys.executable, str(train_script), "--model_dir", str(child.directory)]
    if data_dir is not None:
        command += ["--data_dir", data_dir]
    if resume:
        command += ["--restore_file", "last"]
    return command


def tail(path: Path, offset: int = 0, lines: int = TAIL_LINES) -> list[str]:
    """The last non-empty lines of a text file from byte `offset` on (progress-bar carriage returns split lines)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()][-lines:]


# ----------------------------------------------------------------------------- running

@dataclass
class Running:
    """A child process in flight."""

    child: Child
    status: str
    process: subprocess.Popen
    output: TextIO
    output_offset: int
    started: float


class Scheduler:
    """Runs child commands, one per slot (a GPU id, or None for 'no pinning'), forwarding stop signals."""

    def __init__(self, slots: list[str | None]) -> None:
        self.free = list(slots)
        self.running: dict[str | None, Running] = {}
        self.stop_signal: int | None = None

    def handle_signal(self, signum: int, _frame: Any) -> None:
        """SIGINT/SIGTERM: forward it to the running children; from the first one on, start nothing new."""
        if self.stop_signal is None:
            self.stop_signal = signum
            print(f"\nsearch_hyperparams: {signal.Signals(signum).name} received; forwarded to the running "
                  f"children, waiting for them to save and exit", file=sys.stderr, flush=True)
        for run in self.running.values():
            run.process.send_signal(signum)

    def start(self, child: Child, status: str, command: list[str]) -> str | None:
        """Start `command` for `child` on a free slot, output appended to the child's stdout.log; returns the slot."""
        slot = self.free[0]
        env = dict(os.environ)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        output_path = child.directory / CHILD_OUTPUT
        with output_path.open("a") as output:
            output.write(f"\n=== search_hyperparams {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n")
        offset = output_path.stat().st_size
        output = output_path.open("a")
        try:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
        except OSError:
            output.close()
            raise
        self.free.pop(0)
        self.running[slot] = Running(child, status, process, output, offset, time.monotonic())
        return slot

    def wait_any(self) -> list[tuple[Running, int]]:
        """Block until at least one child exits; return the finished ones with their exit status."""
        while True:
            finished = [(slot, run, run.process.poll()) for slot, run in self.running.items()]
            finished = [(slot, run, code) for slot, run, code in finished if code is not None]
            if finished:
                for slot, run, _ in finished:
                    del self.running[slot]
                    self.free.append(slot)
                    run.output.close()
                return [(run, code) for _, run, code in finished]
            time.sleep(POLL_SECONDS)


def failure_detail(child: Child, output_offset: int, exit_code: int) -> list[str]:
    """Where to look, and the last lines the child printed in this attempt (else the last lines of its train.log)."""
    lines = tail(child.directory / CHILD_OUTPUT, output_offset) or tail(child.directory / TRAIN_LOG)
    return [f"exit status {exit_code}; full output in {child.directory / CHILD_OUTPUT} and {TRAIN_LOG}", *lines]


def finished_outcome(run: Running, code: int, stop_signal: int | None) -> Outcome:
    """Success means exit status 0 and a train_complete.json; a child stopped by a forwarded signal is 'interrupted'."""
    if code == 0 and (run.child.directory / COMPLETE_MARKER).exists():
        return Outcome(run.child, run.status, [])
    detail = failure_detail(run.child, run.output_offset, code)
    if stop_signal is not None:
        return Outcome(run.child, "interrupted", detail)
    if code == 0:
        detail[0] = f"exit status 0 but no {COMPLETE_MARKER}; full output in {run.child.directory / CHILD_OUTPUT}"
    return Outcome(run.child, "failed", detail)


def prepare_all(children: list[Child]) -> tuple[dict[Path, Outcome], deque[tuple[Child, str]]]:
    """Outcomes known before running (skipped, or failed to prepare) and the queue of (child, 'trained'|'resumed')."""
    outcomes: dict[Path, Outcome] = {}
    pending: deque[tuple[Child, str]] = deque()
    for child in children:
        try:
            action = prepare_child(child)
        except (SweepError, OSError) as exc:
            outcomes[child.directory] = Outcome(child, "failed", [str(exc)])
            print(f"{child.directory.name}: failed before starting", flush=True)
            continue
        if action == "complete":
            outcomes[child.directory] = Outcome(child, "skipped", [])
            print(f"{child.directory.name}: already complete, skipped", flush=True)
        else:
            pending.append((child, "resumed" if action == "resume" else "trained"))
    return outcomes, pending


def run_sweep(children: list[Child], train_script: Path, data_dir: str | None,
              gpus: list[str] | None) -> tuple[list[Outcome], int | None]:
    """Train every child that needs it; returns the outcomes (in sweep order) and the stop signal, if any."""
    outcomes, pending = prepare_all(children)
    scheduler = Scheduler(list(gpus) if gpus else [None])
    in_main_thread = threading.current_thread() is threading.main_thread()
    stop_signals = (signal.SIGINT, signal.SIGTERM) if in_main_thread else ()
    previous = {s: signal.signal(s, scheduler.handle_signal) for s in stop_signals}
    try:
        while pending or scheduler.running:
            while pending and scheduler.free and scheduler.stop_signal is None:
                child, status = pending.popleft()
                command = train_command(train_script, child, status == "resumed", data_dir)
                try:
                    slot = scheduler.start(child, status, command)
                except OSError as exc:
                    outcomes[child.directory] = Outcome(child, "failed", [f"cannot start {shlex.join(command)}: {exc}"])
                    continue
                where = f" on GPU {slot}" if slot is not None else ""
                verb = "resuming" if status == "resumed" else "training"
                print(f"{child.directory.name}: {verb}{where} (output in {child.directory / CHILD_OUTPUT})", flush=True)
            if not scheduler.running:
                break
            for run, code in scheduler.wait_any():
                outcome = finished_outcome(run, code, scheduler.stop_signal)
                outcomes[run.child.directory] = outcome
                seconds = time.monotonic() - run.started
                print(f"{run.child.directory.name}: {outcome.status} ({seconds:.0f} s)", flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for child, _ in pending:
        outcomes[child.directory] = Outcome(child, "interrupted", ["not started"])
    return [outcomes[c.directory] for c in children], scheduler.stop_signal


def report(outcomes: list[Outcome]) -> None:
    """A one-line-per-child summary on stdout, then each failure with its last output lines on stderr."""
    statuses = ("skipped", "trained", "resumed", "failed", "interrupted")
    counts = {s: sum(o.status == s for o in outcomes) for s in statuses}
    print("\nsweep summary: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), flush=True)
    for outcome in outcomes:
        print(f"  {outcome.status:<11} {outcome.child.directory}", flush=True)
    for outcome in outcomes:
        if outcome.status == "failed":
            print(f"\nFAILED: {outcome.child.directory}", file=sys.stderr)
            for line in outcome.detail:
                print(f"  | {line}", file=sys.stderr)


# ----------------------------------------------------------------------------- command line

def parse_gpus(text: str | None) -> list[str] | None:
    """`0,1,2,3` -> ['0', '1', '2', '3']; each id must be a non-negative integer, given once."""
    if text is None:
        return None
    gpus = [g.strip() for g in text.split(",")]
    if not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise SweepError(f"--gpus {text!r}: expected distinct GPU indices separated by commas, e.g. 0,1,2,3")
    return gpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent_dir", required=True, help="folder with the base params.json (and search.json)")
    parser.add_argument("--data_dir", help="forwarded to train.py")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=V1,V2",
                        help="sweep KEY over these values (JSON where they parse, else strings); repeatable")
    parser.add_argument("--gpus", help="run one child per GPU at once, e.g. 0,1,2,3 (default: one at a time)")
    return parser


def main(argv: list[str] | None = None, train_script: Path = TRAIN_SCRIPT) -> int:
    """Run the sweep; returns the exit status (0 all complete, 1 a child failed, 2 bad input, 128+N signal N)."""
    args = build_parser().parse_args(argv)
    parent_dir = Path(args.parent_dir)
    try:
        gpus = parse_gpus(args.gpus)
        parent_params = load_json(parent_dir / PARAMS_FILE)
        if not isinstance(parent_params, dict):
            raise SweepError(f"{parent_dir / PARAMS_FILE} must hold a JSON object")
        children = plan_children(parent_dir, parent_params, expand(load_grids(parent_dir, args.param, parent_params)))
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sweep of {len(children)} children in {parent_dir}", flush=True)
    outcomes, stop_signal = run_sweep(children, Path(train_script), args.data_dir, gpus)
    report(outcomes)
    if stop_signal is not None:
        return 128 + stop_signal
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

"""A run's surroundings: the run folder (file names, lock, atomic writes), logging, the run record, mixed precision
and placement, distributed start-up, stop signals, and what every entry point shares on its command line.

The settings live in settings.py, checkpoints in checkpoints.py."""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import io
import json
import logging
import os
import platform
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from errors import ParamsError, UserError
from model import normalise

# The run folder: the files a run writes into its experiment folder, by name (sweeps and synthesis read them too).
PARAMS_FILE = "params.json"  # the experiment's settings (settings.load_params reads it)
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
# The scalar metrics of a validation (metrics JSON, TensorBoard's val/..., the sweep tables); `loss` is the training
# objective (class-weighted cross entropy, + Dice if asked), so that val/loss and train/loss compare.
SCALAR_METRICS = ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "boundary_accuracy", "interior_accuracy",
                  "loss")


# ----------------------------------------------------------------------------------------------- command lines

class ArgumentParser(argparse.ArgumentParser):
    """argparse that also accepts dashed spellings of underscored options (--model-dir for --model_dir)."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        aliases = [n.replace("_", "-") for n in names if n.startswith("--") and "_" in n]
        return super().add_argument(*names, *aliases, **kwargs)


# What an entry point reports in one line instead of a traceback: the user's errors, and the system's about files
# (a full disk, a folder that cannot be read) with the file's name.
USER_ERRORS = (UserError, OSError)


def run_cli(main: Callable[[], int]) -> int:
    """Run an entry point: a user error (USER_ERRORS) is one line on stderr and exit status 2."""
    try:
        return main()
    except USER_ERRORS as exc:
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


def write_png(path: Path, png: bytes) -> None:
    """Atomically write PNG bytes (model/visualize.py's pictures) at `path`, creating its folder; the name must end in
    .png, so that no picture is taken for a JPEG."""
    if path.suffix.lower() != ".png":
        raise ValueError(f"pictures are written as PNG; name the file *.png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(png))


def write_text(path: Path, text: str) -> None:
    """Atomically write `text` (UTF-8); a write error (full disk, read-only folder) is one line."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, values: dict[str, Any]) -> None:
    """Atomically write `values` as indented JSON; a write error (full disk, read-only folder) is one line."""
    write_text(path, json.dumps(values, indent=4) + "\n")


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
def errors_in_log() -> Iterator[None]:
    """Within: a user error also goes to the log files (train.log), not only to stderr, where run_cli prints it."""
    try:
        yield
    except USER_ERRORS as exc:
        record = logging.makeLogRecord({"levelno": logging.ERROR, "levelname": "ERROR", "msg": f"error: {exc}"})
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        raise


def run_record(params: dict[str, Any], overrides: dict[str, Any], arguments: dict[str, Any],
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
    return {"params": params, "overrides": overrides, "command": [sys.executable, *sys.argv],
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


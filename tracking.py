"""Where a training run's scalars, pictures and settings go: TensorBoard event files in the run folder, always; and
MLflow and/or Weights & Biases too when params.json's `tracker` names them, e.g. "tensorboard+wandb" (each package is
imported only then).

A backend holds a copy, and never stands between the run and its saves: it is opened within TIMEOUT_S (a stop signal
ends that wait at once), then called from a thread of its own that the training loop only hands values to. Should it
fail, fall behind or stop answering, one warning says so and training goes on, since the run folder (TensorBoard
events, metrics JSON, train.log) keeps everything; at the end it gets at most TIMEOUT_S to catch up.

Each backend is a small adapter here rather than a multi-backend layer (Lightning's loggers, Accelerate's trackers):
those call the backends on the training thread, which is what must never wait, and would add a framework dependency.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import json
import logging
import os
import queue
import re
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.tensorboard import SummaryWriter

import errors
import settings
import utils

MLFLOW_TRACKER, WANDB_TRACKER = settings.TRACKERS[1:3]  # the TrainConfig.tracker values that add MLflow, W&B
MLFLOW_RUN_FILE = "mlflow_run.json"  # in the run folder: the MLflow run that a resume continues
WANDB_RUN_FILE = "wandb_run.json"  # in the run folder: the W&B run that a resume continues
RUN_FILES = (MLFLOW_RUN_FILE, WANDB_RUN_FILE)
WANDB_STEP = "iteration"  # W&B's x-axis for every scalar: the training iteration, as in TensorBoard and MLflow
TIMEOUT_S = 10.0  # the longest a tracking backend may hold the run: to open it, and to catch up at the end
BACKLOG = 1000  # calls a backend may fall behind (a store that stopped answering) before it is dropped
MLFLOW_HTTP_RETRIES = 2  # MLflow's own defaults (120 s per request, 7 retries with back-off) keep one call
# waiting for minutes: its requests get TIMEOUT_S and this many retries, unless $MLFLOW_HTTP_REQUEST_* say otherwise
THREAD_PREFIX = "tracking: "  # names the threads that call the backends
URLLIB3_LOGGER = "urllib3.connectionpool"  # warns at each HTTP retry; a backend's failure is one warning of ours
_NOT_IN_MLFLOW_NAMES = re.compile(r"[^\w\-. /]")  # MLflow's keys allow letters, digits, _ - . space and /
_NOT_IN_WANDB_PROJECTS = re.compile(r"[/\\#?%:]")  # W&B refuses these in a project name...
_WANDB_PROJECT_LENGTH = 128  # ...and longer names
_MLFLOW_PARAMS_PER_CALL = 100  # MLflow's log_batch limit
_RECORD_BYTES = 1 << 20  # a run record is a few hundred bytes; a larger file there is not one


def check_tracker(config: settings.TrainConfig) -> None:
    """Refuse, before the run starts, a tracker whose package (or database driver) is missing."""
    for backend in backends(config.tracker):
        backend.check(config)


@contextlib.contextmanager
def open_tracker(model_dir: Path, config: settings.TrainConfig, params: dict[str, Any],
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator[Tracker]:
    """The run's tracker, for the main process; each backend's run ends FINISHED when the tracker was told that
    training finished, KILLED (W&B: marked preempting) when the run stopped resumably, FAILED on an error (or when
    another backend refused the start). `should_stop` (a stop signal arrived) ends the wait for a backend that is
    being opened."""
    with contextlib.ExitStack() as stack:
        _quieten_tracking_threads(logging.getLogger(URLLIB3_LOGGER))
        mirrors = []
        try:
            for backend in backends(config.tracker):
                stack.enter_context(_environment_defaults(backend.environment()))
                if (mirror := open_mirror(backend, model_dir, config, params, should_stop)) is not None:
                    mirrors.append(mirror)
        except BaseException:
            close_mirrors(mirrors, "FAILED")
            raise
        tracker = Tracker(SummaryWriter(model_dir), mirrors)
        status = "KILLED"
        try:
            yield tracker
            if tracker.finished:
                status = "FINISHED"
        except BaseException:
            status = "FAILED"
            raise
        finally:
            tracker.writer.close()
            close_mirrors(tracker.mirrors, status)


class Tracker:
    """Logs to TensorBoard and hands the scalars to the mirrors (MLflow, W&B), which never make it wait."""

    def __init__(self, writer: SummaryWriter, mirrors: list[Mirror]) -> None:
        self.writer, self.mirrors = writer, mirrors
        self.finished = False

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars named like 'train/loss' at iteration `step`."""
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        for mirror in self.mirrors:
            mirror.submit("log", dict(values), step, time.time())

    def pictures(self, prefix: str, pictures: list[torch.Tensor], step: int) -> None:
        """uint8 3×H×W pictures, to TensorBoard only (the run folder keeps the PNGs evaluate.py writes)."""
        for i, picture in enumerate(pictures):
            self.writer.add_image(f"{prefix}/{i}", picture, step)
        self.writer.flush()

    def finish(self, best_metrics_file: Path, step: int) -> None:
        """Training finished: the best validation's metrics (that JSON file, if it is there) go to the mirrors as
        best/miou, best/epoch, ...; their runs will end FINISHED."""
        if self.mirrors and best_metrics_file.is_file():
            best = json.loads(best_metrics_file.read_text())
            values = {f"best/{key}": best[key] for key in (*utils.SCALAR_METRICS, "epoch") if best.get(key) is not None}
            for mirror in self.mirrors:
                mirror.submit("log_best", values, step, time.time())
        self.finished = True


# ----------------------------------------------------------------------------------------------- isolation

class Mirror:
    """One backend's copy of the run, called in order from a daemon thread of its own: the training loop only queues
    the calls. The first failure, or a backlog of BACKLOG calls, ends the mirroring with one warning."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.name = backend, backend.NAME
        self.stopped = False
        self._calls: queue.Queue = queue.Queue(BACKLOG)
        self._thread = threading.Thread(target=self._serve, name=f"{THREAD_PREFIX}{self.name}", daemon=True)
        self._thread.start()

    def submit(self, method: str, *args: Any) -> None:
        """Queue backend.method(*args); never waits."""
        if self.stopped:
            return
        try:
            self._calls.put_nowait((method, args))
        except queue.Full:
            self.stop(f"{BACKLOG} calls are waiting (the store stopped answering?)")

    def close(self, status: str) -> None:
        """Queue the end of the backend's run (no wait: see close_mirrors)."""
        self.submit("end", status)
        with contextlib.suppress(queue.Full):
            self._calls.put_nowait(None)

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the queued calls (close's last); one warning if they are not done."""
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive() and not self.stopped:
            self.stop(f"no answer within {TIMEOUT_S:g} s at the end of the run (its last values and status may be "
                      f"missing there)")

    def stop(self, reason: str) -> None:
        """Stop mirroring, with one warning."""
        if not self.stopped:
            self.stopped = True
            logging.warning("%s: %s; logging to %s stops here, TensorBoard and the run folder keep everything",
                            self.name, reason, self.name)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            if self.stopped:
                continue
            method, args = call
            try:
                getattr(self.backend, method)(*args)
            except Exception as error:  # noqa: BLE001 -- whatever the store's failure, it must not cost the run
                self.stop(_first_line(error))


def open_mirror(backend_class: Any, model_dir: Path, config: settings.TrainConfig, params: dict[str, Any],
                should_stop: Callable[[], bool]) -> Mirror | None:
    """Open the backend's run (a new one, or the one this folder's record names) within TIMEOUT_S and record it.
    A backend that fails or does not answer refuses the first start in one line; a resume goes on without it, with
    one warning (its next resume tries again). A stop signal ends the wait at once: the run goes on to save."""
    record_file = model_dir / backend_class.RUN_FILE
    record = read_record(record_file)
    opening = backend_class.opening(model_dir, config, params, record)
    try:
        backend = _call_in_time(opening.call, should_stop)
    except _Stopped:
        logging.warning("%s: a stop signal arrived while opening %s; this start is not tracked there",
                        backend_class.NAME, opening.where)
        return None
    except (TimeoutError, *backend_class.errors()) as error:
        reason = f"no answer within {TIMEOUT_S:g} s" if isinstance(error, _NoAnswer) else _first_line(error)
        if record is None:
            raise errors.UserError(f"{opening.where}: {reason} ({opening.hint}, or set tracker to "
                                   f"\"tensorboard\")") from None
        logging.warning("%s: %s; this resume goes on without %s (TensorBoard and the run folder keep everything)",
                        opening.where, reason, backend_class.NAME)
        return None
    utils.write_json(record_file, backend.record)
    return Mirror(backend)


def close_mirrors(mirrors: list[Mirror], status: str) -> None:
    """End every mirror's run with `status`, giving them TIMEOUT_S together to catch up."""
    for mirror in mirrors:
        mirror.close(status)
    deadline = time.monotonic() + TIMEOUT_S
    for mirror in mirrors:
        mirror.wait(deadline - time.monotonic())


@dataclass
class Opening:
    """How to open a backend's run: `call` does it (on a thread of its own); `where` names the store and `hint`
    what to set, in the messages that refuse or warn."""

    where: str
    hint: str
    call: Callable[[], Any]


class _Stopped(Exception):
    """A stop signal arrived while waiting for a backend."""


class _NoAnswer(TimeoutError):
    """A backend did not answer within TIMEOUT_S."""


def _call_in_time(function: Callable[[], Any], should_stop: Callable[[], bool]) -> Any:
    """function() on a daemon thread: its result or exception; _NoAnswer after TIMEOUT_S, _Stopped as soon as
    should_stop(). A call given up on is left to its thread, which cannot keep the process from exiting."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def call() -> None:
        try:
            future.set_result(function())
        except BaseException as error:  # noqa: BLE001 -- handed to the waiting thread
            future.set_exception(error)
    threading.Thread(target=call, name=f"{THREAD_PREFIX}start", daemon=True).start()
    deadline = time.monotonic() + TIMEOUT_S
    while not future.done():
        if should_stop():
            raise _Stopped
        if time.monotonic() >= deadline:
            raise _NoAnswer
        concurrent.futures.wait([future], timeout=0.1)
    return future.result()


class _NotFromTrackingThreads(logging.Filter):
    """Drops the records logged from the threads that call the backends (also those given up on, which may retry
    after the run ended)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.threadName or "").startswith(THREAD_PREFIX)


def _quieten_tracking_threads(logger: logging.Logger) -> None:
    if not any(isinstance(existing, _NotFromTrackingThreads) for existing in logger.filters):
        logger.addFilter(_NotFromTrackingThreads())


@contextlib.contextmanager
def _environment_defaults(values: dict[str, str]) -> Iterator[None]:
    """Set the environment variables that are not set, for the duration."""
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


# ----------------------------------------------------------------------------------------------- MLflow

class MlflowRun:
    """The MLflow run mirroring one training run: created by the first start, continued by every resume."""

    NAME = "MLflow"
    RUN_FILE = MLFLOW_RUN_FILE

    def __init__(self, client: Any, run_id: str, record: dict[str, str]) -> None:
        self.client, self.run_id, self.record = client, run_id, record

    @staticmethod
    def check(config: settings.TrainConfig) -> None:
        """The package, and for a database store its driver."""
        _check_database_driver(config.tracking_uri or _import("mlflow", config.tracker).get_tracking_uri())

    @staticmethod
    def environment() -> dict[str, str]:
        """MLflow's HTTP limits for this run (see MLFLOW_HTTP_RETRIES)."""
        return {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(TIMEOUT_S))),
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(MLFLOW_HTTP_RETRIES)}

    @staticmethod
    def errors() -> tuple[type[Exception], ...]:
        """What the store, its connection and its driver raise."""
        from mlflow.exceptions import MlflowException  # noqa: PLC0415 -- mlflow is imported only when chosen
        return MlflowException, OSError, ImportError

    @classmethod
    def opening(cls, model_dir: Path, config: settings.TrainConfig, params: dict[str, Any],
                record: dict[str, Any] | None) -> Opening:
        """A call that creates the run (experiment: $MLFLOW_EXPERIMENT_NAME, else the run folder's parent's name;
        run name: the folder's) or continues the one `record` names; it logs the settings not logged yet."""
        mlflow = _import("mlflow", config.tracker)
        given = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")  # "": MLflow's default store
        if record and record.get("given_uri") == given and isinstance(record.get("tracking_uri"), str):
            uri = record["tracking_uri"]  # the first start's store, from whatever folder this resume started
        else:
            uri = absolute_store_uri(given or mlflow.get_tracking_uri())

        def open_run() -> MlflowRun:
            from mlflow.entities import Param  # noqa: PLC0415 -- mlflow is imported only when chosen

            client = mlflow.MlflowClient(uri)
            run_id = _recorded_run(client, record, uri)
            if run_id is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or model_dir.resolve().parent.name
                experiment = client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
                run_id = client.create_run(experiment_id, run_name=model_dir.name,
                                           tags={"model_dir": str(model_dir.resolve())}).info.run_id
            else:
                client.update_run(run_id, status="RUNNING")
            logged = client.get_run(run_id).data.params  # a resume may not rewrite them (MLflow params are final)
            new = [Param(key, _param_value(value)) for key, value in params.items() if key not in logged]
            for start in range(0, len(new), _MLFLOW_PARAMS_PER_CALL):
                client.log_batch(run_id, params=new[start:start + _MLFLOW_PARAMS_PER_CALL])
            return cls(client, run_id, {"tracking_uri": uri, "given_uri": given, "run_id": run_id})
        return Opening(f"MLflow tracking store {uri}", "set tracking_uri", open_run)

    def log(self, values: dict[str, float], step: int, seconds: float) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415 -- mlflow is imported only when chosen

        self.client.log_batch(self.run_id, metrics=[
            Metric(mlflow_name(name), float(value), int(seconds * 1000), step) for name, value in values.items()])

    log_best = log

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def absolute_store_uri(uri: str) -> str:
    """The MLflow store `uri` with a relative local path made absolute (from the working directory), so that a
    resume started in another folder finds the same store: mlruns or file:./mlruns -> file:///.../mlruns,
    sqlite:///mlflow.db -> sqlite:////.../mlflow.db; servers ("databricks" too) and absolute paths are kept."""
    parsed = urllib.parse.urlsplit(uri)
    if not parsed.scheme and uri != "databricks":  # a path: MLflow's file store
        return uri if os.path.isabs(uri) else Path(os.path.abspath(uri)).as_uri()
    if parsed.scheme == "file" and not parsed.netloc and not parsed.path.startswith("/"):
        return Path(os.path.abspath(urllib.parse.unquote(parsed.path))).as_uri()
    prefix, separator, database = uri.partition(":///")
    if parsed.scheme.split("+")[0] == "sqlite" and separator and database[:1] not in ("", "/", ":"):
        return f"{prefix}:///{os.path.abspath(database)}"
    return uri


def mlflow_name(name: str) -> str:
    """A metric name MLflow accepts: e.g. val_iou/traffic light (red) -> val_iou/traffic light _red_."""
    return _NOT_IN_MLFLOW_NAMES.sub("_", name)


def _import(package: str, tracker: str) -> Any:
    """An optional backend's package, imported only when chosen; missing, it refuses the run in one line."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise errors.ParamsError(f'tracker "{tracker}" needs the {package} package ({error}): pip install '
                                 f'{package}, or set tracker to "tensorboard"') from None


def _check_database_driver(uri: str) -> None:
    """A database store (MLflow's default: sqlite:///mlflow.db) needs SQLAlchemy, which mlflow-skinny lacks."""
    if uri.split(":", 1)[0].split("+", 1)[0] not in ("sqlite", "postgresql", "mysql", "mssql"):
        return
    try:
        import sqlalchemy  # noqa: F401, PLC0415 -- only to learn whether it is there
    except ImportError:
        raise errors.ParamsError(f"MLflow tracking store {uri}: a database store needs the full mlflow package (pip "
                                 f"install mlflow; mlflow-skinny has no database support), or set tracking_uri to a "
                                 f"server (http://...)") from None


def _recorded_run(client: Any, record: dict[str, Any] | None, uri: str) -> str | None:
    """The MLflow run this folder's previous start created in the store `uri`, if it still exists there."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 -- mlflow is imported only when chosen

    if record is None or record.get("tracking_uri") != uri or not isinstance(record.get("run_id"), str):
        return None
    try:
        run = client.get_run(record["run_id"])
    except MlflowException:  # a run the store no longer has: a new MLflow run starts
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


# ----------------------------------------------------------------------------------------------- W&B

class WandbRun:
    """The W&B run mirroring one training run: created by the first start, continued (same id) by every resume."""

    NAME = "W&B"
    RUN_FILE = WANDB_RUN_FILE

    def __init__(self, run: Any, record: dict[str, str]) -> None:
        self.run, self.record = run, record

    @staticmethod
    def check(config: settings.TrainConfig) -> None:
        _import("wandb", config.tracker)

    @staticmethod
    def environment() -> dict[str, str]:
        return {}

    @staticmethod
    def errors() -> tuple[type[Exception], ...]:
        """What W&B raises for its server, its settings and its files."""
        import wandb  # noqa: PLC0415 -- wandb is imported only when chosen
        return wandb.Error, OSError

    @classmethod
    def opening(cls, model_dir: Path, config: settings.TrainConfig, params: dict[str, Any],
                record: dict[str, Any] | None) -> Opening:
        """A call that creates the run (project: $WANDB_PROJECT, else the run folder's parent's name; run name: the
        folder's; W&B's own files in <run folder>/wandb unless $WANDB_DIR) or resumes the one `record` names; every
        setting goes to its config, the current value of each."""
        wandb = _import("wandb", config.tracker)
        project = os.environ.get("WANDB_PROJECT") or _NOT_IN_WANDB_PROJECTS.sub(
            "_", model_dir.resolve().parent.name)[:_WANDB_PROJECT_LENGTH]
        run_id = record.get("run_id") if record and record.get("project") == project else None
        files = None if os.environ.get("WANDB_DIR") else model_dir

        def open_run() -> WandbRun:
            run = wandb.init(project=project, name=model_dir.name, id=run_id if isinstance(run_id, str) else None,
                             resume="allow", reinit="create_new", dir=files,
                             settings=wandb.Settings(console="off", finish_timeout=TIMEOUT_S,
                                                     init_timeout=TIMEOUT_S + 1))  # W&B's own, after ours
            run.define_metric(WANDB_STEP)
            run.define_metric("*", step_metric=WANDB_STEP)
            run.config.update(params, allow_val_change=True)
            return cls(run, {"project": project, "run_id": run.id})
        return Opening(f"W&B project {project}", "set WANDB_MODE=offline to log without the server", open_run)

    def log(self, values: dict[str, float], step: int, _seconds: float) -> None:
        self.run.log({WANDB_STEP: step, **values})

    def log_best(self, values: dict[str, float], _step: int, _seconds: float) -> None:
        self.run.summary.update(values)

    def end(self, status: str) -> None:
        if status == "KILLED":  # stopped, resumable: W&B shows it preempted
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


BACKENDS = {"mlflow": MlflowRun, "wandb": WandbRun}


def backends(tracker: str) -> list[Any]:
    """The backends a TrainConfig.tracker names beside TensorBoard, e.g. "tensorboard+mlflow+wandb"."""
    return [BACKENDS[name] for name in tracker.split("+")[1:]]


# ----------------------------------------------------------------------------------------------- helpers

def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None: no file, a broken one, or not a regular file (a FIFO, or a link to one,
    is opened without blocking and never read)."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return None
            record = json.loads(file.read(_RECORD_BYTES))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""Where a training run's scalars, pictures and settings go: TensorBoard event files in the run folder, always; and
an MLflow tracking store too when params.json's `tracker` is "tensorboard+mlflow" (mlflow is imported only then).

MLflow holds a copy: should its store fail in the middle of a run, one warning says so and training goes on, since
the run folder (TensorBoard events, metrics JSON, train.log) keeps everything.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.tensorboard import SummaryWriter

import utils

MLFLOW_TRACKER = utils.TRACKERS[1]  # the TrainConfig.tracker that adds MLflow
MLFLOW_RUN_FILE = "mlflow_run.json"  # in the run folder: the MLflow run that a resume continues
_NOT_IN_MLFLOW_NAMES = re.compile(r"[^\w\-. /]")  # MLflow's keys allow letters, digits, _ - . space and /
_MLFLOW_PARAMS_PER_CALL = 100  # MLflow's log_batch limit


def check_tracker(config: utils.TrainConfig) -> None:
    """Refuse, before the run starts, a tracker whose package (or database driver) is missing."""
    if config.tracker == MLFLOW_TRACKER:
        _check_database_driver(config.tracking_uri or _import_mlflow().get_tracking_uri())


@contextlib.contextmanager
def open_tracker(model_dir: Path, config: utils.TrainConfig, params: dict[str, Any]) -> Iterator[Tracker]:
    """The run's tracker, for the main process; the MLflow run (if any) ends FINISHED when the tracker was told
    that training finished, KILLED when the run stopped resumably, FAILED on an error."""
    mlflow_run = MlflowRun.open(model_dir, config.tracking_uri, params) if config.tracker == MLFLOW_TRACKER else None
    tracker = Tracker(SummaryWriter(model_dir), mlflow_run)
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
        if mlflow_run is not None:
            mlflow_run.end(status)


class Tracker:
    """Logs to TensorBoard and, if given, mirrors the scalars to an MLflow run."""

    def __init__(self, writer: SummaryWriter, mlflow_run: MlflowRun | None) -> None:
        self.writer, self.mlflow_run = writer, mlflow_run
        self.finished = False

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars named like 'train/loss' at iteration `step`."""
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        if self.mlflow_run is not None:
            self.mlflow_run.log_metrics(values, step)

    def pictures(self, prefix: str, pictures: list[torch.Tensor], step: int) -> None:
        """uint8 3×H×W pictures, to TensorBoard only (the run folder keeps the PNGs evaluate.py writes)."""
        for i, picture in enumerate(pictures):
            self.writer.add_image(f"{prefix}/{i}", picture, step)
        self.writer.flush()

    def finish(self, best_metrics_file: Path, step: int) -> None:
        """Training finished: the best validation's metrics (that JSON file, if it is there) go to MLflow as
        best/miou, best/epoch, ...; its run will end FINISHED."""
        if self.mlflow_run is not None and best_metrics_file.is_file():
            best = json.loads(best_metrics_file.read_text())
            self.mlflow_run.log_metrics({f"best/{key}": best[key] for key in (*utils.SCALAR_METRICS, "epoch")
                                         if best.get(key) is not None}, step)
        self.finished = True


class MlflowRun:
    """The MLflow run mirroring one training run: created by the first start, continued by every resume."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, model_dir: Path, tracking_uri: str, params: dict[str, Any]) -> MlflowRun:
        """Create the run (experiment: $MLFLOW_EXPERIMENT_NAME, else the run folder's parent's name; run name: the
        folder's) or continue the one this folder's previous start recorded; log the settings not logged yet."""
        mlflow = _import_mlflow()
        from mlflow.entities import Param  # noqa: PLC0415 -- mlflow is imported only when chosen
        from mlflow.exceptions import MlflowException  # noqa: PLC0415

        uri = tracking_uri or mlflow.get_tracking_uri()  # "": $MLFLOW_TRACKING_URI, else MLflow's default
        try:
            client = mlflow.MlflowClient(uri)
            run_id = _recorded_run(client, model_dir, uri)
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
        except (MlflowException, OSError, ImportError) as error:  # the store's errors, its connection's, its driver's
            raise utils.UserError(f"MLflow tracking store {uri}: {_first_line(error)} (set tracking_uri, or "
                                  f"tracker to \"tensorboard\")") from None
        utils.write_json(model_dir / MLFLOW_RUN_FILE, {"tracking_uri": uri, "run_id": run_id})
        return cls(client, run_id)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415 -- mlflow is imported only when chosen

        now = int(time.time() * 1000)
        self._call("log_batch", self.run_id, metrics=[
            Metric(mlflow_name(name), float(value), now, step) for name, value in values.items()])

    def end(self, status: str) -> None:
        self._call("set_terminated", self.run_id, status)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Call the client; after a failure, warn once and stop mirroring (the run folder has everything)."""
        if self.client is None:
            return
        try:
            getattr(self.client, method)(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 -- whatever the store's failure, it must not cost the training run
            logging.warning("MLflow: %s; logging to MLflow stops here, TensorBoard and the run folder keep "
                            "everything", _first_line(error))
            self.client = None


def mlflow_name(name: str) -> str:
    """A metric name MLflow accepts: e.g. val_iou/traffic light (red) -> val_iou/traffic light _red_."""
    return _NOT_IN_MLFLOW_NAMES.sub("_", name)


def _import_mlflow():
    try:
        import mlflow  # noqa: PLC0415 -- an optional dependency, imported only when chosen
    except ImportError as error:
        raise utils.ParamsError(f'tracker "{MLFLOW_TRACKER}" needs the mlflow package ({error}): pip install '
                                f'mlflow, or set tracker to "tensorboard"') from None
    return mlflow


def _check_database_driver(uri: str) -> None:
    """A database store (MLflow's default: sqlite:///mlflow.db) needs SQLAlchemy, which mlflow-skinny lacks."""
    if uri.split(":", 1)[0].split("+", 1)[0] not in ("sqlite", "postgresql", "mysql", "mssql"):
        return
    try:
        import sqlalchemy  # noqa: F401, PLC0415 -- only to learn whether it is there
    except ImportError:
        raise utils.ParamsError(f"MLflow tracking store {uri}: a database store needs the full mlflow package (pip "
                                f"install mlflow; mlflow-skinny has no database support), or set tracking_uri to a "
                                f"server (http://...)") from None


def _recorded_run(client: Any, model_dir: Path, uri: str) -> str | None:
    """The MLflow run this folder's previous start created in the store `uri`, if it still exists there."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 -- mlflow is imported only when chosen

    try:
        record = json.loads((model_dir / MLFLOW_RUN_FILE).read_text())
        if record["tracking_uri"] != uri:
            return None
        run = client.get_run(record["run_id"])
    except (OSError, ValueError, KeyError, TypeError, MlflowException):  # no record, a bad one, or a run the store
        return None  # no longer has: a new MLflow run starts
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

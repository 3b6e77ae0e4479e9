"""tracking.py: TensorBoard always; with `tracker: "tensorboard+mlflow"` an MLflow run (a file store in a temporary
folder: no network) holding the same scalars, every setting and the best metrics, continued by a resume; MLflow
imported only when chosen, and a failing store never costs the training run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tracking
import utils
from test_train import read_json, run_train, stop_after_first_step

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mlflow(tmp_path, monkeypatch) -> SimpleNamespace:
    """The mlflow package (.package) and a file store in tmp_path (.uri). A clone without mlflow skips, saying so;
    .ci/run installs it and sets GCN_REQUIRE_MLFLOW=1, and there a missing package fails."""
    try:
        import mlflow  # noqa: PLC0415 -- optional: the rest of the suite runs without it
    except ImportError:
        if os.environ.get("GCN_REQUIRE_MLFLOW") == "1":
            pytest.fail("GCN_REQUIRE_MLFLOW=1 but mlflow is not installed")
        pytest.skip("needs mlflow (pip install mlflow), an optional dependency")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for such uses
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return SimpleNamespace(package=mlflow, uri=(tmp_path / "mlruns").as_uri())


def mlflow_experiment(experiment, mlflow, name: str = "sweep/child", **overrides) -> Path:
    return experiment(name, tracker=tracking.MLFLOW_TRACKER, tracking_uri=mlflow.uri, **overrides)


def recorded_run(mlflow, model_dir: Path):
    client = mlflow.package.MlflowClient(mlflow.uri)
    return client, client.get_run(read_json(model_dir / tracking.MLFLOW_RUN_FILE)["run_id"])


def tensorboard_scalars(model_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(model_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_an_mlflow_run_holds_the_same_scalars_every_setting_and_the_best_metrics(experiment, mlflow):
    model_dir = mlflow_experiment(experiment, mlflow)
    assert run_train(model_dir) == 0
    client, run = recorded_run(mlflow, model_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "child"
    assert client.get_experiment(run.info.experiment_id).name == "sweep"  # the folder's parent: a sweep's name
    assert run.data.tags["model_dir"] == str(model_dir.resolve())

    scalars = tensorboard_scalars(model_dir)
    assert {"train/loss", "train/lr", "val/miou", "val_iou/disc"} <= set(scalars)
    best = read_json(model_dir / utils.METRICS_BEST)
    assert set(run.data.metrics) == set(scalars) | {f"best/{key}" for key in (*utils.SCALAR_METRICS, "epoch")
                                                    if best.get(key) is not None}
    for tag, points in scalars.items():
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)]
        assert [step for step, _ in history] == [step for step, _ in points], tag
        assert [value for _, value in history] == pytest.approx([value for _, value in points], rel=1e-6), tag
    assert run.data.metrics["best/miou"] == best["miou"] and run.data.metrics["best/epoch"] == best["epoch"]

    settings = read_json(model_dir / utils.RESOLVED_PARAMS_FILE)["params"]  # defaults filled in
    assert run.data.params == {key: value if isinstance(value, str) else json.dumps(value)
                               for key, value in settings.items()}


def test_a_resume_continues_the_mlflow_run_and_a_fresh_start_makes_a_new_one(experiment, mlflow, monkeypatch):
    model_dir = mlflow_experiment(experiment, mlflow)
    with monkeypatch.context() as patch:
        stop_after_first_step(patch)
        assert run_train(model_dir) == 128 + signal.SIGTERM
    client, stopped = recorded_run(mlflow, model_dir)
    assert stopped.info.status == "KILLED"  # resumable, not finished

    assert run_train(model_dir, "--restore_file", "last", "--set", "save_summary_steps=1") == 0  # a changed setting
    _, resumed = recorded_run(mlflow, model_dir)
    assert resumed.info.run_id == stopped.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.params["save_summary_steps"] == "2"  # MLflow's params are final: the first start's value
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")]
    assert steps == list(range(2, 9)), steps  # iteration 1 stopped before its first log; then every step

    assert run_train(model_dir, "--force") == 0
    _, fresh = recorded_run(mlflow, model_dir)
    assert fresh.info.run_id != stopped.info.run_id and fresh.info.status == "FINISHED"
    assert len(client.search_runs([fresh.info.experiment_id])) == 2


def test_a_store_that_fails_mid_run_warns_once_and_training_completes(experiment, mlflow, monkeypatch):
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    original = mlflow.package.MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), **kwargs):
        if metrics:
            raise MlflowException("the tracking server went away")
        return original(self, run_id, metrics=metrics, **kwargs)
    monkeypatch.setattr(mlflow.package.MlflowClient, "log_batch", log_batch)
    model_dir = mlflow_experiment(experiment, mlflow)
    assert run_train(model_dir) == 0
    assert (model_dir / utils.COMPLETE_MARKER).exists() and (model_dir / utils.BEST_CHECKPOINT).exists()
    log = (model_dir / utils.TRAIN_LOG).read_text()
    assert log.count("MLflow: the tracking server went away; logging to MLflow stops here") == 1, log
    assert tensorboard_scalars(model_dir)["train/loss"]  # TensorBoard kept everything


def test_a_store_that_cannot_be_opened_is_one_line_before_training(experiment, mlflow, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # MLflow 3 refuses its file store without it
    model_dir = mlflow_experiment(experiment, mlflow)
    assert run_train(model_dir) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: MLflow tracking store {mlflow.uri}: ") and "\n" not in error
    assert 'tracker to "tensorboard"' in error
    assert not (model_dir / utils.LAST_CHECKPOINT).exists()
    assert error.removeprefix("error: ") in (model_dir / utils.TRAIN_LOG).read_text()


def test_a_database_store_without_its_driver_is_one_line_naming_the_package(experiment, mlflow, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # as with mlflow-skinny: importing it raises ImportError
    model_dir = experiment(tracker=tracking.MLFLOW_TRACKER, tracking_uri="sqlite:///mlflow.db")
    assert run_train(model_dir) == 2
    assert capsys.readouterr().err == ("error: MLflow tracking store sqlite:///mlflow.db: a database store needs the "
                                       "full mlflow package (pip install mlflow; mlflow-skinny has no database "
                                       "support), or set tracking_uri to a server (http://...)\n")
    assert sorted(path.name for path in model_dir.iterdir()) == ["params.json"]  # refused before anything was written


def test_metric_names_become_names_mlflow_accepts(mlflow):
    from mlflow.exceptions import MlflowException  # noqa: PLC0415
    client = mlflow.package.MlflowClient(mlflow.uri)
    run_id = client.create_run(client.create_experiment("names")).info.run_id
    name = "val_iou/traffic light (red)"
    with pytest.raises(MlflowException):
        client.log_metric(run_id, name, 1.0)
    assert tracking.mlflow_name(name) == "val_iou/traffic light _red_"
    client.log_metric(run_id, tracking.mlflow_name("val_iou/Pedestrian-crossing.v2 ü"), 1.0)  # allowed as they are


def test_mlflow_is_imported_only_when_chosen_and_a_missing_package_is_one_line(experiment, monkeypatch, capsys):
    model_dir = experiment(num_iterations=1)
    program = ("import sys, train; code = train.cli(['--model_dir', sys.argv[1]]); "
               "sys.exit(code or 3 * ('mlflow' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", program, str(model_dir)], cwd=REPO).returncode == 0

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: importing it raises ImportError
    other = experiment("other", tracker=tracking.MLFLOW_TRACKER)
    assert run_train(other) == 2
    assert capsys.readouterr().err.startswith('error: tracker "tensorboard+mlflow" needs the mlflow package')
    assert sorted(path.name for path in other.iterdir()) == ["params.json"]  # refused before anything was written

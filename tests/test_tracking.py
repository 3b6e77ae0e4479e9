"""tracking.py: TensorBoard always; with `tracker: "tensorboard+mlflow"` an MLflow run (a file store in a temporary
folder, or a fake server on 127.0.0.1: no network) holding the same scalars, every setting and the best metrics,
continued by a resume; MLflow imported only when chosen, and a store that fails or hangs never costs the training run
nor delays its save."""
from __future__ import annotations

import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import settings
import tracking
import utils
from conftest import optional_package
from test_train import read_json, run_train, stop_after_first_step

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def mlflow(tmp_path, monkeypatch) -> SimpleNamespace:
    """The mlflow package (.package) and a file store in tmp_path (.uri). A clone without mlflow skips, saying so;
    .ci/run installs it and sets GCN_REQUIRE_MLFLOW=1, and there a missing package fails."""
    mlflow = optional_package("mlflow", "GCN_REQUIRE_MLFLOW")
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
    program = ("import sys, train; code = train.main(['--model_dir', sys.argv[1]]); "
               "sys.exit(code or 3 * ('mlflow' in sys.modules or 'wandb' in sys.modules))")  # W&B's too
    assert subprocess.run([sys.executable, "-c", program, str(model_dir)], cwd=REPO).returncode == 0

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: importing it raises ImportError
    other = experiment("other", tracker=tracking.MLFLOW_TRACKER)
    assert run_train(other) == 2
    assert capsys.readouterr().err.startswith('error: tracker "tensorboard+mlflow" needs the mlflow package')
    assert sorted(path.name for path in other.iterdir()) == ["params.json"]  # refused before anything was written


# ----------------------------------------------------------------------------------------------- a store that hangs

HANG_S = 120  # the longest a fake store keeps a request waiting; the test's end releases them sooner
FAKE_RUN = {"info": {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "run_name": "exp", "status": "RUNNING",
                     "start_time": 0, "artifact_uri": "", "lifecycle_stage": "active"}, "data": {}}
FAKE_ANSWERS = {"/api/2.0/mlflow/experiments/get-by-name": (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}),
                "/api/2.0/mlflow/experiments/create": (200, {"experiment_id": "1"}),
                "/api/2.0/mlflow/runs/create": (200, {"run": FAKE_RUN}),
                "/api/2.0/mlflow/runs/get": (200, {"run": FAKE_RUN})}
# train.py with tracking.TIMEOUT_S set to argv[1]
TRAIN_PY = "import sys, tracking, train; tracking.TIMEOUT_S = float(sys.argv[1]); sys.exit(train.main(sys.argv[2:]))"


class FakeStore(http.server.ThreadingHTTPServer):
    """An MLflow tracking server on 127.0.0.1, in a thread of the test. It answers what opening a run asks, but
    never a request whose path or body holds `hang_on` ("": every request), which waits until the test ends (at most
    HANG_S); `hung` counts those."""

    daemon_threads = True

    def __init__(self, hang_on: str) -> None:
        super().__init__(("127.0.0.1", 0), FakeStoreHandler)
        self.hang_on, self.hung, self.release = hang_on, 0, threading.Event()
        self.uri = f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for_hung_request(self, limit_s: float = 120) -> None:
        deadline = time.monotonic() + limit_s
        while not self.hung:
            assert time.monotonic() < deadline, "the run never called the store"
            time.sleep(0.05)


class FakeStoreHandler(http.server.BaseHTTPRequestHandler):
    def answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if self.server.hang_on in self.path + body:
            self.server.hung += 1
            self.server.release.wait(HANG_S)
            return
        status, answer = FAKE_ANSWERS.get(self.path.partition("?")[0], (200, {}))
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_store():
    """make(hang_on) -> a FakeStore serving until the test ends."""
    stores = []

    def make(hang_on: str) -> FakeStore:
        store = FakeStore(hang_on)
        threading.Thread(target=store.serve_forever, daemon=True).start()
        stores.append(store)
        return store
    yield make
    for store in stores:
        store.release.set()
        store.shutdown()
        store.server_close()


@pytest.fixture
def spawn():
    """spawn(model_dir, timeout_s, *args) -> train.py (tracking.TIMEOUT_S = timeout_s) in a process group of its
    own, as a cluster starts it; whatever is left of the group is killed when the test ends."""
    groups = []

    def start(model_dir: Path, timeout_s: float, *args: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", TRAIN_PY, str(timeout_s), "--model_dir", str(model_dir),
                                    *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        groups.append(process.pid)
        return process
    yield start
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_store_that_hangs_mid_run_never_holds_training_back(experiment, mlflow, fake_store, spawn, monkeypatch):
    store = fake_store(hang_on='"metrics"')  # answers the start, then never answers a metric
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")  # and MLflow's client waits for it the whole run
    model_dir = experiment(tracker=tracking.MLFLOW_TRACKER, tracking_uri=store.uri, num_iterations=8,
                           save_summary_steps=1)
    process = spawn(model_dir, 1)
    _, stderr = process.communicate(timeout=240)  # MLflow's own retries would hold the first log for 15 minutes
    assert process.returncode == 0, stderr[-3000:]
    assert store.hung == 1  # the run trained 8 steps and validated twice while the store held its first log
    assert read_json(model_dir / utils.COMPLETE_MARKER)["iterations"] == 8
    log = (model_dir / utils.TRAIN_LOG).read_text()
    assert log.count("WARNING") == 1 and ("MLflow: no answer within 1 s at the end of the run (its last values and "
                                          "status may be missing there); logging to MLflow stops here") in log, log


def test_a_stop_signal_saves_at_once_while_the_store_hangs(experiment, mlflow, fake_store, spawn, monkeypatch):
    store = fake_store(hang_on='"metrics"')
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")
    model_dir = experiment(tracker=tracking.MLFLOW_TRACKER, tracking_uri=store.uri, num_iterations=10_000,
                           val_every_epochs=10_000, save_summary_steps=1)
    process = spawn(model_dir, 3)
    store.wait_for_hung_request()
    last = model_dir / utils.LAST_CHECKPOINT
    deadline = time.monotonic() + 120
    while not last.exists():  # epoch 1 saved: training went on past the store's hung first log
        assert time.monotonic() < deadline and process.poll() is None, f"no epoch saved (exit {process.poll()})"
        time.sleep(0.05)
    saved = last.stat().st_mtime_ns
    os.killpg(process.pid, signal.SIGTERM)  # as Slurm or a pod stop does: the whole group
    signalled = time.monotonic()
    while last.stat().st_mtime_ns == saved:  # about a second; bounds for a loaded machine, far below the 120 s
        assert time.monotonic() - signalled < 30, "no save within 30 s of SIGTERM"  # MLflow would hold one call
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=60)  # TIMEOUT_S (3 s) for the store to catch up, then exit
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    progress = torch.load(last, weights_only=True)["progress"]
    assert progress["iteration"] > 4 and store.hung == 1  # the stop's save, past epoch 1's


def test_mlflow_requests_to_a_store_that_hangs_time_out_with_few_retries(mlflow, fake_store, monkeypatch):
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    store = fake_store(hang_on="")
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracking, "TIMEOUT_S", 1.0)
    with tracking._environment_defaults(tracking.MlflowRun.environment()):  # as open_tracker sets them
        run = tracking.MlflowRun(mlflow.package.MlflowClient(store.uri), "r1", {})
        with pytest.raises(MlflowException, match="Read timed out"):  # after 3 × 1 s and back-off, not 8 × 120 s
            run.log({"train/loss": 1.0}, 1, 0.0)
    assert store.hung == 1 + tracking.MLFLOW_HTTP_RETRIES
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # only for the run


def test_a_backend_that_falls_behind_never_makes_training_wait_and_is_dropped_with_one_warning(monkeypatch, caplog):
    release = threading.Event()
    monkeypatch.setattr(tracking, "BACKLOG", 3)
    mirror = tracking.Mirror(SimpleNamespace(NAME="Fake", log=lambda *args: release.wait(HANG_S)))  # never answers
    submitting = threading.Thread(target=lambda: [mirror.submit("log", {"train/loss": 1.0}, step, 0.0)
                                                  for step in range(10)], daemon=True)
    try:
        submitting.start()
        submitting.join(10)
        assert not submitting.is_alive(), "submit waited for the backend"
    finally:
        release.set()
    assert mirror.stopped
    assert [record.getMessage() for record in caplog.records] == [
        "Fake: 3 calls are waiting (the store stopped answering?); logging to Fake stops here, TensorBoard and the run "
        "folder keep everything"]


def test_http_retry_warnings_from_the_tracking_threads_stay_out_of_the_log(experiment, caplog):
    with tracking.open_tracker(experiment(), settings.TrainConfig(), {}):
        pass
    urllib3 = logging.getLogger(tracking.URLLIB3_LOGGER)
    for name in (f"{tracking.THREAD_PREFIX}MLflow", "a thread of the program's own"):
        warning = threading.Thread(target=urllib3.warning, args=("Retrying after a read time-out",), name=name)
        warning.start()
        warning.join()
    assert [record.threadName for record in caplog.records] == ["a thread of the program's own"]


def test_a_store_that_hangs_at_start_refuses_a_first_start_and_a_resume_goes_on(experiment, mlflow, fake_store,
                                                                                spawn, monkeypatch):
    store = fake_store(hang_on="")  # never answers
    model_dir = experiment(tracker=tracking.MLFLOW_TRACKER, tracking_uri=store.uri, num_iterations=2)
    process = spawn(model_dir, 1)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 2
    assert stderr == (f"error: MLflow tracking store {store.uri}: no answer within 1 s (set tracking_uri, or set "
                      f"tracker to \"tensorboard\")\n")
    assert not (model_dir / utils.LAST_CHECKPOINT).exists()

    resumed = experiment("resumed", num_iterations=2)
    with monkeypatch.context() as patch:
        stop_after_first_step(patch)
        assert run_train(resumed) == 128 + signal.SIGTERM
    utils.write_json(resumed / tracking.MLFLOW_RUN_FILE, {"tracking_uri": store.uri, "run_id": "r1"})
    process = spawn(resumed, 1, "--restore_file", "last", "--set", f"tracking_uri={store.uri}",
                    "--set", f"tracker={tracking.MLFLOW_TRACKER}")
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    log = (resumed / utils.TRAIN_LOG).read_text()
    assert log.count("WARNING") == 1 and (f"MLflow tracking store {store.uri}: no answer within 1 s; this resume goes "
                                          f"on without MLflow") in log, log


def test_a_stop_signal_ends_the_wait_for_a_store_at_once(experiment, mlflow, fake_store, spawn):
    store = fake_store(hang_on="")
    model_dir = experiment(tracker=tracking.MLFLOW_TRACKER, tracking_uri=store.uri, num_iterations=2)
    process = spawn(model_dir, 600)  # the store would be waited for 10 minutes
    store.wait_for_hung_request()
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert torch.load(model_dir / utils.LAST_CHECKPOINT, weights_only=True)["progress"]["iteration"] == 1
    assert "MLflow: a stop signal arrived while opening" in (model_dir / utils.TRAIN_LOG).read_text()


def test_a_fifo_at_the_run_record_never_holds_a_resume(experiment, mlflow, monkeypatch, spawn, tmp_path):
    model_dir = mlflow_experiment(experiment, mlflow, num_iterations=2)
    with monkeypatch.context() as patch:
        stop_after_first_step(patch)
        assert run_train(model_dir) == 128 + signal.SIGTERM
    _, stopped = recorded_run(mlflow, model_dir)
    record = model_dir / tracking.MLFLOW_RUN_FILE
    fifo = tmp_path / "planted_fifo"
    os.mkfifo(fifo)
    record.unlink()
    record.symlink_to(fifo)  # opening a FIFO to read waits for a writer: for ever
    process = spawn(model_dir, 10, "--restore_file", "last")
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    assert record.is_file() and not record.is_symlink() and fifo.is_fifo()  # replaced, not written through
    _, resumed = recorded_run(mlflow, model_dir)
    assert resumed.info.run_id != stopped.info.run_id  # the record was unreadable: a new MLflow run


def test_only_a_regular_file_holding_a_json_object_is_a_run_record(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    (tmp_path / "folder").mkdir()
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "record.json").write_text('{"run_id": "r1"}')
    for name in ("fifo", "link", "folder", "list.json", "broken.json", "missing.json"):
        assert read_record_in_time(tmp_path / name) is None, name
    assert read_record_in_time(tmp_path / "record.json") == {"run_id": "r1"}


def read_record_in_time(path: Path) -> dict | None:
    """tracking.read_record(path), which must return within 10 s (a thread, so that a blocking read fails the test)."""
    result = []
    reader = threading.Thread(target=lambda: result.append(tracking.read_record(path)), daemon=True)
    reader.start()
    reader.join(10)
    assert result, f"reading {path.name} blocked"
    return result[0]


def test_the_run_record_names_its_store_absolutely_and_a_resume_from_elsewhere_continues_there(
        experiment, mlflow, monkeypatch, tmp_path):
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    first.mkdir()
    elsewhere.mkdir()
    model_dir = experiment(tracker=tracking.MLFLOW_TRACKER, tracking_uri="file:./mlruns", num_iterations=2)
    monkeypatch.chdir(first)
    with monkeypatch.context() as patch:
        stop_after_first_step(patch)
        assert run_train(model_dir) == 128 + signal.SIGTERM
    record = read_json(model_dir / tracking.MLFLOW_RUN_FILE)
    assert record["tracking_uri"] == (first / "mlruns").as_uri()

    monkeypatch.chdir(elsewhere)
    assert run_train(model_dir, "--restore_file", "last") == 0
    assert read_json(model_dir / tracking.MLFLOW_RUN_FILE) == record
    run = mlflow.package.MlflowClient(record["tracking_uri"]).get_run(record["run_id"])
    assert run.info.status == "FINISHED" and "best/miou" in run.data.metrics
    assert not (elsewhere / "mlruns").exists()


def test_store_uris_with_a_relative_path_become_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    here = tmp_path.as_uri()
    for given, absolute in (("mlruns", f"{here}/mlruns"), ("file:./mlruns", f"{here}/mlruns"),
                            ("file:mlruns", f"{here}/mlruns"), ("sqlite:///mlflow.db", f"sqlite:///{tmp_path}/mlflow.db"),
                            ("/srv/mlruns", "/srv/mlruns"), ("file:///srv/mlruns", "file:///srv/mlruns"),
                            ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"),
                            ("sqlite:///:memory:", "sqlite:///:memory:"), ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
                            ("databricks", "databricks")):
        assert tracking.absolute_store_uri(given) == absolute, given

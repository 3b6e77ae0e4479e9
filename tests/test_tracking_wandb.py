"""tracking.py with `tracker: "tensorboard+wandb"`: a W&B run (offline, read back from the files W&B wrote in the run
folder; or a fake server on 127.0.0.1 that never answers) holding the same scalars, every setting and the best
metrics, continued by a resume; W&B imported only when chosen, and a backend that fails or hangs never costs the
training run."""
from __future__ import annotations

import json
import signal
import struct
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

import tracking
import utils
from conftest import optional_package
from test_tracking import fake_store, mlflow, spawn, tensorboard_scalars  # noqa: F401 -- fixtures used here
from test_train import read_json, run_train, stop_after_first_step

WANDB_LOG_BLOCK = 32768  # W&B's run-*.wandb files: LevelDB-style log records in 32 KiB blocks
WANDB_LOG_HEADER = b":W&B\xe1\xbe\x00"


@pytest.fixture
def wandb(tmp_path, monkeypatch) -> Iterator[SimpleNamespace]:
    """The wandb package (.package), offline, its own files in tmp_path. A clone without wandb skips, saying so;
    .ci/run installs it and sets GCN_REQUIRE_WANDB=1, and there a missing package fails."""
    wandb = optional_package("wandb", "GCN_REQUIRE_WANDB")
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME",
                 "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name))
    yield SimpleNamespace(package=wandb)
    wandb.teardown()  # W&B keeps its settings (the mode too) and its service process until then


@dataclass
class OfflineRun:
    """What one W&B process wrote into an offline run's run-<id>.wandb file."""

    run_id: str = ""
    project: str = ""
    name: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    preempting: bool = False
    exit_code: int | None = None


def offline_runs(model_dir: Path) -> list[OfflineRun]:
    """Every offline W&B run written in the run folder, oldest first."""
    from wandb.proto import wandb_internal_pb2  # noqa: PLC0415 -- wandb is optional

    runs = []
    for path in sorted((model_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run = OfflineRun()
        for data in wandb_records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.run_id, run.project, run.name = record.run.run_id, record.run.project, record.run.display_name
                run.config.update(items(record.run.config.update))
            elif kind == "config":
                run.config.update(items(record.config.update))
            elif kind == "history":
                run.history.append(items(record.history.item))
            elif kind == "summary":
                run.summary.update(items(record.summary.update))
            elif kind == "preempting":
                run.preempting = True
            elif kind == "exit":
                run.exit_code = record.exit.exit_code
        runs.append(run)
    return runs


def wandb_records(data: bytes):
    """The records of a W&B transaction log: a header, then chunks (crc32, length, type: 1 whole, 2 first,
    3 middle, 4 last) that never cross a 32 KiB block; a block's tail too short for a chunk header is padding."""
    assert data.startswith(WANDB_LOG_HEADER)
    position, parts = len(WANDB_LOG_HEADER), b""
    while position + 7 <= len(data):
        left = WANDB_LOG_BLOCK - position % WANDB_LOG_BLOCK
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:
            position += left
            continue
        parts += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            yield parts
            parts = b""


def items(updates) -> dict:
    """W&B's key/value_json items -> {key: value}; nested keys joined with '/'."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates}


def wandb_experiment(experiment, name: str = "sweep/child", **overrides) -> Path:
    return experiment(name, tracker=tracking.WANDB_TRACKER, **overrides)


def test_a_wandb_run_holds_the_same_scalars_every_setting_and_the_best_metrics(experiment, wandb):
    model_dir = wandb_experiment(experiment)
    assert run_train(model_dir) == 0
    [run] = offline_runs(model_dir)
    assert read_json(model_dir / tracking.WANDB_RUN_FILE) == {"project": "sweep", "run_id": run.run_id}
    assert (run.project, run.name, run.exit_code, run.preempting) == ("sweep", "child", 0, False)

    settings = read_json(model_dir / utils.RESOLVED_PARAMS_FILE)["params"]  # defaults filled in
    assert {key: value for key, value in run.config.items() if key != "_wandb"} == settings

    scalars = tensorboard_scalars(model_dir)
    assert {"train/loss", "train/lr", "val/miou", "val_iou/disc"} <= set(scalars)
    for tag, points in scalars.items():
        logged = [(row[tracking.WANDB_STEP], row[tag]) for row in run.history if tag in row]
        assert [step for step, _ in logged] == [step for step, _ in points], tag
        assert [value for _, value in logged] == pytest.approx([value for _, value in points], rel=1e-6), tag
    logged_names = set().union(*(row.keys() for row in run.history)) - {"_step", "_runtime", "_timestamp"}
    assert logged_names == set(scalars) | {tracking.WANDB_STEP}  # nothing else

    best = read_json(model_dir / utils.METRICS_BEST)
    assert {key: value for key, value in run.summary.items() if key.startswith("best/")} == {
        f"best/{key}": best[key] for key in (*utils.SCALAR_METRICS, "epoch") if best.get(key) is not None}


def test_a_resume_continues_the_wandb_run_and_a_fresh_start_makes_a_new_one(experiment, wandb, monkeypatch):
    model_dir = wandb_experiment(experiment, num_iterations=4)
    with monkeypatch.context() as patch:
        stop_after_first_step(patch)
        assert run_train(model_dir) == 128 + signal.SIGTERM
    [stopped] = offline_runs(model_dir)
    assert stopped.preempting and stopped.exit_code != 0  # resumable, not finished

    assert run_train(model_dir, "--restore_file", "last", "--set", "save_summary_steps=1") == 0
    _, resumed = offline_runs(model_dir)
    assert resumed.run_id == stopped.run_id and (resumed.exit_code, resumed.preempting) == (0, False)
    assert resumed.config["save_summary_steps"] == 1  # W&B's config holds the settings the run goes on with
    steps = [row[tracking.WANDB_STEP] for row in resumed.history if "train/loss" in row]
    assert steps == [2, 3, 4], steps  # the resume logs from the checkpoint's iteration on, every step

    assert run_train(model_dir, "--force") == 0
    fresh = offline_runs(model_dir)[-1]
    assert fresh.run_id != stopped.run_id and fresh.exit_code == 0
    assert read_json(model_dir / tracking.WANDB_RUN_FILE)["run_id"] == fresh.run_id


def test_a_wandb_backend_that_fails_or_hangs_never_costs_the_run(experiment, wandb, monkeypatch):
    from wandb.sdk.wandb_run import Run  # noqa: PLC0415 -- wandb is optional

    def fail(self, values, *args, **kwargs):
        raise wandb.package.Error("the W&B service went away")
    monkeypatch.setattr(Run, "log", fail)
    model_dir = wandb_experiment(experiment, "failing", num_iterations=2)
    assert run_train(model_dir) == 0
    log = (model_dir / utils.TRAIN_LOG).read_text()
    assert log.count("W&B: the W&B service went away; logging to W&B stops here") == 1, log

    release = threading.Event()
    monkeypatch.setattr(Run, "log", lambda self, values, *args, **kwargs: release.wait(120))
    monkeypatch.setattr(tracking, "TIMEOUT_S", 1.0)
    model_dir = wandb_experiment(experiment, "hanging", num_iterations=2)
    try:
        assert run_train(model_dir) == 0  # trained, validated and saved while the first log hung
    finally:
        release.set()
    assert (model_dir / utils.COMPLETE_MARKER).exists()
    log = (model_dir / utils.TRAIN_LOG).read_text()
    assert log.count("WARNING") == 1 and "W&B: no answer within 1 s at the end of the run" in log, log


def test_a_wandb_server_that_hangs_at_start_refuses_a_first_start(experiment, wandb, fake_store, spawn,  # noqa: F811
                                                                  monkeypatch):
    store = fake_store(hang_on="")  # never answers
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", store.uri)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    model_dir = wandb_experiment(experiment, num_iterations=2)
    process = spawn(model_dir, 2)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 2, stderr[-3000:]
    assert stderr == ("error: W&B project sweep: no answer within 2 s (set WANDB_MODE=offline to log without the "
                      "server, or set tracker to \"tensorboard\")\n"), stderr[-3000:]
    assert not (model_dir / utils.LAST_CHECKPOINT).exists()


def test_with_both_backends_a_refusal_by_wandb_ends_the_mlflow_run_it_opened(experiment, wandb, mlflow,  # noqa: F811
                                                                             monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")  # and no API key: W&B refuses at once
    model_dir = experiment(tracker="tensorboard+mlflow+wandb", tracking_uri=mlflow.uri)
    assert run_train(model_dir) == 2
    assert capsys.readouterr().err.startswith(f"error: W&B project {model_dir.parent.name}: ")
    record = read_json(model_dir / tracking.MLFLOW_RUN_FILE)
    assert mlflow.package.MlflowClient(mlflow.uri).get_run(record["run_id"]).info.status == "FAILED"  # not RUNNING
    assert not (model_dir / utils.LAST_CHECKPOINT).exists()


def test_a_missing_wandb_package_is_one_line_before_the_run(experiment, monkeypatch, capsys):
    # (imported only when chosen: tests/test_tracking.py's import test checks wandb too)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importing it raises ImportError
    other = wandb_experiment(experiment, "other")
    assert run_train(other) == 2
    assert capsys.readouterr().err.startswith('error: tracker "tensorboard+wandb" needs the wandb package')
    assert sorted(path.name for path in other.iterdir()) == ["params.json"]  # refused before anything was written

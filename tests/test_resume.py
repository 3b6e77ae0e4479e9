"""Never lose a run, as users run it: a stop signal to the whole process group (with DataLoader workers) at any
moment, SIGKILL in the middle of a save, a second writer, and a cluster job requeued. Each case resumes and must end
with weights bitwise equal to an uninterrupted run's (CPU) and the same metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

# Runs train.py with one function wrapped so that its N-th call first does something drastic ("write:NAME" counts
# only the atomic writes of the file NAME).
STRIKE = """
import os, signal, subprocess, sys
import checkpoints, evaluate, train, utils
where, when, action = sys.argv[1], int(sys.argv[2]), sys.argv[3]
module, name = {"step": (train, "synchronise"), "validation": (evaluate, "predict_logits"),
                "save": (checkpoints, "save_checkpoint"), "write": (utils, "atomic_write")}[where.split(":")[0]]
original, calls = getattr(module, name), []

def strike(*args, **kwargs):
    counted = ":" not in where or args[0].name == where.split(":")[1]
    calls.append(counted)
    if counted and sum(calls) == when:
        if action == "kill_after":  # SIGKILL right after the call (a write: the file is in place) returns
            original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "kill":  # SIGKILL half-way through a write: the temporary file is written, never renamed
            path, write = args
            with open(path.with_name(f".{path.name}.tmp"), "wb") as f:
                write(f)
            os.kill(os.getpid(), signal.SIGKILL)
        # From another process, as a terminal, Slurm or a pod stop signals the whole group, workers included
        subprocess.run(["kill", "-s", action.removeprefix("SIG"), "--", f"-{os.getpgrp()}"], start_new_session=True)
    return original(*args, **kwargs)

setattr(module, name, strike)
sys.exit(train.main(sys.argv[4:]))
"""


def train_py(model_dir: Path, *extra: str, strike: tuple[str, int, str] | None = None,
             ignored: tuple[signal.Signals, ...] = ()) -> subprocess.CompletedProcess:
    """train.py in its own process group (so that a signal to the group reaches only it and its workers), with the
    stop signals at their defaults but `ignored` (SIGHUP: started under nohup)."""
    from conftest import child_signals  # noqa: PLC0415 -- conftest is importable once pytest has loaded it
    command = [sys.executable, "-c", STRIKE, *map(str, strike)] if strike else [sys.executable, "train.py"]
    return subprocess.run([*command, "--model_dir", str(model_dir), *extra], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300, start_new_session=True, preexec_fn=child_signals(*ignored))


def final_state(model_dir: Path) -> tuple[dict, dict, dict]:
    return (torch.load(model_dir / utils.LAST_CHECKPOINT, weights_only=True)["state_dict"],
            json.loads((model_dir / utils.METRICS_LAST).read_text()),
            json.loads((model_dir / utils.METRICS_BEST).read_text()))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[tuple[int, int], tuple[dict, dict, dict]]:
    """The reference runs by (workers, epochs)."""
    references = {}
    for workers, epochs in ((0, 2), (2, 2), (0, 1)):
        model_dir = tmp_path_factory.mktemp(f"reference{workers}_{epochs}")
        (model_dir / "params.json").write_text(json.dumps({**TINY_PARAMS(), "num_workers": workers,
                                                           "num_epochs": epochs}))
        result = train_py(model_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        references[workers, epochs] = final_state(model_dir)
    return references


def TINY_PARAMS() -> dict:  # noqa: N802 -- the conftest constant, read where fixtures cannot reach
    from conftest import TINY  # noqa: PLC0415 -- conftest is importable once pytest has loaded it
    return TINY


def assert_same_run(model_dir: Path, reference: tuple[dict, dict, dict]) -> None:
    weights, last, best = final_state(model_dir)
    assert weights.keys() == reference[0].keys()
    different = [k for k in weights if not torch.equal(weights[k], reference[0][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert (last, best) == reference[1:]
    assert not list(model_dir.glob(".*.tmp")), "a temporary file outlived the resumed run"


# A signal during step N's synchronise() is seen after step N + 1 (4 steps per epoch, 8 in all).
@pytest.mark.parametrize("where,when,sig,workers", [
    ("step", 3, "SIGTERM", 2),        # seen on the last step of epoch 1, as Slurm/scancel/a pod stop signal the group
    ("step", 4, "SIGINT", 0),         # Ctrl-C, seen on the first step of epoch 2
    ("validation", 2, "SIGTERM", 2),  # during validation (the epoch is already saved)
    ("save", 1, "SIGINT", 0),         # while the end-of-epoch checkpoint is being written
    ("step", 7, "SIGTERM", 0),        # seen on the very last step: the final epoch must still be validated
    ("step", 2, "SIGHUP", 0),         # the terminal closed (or a sweep forwarding its hang-up), mid-epoch
])
def test_a_stop_signal_to_the_process_group_saves_and_the_resumed_run_is_identical(
        experiment, uninterrupted, where, when, sig, workers):
    model_dir = experiment(num_workers=workers)
    stopped = train_py(model_dir, strike=(where, when, sig))
    assert stopped.returncode == 128 + getattr(signal, sig), stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "resume with --restore_file last" in stopped.stderr
    assert not (model_dir / utils.COMPLETE_MARKER).exists()
    resumed = train_py(model_dir, "--restore_file", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(model_dir, uninterrupted[workers, 2])


def test_a_run_started_under_nohup_ignores_sighup_and_completes(experiment, uninterrupted):
    """nohup's contract: a hang-up (the terminal closing) never stops the run, which ends as an uninterrupted one."""
    model_dir = experiment()
    result = train_py(model_dir, strike=("step", 2, "SIGHUP"), ignored=(signal.SIGHUP,))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model_dir / utils.COMPLETE_MARKER).exists() and "Stopped by signal" not in result.stderr
    assert_same_run(model_dir, uninterrupted[0, 2])


@pytest.mark.parametrize("name,when", [
    (utils.LAST_CHECKPOINT, 1),  # the trained epoch, before validation
    (utils.BEST_CHECKPOINT, 1),  # the new best, which the (validated) last.pth.tar must not know of yet
    (utils.METRICS_BEST, 1),
    (utils.METRICS_LAST, 1),
    (utils.LAST_CHECKPOINT, 2),  # the validated epoch
    (utils.COMPLETE_MARKER, 1),
])
def test_sigkill_in_the_middle_of_any_save_resumes_to_a_complete_run(experiment, uninterrupted, name, when):
    model_dir = experiment(num_epochs=1)
    killed = train_py(model_dir, strike=(f"write:{name}", when, "kill"))
    assert killed.returncode == -signal.SIGKILL
    assert list(model_dir.glob(".*.tmp"))  # the half-written file is there
    resumed = train_py(model_dir, "--restore_file", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (model_dir / utils.BEST_CHECKPOINT).exists() and (model_dir / utils.COMPLETE_MARKER).exists()
    assert_same_run(model_dir, uninterrupted[0, 1])


def test_sigkill_as_a_best_weights_run_ends_never_keeps_its_last_checkpoint(experiment):
    """keep_checkpoints best_weights: a kill between train_complete.json and the deletion of last.pth.tar leaves
    both; the next start of the same requeued command finds the run complete and deletes last.pth.tar."""
    model_dir = experiment(num_epochs=1, keep_checkpoints="best_weights")
    killed = train_py(model_dir, "--restore_file", "auto", strike=(f"write:{utils.COMPLETE_MARKER}", 1, "kill_after"))
    assert killed.returncode == -signal.SIGKILL
    assert (model_dir / utils.COMPLETE_MARKER).exists() and (model_dir / utils.LAST_CHECKPOINT).exists()
    again = train_py(model_dir, "--restore_file", "auto")
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-3000:]
    assert not (model_dir / utils.LAST_CHECKPOINT).exists() and (model_dir / utils.BEST_CHECKPOINT).exists()
    assert sorted(p.name for p in model_dir.iterdir() if p.name.startswith(".")) == [utils.LOCK_FILE]


@pytest.mark.parametrize("start", ["fresh", "resumed"])
def test_a_run_another_writer_completes_while_this_one_starts_is_never_deleted(experiment, monkeypatch, capsys,
                                                                               start):
    """--restore_file auto decides (afresh, resume, nothing to do) before it holds the folder; the folder is checked
    again under the lock, so a run that another writer completed in between is refused, untouched."""
    import train  # noqa: PLC0415 -- in this process: the other writer is simulated between decision and lock
    from test_train import stop_after_first_step  # noqa: PLC0415

    model_dir = experiment(num_iterations=2, keep_checkpoints="best_weights")
    if start == "resumed":
        with monkeypatch.context() as patch:
            stop_after_first_step(patch)
            assert train.main(["--model_dir", str(model_dir)]) == 128 + signal.SIGTERM
    finished = (utils.BEST_CHECKPOINT, utils.METRICS_BEST, utils.METRICS_LAST, utils.COMPLETE_MARKER)
    real = train.build_data

    def another_writer_completes_the_run(*args):
        built = real(*args)
        with utils.RunLock(model_dir):
            for name in finished:
                (model_dir / name).write_text("the other writer's")
            (model_dir / utils.LAST_CHECKPOINT).unlink(missing_ok=True)  # keep_checkpoints: best_weights
        return built

    monkeypatch.setattr(train, "build_data", another_writer_completes_the_run)
    assert train.main(["--model_dir", str(model_dir), "--restore_file", "auto"]) == 2
    assert "changed while this run was starting" in capsys.readouterr().err
    assert all((model_dir / name).read_text() == "the other writer's" for name in finished)
    assert not (model_dir / utils.LAST_CHECKPOINT).exists()


def test_restore_auto_is_the_one_requeue_command(experiment):
    """A cluster job requeued after pre-emption runs the same command every time: fresh, resumed or finished."""
    model_dir = experiment(num_epochs=1)
    stopped = train_py(model_dir, "--restore_file", "auto", strike=("step", 2, "SIGTERM"))
    assert stopped.returncode == 128 + signal.SIGTERM
    resumed = train_py(model_dir, "--restore_file", "auto")
    assert resumed.returncode == 0 and "Resumed from last" in resumed.stderr
    again = train_py(model_dir, "--restore_file", "auto")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_a_second_writer_is_refused_naming_the_holder(experiment):
    model_dir = experiment()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, utils, pathlib\n"
                               "with utils.RunLock(pathlib.Path(sys.argv[1])):\n"
                               "    print('locked', flush=True); time.sleep(60)", str(model_dir)],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = train_py(model_dir)
        assert second.returncode == 2
        assert f"{model_dir} is in use by pid {holder.pid}" in second.stderr
        assert sorted(os.listdir(model_dir)) == [utils.LOCK_FILE, "params.json"]
    finally:
        holder.kill()
        holder.wait()
    assert train_py(model_dir, "--set", "num_iterations=1").returncode == 0  # a dead holder frees the folder


def test_frozen_bn_resumes_bitwise_and_keeps_the_pretrained_statistics(experiment, tmp_path):
    """A pretrained file whose batch-norm statistics and affine parameters are not the init's: with frozen_bn they
    leave training untouched, a stopped and resumed run ends bitwise equal to an uninterrupted one, and the run
    record and checkpoint name the file and its sha256."""
    import hashlib  # noqa: PLC0415
    import torchvision  # noqa: PLC0415
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for key, value in state.items():
        if "bn" in key or "downsample.1" in key:
            value.copy_(torch.rand_like(value.float()) + 0.5 if "var" in key or "weight" in key else
                        0.1 * torch.randn_like(value.float()) if value.is_floating_point() else value + 7)
    weights = tmp_path / "resnet18.pth"
    torch.save(state, weights)
    runs = {}
    for name in ("uninterrupted", "resumed"):
        runs[name] = experiment(name, num_epochs=1, pretrained=str(weights), frozen_bn=True)
    assert train_py(runs["uninterrupted"]).returncode == 0
    stopped = train_py(runs["resumed"], strike=("step", 2, "SIGTERM"))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    resumed = train_py(runs["resumed"], "--restore_file", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(runs["resumed"], final_state(runs["uninterrupted"]))
    checkpoint = torch.load(runs["resumed"] / utils.LAST_CHECKPOINT, weights_only=True)
    record = {"file": str(weights.resolve()), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert checkpoint["pretrained_weights"] == record
    assert json.loads((runs["resumed"] / utils.RESOLVED_PARAMS_FILE).read_text())["pretrained_weights"] == record
    norms = {k: v for k, v in state.items() if "bn" in k or "downsample.1" in k}
    trained = {k.replace("backbone.", "").replace("stem.1", "bn1"): v for k, v in checkpoint["state_dict"].items()}
    trained = {k.replace("stem.0", "conv1"): v for k, v in trained.items()}
    assert all(torch.equal(trained[k], v) for k, v in norms.items())
    assert not torch.equal(trained["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])

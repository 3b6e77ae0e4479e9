"""search_hyperparams.py against a stub train.py honouring the contract, the ablation folders, and one
integration sweep with the real train.py on the demo (synthetic) experiment."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import search_hyperparams as sh
from conftest import TINY, child_signals
import synthesize_results as sr

REPO = Path(__file__).resolve().parents[1]

# A train.py stand-in following the contract: exit 0/1/2, train.log, last.pth.tar, metrics JSON and
# train_complete.json; refuses a fresh run over last.pth.tar. Every call appends one JSON line (its folder,
# argv and CUDA_VISIBLE_DEVICES) to <parent>/invocations.jsonl. Behaviour is chosen by the params key "stub":
#   "ok" (default)    train and complete; mIoU = 0.5 + learning_rate
#   "fail"            log a line, print a traceback to stderr, exit 1
#   "crash_once"      without --restore_file: write last.pth.tar and exit 1 (killed mid-run); resumed: complete
#   "rendezvous"      wait (<= 20 s) until two children have started, then complete
#   "wait_signal"     announce itself, then wait for SIGINT/SIGTERM/SIGHUP: record it, save last.pth.tar, exit 1
STUB_TRAIN = textwrap.dedent('''
    import argparse, json, os, signal, sys, time
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--data_dir")
    parser.add_argument("--restore_file")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    run = Path(args.model_dir)
    with open(run.parent / "invocations.jsonl", "a") as f:
        f.write(json.dumps({"run": run.name, "argv": sys.argv[1:],
                            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
    params = json.loads((run / "params.json").read_text())
    if (run / "last.pth.tar").exists() and args.restore_file is None and not args.force:
        print(f"error: {run / 'last.pth.tar'} exists; pass --restore_file last or --force", file=sys.stderr)
        sys.exit(2)
    log = open(run / "train.log", "a")
    log.write("epoch 1/1\\n")
    log.flush()
    behaviour = params.get("stub", "ok")
    if behaviour == "fail":
        print("Traceback (most recent call last):\\nRuntimeError: forced failure in stub", file=sys.stderr)
        sys.exit(1)
    if behaviour == "crash_once" and args.restore_file is None:
        (run / "last.pth.tar").write_text("checkpoint")
        sys.exit(1)
    if behaviour == "rendezvous":
        (run.parent / f"started_{run.name}").touch()
        deadline = time.time() + 20
        while len(list(run.parent.glob("started_*"))) < 2:
            if time.time() > deadline:
                print("rendezvous timed out: children did not run at the same time", file=sys.stderr)
                sys.exit(1)
            time.sleep(0.05)
    if behaviour == "wait_signal":
        def on_term(signum, frame):
            (run / "got_signal").write_text(str(signum))
            (run / "last.pth.tar").write_text("checkpoint")
            sys.exit(1)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, on_term)
        (run.parent / "waiting").write_text(str(os.getpid()))
        time.sleep(60)
        sys.exit(3)
    miou = 0.5 + float(params.get("learning_rate", 0.0))
    metrics = {"miou": miou, "pixel_accuracy": 0.9, "mean_accuracy": 0.6, "fw_iou": 0.8, "loss": 1.0 - miou,
               "per_class_iou": {"a": miou}, "boundary_accuracy": 0.7, "interior_accuracy": 0.95, "epoch": 1}
    (run / "last.pth.tar").write_text("checkpoint")
    (run / "best.pth.tar").write_text("checkpoint")
    for name in ("metrics_val_last_weights.json", "metrics_val_best_weights.json"):
        (run / name).write_text(json.dumps(metrics))
    (run / "train_complete.json").write_text(json.dumps(
        {"epochs": 1, "iterations": 10, "best_miou": miou, "wall_time_s": 0.1}))
    print("training done")
''')


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    path = tmp_path / "stub_train.py"
    path.write_text(STUB_TRAIN)
    return path


def make_parent(tmp_path: Path, params: dict, search: object | None = None) -> Path:
    parent = tmp_path / "sweep"
    parent.mkdir()
    (parent / "params.json").write_text(json.dumps(params))
    if search is not None:
        (parent / "search.json").write_text(json.dumps(search))
    return parent


def invocations(parent: Path) -> list[dict]:
    path = parent / "invocations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def child_params(parent: Path, name: str) -> dict:
    return json.loads((parent / name / "params.json").read_text())


# ----------------------------------------------------------------------------- sweep runs (stub train.py)

def test_two_learning_rates_train_then_rerun_skips(tmp_path, stub, capsys):
    parent = make_parent(tmp_path, {"learning_rate": 0.1, "num_epochs": 3}, {"learning_rate": [0.01, 0.001]})
    data_dir = tmp_path / "my data"
    assert sh.main(["--parent_dir", str(parent), "--data_dir", str(data_dir)], train_script=stub, spec=None) == 0

    names = ["learning_rate_0.01", "learning_rate_0.001"]
    calls = invocations(parent)
    assert sorted(c["run"] for c in calls) == sorted(names)
    for call in calls:
        assert call["argv"] == ["--model_dir", str(parent / call["run"]), "--data_dir", str(data_dir)]
    lean = {"keep_checkpoints": "best_weights"}  # a sweep's default
    assert child_params(parent, "learning_rate_0.01") == {**lean, "learning_rate": 0.01, "num_epochs": 3}
    assert child_params(parent, "learning_rate_0.001") == {**lean, "learning_rate": 0.001, "num_epochs": 3}
    for name in names:
        assert (parent / name / "train_complete.json").exists()
        assert "training done" in (parent / name / "stdout.log").read_text()

    capsys.readouterr()
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 0
    assert len(invocations(parent)) == 2, "finished children must not be trained again"
    out = capsys.readouterr().out
    assert out.count("already complete, skipped") == 2
    assert "2 skipped" in out


def test_a_terminal_shows_the_runs_done_and_left(tmp_path, stub, capsys, terminal):
    parent = make_parent(tmp_path, {"learning_rate": 0.01}, {"stub": ["ok", "fail", "ok2"]})
    screen = terminal()
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 1
    drawn = screen.getvalue()
    assert "sweep:   0%|          | 0/3 [" in drawn and "| 3/3 [" in drawn and "2 trained, 1 failed" in drawn
    assert "stub_ok2: trained" in capsys.readouterr().out  # each child's line stays, above the bar


def test_children_are_ignored_by_git_and_the_parent_is_not(tmp_path, stub):
    repo = tmp_path / "repo"
    (repo / "experiments").mkdir(parents=True)
    (repo / ".gitignore").write_text((REPO / ".gitignore").read_text())
    parent = make_parent(repo / "experiments", {"learning_rate": 0.1}, {"learning_rate": [0.01]})
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 0
    assert (parent / "learning_rate_0.01" / "params.json").exists()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout
    assert sorted(line[3:] for line in status.splitlines()) == [
        ".gitignore", "experiments/sweep/params.json", "experiments/sweep/search.json"]


def test_failing_child_is_reported_and_others_finish(tmp_path, stub, capsys):
    parent = make_parent(tmp_path, {"learning_rate": 0.01}, {"stub": ["fail", "ok"]})
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 1

    assert (parent / "stub_ok" / "train_complete.json").exists()
    assert not (parent / "stub_fail" / "train_complete.json").exists()
    captured = capsys.readouterr()
    assert f"FAILED: {parent / 'stub_fail'}" in captured.err
    assert "RuntimeError: forced failure in stub" in captured.err
    assert "exit status 1" in captured.err
    assert "stub_ok" not in captured.err
    assert "1 trained, 1 failed" in captured.out


def test_interrupted_child_is_resumed_with_restore_file_last(tmp_path, stub):
    parent = make_parent(tmp_path, {"learning_rate": 0.01}, {"stub": ["crash_once"]})
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 1
    assert (parent / "stub_crash_once" / "last.pth.tar").exists()

    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 0
    calls = invocations(parent)
    assert [c["argv"][2:] for c in calls] == [[], ["--restore_file", "last"]]
    assert (parent / "stub_crash_once" / "train_complete.json").exists()
    log = (parent / "stub_crash_once" / "stdout.log").read_text()
    assert log.count("=== search_hyperparams") == 2, "re-runs append to stdout.log"


def test_shell_metacharacters_are_passed_literally(tmp_path, stub):
    nasty = ["; touch PWNED", "it's \"quoted\" $(touch PWNED2) `touch PWNED3`", "a b | touch PWNED4", "../../escape"]
    parent = make_parent(tmp_path, {"learning_rate": 0.01})
    options = ["--param", "note=" + ",".join(nasty)]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a shell would have run `touch` here
    try:
        assert sh.main(["--parent_dir", str(parent), *options], train_script=stub, spec=None) == 0
    finally:
        os.chdir(cwd)

    assert not list(tmp_path.rglob("PWNED*"))
    children = sorted(p for p in parent.iterdir() if p.is_dir())
    assert len(children) == 4
    assert all(child.parent == parent for child in children)
    assert sorted(child_params(parent, c.name)["note"] for c in children) == sorted(nasty)
    for child in children:
        assert set(child.name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")
        assert (child / "train_complete.json").exists()


def test_gpus_run_children_at_once_each_on_one_gpu(tmp_path, stub):
    parent = make_parent(tmp_path, {"learning_rate": 0.01, "stub": "rendezvous"}, {"learning_rate": [0.01, 0.02]})
    assert sh.main(["--parent_dir", str(parent), "--gpus", "3,5"], train_script=stub, spec=None) == 0
    assert sorted(c["cuda"] for c in invocations(parent)) == ["3", "5"]


def test_without_gpus_the_environment_is_left_alone(tmp_path, stub, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    parent = make_parent(tmp_path, {"learning_rate": 0.01}, {"learning_rate": [0.01, 0.02]})
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 0
    assert [c["cuda"] for c in invocations(parent)] == ["7", "7"]


def test_default_sweep_is_learning_rate_around_the_parents(tmp_path, stub):
    parent = make_parent(tmp_path, {"learning_rate": 0.01})
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 0
    expected = ["learning_rate_0.001", "learning_rate_0.003", "learning_rate_0.01", "learning_rate_0.03"]
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == sorted(expected)
    assert child_params(parent, "learning_rate_0.003") == {"keep_checkpoints": "best_weights", "learning_rate": 0.003}


def test_param_option_adds_to_every_search_grid(tmp_path, stub):
    search = [{"head": ["1x1"], "kernel_size": [1]}, {"head": ["gcn"], "kernel_size": [3, 5]}]
    parent = make_parent(tmp_path, {"learning_rate": 0.01, "head": "gcn", "kernel_size": 15}, search)
    argv = ["--parent_dir", str(parent), "--param", "learning_rate=1e-3", "--param", "kernel_size=7"]
    assert sh.main(argv, train_script=stub, spec=None) == 0
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == [
        "head_1x1__kernel_size_7__learning_rate_0.001", "head_gcn__kernel_size_7__learning_rate_0.001"]


def test_changed_parent_params_do_not_overwrite_a_trained_child(tmp_path, stub, capsys):
    parent = make_parent(tmp_path, {"learning_rate": 0.01, "num_epochs": 1}, {"learning_rate": [0.01]})
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 0
    (parent / "params.json").write_text(json.dumps({"learning_rate": 0.01, "num_epochs": 5}))

    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 1
    assert child_params(parent, "learning_rate_0.01")["num_epochs"] == 1
    assert len(invocations(parent)) == 1
    assert "differs from the sweep's settings in num_epochs" in capsys.readouterr().err


def test_a_trained_child_takes_a_change_that_train_py_allows_on_resume(tmp_path, stub, capsys):
    parent = make_parent(tmp_path, {"learning_rate": 0.01, "num_workers": 0}, {"stub": ["crash_once", "ok"]})
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 1  # stub_crash_once stopped
    (parent / "params.json").write_text(json.dumps({"learning_rate": 0.01, "num_workers": 2}))
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 0, capsys.readouterr().err
    assert child_params(parent, "stub_crash_once")["num_workers"] == 2  # resumed with it, as train.py allows
    assert child_params(parent, "stub_ok")["num_workers"] == 2  # complete: skipped, its record up to date
    assert invocations(parent)[-1]["argv"][-2:] == ["--restore_file", "last"] and len(invocations(parent)) == 3


def signal_sweep(parent: Path, stub: Path, signals: list[signal.Signals], prelude: str = "pass") -> tuple[int, bytes]:
    """Run a sweep in a subprocess (after `prelude`), send it `signals` once its first child waits; (status, stderr)."""
    code = (f"import signal, sys; from pathlib import Path; import search_hyperparams as sh; {prelude}; "
            f"sys.exit(sh.main(['--parent_dir', {str(parent)!r}], train_script=Path({str(stub)!r}), spec=None))")
    sweep = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=child_signals())
    try:
        deadline = time.time() + 60
        while not (parent / "waiting").exists():
            assert time.time() < deadline and sweep.poll() is None, "the first child never started"
            time.sleep(0.05)
        for signum in signals:
            sweep.send_signal(signum)
            time.sleep(0.5)
        _, err = sweep.communicate(timeout=30)
    finally:
        if sweep.poll() is None:
            sweep.kill()
        if (parent / "waiting").exists() and not list(parent.glob("*/got_signal")):  # an orphan, still sleeping
            with contextlib.suppress(ProcessLookupError):
                os.kill(int((parent / "waiting").read_text()), signal.SIGKILL)
    return sweep.returncode, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_is_forwarded_and_no_new_child_starts(tmp_path, stub, signum):
    parent = make_parent(tmp_path, {"learning_rate": 0.01}, {"stub": ["wait_signal", "ok"]})
    code, err = signal_sweep(parent, stub, [signum])

    assert code == 128 + signum, err.decode()
    assert (parent / "stub_wait_signal" / "got_signal").read_text() == str(int(signum))
    assert (parent / "stub_wait_signal" / "last.pth.tar").exists()
    assert not (parent / "stub_ok" / "stdout.log").exists()
    assert [c["run"] for c in invocations(parent)] == ["stub_wait_signal"]
    assert f"{signum.name} received".encode() in err


def test_an_ignored_sighup_stays_ignored_under_nohup(tmp_path, stub):
    parent = make_parent(tmp_path, {"learning_rate": 0.01}, {"stub": ["wait_signal"]})
    nohup = "signal.signal(signal.SIGHUP, signal.SIG_IGN)"
    code, err = signal_sweep(parent, stub, [signal.SIGHUP, signal.SIGTERM], nohup)

    assert code == 128 + signal.SIGTERM, err.decode()
    assert (parent / "stub_wait_signal" / "got_signal").read_text() == str(int(signal.SIGTERM))
    assert b"SIGHUP" not in err


# ----------------------------------------------------------------------------- sweep definition

@pytest.mark.parametrize("option, expected", [
    ("learning_rate=1e-3,1e-2", ("learning_rate", [0.001, 0.01])),
    ("head=gcn,conv", ("head", ["gcn", "conv"])),
    ("boundary_refine=true,false", ("boundary_refine", [True, False])),
    ("scale_range=[0.5,2.0],[0.75,1.5]", ("scale_range", [[0.5, 2.0], [0.75, 1.5]])),
    ('note="a,b","c"', ("note", ["a,b", "c"])),
    ('note="a,b",c', ("note", ['"a', 'b"', "c"])),  # not all JSON: every comma splits
    ("note=NaN,x y", ("note", ["NaN", "x y"])),
    ("stack_channels=null,210", ("stack_channels", [None, 210])),
])
def test_parse_param_option(option, expected):
    assert sh.parse_param_option(option) == expected


@pytest.mark.parametrize("combination, name", [
    ({"learning_rate": 0.01}, "learning_rate_0.01"),
    ({"learning_rate": 1e-05}, "learning_rate_1e-05"),
    ({"head": "conv", "kernel_size": 7}, "head_conv__kernel_size_7"),
    ({"boundary_refine": False}, "boundary_refine_false"),
    ({"scale_range": [0.5, 2.0]}, "scale_range_0.5-2.0"),
    ({"loss": "cross_entropy+dice", "class_weights": None}, "loss_cross_entropy+dice__class_weights_null"),
])
def test_child_name_is_readable(combination, name):
    assert sh.child_name(combination) == name


def test_child_name_sanitises_and_keeps_distinct_values_apart():
    names = {sh.child_name({"note": v}) for v in ["a b", "a;b", "a/b", "a_b", "../..", "x" * 500]}
    assert len(names) == 6
    for name in names:
        assert "/" not in name and " " not in name and ";" not in name and len(name) <= sh.MAX_NAME_LENGTH + 9
    assert sh.child_name({"note": "a_b"}) == "note_a_b"
    assert sh.child_name({"note": "a b"}).startswith("note_a_b-")


@pytest.mark.parametrize("search, message", [
    ("{broken", "is not valid JSON"),
    (json.dumps({"learning_rate": 0.1}), "'learning_rate' must map to a non-empty list"),
    (json.dumps({"learning_rate": []}), "'learning_rate' must map to a non-empty list"),
    (json.dumps({"bad key": [1]}), "'bad key' is not a params.json key name"),
    (json.dumps({"kernel_size": [3, 3]}), "defines 'kernel_size_3' twice"),
    (json.dumps([]), "the list of grids is empty"),
    (json.dumps([{"kernel_size": [3]}, {"kernel_size": [3, 5]}]), "defines 'kernel_size_3' twice"),
    ('{"seed": ' + "[" * 5000 + "]" * 5000 + "}", "search.json: lists or objects nested deeper than 32 levels"),
    (json.dumps({key: list(range(100)) for key in ("seed", "batch_size", "num_epochs", "synthetic_seed")}),
     "defines 100000000 runs, more than 10000"),
])
def test_bad_search_json_is_one_clear_error(tmp_path, stub, capsys, search, message):
    parent = tmp_path / "sweep"
    parent.mkdir()
    (parent / "params.json").write_text(json.dumps({"learning_rate": 0.01}))
    (parent / "search.json").write_text(search)
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not invocations(parent)


@pytest.mark.parametrize("argv, message", [
    (["--param", "learning_rate"], "expected key=value"),
    (["--param", "lr=1", "--param", "lr=2"], "--param lr given more than once"),
    (["--gpus", "0,a"], "expected distinct GPU indices"),
    (["--gpus", "1,1"], "expected distinct GPU indices"),
    (["--param", "seed=" + "[" * 5000 + "]" * 5000], "--param seed: lists or objects nested deeper than 32 levels"),
])
def test_bad_command_line_is_one_clear_error(tmp_path, stub, capsys, argv, message):
    parent = make_parent(tmp_path, {"learning_rate": 0.01})
    assert sh.main(["--parent_dir", str(parent), *argv], train_script=stub, spec=None) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, search, message", [
    (["--param", "learnig_rate=0.1,0.2"], None,
     "sweeps 'learnig_rate', which is not a params.json key (did you mean 'learning_rate'?)"),
    ([], {"kernel_sise": [3, 5]}, "sweeps 'kernel_sise', which is not a params.json key (did you mean 'kernel_size'?)"),
    (["--param", "kernel_size=3,4"], None, "sweep child kernel_size_4: 'kernel_size' is 4; expected an odd integer"),
    (["--param", "head=gcn,gnc"], None, "sweep child head_gnc: 'head' is \"gnc\"; expected one of"),
])
def test_sweep_keys_and_values_are_checked_before_any_folder_exists(tmp_path, stub, capsys, argv, search, message):
    parent = make_parent(tmp_path, TINY, search)
    before = sorted(os.listdir(parent))
    assert sh.main(["--parent_dir", str(parent), *argv], train_script=stub) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert sorted(os.listdir(parent)) == before and not invocations(parent)


def test_a_bad_parent_params_json_is_named(tmp_path, stub, capsys):
    parent = make_parent(tmp_path, {**TINY, "momentum": 1.5})
    assert sh.main(["--parent_dir", str(parent), "--param", "seed=1,2"], train_script=stub) == 2
    assert f"error: {parent / 'params.json'}: 'momentum' is 1.5" in capsys.readouterr().err
    assert sorted(os.listdir(parent)) == ["params.json"]


def test_missing_parent_params_and_no_learning_rate(tmp_path, stub, capsys):
    assert sh.main(["--parent_dir", str(tmp_path / "nowhere")], train_script=stub, spec=None) == 2
    assert f"{tmp_path / 'nowhere' / 'params.json'} does not exist" in capsys.readouterr().err
    parent = make_parent(tmp_path, {"num_epochs": 1})
    assert sh.main(["--parent_dir", str(parent)], train_script=stub, spec=None) == 2
    assert "has no positive 'learning_rate'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the paper's ablations

ABLATIONS = REPO / "experiments" / "ablations"
EXPECTED_RUNS = {  # folder prefix -> child folders (one per row of the paper's table)
    "table1_kernel_size": ["head_1x1__kernel_size_1"] + [f"head_gcn__kernel_size_{k}" for k in range(3, 16, 2)],
    "table2_gcn_vs_conv": [f"head_{h}__kernel_size_{k}" for h in ("gcn", "conv") for k in (3, 5, 7, 9)],
    "table3_stack": [f"kernel_size_{k}" for k in (3, 5, 7, 9, 11)],
    "table4_stack_channels": [f"stack_channels_{m}" for m in (2048, 1024, 210)],
    "table5_boundary_refine": ["head_1x1__kernel_size_1__boundary_refine_false",
                               "head_gcn__kernel_size_15__boundary_refine_false",
                               "head_gcn__kernel_size_15__boundary_refine_true"],
}
ABLATION_KEYS = {"head", "kernel_size", "boundary_refine", "stack_channels"}


@pytest.mark.parametrize("table", sorted(EXPECTED_RUNS))
@pytest.mark.parametrize("suffix, backbone", [("r152", "resnet152"), ("r50", "resnet50")])
def test_ablation_sweeps_define_the_paper_rows(table, suffix, backbone):
    parent = ABLATIONS / f"{table}_{suffix}"
    params = sh.load_json(parent / "params.json")
    grids = sh.load_grids(parent, [], params)
    children = sh.plan_children(parent, params, grids)
    assert [c.directory.name for c in children] == EXPECTED_RUNS[table]
    assert params["backbone"] == backbone
    assert {k for g in grids for k in g} <= ABLATION_KEYS
    assert len({json.dumps(c.params, sort_keys=True) for c in children}) == len(children)


def test_ablation_parents_share_one_recipe_with_the_base_model():
    """Each ablation is experiments/base_model's recipe with only the backbone and the ablation switches changed."""
    base = sh.load_json(REPO / "experiments" / "base_model" / "params.json")
    for params_path in sorted(ABLATIONS.glob("*/params.json")):
        params = sh.load_json(params_path)
        differing = {k for k in base.keys() | params.keys() if base.get(k) != params.get(k)}
        assert differing <= ABLATION_KEYS | {"backbone"}, f"{params_path} differs from base_model in {differing}"


# ----------------------------------------------------------------------------- integration (real train.py)

def test_real_train_py_demo_sweep_and_synthesis(tmp_path, capsys):
    """Integration: two learning rates on experiments/demo (synthetic data, CPU, 1 epoch) through the real train.py."""
    parent = tmp_path / "demo_sweep"
    parent.mkdir()
    (parent / "params.json").write_text((REPO / "experiments" / "demo" / "params.json").read_text())
    (parent / "search.json").write_text(json.dumps({"learning_rate": [0.01, 0.003], "num_epochs": [1],
                                                    "synthetic_train_images": [16], "synthetic_val_images": [4]}))
    assert sh.main(["--parent_dir", str(parent)]) == 0, capsys.readouterr().err
    children = sorted(p for p in parent.iterdir() if p.is_dir())
    assert len(children) == 2
    for child in children:
        assert json.loads((child / "train_complete.json").read_text())["epochs"] == 1
        assert (child / "train.log").stat().st_size > 0
        assert not (child / "last.pth.tar").exists()  # lean by default: best weights only
        assert "optimizer" not in torch.load(child / "best.pth.tar", weights_only=True)

    assert sh.main(["--parent_dir", str(parent)]) == 0
    assert "2 skipped" in capsys.readouterr().out

    assert sr.main(["--parent_dir", str(parent)]) == 0
    rows = [line for line in (parent / "results.md").read_text().splitlines() if line.startswith("| learning_rate")]
    assert len(rows) == 2
    assert (parent / "results.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

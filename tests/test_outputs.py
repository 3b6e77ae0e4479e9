"""Every file every entry point writes (train, evaluate, predict, export, search_hyperparams, synthesize_results), each
against a link, a FIFO and a folder planted at its name: a link's target is untouched and the file replaces the link,
nothing hangs, a folder is one line naming it and stays as it was. The table below is checked against what each
entry point actually writes, so that a new output cannot escape it."""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from PIL import Image

import errors
import evaluate
import export
import predict
import search_hyperparams
import synthesize_results
import train
import utils
from conftest import TINY
from test_predict import write_checkpoint
from test_search import STUB_TRAIN
from test_synthesize import metrics, write_run

ATOMIC, APPEND = "written whole", "appended to"  # through utils.atomic_write / utils.open_append
# entry point -> its output files (relative to its folder) and how each is written
OUTPUTS: dict[str, dict[str, str]] = {
    "train": {utils.RESOLVED_PARAMS_FILE: ATOMIC, utils.TRAIN_LOG: APPEND, utils.LAST_CHECKPOINT: ATOMIC,
              utils.BEST_CHECKPOINT: ATOMIC, utils.METRICS_LAST: ATOMIC, utils.METRICS_BEST: ATOMIC,
              utils.COMPLETE_MARKER: ATOMIC},
    "evaluate": {"metrics_val_best.json": ATOMIC, "confusion_val_best.png": ATOMIC, utils.EVALUATE_LOG: APPEND,
                 "predictions/synthetic_val_00000.png": ATOMIC,
                 "predictions/pictures/synthetic_val_00000.png": ATOMIC},
    "predict": {"out/labels/a.png": ATOMIC, "out/overlays/a.png": ATOMIC},
    "export-weights": {"w.pth": ATOMIC, "w.pth.sha256": ATOMIC},
    "export-onnx": {"best.onnx": ATOMIC},
    "search_hyperparams": {"learning_rate_0.01/params.json": ATOMIC, "learning_rate_0.01/.gitignore": ATOMIC,
                           "learning_rate_0.01/stdout.log": APPEND},
    "synthesize_results": {"results.md": ATOMIC, "results.png": ATOMIC},
}
# What else appears in the folders: the inputs, TensorBoard's event files (tracking.py), the lock, and what the sweep's
# stand-in for train.py writes.
NOT_OUTPUTS = ("params.json", "events.out.tfevents.*", utils.LOCK_FILE, "*/train.log", "*/*.pth.tar",
               "*/metrics_val_*.json", f"*/{utils.COMPLETE_MARKER}", "invocations.jsonl", "hparams/*")


@dataclass
class Case:
    """An entry point ready to run in `root`: run(plant) calls plant() when the planted things should be there."""

    root: Path
    run: Callable[[Callable[[], None]], int]


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory) -> Path:
    """A trained TINY experiment (one iteration) whose checkpoint the evaluate cases share."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "params.json").write_text(json.dumps({**TINY, "num_iterations": 1, "synthetic_val_images": 1}))
    assert train.main(["--model_dir", str(folder)]) == 0
    return folder


def prepare(entry: str, root: Path, trained: Path, monkeypatch) -> Case:
    """The inputs of `entry` in `root`, and how to run it there."""
    if entry == "train":
        root.mkdir()
        (root / "params.json").write_text(json.dumps({**TINY, "num_iterations": 1, "synthetic_val_images": 1}))
        real_claim = train.claim_run_folder

        def run(plant):
            @contextlib.contextmanager
            def claim_then_plant(*args, **kwargs):  # planted once the run holds its folder, as a rival would
                with real_claim(*args, **kwargs):
                    plant()
                    yield
            monkeypatch.setattr(train, "claim_run_folder", claim_then_plant)
            return train.main(["--model_dir", str(root), "--force"])
        return Case(root, run)
    if entry == "evaluate":
        root.mkdir()
        shutil.copy(trained / "params.json", root)
        os.link(trained / utils.BEST_CHECKPOINT, root / utils.BEST_CHECKPOINT)
        return Case(root, lambda plant: plant() or evaluate.main(
            ["--model_dir", str(root), "--save_predictions", str(root / "predictions"), "--num_pictures", "1"]))
    if entry == "predict":
        (root / "in").mkdir(parents=True)
        write_checkpoint(root / utils.BEST_CHECKPOINT)
        Image.new("RGB", (20, 16), (90, 20, 200)).save(root / "in" / "a.png")
        return Case(root, lambda plant: plant() or predict.main(
            [str(root / "in"), "--out", str(root / "out"), "--model_dir", str(root)]))
    if entry == "export-weights":
        root.mkdir()
        write_checkpoint(root / utils.BEST_CHECKPOINT)
        return Case(root, lambda plant: plant() or export.main(
            ["--model_dir", str(root), "--format", "weights", "--out", str(root / "w.pth")]))
    if entry == "export-onnx":  # a one-layer network: its file goes through export.py's path, in a fraction of the time
        root.mkdir()
        monkeypatch.setattr(export, "load_trained_model", lambda path: SimpleNamespace(
            path=path, checkpoint={}, class_names=["a", "b"], palette=[(0, 0, 0), (9, 9, 9)], net=OneLayer()))
        return Case(root, lambda plant: plant() or export.main(["--model_dir", str(root), "--format", "onnx"]))
    if entry == "search_hyperparams":
        root.mkdir()
        (root / "params.json").write_text(json.dumps({"learning_rate": 0.01}))
        (root / "search.json").write_text(json.dumps({"learning_rate": [0.01]}))
        (root.parent / "stub_train.py").write_text(STUB_TRAIN)
        return Case(root, lambda plant: plant() or search_hyperparams.main(
            ["--parent_dir", str(root)], train_script=root.parent / "stub_train.py", spec=None))
    assert entry == "synthesize_results"
    for name, miou in (("a", 0.5), ("b", 0.6)):
        write_run(root, name, {"learning_rate": miou}, metrics(miou))
    return Case(root, lambda plant: plant() or synthesize_results.main(["--parent_dir", str(root)]))


class OneLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
        self.config = SimpleNamespace(num_classes=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def plant_everywhere(kind: str, root: Path, outputs: dict[str, str], victims: Path) -> Callable[[], None]:
    """plant(): a link to a precious file of its own (or a FIFO) at every output name, and at each temporary name."""
    def plant() -> None:
        for name, how in outputs.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            for target in (path, temporary(path)) if how == ATOMIC else (path,):
                target.unlink(missing_ok=True)
                if kind == "link":
                    victim = victims / target.relative_to(root).as_posix().replace("/", "__")
                    victim.write_text("precious")
                    target.symlink_to(victim)
                else:
                    os.mkfifo(target)
    return plant


def written(root: Path, before: set[Path]) -> set[str]:
    """The files below root that were not there before, less those that are not outputs."""
    new = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir() and p not in before}
    return {n for n in new if not any(fnmatch.fnmatch(n, pattern) for pattern in NOT_OUTPUTS)}


@pytest.mark.parametrize("kind", ["link", "fifo"])
@pytest.mark.parametrize("entry", OUTPUTS)
def test_no_entry_point_writes_through_a_planted_link_or_blocks_on_a_fifo(entry, kind, tmp_path, trained_folder,
                                                                          monkeypatch, no_hang):
    case = prepare(entry, tmp_path / "root", trained_folder, monkeypatch)
    victims = tmp_path / "victims"
    victims.mkdir()
    before = set(case.root.rglob("*"))
    assert case.run(plant_everywhere(kind, case.root, OUTPUTS[entry], victims)) == 0
    for name in OUTPUTS[entry]:
        path = case.root / name
        assert path.is_file() and not path.is_symlink() and path.stat().st_size > 0, name
        assert not os.path.lexists(temporary(path)), name
    assert all(victim.read_text() == "precious" for victim in victims.iterdir())
    assert written(case.root, before) == set(OUTPUTS[entry])  # the table names every file written


FOLDER_CASES = [(entry, name) for entry, outputs in OUTPUTS.items() for name in outputs]


@pytest.mark.parametrize("entry,name", FOLDER_CASES)
def test_a_folder_at_any_output_name_is_one_line_and_kept(entry, name, tmp_path, trained_folder, monkeypatch,
                                                          capsys, no_hang):
    case = prepare(entry, tmp_path / "root", trained_folder, monkeypatch)
    folder = case.root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kept").write_text("precious")
    status = case.run(lambda: None)
    err = capsys.readouterr().err
    last = err.rstrip().splitlines()[-1]
    refusal = f"{folder}: a folder is in the way; remove or rename it"
    if entry == "export-weights" and name == "w.pth":
        refusal = f"--out {folder} is a folder; give a file name"  # checked with the other options
    assert "Traceback" not in err and refusal in last, err[-2000:]
    assert status == (1 if entry == "search_hyperparams" else 2)  # a sweep reports a failed child and goes on
    assert (folder / "kept").read_text() == "precious" and sorted(os.listdir(folder)) == ["kept"]


@pytest.mark.parametrize("kind", ["link", "fifo", "folder"])
def test_the_lock_file_planted_as_anything_else_is_refused_in_one_line(kind, tmp_path, capsys, no_hang):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "params.json").write_text(json.dumps({**TINY, "num_iterations": 1}))
    victim = tmp_path / "victim"
    victim.write_text("precious")
    lock = model_dir / utils.LOCK_FILE
    {"link": lambda: lock.symlink_to(victim), "fifo": lambda: os.mkfifo(lock), "folder": lock.mkdir}[kind]()
    assert train.main(["--model_dir", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot lock {model_dir}: ") and err.count("\n") == 1
    assert victim.read_text() == "precious" and sorted(os.listdir(model_dir)) == [utils.LOCK_FILE, "params.json"]


def test_the_hparams_folder_planted_as_a_link_or_fifo_is_replaced(tmp_path, capsys, no_hang):
    for kind in ("link", "fifo"):
        parent = tmp_path / kind
        write_run(parent, "a", {"learning_rate": 0.1}, metrics(0.5))
        elsewhere = tmp_path / f"elsewhere_{kind}"
        (elsewhere / "keep").mkdir(parents=True)
        hparams = parent / synthesize_results.HPARAMS_DIR
        hparams.symlink_to(elsewhere) if kind == "link" else os.mkfifo(hparams)
        assert synthesize_results.main(["--parent_dir", str(parent)]) == 0, capsys.readouterr().err
        assert hparams.is_dir() and not hparams.is_symlink() and list(hparams.rglob("events.out.tfevents.*"))
        assert sorted(os.listdir(elsewhere)) == ["keep"]


def test_a_log_opened_for_appending_replaces_a_link_or_fifo_and_refuses_a_folder(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for kind in ("link", "fifo", "file"):
        log = tmp_path / f"{kind}.log"
        {"link": lambda: log.symlink_to(victim), "fifo": lambda: os.mkfifo(log),
         "file": lambda: log.write_text("before\n")}[kind]()
        with utils.open_append(log) as f:
            f.write("after\n")
        assert not log.is_symlink() and log.read_text() == ("before\nafter\n" if kind == "file" else "after\n")
    assert victim.read_text() == "precious"
    (tmp_path / "folder.log").mkdir()
    with pytest.raises(errors.UserError, match=r"folder\.log: a folder is in the way"):
        utils.open_append(tmp_path / "folder.log")

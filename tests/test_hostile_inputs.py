"""Hostile or broken inputs (issue 20): outputs never collide, never land outside their folder and never follow a
planted link; split-list ids, FIFOs, bad checkpoints, dead workers and Ctrl-C at start-up are one line."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import errors
import evaluate
import export
import hubconf
import predict
import train
import utils
from data import build_voc_aug
from model.data_loader import DataConfig, build_dataset
from model.datasets.base import DatasetError, read_image, read_list
from model.datasets.camvid import CamVidSegmentation
from model.datasets.synthetic import SyntheticSegmentation
from model.datasets.voc import VOCSegmentation
from model.net import GCN, CheckpointMismatchError, GCNConfig
from model.transforms import eval_transform
from test_download import ArchiveServer, download
from test_predict import write_checkpoint


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def image(path: Path, size=(20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)
    return path


# ------------------------------------------------------------------ item 1: predict's output names


def test_predict_refuses_output_names_that_would_collide_before_writing(tmp_path, capsys):
    write_checkpoint(tmp_path / "best.pth.tar")
    for name in ("x.jpg", "x.png", "x.jpg.png"):
        image(tmp_path / "in" / name)
    out = tmp_path / "out"
    assert predict.main([str(tmp_path / "in"), "--out", str(out), "--model_dir", str(tmp_path)]) == 2
    assert "would both be written as x.jpg.png" in one_line_error(capsys)
    assert not out.exists()


# ------------------------------------------------------------------ item 2: split-list ids


@pytest.mark.parametrize("bad_id", ["../../../../x/pic", "/etc/passwd", "a/../../b"])
def test_a_split_list_id_outside_the_data_set_is_refused_naming_list_line_and_id(tmp_path, bad_id):
    lists = tmp_path / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text(f"2007_000001\n\n{bad_id}\n")
    with pytest.raises(DatasetError) as info:
        VOCSegmentation(tmp_path, "val", eval_transform())
    assert str(info.value).startswith(f"{lists / 'val.txt'}, line 3: id {bad_id!r} is not a name inside")
    assert read_list(lists / "val.txt", ids=False)[-1] == bad_id  # CamVid's absolute paths are checked elsewhere


def test_a_camvid_path_climbing_out_of_data_dir_is_refused(tmp_path):
    (tmp_path / "val.txt").write_text("/SegNet/CamVid/../x.png /SegNet/CamVid/valannot/x.png\n")
    with pytest.raises(DatasetError, match=r"does not name a file inside"):
        CamVidSegmentation(tmp_path, "val", eval_transform())


def test_evaluate_never_writes_a_prediction_outside_its_folder(tmp_path):
    with pytest.raises(DatasetError, match="would be written outside"):
        evaluate.prediction_path(tmp_path, "folder", "../../x/pic")
    assert evaluate.prediction_path(tmp_path, "folder", "city/frame") == tmp_path / "city" / "frame.png"


def test_build_voc_aug_refuses_an_id_outside_the_data_set(tmp_path):
    (tmp_path / "train.txt").write_text("2008_000002\n../../../x/pic\n")
    with pytest.raises(build_voc_aug.BuildError, match=r"train\.txt, line 2: id '\.\./\.\./\.\./x/pic'"):
        build_voc_aug.read_ids(tmp_path / "train.txt")


# ------------------------------------------------------------------ item 3: links are never followed


def test_atomic_write_never_follows_a_link_at_the_temporary_or_final_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / ".a.json.tmp").symlink_to(victim)
    (tmp_path / "b.json").symlink_to(victim)
    for name in ("a.json", "b.json"):
        utils.write_json(tmp_path / name, {"x": 1})
        assert not (tmp_path / name).is_symlink() and json.loads((tmp_path / name).read_text()) == {"x": 1}
    assert victim.read_text() == "precious" and not (tmp_path / ".a.json.tmp").exists()


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / utils.LOCK_FILE).symlink_to(victim)
    with pytest.raises(errors.UserError, match=r"a link is planted at \.train\.lock; remove it"):
        with utils.RunLock(run):
            pass
    assert victim.read_text() == "precious"


def test_the_download_lock_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "a.tar.lock").symlink_to(victim)
    with pytest.raises(download.DownloadError, match="cannot create"):
        with download._lock(tmp_path / "a.tar"):
            pass
    assert victim.read_text() == "precious"


def test_export_weights_replace_a_planted_link_and_keep_its_target(tmp_path, capsys):
    write_checkpoint(tmp_path / "best.pth.tar")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "w.pth"
    (tmp_path / ".w.pth.tmp").symlink_to(victim)
    out.symlink_to(victim)
    assert export.main(["--model_dir", str(tmp_path), "--format", "weights", "--out", str(out)]) == 0
    assert victim.read_text() == "precious" and not out.is_symlink()
    assert checkpoints.load_checkpoint(out)["class_names"] == ["background", "cat", "dog"]


# ------------------------------------------------------------------ items 4, 11: train.py


def test_a_killed_dataloader_worker_saves_and_stops_in_one_line_naming_memory(experiment, monkeypatch, capsys):
    original = SyntheticSegmentation.__getitem__
    calls = {"n": 0}

    def killed_on_the_sixth_item(self, index):  # runs in the worker (forked with this patch)
        calls["n"] += 1
        if self.names[0].startswith("synthetic_train") and calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer sends
        return original(self, index)

    monkeypatch.setattr(SyntheticSegmentation, "__getitem__", killed_on_the_sixth_item)
    model_dir = experiment(num_workers=1)
    assert train.main(["--model_dir", str(model_dir)]) == 2
    stderr = capsys.readouterr().err
    err = stderr.rstrip().splitlines()[-1].split("   ")[-1]  # after the log lines and tqdm's bar
    assert err.startswith("error: DataLoader worker") and "out of memory" in err, err
    assert "resume with --restore_file last" in err and "Traceback" not in stderr
    assert (model_dir / utils.LAST_CHECKPOINT).is_file()
    monkeypatch.setattr(SyntheticSegmentation, "__getitem__", original)
    assert train.main(["--model_dir", str(model_dir), "--restore_file", "last"]) == 0  # the run resumes


def test_a_dataloader_worker_killed_during_validation_is_one_line_and_the_epoch_resumes(experiment, monkeypatch,
                                                                                        capsys):
    original = SyntheticSegmentation.__getitem__

    def killed_in_validation(self, index):  # runs in a validation worker (forked with this patch)
        if self.names[0].startswith("synthetic_val"):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, index)

    monkeypatch.setattr(SyntheticSegmentation, "__getitem__", killed_in_validation)
    model_dir = experiment(num_workers=1, num_epochs=1)
    assert train.main(["--model_dir", str(model_dir)]) == 2
    stderr = capsys.readouterr().err
    err = stderr.rstrip().splitlines()[-1].split("   ")[-1]
    assert err.startswith("error: DataLoader worker") and "out of memory" in err, err
    assert "saved" in err and "resume with --restore_file last" in err and "Traceback" not in stderr
    saved = torch.load(model_dir / utils.LAST_CHECKPOINT, weights_only=True)["progress"]
    assert saved["iteration"] == 4 and saved["validation_pending"]  # the trained epoch, still to validate
    assert evaluate.main(["--model_dir", str(model_dir), "--restore_file", "last"]) == 2  # evaluate.py alike
    stderr = capsys.readouterr().err
    assert stderr.splitlines()[-1].startswith("error: DataLoader worker") and "Traceback" not in stderr
    monkeypatch.setattr(SyntheticSegmentation, "__getitem__", original)
    assert train.main(["--model_dir", str(model_dir), "--restore_file", "last"]) == 0
    assert json.loads((model_dir / utils.METRICS_LAST).read_text())["epoch"] == 1


def test_ctrl_c_while_starting_is_one_line_and_force_deletes_nothing(experiment, monkeypatch, capsys):
    model_dir = experiment()
    (model_dir / utils.LAST_CHECKPOINT).write_bytes(b"the previous run")

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "build_dataset", interrupted)
    assert train.main(["--model_dir", str(model_dir), "--force"]) == 128 + signal.SIGINT
    assert "nothing new was saved" in one_line_error(capsys)
    assert (model_dir / utils.LAST_CHECKPOINT).read_bytes() == b"the previous run"


def test_a_run_folder_deleted_mid_run_is_not_recreated(tmp_path):
    with pytest.raises(errors.UserError, match="does not exist .*not recreating it"):
        utils.write_json(tmp_path / "gone" / "metrics.json", {})
    assert not (tmp_path / "gone").exists()


# ------------------------------------------------------------------ items 5, 12: evaluate.py


def test_metrics_of_a_foreign_checkpoint_never_replace_the_folders_own(tmp_path):
    own = evaluate.metrics_tag(tmp_path / "run", tmp_path / "run" / "best.pth.tar", "val", False)
    foreign = evaluate.metrics_tag(tmp_path / "run", tmp_path / "other" / "best.pth.tar", "val", True)
    assert own == "val_best" and foreign == "val_other.best_tta"


def test_a_split_the_synthetic_data_set_lacks_is_refused():
    config = DataConfig(dataset="synthetic", data_dir="")
    with pytest.raises(DatasetError, match="has the splits 'train' and 'val', not 'vall'"):
        build_dataset(config, 5, "vall", train=False)


# ------------------------------------------------------------------ item 8: FIFOs


def test_a_fifo_is_never_read(tmp_path, capsys, no_hang):
    fifo = tmp_path / "in" / "pipe.png"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(DatasetError, match="not a regular file"):
        read_image(fifo)
    write_checkpoint(tmp_path / "best.pth.tar")
    assert predict.main([str(fifo), "--out", str(tmp_path / "out"), "--model_dir", str(tmp_path)]) == 2
    assert "not a regular file or folder" in one_line_error(capsys)
    _, errors = predict.size_batches([fifo], 1)
    assert errors and "not a regular file" in errors[0]


# ------------------------------------------------------------------ item 9: checkpoints through every entry point


def broken_checkpoints(tmp_path: Path) -> dict[str, Path]:
    """A valid GCN-R18 checkpoint, then copies with one key broken."""
    write_checkpoint(tmp_path / "good.pth.tar")
    good = torch.load(tmp_path / "good.pth.tar", weights_only=True)
    shapes = dict(good["state_dict"])
    shapes["heads.0.left.0.weight"] = torch.zeros(1)
    cases = {"huge kernel": {"model_config": {**good["model_config"], "kernel_size": 400001}},
             "wrong shapes": {"state_dict": shapes},
             "short palette": {"palette": good["palette"][:1]},
             "no state_dict": {"state_dict": None}}
    paths = {}
    for name, change in cases.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.pth.tar"
        torch.save({k: v for k, v in {**good, **change}.items() if v is not None}, paths[name])
    return paths


def test_a_bad_checkpoint_is_one_line_in_predict_export_and_hubconf_and_export_writes_nothing(tmp_path, capsys):
    image(tmp_path / "in" / "a.png")
    for name, path in broken_checkpoints(tmp_path).items():
        out = tmp_path / f"out_{path.stem}"
        assert predict.main([str(tmp_path / "in"), "--out", str(out), "--restore_file", str(path)]) == 2, name
        assert str(path) in one_line_error(capsys)
        weights = tmp_path / f"{path.stem}.pth"
        assert export.main(["--restore_file", str(path), "--format", "weights", "--out", str(weights)]) == 2, name
        assert str(path) in one_line_error(capsys) and not weights.exists()
        with pytest.raises((checkpoints.CheckpointError, CheckpointMismatchError), match=str(path)):
            hubconf.gcn(str(path))


def test_a_state_dict_of_another_shape_is_refused_before_loading():
    model = GCN(GCNConfig(num_classes=3, backbone="resnet18", kernel_size=3))
    checkpoint = {"model_config": dataclasses.asdict(model.config), "state_dict": model.state_dict()}
    GCN.check_checkpoint(checkpoint)
    bigger = {**checkpoint, "model_config": {**checkpoint["model_config"], "kernel_size": 5}}
    with pytest.raises(CheckpointMismatchError, match=r"^x: its state_dict does not fit its model_config \(heads\.0"):
        GCN.from_checkpoint(bigger, "x")


# ------------------------------------------------------------------ item 11: output paths of the wrong type


def test_output_paths_of_the_wrong_type_are_one_line_before_any_work(tmp_path, capsys):
    write_checkpoint(tmp_path / "best.pth.tar")
    image(tmp_path / "in" / "a.png")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert predict.main([str(tmp_path / "in"), "--out", str(a_file), "--model_dir", str(tmp_path)]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert export.main(["--model_dir", str(tmp_path), "--format", "weights", "--out", str(tmp_path / "in")]) == 2
    assert "is a folder; give a file name" in one_line_error(capsys) and not list((tmp_path / "in").glob("*.pth"))
    with pytest.raises(errors.UserError, match="is a file, not a folder"):
        utils.output_folder(a_file / "sub", "--save_predictions")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(errors.UserError, match="is a broken link, not a folder"):
        utils.output_folder(tmp_path / "dangling", "--save_predictions")
    assert download.main(["voc", "--dest", str(a_file / "data")]) == 2
    assert "cannot create --dest" in one_line_error(capsys)


# ------------------------------------------------------------------ item 6: download.py


def test_a_reply_without_length_over_a_partial_keeps_the_partial(tmp_path, monkeypatch):
    archive = b"0123456789" * 1000
    with ArchiveServer({"a.tar": archive}, ranges=False) as server:
        monkeypatch.setattr(server.httpd.RequestHandlerClass, "send_header",
                            lambda self, key, value: None if key == "Content-Length" else
                            type(self).__mro__[1].send_header(self, key, value))
        (tmp_path / "a.tar.part").write_bytes(archive[:500])
        with pytest.raises(download.DownloadError, match="gives no length.*is kept"):
            download.fetch(server.url("a.tar"), tmp_path / "a.tar", "0" * 32)
    assert (tmp_path / "a.tar.part").read_bytes() == archive[:500]


def test_a_full_disk_is_said_as_such_and_keeps_the_partial(tmp_path, monkeypatch):
    archive = b"x" * 5000
    real_append = download._append

    class FullDisk:
        def write(self, _chunk):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(download, "_append", lambda file, chunk, partial: real_append(FullDisk(), chunk, partial))
    with ArchiveServer({"a.tar": archive}) as server:
        (tmp_path / "a.tar.part").write_bytes(archive[:100])
        with pytest.raises(download.DownloadError, match="disk full"):
            download.fetch(server.url("a.tar"), tmp_path / "a.tar", "0" * 32)
    assert (tmp_path / "a.tar.part").read_bytes() == archive[:100]

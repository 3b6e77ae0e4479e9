"""evaluate.py: metrics equal training's validation, the per-class table and confusion matrix, prediction PNGs and
titled pictures, TTA, sliding windows, and a split without ground truth in the VOC server layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train
import utils
from model.inference import padded_logits, predict_logits
from model.metrics import SegmentationMetrics
from model.net import GCN, GCNConfig


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def trained(experiment):
    model_dir = experiment(num_epochs=1, tta_scales=[1.0, 1.5])
    assert train.main(["--model_dir", str(model_dir)]) == 0
    return model_dir


def test_evaluate_matches_validation_and_writes_table_matrix_pngs_and_pictures(trained, tmp_path, caplog):
    out = tmp_path / "predictions"
    caplog.set_level("INFO")
    assert evaluate.main(["--model_dir", str(trained), "--restore_file", "last", "--save_predictions", str(out),
                         "--num_pictures", "all"]) == 0
    metrics = read_json(trained / "metrics_val_last.json")
    validated = read_json(trained / utils.METRICS_LAST)
    assert metrics == {**validated, "epoch": 1}
    counts = np.array(metrics["confusion_matrix"]["counts"])
    assert counts.shape == (5, 5) and metrics["confusion_matrix"]["classes"][0] == "background"
    assert counts.trace() / counts.sum() == pytest.approx(metrics["pixel_accuracy"])
    assert Image.open(trained / "confusion_val_last.png").size[0] > 400
    assert "Per class (val_last)" in caplog.text and "<- worst" in caplog.text
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    first = Image.open(pngs[0])
    assert first.mode == "P" and first.size == (48, 48) and np.array(first).max() < 5
    assert sorted(p.name for p in (out / "pictures").glob("*.png")) == [p.name for p in pngs]
    assert evaluate.main(["--model_dir", str(trained), "--restore_file", "last", "--tta"]) == 0
    tta = read_json(trained / "metrics_val_last_tta.json")
    assert 0 <= tta["miou"] <= 1 and tta["loss"] != pytest.approx(metrics["loss"])


def test_evaluation_computes_in_float32_whatever_amp_trains_in_and_says_so(experiment, monkeypatch, capsys):
    """Metrics must not depend on the machine: where amp trains in bf16 (a CPU with AMX), validation, evaluate.py
    and its records are float32 unless eval_precision asks otherwise, which needs native hardware."""
    monkeypatch.setattr(utils, "cpu_bf16_pays", lambda: True)  # as on a CPU with AMX-BF16
    model_dir = experiment(num_iterations=1, channels_last=False)
    assert train.main(["--model_dir", str(model_dir)]) == 0
    assert read_json(model_dir / utils.RESOLVED_PARAMS_FILE)["precision"] == "bfloat16"
    assert "in bfloat16 (validation in float32)" in (model_dir / utils.TRAIN_LOG).read_text()
    validated = read_json(model_dir / utils.METRICS_LAST)
    assert validated["precision"] == "float32"
    assert evaluate.main(["--model_dir", str(model_dir), "--restore_file", "last"]) == 0
    assert read_json(model_dir / "metrics_val_last.json") == validated
    assert "in float32" in (model_dir / utils.EVALUATE_LOG).read_text()

    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert evaluate.main(["--model_dir", str(model_dir), "--restore_file", "last", "--set",
                         "eval_precision=bfloat16"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        'error: eval_precision "bfloat16": this cpu has no native bfloat16; use "float32"')
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    assert evaluate.main(["--model_dir", str(model_dir), "--restore_file", "last", "--set",
                         "eval_precision=bfloat16"]) == 0
    assert read_json(model_dir / "metrics_val_last.json")["precision"] == "bfloat16"


def test_num_pictures_limits_the_pictures(trained, tmp_path):
    out = tmp_path / "predictions"
    assert evaluate.main(["--model_dir", str(trained), "--restore_file", "last", "--save_predictions", str(out),
                         "--num_pictures", "1"]) == 0
    assert len(list((out / "pictures").glob("*.png"))) == 1 and len(list(out.glob("*.png"))) == 4
    assert evaluate.main(["--model_dir", str(trained), "--num_pictures", "some"]) == 2


def test_per_class_table_agrees_with_the_metrics_on_a_hand_built_case():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    metrics = SegmentationMetrics(4, ["road", "car", "tree", "sky"])
    metrics.update(pred, target)
    result = metrics.compute()
    result["loss"] = 0.0
    # road: 1 hit, truth 2, predicted 2 -> IoU 1/3; car: 3 hits, truth 3, predicted 4 -> 3/4; tree: 1 hit, truth 2,
    # predicted 1 (void pixels are not counted) -> 1/2; sky: absent everywhere -> undefined.
    lines = evaluate.per_class_table(result).splitlines()
    assert lines[2].split() == ["road", "33.33", "50.00", "28.57", "<-", "worst"]
    assert lines[3].split() == ["car", "75.00", "100.00", "42.86"]
    assert lines[4].split() == ["tree", "50.00", "50.00", "28.57"]
    assert lines[5].split() == ["sky", "-", "-", "0.00"]
    assert lines[6].split() == ["mean", f"{100 * (1 / 3 + 3 / 4 + 1 / 2) / 3:.2f}", "66.67"]
    assert result["confusion_matrix"] == {"classes": ["road", "car", "tree", "sky"],
                                          "counts": [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]}


def test_sliding_window_and_flip_equal_the_whole_image_for_a_pointwise_model():
    image = torch.randn(1, 3, 37, 53)
    model = torch.nn.Conv2d(3, 4, 1)
    whole = predict_logits(model, image)
    tiled = predict_logits(model, image, window=16)
    assert tiled.shape == whole.shape and torch.allclose(tiled, whole, atol=1e-6)
    assert torch.allclose(predict_logits(model, image, flip=True), whole, atol=1e-6)


def make_tiny_voc(root: Path) -> list[str]:
    """A VOC2012 tree: train/val ids with palette masks, test ids with images only (no ground truth)."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"2008_{i:06d}" for i in range(6)]
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        if i < 4:
            mask = Image.fromarray(rng.choice([0, 1, 15, 255], (30, 40)).astype(np.uint8))
            mask.putpalette([0] * 768)
            mask.save(root / "SegmentationClass" / f"{name}.png")
    for split, ids in (("train", names[:2]), ("val", names[2:4]), ("test", names[4:])):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return names[4:]


def test_a_split_without_ground_truth_gives_predictions_in_the_voc_server_layout(experiment, tmp_path, capsys):
    voc = tmp_path / "VOC2012"
    test_ids = make_tiny_voc(voc)
    model_dir = experiment(dataset="voc", data_dir=str(voc), num_classes=21, crop_size=32, batch_size=2,
                           num_epochs=1)
    assert train.main(["--model_dir", str(model_dir)]) == 0
    out = tmp_path / "submission"
    assert evaluate.main(["--model_dir", str(model_dir), "--split", "test", "--save_predictions", str(out)]) == 0
    server = out / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
    assert sorted(p.stem for p in server.glob("*.png")) == test_ids
    assert Image.open(server / f"{test_ids[0]}.png").size == (40, 30)
    assert not list(model_dir.glob("metrics_test_*.json"))  # no ground truth: predictions only

    for name in test_ids:  # placeholder ground truth, all void (as Cityscapes' test split ships)
        mask = Image.fromarray(np.full((30, 40), 255, np.uint8))
        mask.putpalette([0] * 768)
        mask.save(voc / "SegmentationClass" / f"{name}.png")
    assert evaluate.main(["--model_dir", str(model_dir), "--split", "test"]) == 2
    assert "the 2 labels of this split mark every pixel void (255): nothing to score" in capsys.readouterr().err


def test_padded_logits_crop_back_to_a_plain_forward_of_the_zero_padded_image():
    torch.manual_seed(0)
    model = GCN(GCNConfig(3, "resnet18", kernel_size=3)).eval()
    with torch.no_grad():
        at_size = torch.randn(1, 3, 64, 64)
        assert torch.equal(padded_logits(model, at_size, 64), model(at_size))  # already at the size: no change
        for height, width in [(50, 61), (70, 40), (1, 1)]:
            image = torch.randn(1, 3, height, width)
            padded = torch.zeros(1, 3, max(height, 64), max(width, 64))  # zeros = the mean colour
            padded[..., :height, :width] = image
            logits = padded_logits(model, image, 64)
            assert logits.shape == (1, 3, height, width)
            assert torch.equal(logits, model(padded)[..., :height, :width])
        assert not torch.allclose(padded_logits(model, image, 64), model(image))  # the context differs
        assert torch.equal(padded_logits(model, image, None), model(image))


def test_padded_evaluation_scores_only_the_real_pixels_and_records_the_band(trained):
    assert evaluate.main(["--model_dir", str(trained), "--restore_file", "last"]) == 0
    plain = read_json(trained / "metrics_val_last.json")
    assert evaluate.main(["--model_dir", str(trained), "--restore_file", "last", "--set", "eval_pad_size=80",
                         "--set", "boundary_distance=euclidean", "--set", "boundary_void=ignored"]) == 0
    padded = read_json(trained / "metrics_val_last.json")
    total = np.array(plain["confusion_matrix"]["counts"]).sum()
    assert total == np.array(padded["confusion_matrix"]["counts"]).sum() <= 4 * 48 * 48  # no padding pixel scored
    assert padded["loss"] != pytest.approx(plain["loss"], rel=1e-6)  # the padding changed the logits
    assert plain["boundary_band"] == {"width": 7, "distance": "chebyshev", "void": "label"}
    assert padded["boundary_band"] == {"width": 7, "distance": "euclidean", "void": "ignored"}


def test_a_foreign_checkpoint_keeps_this_folders_metrics_and_bad_outputs_are_one_line(trained, tmp_path, capsys,
                                                                                     monkeypatch):
    (trained / "metrics_val_best.json").write_text('{"this folder": "own record"}')
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(trained / utils.BEST_CHECKPOINT, other / utils.BEST_CHECKPOINT)
    assert evaluate.main(["--model_dir", str(trained), "--restore_file", str(other / utils.BEST_CHECKPOINT)]) == 0
    assert read_json(trained / "metrics_val_best.json") == {"this folder": "own record"}
    assert read_json(trained / "metrics_val_other.best.json")["miou"] >= 0
    capsys.readouterr()

    def last_line() -> str:
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err
        return err.splitlines()[-1]

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert evaluate.main(["--model_dir", str(trained), "--save_predictions", str(a_file)]) == 2
    assert last_line() == f"error: --save_predictions {a_file} is a file, not a folder"

    def read_only(*_args, **_kwargs):  # as a read-only folder answers (the suite may run as root, which may write)
        raise PermissionError(13, "Permission denied", str(trained / "confusion_val_best.png"))

    monkeypatch.setattr(evaluate.visualize, "confusion_matrix_png", read_only)
    assert evaluate.main(["--model_dir", str(trained)]) == 2
    assert last_line().startswith("error: [Errno 13] Permission denied")

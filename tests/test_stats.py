"""data/stats.py: counts and median-frequency weights against hand computations on a tiny folder data set,
absent-class warnings, --browse pictures, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import stats
from model.visualize import picture_layout

REPO = Path(__file__).resolve().parents[1]

CLASSES = ["sky", "road", "car", "boat"]
V = 255
MASKS = {  # train: a, b, c; val: d. "boat" is in no image, "car" in no val image.
    "a": [[0, 0, 0, 0], [1, 1, V, V]],           # 8 px: sky 4, road 2, void 2
    "b": [[0, 0], [0, 2]],                         # 4 px: sky 3, car 1
    "c": [[1, 1, 1], [1, 1, 1], [2, 2, V]],        # 9 px: road 6, car 2, void 1
    "d": [[0, 0, 0], [0, V, V]],                   # 6 px: sky 4, void 2
}
CROP = 8


def make_experiment(root: Path, **overrides) -> Path:
    """A `folder` data set of the MASKS (with random RGB images) and an experiment folder using it."""
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name, mask in MASKS.items():
        mask = np.array(mask, dtype=np.uint8)
        Image.fromarray(mask, mode="L").save(data / "masks" / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)).save(data / "images" / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(data / "images" / "e.png")  # no mask
    (data / "train.txt").write_text("a\nb\nc\n")
    (data / "val.txt").write_text("d\n")
    (data / "test.txt").write_text("e\n")
    experiment = root / "experiment"
    experiment.mkdir()
    params = {"dataset": "folder", "data_dir": str(data), "num_classes": 4, "class_names": CLASSES,
              "crop_size": CROP, "num_workers": 0, **overrides}
    (experiment / "params.json").write_text(json.dumps(params))
    return experiment


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = stats.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_median_frequency_weights_match_hand_computation(tmp_path, capsys):
    # freq(c) = pixels of c / all pixels (void included) of the images holding c:
    # sky 7 / (8 + 4), road 8 / (8 + 9), car 3 / (4 + 9); the median is road's 8/17; boat (absent) gets 1.
    expected = [round((8 / 17) / (7 / 12), 4), 1.0, round((8 / 17) / (3 / 13), 4), 1.0]
    assert expected == [0.8067, 1.0, 2.0392, 1.0]
    code, out, _ = run(capsys, "--model_dir", str(make_experiment(tmp_path)), "--json", str(tmp_path / "s.json"))
    assert code == 0
    lines = out.splitlines()
    header = lines.index("class_weights (median frequency, split train):")
    assert json.loads(lines[header + 1]) == expected
    assert json.loads((tmp_path / "s.json").read_text())["class_weights"] == {"split": "train", "weights": expected}


def test_counts_sizes_and_absent_classes(tmp_path, capsys, monkeypatch):
    def no_decoding(path):
        raise AssertionError(f"decoded image {path}: pixel counts must come from the label files alone")

    monkeypatch.setattr("model.datasets.base.read_image", no_decoding)
    code, out, err = run(capsys, "--model_dir", str(make_experiment(tmp_path)), "--json", str(tmp_path / "s.json"))
    assert code == 0
    record = json.loads((tmp_path / "s.json").read_text())["splits"]
    train, val = record["train"], record["val"]
    assert (train["images"], val["images"]) == (3, 1)
    assert sorted(map(tuple, train["sizes"])) == [(2, 2, 1), (3, 3, 1), (4, 2, 1)]  # width, height, images
    assert (train["total_pixels"], train["void_pixels"]) == (21, 3)
    assert [train["classes"][c]["pixels"] for c in CLASSES] == [7, 8, 3, 0]
    assert [train["classes"][c]["images"] for c in CLASSES] == [2, 2, 2, 0]
    assert [val["classes"][c]["pixels"] for c in CLASSES] == [4, 0, 0, 0]
    assert (train["absent_classes"], val["absent_classes"]) == (["boat"], ["road", "car", "boat"])
    assert "  sky" in out and "33.333%" in out  # 7 of 21 train pixels
    assert "  absent classes: road, car, boat" in out
    assert "WARNING: split 'train' has no pixel of class(es) boat" in err
    assert "WARNING: split 'val' has no pixel of class(es) road, car, boat" in err


def test_split_without_ground_truth_reports_images_and_sizes(tmp_path, capsys):
    code, out, err = run(capsys, "--model_dir", str(make_experiment(tmp_path)), "--split", "test")
    assert code == 0 and "WARNING" not in err and "class_weights" not in out
    assert "split 'test': 1 image; image sizes (W×H): 7×5 (1 image)\n  no ground truth" in out


def test_generated_data_set_is_counted_from_its_items(tmp_path, capsys):
    experiment = tmp_path / "synthetic"
    experiment.mkdir()
    (experiment / "params.json").write_text(json.dumps({
        "dataset": "synthetic", "data_dir": "", "num_classes": 5, "synthetic_image_size": 16,
        "synthetic_train_images": 3, "synthetic_val_images": 2}))
    code, _, _ = run(capsys, "--model_dir", str(experiment), "--split", "val", "--json", str(tmp_path / "s.json"))
    assert code == 0
    val = json.loads((tmp_path / "s.json").read_text())["splits"]["val"]
    assert val["sizes"] == [[16, 16, 2]]
    assert sum(c["pixels"] for c in val["classes"].values()) + val["void_pixels"] == 2 * 16 * 16


def test_browse_writes_reproducible_pictures_of_the_crop(tmp_path, capsys):
    experiment = make_experiment(tmp_path)
    code, out, _ = run(capsys, "--model_dir", str(experiment), "--split", "val", "--browse", "2")
    assert code == 0
    paths = sorted((experiment / "browse").glob("*.png"))
    assert len(paths) == 2 and all(str(p) in out for p in paths)
    lay = picture_layout(CROP, CROP, 3)  # image | label | overlay
    one_legend_row = lay.font_size + lay.gap // 2
    for path in paths:
        with Image.open(path) as picture:
            assert picture.size == (lay.width, lay.gap + lay.title_height + lay.panel_height + lay.gap
                                    + one_legend_row + lay.gap)
    first = [p.read_bytes() for p in paths]
    run(capsys, "--model_dir", str(experiment), "--split", "val", "--browse", "2")
    assert [p.read_bytes() for p in paths] == first  # seeded: the same augmentation every time


def test_bad_model_dir_and_missing_data_are_one_line_errors(tmp_path, capsys):
    code, out, err = run(capsys, "--model_dir", str(tmp_path / "nowhere"))
    assert code == 2 and err.strip().count("\n") == 0
    assert err.startswith("error: ") and "params.json" in err
    experiment = make_experiment(tmp_path, data_dir=str(tmp_path / "missing"))
    code, out, err = run(capsys, "--model_dir", str(experiment))
    assert code == 2 and err.strip().count("\n") == 0 and "missing" in err


@pytest.mark.parametrize("module", ["data.stats", "data.build_voc_aug"])
def test_the_readme_runs_the_data_scripts_as_modules(module):
    """`python -m data.stats ...` from the repository root, as the README and docs write it (no sys.path edits)."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_help_is_whole_sentences():
    for command, expected in ((["-m", "data.stats"], "median-frequency class weights ready for params.json's "
                                                     "`class_weights`."),
                              (["export.py"], "weights: a weights-only checkpoint")):
        result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True,
                                check=True, env={**os.environ, "COLUMNS": "1000"})
        assert expected in " ".join(result.stdout.split())

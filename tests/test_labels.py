"""Label images read as the values the user stored, in every image mode, or refused in one line naming the file; the
start-up label check catches labels that would train on nothing; a 2-class set of 1-bit masks trains on its
foreground."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
import utils
from model import data_loader
from model.data_loader import DataConfig, build_dataset
from model.datasets.base import DatasetError, identity_lut, read_label
from model.datasets.voc import voc_palette

STORED = np.array([[0, 1, 255], [1, 0, 0]])  # what the user wrote: class 0, class 1 and void
READ_AS_WRITTEN = {"1", "L", "P", "I;16", "I;16B", "I"}  # the single-channel modes of stored integers
FORMATS = ("PNG", "TIFF")  # between them, every mode Pillow can write to a file


def labelled_image(mode: str) -> Image.Image:
    """An image of `mode` holding STORED (a 1-bit image: its 0/1 values), or any content for other modes."""
    image = Image.new(mode, STORED.shape[::-1])
    if mode in READ_AS_WRITTEN | {"I;16L"}:
        image.putdata([255 * int(v == 1) if mode == "1" else int(v) for v in STORED.ravel()])
    if mode == "P":
        image.putpalette([c for rgb in voc_palette(256) for c in rgb])
    return image


def saved_labels(tmp_path: Path) -> dict[str, Path]:
    """Every mode Pillow knows, saved as PNG or TIFF where it can be: stored mode -> file."""
    files = {}
    for mode in Image.MODES:
        for fmt in FORMATS:
            path = tmp_path / f"{mode.replace(';', '_')}.{fmt.lower()}"
            try:
                labelled_image(mode).save(path, format=fmt)
            except (OSError, ValueError, KeyError):
                continue
            with Image.open(path) as stored:
                files.setdefault(stored.mode, path)
    return files


def test_every_label_mode_reads_as_the_values_written_or_is_refused_in_one_line(tmp_path):
    files = saved_labels(tmp_path)
    assert READ_AS_WRITTEN | {"RGB", "RGBA", "LA", "PA", "F", "CMYK", "YCbCr", "LAB"} <= set(files)
    for mode, path in files.items():
        if mode in READ_AS_WRITTEN:
            expected = np.where(STORED == 255, 255, STORED) if mode != "1" else (STORED == 1)
            assert np.array_equal(read_label(path, identity_lut(2), 2), expected), mode
        else:
            with pytest.raises(DatasetError) as info:
                read_label(path, identity_lut(2), 2)
            message = str(info.value)
            assert message.startswith(f"label {path} has mode {mode}; expected stored class values"), message
            assert "colour masks are refused" in message and "\n" not in message


def test_a_1_bit_mask_reads_0_and_1_not_void(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(np.array([[False, True], [True, True]])).save(path)  # the usual Image.fromarray(mask > 0)
    assert read_label(path, identity_lut(2), 2).tolist() == [[0, 1], [1, 1]]


def test_16_and_32_bit_values_above_255_are_refused_naming_them(tmp_path):
    for mode, fmt in (("I;16", "PNG"), ("I", "TIFF")):
        path = tmp_path / f"wide.{fmt.lower()}"
        image = Image.new(mode, (2, 1))
        image.putdata([1, 300])
        image.save(path, format=fmt)
        with pytest.raises(DatasetError, match=rf"^label {path} \({mode}\) holds value\(s\) \[300\] outside 0\.\.255"):
            read_label(path, identity_lut(2), 2)


def folder_set(root: Path, count: int, mask) -> Path:
    """`count` 32×32 images whose bright square is the foreground, with masks saved by `mask(foreground)`."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        foreground = np.zeros((32, 32), bool)
        top, left = rng.integers(0, 16, 2)
        foreground[top:top + 12, left:left + 12] = True
        image = np.where(foreground[..., None], 220, 30) + rng.integers(0, 20, (32, 32, 3))
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"case_{i:02d}.png")
        mask(foreground).save(root / "masks" / f"case_{i:02d}.png")
    return root


def one_bit(foreground: np.ndarray) -> Image.Image:
    return Image.fromarray(foreground)  # mode "1"


def zero_255(foreground: np.ndarray) -> Image.Image:
    return Image.fromarray(foreground.astype(np.uint8) * 255)  # mode "L"


def folder_config(root: Path, **changes) -> DataConfig:
    return DataConfig(**{"dataset": "folder", "data_dir": str(root), "num_workers": 0, "crop_size": 32, **changes})


def test_the_label_check_refuses_masks_whose_foreground_reads_as_void(tmp_path):
    root = folder_set(tmp_path / "set", 10, zero_255)
    train_set = build_dataset(folder_config(root), 2, "train", train=True)
    with pytest.raises(DatasetError, match=r"the 8 labels in .*masks hold only class 0 besides void \(255\): .* "
                                           r"mask_values, e\.g\. \{\"0\": 0, \"255\": 1\}$"):
        data_loader.check_label_values(train_set, min_classes=2)
    for path in train_set.label_paths:
        Image.new("L", (32, 32), 255).save(path)
    with pytest.raises(DatasetError, match="hold no class besides void"):  # a split of void only
        data_loader.check_label_values(train_set)
    mapped = build_dataset(folder_config(root, mask_values={"0": 0, "255": 1}), 2, "train", train=True)
    for path in mapped.label_paths:
        zero_255(np.eye(32, dtype=bool)).save(path)
    data_loader.check_label_values(mapped, min_classes=2)  # what the message says to do passes


def test_a_class_beyond_the_sample_is_found_before_refusing(tmp_path, monkeypatch):
    root = folder_set(tmp_path / "set", 40, lambda foreground: Image.new("L", (32, 32), 0))
    dataset = build_dataset(folder_config(root, val_fraction=0.1), 2, "train", train=False)
    rare = dataset.label_paths[1]  # outside a sample of 4 spread over the 36 files
    Image.fromarray(np.eye(32, dtype=np.uint8)).save(rare)
    read = []
    real = data_loader.read_label
    monkeypatch.setattr(data_loader, "read_label", lambda path, *args: read.append(path) or real(path, *args))
    data_loader.check_label_values(dataset, min_classes=2, sample=4)
    assert rare in read and len(read) > 4  # the rest was read because the sample showed one class
    read.clear()
    data_loader.check_label_values(dataset, min_classes=1, sample=4)
    assert len(read) == 4  # a sample that shows enough classes is all that is read


def test_a_two_class_folder_set_of_1_bit_masks_trains_on_its_foreground(tmp_path):
    root = folder_set(tmp_path / "set", 20, one_bit)
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "params.json").write_text(json.dumps({
        "dataset": "folder", "data_dir": str(root), "num_classes": 2, "val_fraction": 0.2, "crop_size": 32,
        "num_workers": 0, "backbone": "resnet18", "kernel_size": 3, "batch_size": 4, "num_iterations": 2,
        "scale_range": [1.0, 1.0]}))
    assert train.main(["--model_dir", str(model_dir)]) == 0
    metrics = json.loads((model_dir / utils.METRICS_LAST).read_text())
    counts = np.array(metrics["confusion_matrix"]["counts"])
    assert counts[1].sum() > 0, "no foreground pixel was scored: class 1 read as void"
    assert metrics["per_class_pixel_share"]["class_1"] > 0.05

"""The data pipeline: every loader on trees built here, joint augmentation alignment, bad input, the synthetic set,
the SBD -> SegmentationClassAug builder, and a few items of the real data sets in ../shared/data."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision import tv_tensors
from torch.utils.data import RandomSampler, SequentialSampler

import utils
from data import build_voc_aug
from model import data_loader
from model import IMAGENET_MEAN, IMAGENET_STD, normalise
from model.data_loader import DataConfig, DatasetError, EpochSampler, build_dataloader, build_dataset
from model.datasets import synthetic
from model.datasets.synthetic import void_borders
from model.datasets.voc import voc_palette
from model.transforms import MEAN_COLOR, colorize, denormalise, train_transform

REPO = Path(__file__).resolve().parents[1]
PALETTE = [c for rgb in voc_palette(256) for c in rgb]


def params(num_classes: int, **kw) -> tuple[DataConfig, int]:
    """A DataConfig with small crops and no workers (so tests stay fast), and the class count."""
    return DataConfig(**{"crop_size": 32, "num_workers": 0, **kw}), num_classes


def replace(p: tuple[DataConfig, int], **kw) -> tuple[DataConfig, int]:
    return dataclasses.replace(p[0], **kw), p[1]


def build(p: tuple[DataConfig, int], split: str, train: bool):
    return build_dataset(p[0], p[1], split, train)


def save_rgb(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def save_index_png(path: Path, array: np.ndarray, palette: bool = True) -> None:
    """Single-channel label PNG: palette (P) like VOC, or grayscale (L)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8))
    if palette:
        image.putpalette(PALETTE)
    image.save(path)


def random_label(rng: np.random.Generator, shape: tuple[int, int], values: list[int]) -> np.ndarray:
    return rng.choice(values, size=shape).astype(np.uint8)


def make_voc(root: Path, splits: dict[str, list[str]], size=(30, 40), seed=0, labels=True) -> dict[str, np.ndarray]:
    """A VOC2012 tree; returns id -> label array."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, ids in splits.items():
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for name in ids:
            save_rgb(root / "JPEGImages" / f"{name}.jpg", rng.integers(0, 256, (*size, 3)))
            if labels:
                arrays[name] = random_label(rng, size, [0, 1, 7, 20, 255])
                save_index_png(root / "SegmentationClass" / f"{name}.png", arrays[name])
    return arrays


@pytest.fixture
def voc(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "VOC2012"
    arrays = make_voc(root, {"train": ["2008_000001", "2008_000002", "2008_000003"],
                             "val": ["2008_000010", "2008_000011"]})
    return root, arrays


def check_item(image: torch.Tensor, label: torch.Tensor, shape: tuple[int, int]) -> None:
    assert image.dtype == torch.uint8 and image.shape == (3, *shape)  # normalised on the device (utils.Placement)
    assert label.dtype == torch.uint8 and label.shape == shape


# ---------------------------------------------------------------- VOC


def test_voc_val_yields_whole_images_and_exact_labels(voc):
    root, arrays = voc
    dataset = build(params(dataset="voc", data_dir=str(root), num_classes=21), "val", train=False)
    assert dataset.names == ["2008_000010", "2008_000011"] and dataset.has_labels
    assert len(dataset.classes) == 21 and dataset.classes[15] == "person"
    assert dataset.palette[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
    for i, name in enumerate(dataset.names):
        image, label = dataset[i]
        check_item(image, label, (30, 40))
        assert torch.equal(label, torch.from_numpy(arrays[name]).long())
        jpeg = np.array(Image.open(root / "JPEGImages" / f"{name}.jpg"))
        assert torch.equal(image, torch.from_numpy(jpeg).permute(2, 0, 1))


def test_voc_train_yields_fixed_size_crops(voc):
    root, _ = voc
    dataset = build(params(dataset="voc", data_dir=str(root), num_classes=21, crop_size=48), "train", True)
    for i in range(len(dataset)):
        image, label = dataset[i]
        check_item(image, label, (48, 48))
        assert set(label.unique().tolist()) <= {0, 1, 7, 20, 255}


def test_voc_test_split_without_labels(voc):
    root, _ = voc
    make_voc(root, {"test": ["2008_000100"]}, labels=False)
    dataset = build(params(dataset="voc", data_dir=str(root), num_classes=21), "test", train=False)
    assert not dataset.has_labels
    image, label = dataset[0]
    check_item(image, label, (30, 40))
    assert (label == 255).all()


def test_voc_aug_builder_and_loader(tmp_path):
    voc_dir, sbd_dir = tmp_path / "VOC2012", tmp_path / "sbd" / "dataset"
    voc_arrays = make_voc(voc_dir, {"train": ["a1", "a2"], "val": ["v1", "v2"]})
    rng = np.random.default_rng(1)
    sbd_arrays = {}
    for name in ["s1", "s2", "v1", "a1"]:  # v1 is in VOC val: must not reach train_aug
        if name not in voc_arrays:
            save_rgb(voc_dir / "JPEGImages" / f"{name}.jpg", rng.integers(0, 256, (30, 40, 3)))
        sbd_arrays[name] = random_label(rng, (30, 40), list(range(21)))
        (sbd_dir / "cls").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(sbd_dir / "cls" / f"{name}.mat", {"GTcls": {
            "Segmentation": sbd_arrays[name], "CategoriesPresent": np.unique(sbd_arrays[name])[1:, None]}})
    (sbd_dir / "train.txt").write_text("s1\nv1\n")
    (sbd_dir / "val.txt").write_text("s2\na1\n")

    builder = build_voc_aug
    assert builder.main(["--voc", str(voc_dir), "--sbd", str(sbd_dir)]) == 0
    train_aug = (voc_dir / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    assert train_aug == ["a1", "a2", "s1", "s2"]

    p = params(dataset="voc_aug", data_dir=str(voc_dir), num_classes=21)
    train = build(p, "train", train=False)  # whole images, to compare the labels exactly
    assert train.names == train_aug
    expected = {"a1": voc_arrays["a1"], "a2": voc_arrays["a2"], "s1": sbd_arrays["s1"], "s2": sbd_arrays["s2"]}
    for i, name in enumerate(train.names):
        assert torch.equal(train[i][1], torch.from_numpy(expected[name]).long()), name
    assert Image.open(voc_dir / "SegmentationClassAug" / "s1.png").mode == "P"
    val = build(p, "val", train=False)
    assert val.names == ["v1", "v2"] and torch.equal(val[0][1], torch.from_numpy(voc_arrays["v1"]).long())


def test_voc_aug_leak_check_and_bad_input(tmp_path, capsys):
    builder = build_voc_aug
    list_path = tmp_path / "train_aug.txt"
    list_path.write_text("a\nb\n")
    builder.check_no_leak(list_path, {"c"})
    with pytest.raises(builder.BuildError, match="1 VOC val ids, e.g. b"):
        builder.check_no_leak(list_path, {"b", "c"})
    assert builder.main(["--voc", str(tmp_path / "nowhere"), "--sbd", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere/ImageSets/Segmentation/train.txt" in err


# ---------------------------------------------------------------- Cityscapes, CamVid, folder


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    label_ids = np.array([[7, 8, 26, 33], [0, 4, 255, 24], [11, 23, 1, 31]], dtype=np.uint8)
    train_ids = np.array([[0, 1, 13, 18], [255, 255, 255, 11], [2, 10, 255, 16]])
    for city, stem in [("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")]:
        save_rgb(tmp_path / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", np.full((3, 4, 3), 100))
        save_index_png(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", label_ids, palette=False)
    dataset = build(params(dataset="cityscapes", data_dir=str(tmp_path), num_classes=19), "val", False)
    assert dataset.names == ["aachen/aachen_000000_000019", "bremen/bremen_000001_000019"]
    assert len(dataset.classes) == 19 == len(dataset.palette) and dataset.classes[13] == "car"
    image, label = dataset[1]
    check_item(image, label, (3, 4))
    assert torch.equal(label, torch.from_numpy(train_ids))
    train = build(params(dataset="cityscapes", data_dir=str(tmp_path), num_classes=19, crop_size=8), "val",
                          True)
    assert set(train[0][1].unique().tolist()) <= {0, 1, 2, 10, 11, 13, 16, 18, 255}


def make_camvid(root: Path, split: str, names: list[str], seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays, lines = {}, []
    for name in names:
        save_rgb(root / split / f"{name}.png", rng.integers(0, 256, (12, 16, 3)))
        arrays[name] = random_label(rng, (12, 16), list(range(12)))
        save_index_png(root / f"{split}annot" / f"{name}.png", arrays[name], palette=False)
        lines.append(f"/SegNet/CamVid/{split}/{name}.png /SegNet/CamVid/{split}annot/{name}.png")
    (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return arrays


def test_camvid_resolves_segnet_paths_and_voids_class_11(tmp_path):
    arrays = make_camvid(tmp_path, "train", ["0001TP_006690", "Seq05VD_f00000"])
    dataset = build(params(dataset="camvid", data_dir=str(tmp_path), num_classes=11), "train", False)
    assert dataset.names == ["0001TP_006690", "Seq05VD_f00000"] and dataset.classes[0] == "Sky"
    for i, name in enumerate(dataset.names):
        image, label = dataset[i]
        check_item(image, label, (12, 16))
        expected = torch.from_numpy(arrays[name]).long()
        assert torch.equal(label, expected.where(expected != 11, 255))
    image, label = build(params(dataset="camvid", data_dir=str(tmp_path), num_classes=11), "train", True)[0]
    check_item(image, label, (32, 32))
    assert 11 not in label.unique().tolist()


def test_camvid_split_sequences_take_whole_drives_from_every_list(tmp_path):
    make_camvid(tmp_path, "train", ["0001TP_000010", "0006R0_000020", "0016E5_000030"])
    make_camvid(tmp_path, "val", ["0016E5_000040"], seed=1)
    make_camvid(tmp_path, "test", ["Seq05VD_f00000"], seed=2)
    p = params(dataset="camvid", data_dir=str(tmp_path), num_classes=11,
               split_sequences={"train": ["0001TP", "0016E5"], "val": ["0006R0"]})
    assert build(p, "train", False).names == ["0001TP_000010", "0016E5_000030", "0016E5_000040"]
    assert build(p, "val", False).names == ["0006R0_000020"]
    # A split it does not name is refused: SegNet's test list shares drive 0001TP with train.
    expect_error(r"split 'test' is not in split_sequences \(which names train, val\); add its sequences there",
                 build, p, "test", False)
    with_test = replace(p, split_sequences={**p[0].split_sequences, "test": ["Seq05VD"]})
    assert build(with_test, "test", False).names == ["Seq05VD_f00000"]
    expect_error(r"sequence 'Seq06' of split 'val' has no labelled frames in train\.txt, val\.txt, test\.txt .*"
                 r"\(sequences there: 0001TP, 0006R0, 0016E5, Seq05VD\)", build,
                 replace(p, split_sequences={"val": ["Seq06"]}), "val", False)


def make_folder(root: Path, names: list[str], seed=0) -> dict[str, np.ndarray]:
    """Grayscale images (like chest X-rays) with 0/255 binary masks."""
    rng = np.random.default_rng(seed)
    masks = {}
    for name in names:
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 14)).astype(np.uint8)).save(root / "images" / f"{name}.png")
        masks[name] = random_label(rng, (10, 14), [0, 255])
        save_index_png(root / "masks" / f"{name}.png", masks[name], palette=False)
    return masks


def test_folder_with_mask_values_and_seeded_split(tmp_path):
    names = [f"case_{i:02d}" for i in range(10)]
    masks = make_folder(tmp_path, names)
    p = params(dataset="folder", data_dir=str(tmp_path), num_classes=2, mask_values={"0": 0, "255": 1},
               val_fraction=0.3, class_names=["background", "lung"])
    train, val = build(p, "train", False), build(p, "val", False)
    assert len(val) == 3 and len(train) == 7 and sorted(train.names + val.names) == names
    assert build(p, "val", False).names == val.names  # the same split every time
    assert train.classes == ["background", "lung"] and len(train.palette) == 2
    image, label = val[0]
    check_item(image, label, (10, 14))
    assert torch.equal(label, torch.from_numpy(masks[val.names[0]] // 255).long())
    pixels = image
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[0], pixels[2])  # grayscale -> RGB


def test_folder_split_lists_and_unlabelled_test_split(tmp_path):
    make_folder(tmp_path, ["a", "b", "c"])
    (tmp_path / "train.txt").write_text("c\na\n")
    Image.fromarray(np.zeros((10, 14), np.uint8)).save(tmp_path / "images" / "t.png")
    (tmp_path / "test.txt").write_text("t\n")
    p = params(dataset="folder", data_dir=str(tmp_path), num_classes=2, mask_values={"0": 0, "255": 1})
    assert build(p, "train", False).names == ["c", "a"]
    test = build(p, "test", False)
    assert not test.has_labels and (test[0][1] == 255).all()


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed_and_has_void_borders():
    p = params(dataset="synthetic", data_dir="", num_classes=5, synthetic_image_size=64, synthetic_val_images=6)
    first, again = build(p, "val", False), build(p, "val", False)
    assert len(first) == 6 and first.classes[0] == "background" and len(first.palette) == 5
    for i in reversed(range(6)):  # order does not matter
        image, label = first[i]
        check_item(image, label, (64, 64))
        assert torch.equal(image, again[i][0]) and torch.equal(label, again[i][1])
    labels = torch.stack([first[i][1] for i in range(6)])
    assert set(labels.unique().tolist()) == {0, 1, 2, 3, 4, 255}
    assert 0.01 < (labels == 255).float().mean() < 0.2
    other_seed = build(replace(p, synthetic_seed=1), "val", False)
    assert not torch.equal(other_seed[0][0], first[0][0])
    assert not torch.equal(build(p, "train", False)[0][0], first[0][0])  # splits differ
    train = build(replace(p, crop_size=48), "train", True)
    assert len(train) == DataConfig.synthetic_train_images
    check_item(*train[0], (48, 48))


def test_synthetic_void_borders_match_a_brute_force_reference():
    rng = np.random.default_rng(3)
    label = np.kron(rng.integers(0, 5, (4, 5)), np.ones((4, 3), dtype=np.uint8)).astype(np.uint8)
    expected = label.copy()
    for y in range(label.shape[0]):
        for x in range(label.shape[1]):
            window = label[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
            if (window != label[y, x]).any():
                expected[y, x] = 255
    assert np.array_equal(void_borders(label), expected)


def render_testing_every_pixel(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """synthetic.render as it was first written: every clutter piece and shape tested at every pixel."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    image = synthetic._colour_field(rng, size)
    for _ in range(rng.integers(4, 12)):
        grey = rng.uniform(30, 230) + rng.uniform(-12, 12, 3)
        cx, cy = rng.uniform(0, size, 2)
        u, v = synthetic._rotated(x - cx, y - cy, rng.uniform(0, np.pi))
        if rng.random() < 0.6:
            clutter = (np.abs(u) <= rng.uniform(0.025, 0.15) * size) & (np.abs(v) <= rng.uniform(1, 4))
        else:
            clutter = u ** 2 + v ** 2 <= (2 * rng.uniform(1, 4)) ** 2
        image[clutter] = grey
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 5)):
        kind = int(rng.integers(1, 5))
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        radius, aspect, angle = rng.uniform(0.12, 0.3) * size, rng.uniform(0.6, 1.0), rng.uniform(0, 2 * np.pi)
        u, v = synthetic._rotated(x - cx, y - cy, angle)
        inside = synthetic._shape_mask(kind, u, v, radius, aspect)
        color = synthetic.OBJECT_COLORS[kind - 1] + rng.uniform(-25, 25, 3)
        shade = synthetic._texture(kind, u, v, rng.uniform(3, 7), rng.uniform(0, 2 * np.pi))
        image[inside] = shade[inside, None] * color
        label[inside] = kind
    image += rng.normal(0, synthetic.NOISE_STD, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), void_borders(label)


@pytest.mark.parametrize("size", [17, 48, 64, 101, 256])
def test_synthetic_images_drawn_in_bounding_boxes_equal_every_pixel_tested(size):
    for seed in range(20):
        image, label = synthetic.render(np.random.default_rng(seed), size)
        expected_image, expected_label = render_testing_every_pixel(np.random.default_rng(seed), size)
        assert np.array_equal(image, expected_image) and np.array_equal(label, expected_label), (size, seed)


# ---------------------------------------------------------------- augmentation


def coordinate_image(height=45, width=60) -> tuple[np.ndarray, np.ndarray]:
    """Red = 2·x, green = 2·y (linear ramps survive bilinear resizing), and a pseudo-random label of (x, y)."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([2 * x, 2 * y, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    return image, label_of(x, y)


def label_of(x, y):
    return (x * 7 + y * 3) % 21


@pytest.mark.parametrize("flip", [True, False])
def test_augmentation_keeps_image_and_label_aligned(flip):
    """After random scale/crop/pad/flip, the label equals label_of(source x, source y) read back from the image.

    Where red and green are even, the output pixel samples within 1/4 pixel of source pixel (red/2, green/2), the
    one nearest-exact interpolation of the label must pick; padding is the mean colour in the image, 255 in the label.
    """
    height, width = 45, 60
    image, label = coordinate_image(height, width)
    transform = train_transform(crop_size=64, scale_range=[0.5, 2.0], flip=flip, color_jitter=0.0)
    checked = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out_image, out_label = transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
                                         tv_tensors.Mask(torch.from_numpy(label.astype(np.uint8))))
        assert out_image.shape == (3, 64, 64) and out_label.shape == (64, 64) and out_label.dtype == torch.uint8
        padded = out_label == 255
        mean_color = torch.tensor(MEAN_COLOR, dtype=torch.uint8)[:, None]
        assert (out_image[:, padded] == mean_color).all() and (out_image[:, ~padded] != mean_color).any(0).all()
        red, green, _ = out_image.long()
        x, y = red // 2, green // 2
        exact = (red % 2 == 0) & (green % 2 == 0) & ~padded
        exact &= (x >= 3) & (x < width - 3) & (y >= 3) & (y < height - 3)  # away from the edges' clamped filter
        assert torch.equal(out_label[exact], label_of(x[exact], y[exact]))
        checked += int(exact.sum())
    assert checked > 40 * 64 * 64 * 0.05  # not vacuous: thousands of pixels checked


def test_augmentation_with_colour_jitter_keeps_alignment():
    """Black/white classes stay separable under brightness/contrast/saturation/hue jitter."""
    rng = np.random.default_rng(1)
    transform = train_transform(crop_size=40, scale_range=[1.0, 1.0], flip=True, color_jitter=0.4)
    for seed in range(10):
        torch.manual_seed(seed)
        label = np.kron(rng.integers(0, 2, (8, 8)), np.ones((5, 5), dtype=np.int64))
        image = np.repeat(label[..., None] * 255, 3, axis=2).astype(np.uint8)
        out_image, out_label = transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
                                         tv_tensors.Mask(torch.from_numpy(label.astype(np.uint8))))
        brightness = out_image.float().mean(0)
        valid = out_label != 255
        threshold = (brightness[valid].min() + brightness[valid].max()) / 2
        assert torch.equal((brightness[valid] > threshold).long(), out_label[valid])


def test_scale_one_without_flip_is_pad_exactly_and_the_device_normalises_as_the_reference():
    """Brute-force reference: scale 1, no flip, crop larger than the image -> the image padded with the mean colour
    and the label with 255, uint8; utils.Placement then gives (image / 255 - mean) / std, the padding within 0.01 of
    0, and int64 labels, in the layout asked."""
    rng = np.random.default_rng(2)
    image = torch.from_numpy(rng.integers(0, 256, (3, 20, 30), dtype=np.uint8))
    label = torch.from_numpy(rng.integers(0, 21, (20, 30), dtype=np.uint8))
    out_image, out_label = train_transform(40, [1.0, 1.0], False, 0.0)(tv_tensors.Image(image), tv_tensors.Mask(label))
    rows, cols = torch.nonzero(out_label != 255, as_tuple=True)
    top, left = int(rows.min()), int(cols.min())
    window = (slice(top, top + 20), slice(left, left + 30))
    assert torch.equal(out_image[(slice(None), *window)], image) and torch.equal(out_label[window], label)
    padded = out_label == 255
    assert int(padded.sum()) == 40 * 40 - 20 * 30
    assert (out_image[:, padded] == torch.tensor(MEAN_COLOR, dtype=torch.uint8)[:, None]).all()

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for channels_last in (False, True):
        images, labels = utils.Placement(torch.device("cpu"), channels_last).batch(out_image[None], out_label[None])
        assert images.dtype == torch.float32 and labels.dtype == torch.int64 and torch.equal(labels[0], out_label)
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.allclose(images[0], (out_image / 255 - mean) / std, atol=1e-5)
        assert images[0][:, padded].abs().max() < 0.01
        assert torch.equal(normalise(out_image), images[0])


# ---------------------------------------------------------------- bad input


def expect_error(match: str, build, *args):
    with pytest.raises(DatasetError, match=match) as info:
        result = build(*args)
        if isinstance(result, torch.utils.data.Dataset):
            result[0]
    assert "\n" not in str(info.value)
    return info.value


def test_construction_errors_name_the_file_or_key(voc, tmp_path):
    root, _ = voc
    voc_params = params(dataset="voc", data_dir=str(root), num_classes=21)
    expect_error("num_classes is 20 but dataset 'voc' has 21 classes", build,
                 params(dataset="voc", data_dir=str(root), num_classes=20), "train", False)
    expect_error(f"VOC data_dir not found: {tmp_path}/missing", build,
                 params(dataset="voc", data_dir=str(tmp_path / "missing"), num_classes=21), "val", False)
    expect_error(r"split list not found: .*ImageSets/Segmentation/trainval\.txt", build, voc_params,
                 "trainval", False)
    (root / "JPEGImages" / "2008_000011.jpg").unlink()
    expect_error(r"val\.txt not found: .*JPEGImages/2008_000011\.jpg", build, voc_params, "val", False)
    (root / "SegmentationClass" / "2008_000002.png").unlink()
    expect_error(r"train\.txt not found: .*SegmentationClass/2008_000002\.png", build, voc_params, "train",
                 False)
    expect_error("unknown dataset 'vocc'", build, params(dataset="vocc", data_dir="", num_classes=21), "val",
                 False)
    expect_error("split_sequences is for camvid only", build,
                 params(dataset="voc", data_dir=str(root), num_classes=21, split_sequences={"val": ["x"]}), "val",
                 False)
    expect_error(r"mask_values\['255'\] = 2 is not a class", build,
                 params(dataset="folder", data_dir=str(make_folder_root(tmp_path)), num_classes=2,
                        mask_values={"255": 2}), "train", False)
    expect_error(r"Cityscapes image folder not found: .*leftImg8bit/val", build,
                 params(dataset="cityscapes", data_dir=str(tmp_path), num_classes=19), "val", False)
    expect_error(r"split list not found: .*/val\.txt", build,
                 params(dataset="camvid", data_dir=str(tmp_path), num_classes=11), "val", False)


def make_folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "own"
    if not root.exists():
        make_folder(root, ["a", "b", "c"])
    return root


def test_load_time_errors_name_the_file(voc):
    root, _ = voc
    dataset = build(params(dataset="voc", data_dir=str(root), num_classes=21), "train", False)
    bad_image = root / "JPEGImages" / "2008_000001.jpg"
    bad_image.write_bytes(b"not a jpeg")
    expect_error(f"unreadable image {bad_image}", dataset.__getitem__, 0)
    save_index_png(root / "SegmentationClass" / "2008_000002.png", np.zeros((31, 40)))
    expect_error(r"label .*2008_000002\.png is 40x31 but image .*2008_000002\.jpg is 40x30", dataset.__getitem__, 1)
    save_index_png(root / "SegmentationClass" / "2008_000003.png", np.full((30, 40), 21))
    expect_error(r"label .*2008_000003\.png holds value\(s\) \[21\] that are not classes 0..20 or 255",
                 dataset.__getitem__, 2)
    save_rgb(root / "SegmentationClass" / "2008_000003.png", np.zeros((30, 40, 3)))
    expect_error(r"label .*2008_000003\.png has mode RGB", dataset.__getitem__, 2)


def test_decompression_bombs_and_byte_order_marks(voc, monkeypatch):
    root, arrays = voc
    list_path = root / "ImageSets" / "Segmentation" / "val.txt"
    list_path.write_text("\ufeff" + list_path.read_text(), encoding="utf-8")  # as Windows Notepad saves it
    dataset = build(params(dataset="voc", data_dir=str(root), num_classes=21), "val", False)
    assert dataset.names == ["2008_000010", "2008_000011"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 30×40 images are then over twice PIL's limit
    expect_error(r"unreadable image .*2008_000010\.jpg: Image size \(1200 pixels\) exceeds limit", dataset.__getitem__,
                 0)


def test_worker_errors_reach_the_main_process_as_one_line_naming_the_file(voc):
    root, _ = voc
    dataset = build(params(dataset="voc", data_dir=str(root), num_classes=21), "train", True)
    save_index_png(root / "SegmentationClass" / "2008_000002.png", np.full((30, 40), 99))
    loader = build_dataloader(dataset, batch_size=1, sampler=SequentialSampler(dataset), num_workers=1)
    with pytest.raises(DatasetError) as info:
        list(loader)
    message = str(info.value)
    assert "\n" not in message and "2008_000002.png holds value(s) [99]" in message


# ---------------------------------------------------------------- loaders and pictures


def test_dataloader_batches_fixed_size_crops(voc):
    root, arrays = voc
    p = params(dataset="voc", data_dir=str(root), num_classes=21, crop_size=24)
    dataset = build(p, "train", True)
    train = build_dataloader(dataset, batch_size=2, sampler=RandomSampler(dataset), num_workers=0, drop_last=True)
    batches = list(train)
    assert len(batches) == 1 and batches[0][0].shape == (2, 3, 24, 24) and batches[0][1].shape == (2, 24, 24)
    assert batches[0][0].dtype == torch.uint8 and batches[0][1].dtype == torch.uint8  # a quarter of float32's bytes


def test_epoch_sampler_shards_every_image_and_skips_what_a_resumed_run_trained():
    shards = [[i for i, _ in EpochSampler(10, 2, seed=1, rank=r, world_size=3)] for r in range(3)]
    assert all(len(s) == 4 for s in shards) and set(sum(shards, [])) == set(range(10))
    sampler = EpochSampler(10, 2, seed=1)
    sampler.set_epoch(5)
    full = list(sampler)
    sampler.set_epoch(5, skip_batches=2)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(6)
    assert [i for i, _ in sampler] != [i for i, _ in full]
    other_seed = EpochSampler(10, 2, seed=2)
    other_seed.set_epoch(4)  # seed + epoch is no shortcut: seed 2's epoch 4 is not seed 1's epoch 5
    assert list(other_seed) != full


@pytest.mark.parametrize("workers", [0, 2])
def test_a_samples_augmentation_depends_only_on_seed_epoch_and_index(workers):
    """Through any number of workers, and when a resumed run skips batches, sample i of an epoch is the same."""
    config = DataConfig(dataset="synthetic", data_dir="", synthetic_image_size=48, synthetic_train_images=12,
                        crop_size=32, scale_range=[0.6, 1.4], color_jitter=0.3)
    dataset = build_dataset(config, 5, "train", train=True)

    def epoch_items(num_workers: int, skip: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        sampler = EpochSampler(len(dataset), 3, seed=7)
        sampler.set_epoch(2, skip_batches=skip)
        loader = build_dataloader(dataset, 3, sampler, num_workers, drop_last=True, pin_memory=False)
        order = [i for i, _ in sampler]
        items = [(image, label) for images, labels in loader for image, label in zip(images, labels)]
        return dict(zip(order, items))

    reference = epoch_items(0, skip=0)
    assert len({image.sum().item() for image, _ in reference.values()}) == 12  # the augmentation does vary
    for index, (image, label) in epoch_items(workers, skip=2).items():
        assert torch.equal(image, reference[index][0]) and torch.equal(label, reference[index][1])


def test_denormalise_inverts_normalisation_and_colorize_uses_the_palette():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 4, 1)  # 3×4×256: every value in every channel
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(denormalise((pixels / 255 - mean) / std), pixels)
    label = torch.tensor([[0, 1], [255, 2]])
    picture = colorize(label, [(1, 2, 3), (4, 5, 6), (7, 8, 9)])
    assert picture.dtype == torch.uint8 and picture.shape == (3, 2, 2)
    assert picture[:, 0, 1].tolist() == [4, 5, 6] and picture[:, 1, 0].tolist() == [255, 255, 255]
    assert picture[:, 1, 1].tolist() == [7, 8, 9]


# ---------------------------------------------------------------- real data (../shared/data, present in CI)


def test_real_voc_subset_loads(shared_data):
    root = shared_data / "voc2012_2007subset" / "VOCdevkit" / "VOC2012"
    p = params(dataset="voc", data_dir=str(root), num_classes=21, crop_size=64)
    val, train = build(p, "val", False), build(p, "train", True)
    assert len(train) == 311 and len(val) == 321
    for i in range(3):
        image, label = val[i]
        width, height = Image.open(root / "JPEGImages" / f"{val.names[i]}.jpg").size
        check_item(image, label, (height, width))
        values = set(label.unique().tolist())
        assert values <= set(range(21)) | {255} and 255 in values and len(values - {0, 255}) >= 1
        check_item(*train[i], (64, 64))


def test_real_camvid_loads(shared_data):
    root = shared_data / "camvid"
    p = params(dataset="camvid", data_dir=str(root), num_classes=11, crop_size=64)
    val, train = build(p, "val", False), build(p, "train", True)
    assert len(train) == 367 and len(val) == 101 and train.names[0] == "0001TP_006690"
    for i in range(3):
        image, label = val[i]
        check_item(image, label, (360, 480))
        assert set(label.unique().tolist()) <= set(range(11)) | {255}
        check_item(*train[i], (64, 64))


LOADER_ALIVE_AT_EXIT = """
import torch
from torch.utils.data import SequentialSampler, TensorDataset
from model.data_loader import build_dataloader
items = TensorDataset(torch.arange(8.0))
loader = build_dataloader(items, 2, SequentialSampler(items), num_workers=2)
first = next(iter(loader))
KEPT = [loader, first]
KEPT.append(KEPT)  # a reference cycle: no garbage collection before the exit handlers run
print("exiting", flush=True)
"""


def test_a_process_exits_while_its_loader_workers_are_alive():
    """The workers ignore stop signals sent to the group, but not multiprocessing's exit handler, which stops them
    with SIGTERM from the main process and waits for them (ignoring it hung the test process at exit)."""
    exited = subprocess.run([sys.executable, "-c", LOADER_ALIVE_AT_EXIT], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (exited.returncode, exited.stdout) == (0, "exiting\n"), exited.stderr[-2000:]


# ---------------------------------------------------------------- split names and label values before training

def test_split_names_a_data_set_lacks_are_one_line(tmp_path):
    with pytest.raises(DatasetError, match=r"^the synthetic set has the splits 'train' and 'val', not 'test'$"):
        build(params(dataset="synthetic", data_dir="", num_classes=5), "test", False)
    with pytest.raises(DatasetError, match=r"dataset 'voc' has no split 'train_aug' .*set train_split to \"train\""):
        build(params(dataset="voc", data_dir=str(tmp_path), num_classes=21), "train_aug", True)


def test_label_values_are_checked_on_a_sample_naming_mask_values(tmp_path, monkeypatch):
    make_folder(tmp_path, [f"case_{i:03d}" for i in range(100)])
    p = params(dataset="folder", data_dir=str(tmp_path), num_classes=2, mask_values={"0": 0, "255": 1})
    dataset = build(p, "train", False)
    data_loader.check_label_values(dataset)  # a valid data set passes
    bad = dataset.label_paths[0]  # the first file is always in the sample
    save_index_png(bad, np.full((10, 14), 7, np.uint8), palette=False)
    with pytest.raises(DatasetError, match=rf"label {bad} holds value\(s\) \[7\] .* with mask_values, e"):
        data_loader.check_label_values(dataset)
    read = []
    monkeypatch.setattr(data_loader, "read_label", lambda path, lut, n: read.append(path) or np.array([0, 1]))
    data_loader.check_label_values(dataset, sample=30)
    assert len(read) == len(set(read)) == 30 and len(dataset) == 80  # spread over the split, not its start
    assert read[-1] in dataset.label_paths[-3:]
    read.clear()
    data_loader.check_label_values(dataset, sample=100)
    assert read == dataset.label_paths  # a small split: every file

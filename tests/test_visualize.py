"""model/visualize.py: error mask against a per-pixel loop, exact panel contents at known geometry, legend, PNGs."""
import io
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import utils
from model.datasets.base import IGNORE_INDEX
from model.datasets.camvid import CAMVID_PALETTE
from model.datasets.cityscapes import CITYSCAPES_PALETTE
from model.datasets.synthetic import SYNTHETIC_PALETTE
from model.datasets.voc import VOC_CLASSES, voc_palette
from model.transforms import colorize
from model.visualize import (BACKGROUND, VOID_COLOR, confusion_matrix_png, error_mask,
                             legend_entries, overlay_picture, picture_layout, prediction_picture, row_normalised,
                             picture_png, wrong_color)

PALETTE = voc_palette(21)


def random_case(height, width, num_classes=21, seed=0, void_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    label = torch.randint(0, num_classes, (height, width), generator=g)
    label[torch.rand(height, width, generator=g) < void_fraction] = IGNORE_INDEX
    pred = torch.where(torch.rand(height, width, generator=g) < 0.5, label,
                       torch.randint(0, num_classes, (height, width), generator=g))
    pred[pred == IGNORE_INDEX] = 0
    return image, label, pred


def panel(picture, layout, index):
    """Panel `index` of a picture, shrunk back to image resolution after checking each block is one colour."""
    top, left = layout.panel_origin(index)
    crop = picture[:, top:top + layout.panel_height, left:left + layout.panel_width]
    s = layout.scale
    small = crop[:, ::s, ::s]
    assert torch.equal(crop, small.repeat_interleave(s, 1).repeat_interleave(s, 2))
    return small


def test_error_mask_matches_per_pixel_loop():
    for seed in range(3):
        _, label, pred = random_case(17, 23, seed=seed)
        label = label.to(torch.uint8)      # dtypes may differ
        mask = error_mask(label, pred)
        assert mask.dtype == torch.bool and mask.shape == label.shape
        for y in range(17):
            for x in range(23):
                t, p = int(label[y, x]), int(pred[y, x])
                assert bool(mask[y, x]) == (t != IGNORE_INDEX and p != t)
    with pytest.raises(ValueError):
        error_mask(torch.zeros(3, 4), torch.zeros(4, 3))


@pytest.mark.parametrize("height,width", [(20, 30), (64, 64), (375, 500)])
def test_panels_hold_exactly_the_image_truth_prediction_and_errors(height, width):
    image, label, pred = random_case(height, width, seed=height)
    picture = prediction_picture(image, label, pred, PALETTE, VOC_CLASSES)
    layout = picture_layout(height, width, 4)
    assert picture.dtype == torch.uint8 and picture.shape[0] == 3 and picture.shape[2] == layout.width
    assert max(layout.panel_height, layout.panel_width) >= 200      # small images are enlarged
    assert torch.equal(panel(picture, layout, 0), image)
    assert torch.equal(panel(picture, layout, 1), colorize(label, PALETTE))
    assert torch.equal(panel(picture, layout, 2), colorize(pred, PALETTE))

    errors = panel(picture, layout, 3).long()
    wrong, void = error_mask(label, pred), label == IGNORE_INDEX
    assert 0 < wrong.sum() and 0 < void.sum() and (~wrong & ~void).sum() > 0

    def is_color(rgb: tuple[int, int, int]) -> torch.Tensor:
        return (errors == torch.tensor(rgb).view(3, 1, 1)).all(0)
    assert torch.equal(is_color(wrong_color(PALETTE)), wrong)
    assert torch.equal(is_color(VOID_COLOR), void)
    rest = errors[:, ~wrong & ~void]
    luminance = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[~wrong & ~void]
    assert torch.equal(rest[0], rest[1]) and torch.equal(rest[1], rest[2])       # grey
    assert ((rest[0] - luminance / 2).abs() <= 1).all()                         # dimmed copy of the image


def test_void_in_truth_is_void_in_errors_panel_even_where_prediction_is_a_class():
    image, label, pred = random_case(8, 8, void_fraction=0.0)
    label[2:5, 2:5] = IGNORE_INDEX
    pred[2:5, 2:5] = 3
    layout = picture_layout(8, 8, 4)
    errors = panel(prediction_picture(image, label, pred, PALETTE, VOC_CLASSES), layout, 3)
    assert (errors[:, 2:5, 2:5] == torch.tensor(VOID_COLOR, dtype=torch.uint8).view(3, 1, 1)).all()


def test_without_label_there_are_two_panels():
    image, _, pred = random_case(40, 50)
    picture = prediction_picture(image, None, pred, PALETTE, VOC_CLASSES)
    layout = picture_layout(40, 50, 2)
    assert picture.shape[2] == layout.width
    assert torch.equal(panel(picture, layout, 0), image)
    assert torch.equal(panel(picture, layout, 1), colorize(pred, PALETTE))
    top, left = layout.panel_origin(1)
    right_margin = picture[:, top:top + layout.panel_height, left + layout.panel_width:]
    assert (right_margin == torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1)).all()
    title_band = picture[:, :top, left:left + layout.panel_width]
    assert (title_band.int().sum(0) > 3 * 200).any()          # the title text is drawn above the panel


def test_legend_lists_exactly_the_classes_present():
    names = ["c0", "c1", "c2", "c3", "c4", "c5"]
    label = torch.tensor([[0, 2], [5, IGNORE_INDEX]])
    pred = torch.tensor([[2, 3], [5, 2]])
    entries = legend_entries(label, pred, PALETTE, names)
    assert entries == [("c0", PALETTE[0]), ("c2", PALETTE[2]), ("c3", PALETTE[3]), ("c5", PALETTE[5]),
                       ("void", VOID_COLOR), ("wrong", wrong_color(PALETTE))]
    assert legend_entries(None, pred, PALETTE, names) == [("c2", PALETTE[2]), ("c3", PALETTE[3]), ("c5", PALETTE[5])]
    assert legend_entries(None, torch.tensor([[1, 9]]), PALETTE, names)[-1] == ("void", VOID_COLOR)


@pytest.mark.parametrize("palette", [SYNTHETIC_PALETTE, PALETTE, CAMVID_PALETTE, CITYSCAPES_PALETTE])
def test_wrong_pixels_never_look_like_a_class_in_the_legend(palette):
    """Each data set's errors panel draws wrong pixels in a colour at least 100 (RGB distance) from every class
    colour and void's: a pure red beside the synthetic disc's 220,50,50 (79 apart) read as one colour."""
    label = torch.arange(len(palette)).repeat(3, 1)
    pred = (label + 1) % len(palette)  # every pixel wrong
    entries = legend_entries(label, pred, palette, [f"c{i}" for i in range(len(palette))])
    assert entries[-1][0] == "wrong" and len(entries) == len(palette) + 1
    wrong = entries[-1][1]
    assert min(math.dist(wrong, color) for _, color in [*entries[:-1], ("void", VOID_COLOR)]) >= 100
    errors = prediction_picture(torch.zeros(3, *label.shape, dtype=torch.uint8), label, pred, palette,
                                [f"c{i}" for i in range(len(palette))])
    panel_pixels = panel(errors, picture_layout(*label.shape, 4), 3)
    assert (panel_pixels == torch.tensor(wrong, dtype=torch.uint8).view(3, 1, 1)).all()


def test_legend_swatches_are_drawn_below_the_panels():
    label = torch.full((30, 30), 15)
    label[:10] = 7
    pred = label.clone()
    pred[:5] = 12
    image = torch.zeros(3, 30, 30, dtype=torch.uint8)
    picture = prediction_picture(image, label, pred, PALETTE, VOC_CLASSES)
    layout = picture_layout(30, 30, 4)
    legend = picture[:, layout.panel_origin(0)[0] + layout.panel_height:]
    def count(rgb):
        return int((legend == torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1)).all(0).sum())
    for c in (7, 12, 15):
        assert count(PALETTE[c]) >= (layout.font_size - 2) ** 2
    assert count(wrong_color(PALETTE)) >= (layout.font_size - 2) ** 2
    assert count(PALETTE[9]) == 0          # a class in neither truth nor prediction


def test_a_picture_is_written_as_png(tmp_path):
    image, label, pred = random_case(16, 16)
    picture = prediction_picture(image, label, pred, PALETTE, VOC_CLASSES)
    path = tmp_path / "sub" / "pic.png"
    utils.write_png(path, picture_png(picture))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.equal(torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1), picture)
    with pytest.raises(ValueError):
        utils.write_png(tmp_path / "pic.jpg", picture_png(picture))


def test_row_normalised_hand_built():
    matrix = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = row_normalised(matrix)
        out_tensor = row_normalised(torch.tensor(matrix))
    expected = np.array([[0.75, 0.25, 0.0], [np.nan] * 3, [0.25, 0.25, 0.5]])
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out_tensor, expected)


@pytest.mark.parametrize("num_classes", [3, 21])
def test_confusion_matrix_png_is_a_png(num_classes):
    g = torch.Generator().manual_seed(1)
    matrix = torch.randint(0, 100, (num_classes, num_classes), generator=g)
    matrix[1] = 0                            # a class absent from the truth
    names = VOC_CLASSES[:num_classes]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        png = confusion_matrix_png(matrix, names, title="test")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG"
        width, height = img.size
    assert 400 <= width <= 2500 and 400 <= height <= 2500
    if num_classes == 21:
        assert width >= 900                  # room for 21 labelled columns
    with pytest.raises(ValueError):
        confusion_matrix_png(matrix, names[:-1])


@pytest.mark.parametrize("picture", ["overlay", "panels"])
def test_the_legend_of_a_narrow_image_is_never_cut_off(picture):
    image = torch.zeros(3, 90, 6, dtype=torch.uint8)
    pred = torch.zeros(90, 6, dtype=torch.long)
    names, palette = ["a class with a long name"], [(200, 40, 40)]
    drawn = (overlay_picture(image, pred, palette, names) if picture == "overlay"
             else prediction_picture(image, pred, pred, palette, names))
    legend = drawn[:, -40:, :]  # the legend's row, below the panels
    assert (legend[:, :, -1] == torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1)).all(), "text reaches the edge"
    text = (legend != torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1)).any(0).any(0).nonzero()
    assert drawn.shape[2] - text.max() <= 12  # the name ends near the widened edge: it was drawn whole

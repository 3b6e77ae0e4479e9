"""predict.py, model.inference.segment and hubconf.py on a small random GCN: one label map and one overlay per
readable image at its own size, the same predictions as evaluate.py, names that never collide, broken files."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import errors
import evaluate
import predict
import utils
from model.datasets.voc import voc_palette
from model.inference import predict_logits, segment
from model.net import GCN, GCNConfig
from model import normalise
from model.visualize import OVERLAY_ALPHA, overlay_picture, picture_layout

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["background", "cat", "dog"]
PALETTE = [list(c) for c in voc_palette(3)]  # what the `folder` data set draws with, so evaluate.py's PNGs match
TIE = 1e-3  # pixels whose two best logits are closer than this may go either way between code paths


# float32 (amp false): compared with float32 logits; bf16 is tested in tests/test_train_step.py
TRAINING_PARAMS = {"tta_scales": [0.75, 1.0], "tta_flip": True, "learning_rate": 0.01, "amp": False}


def write_checkpoint(path: Path, seed: int = 0, **extra) -> GCN:
    """A GCN-R18 (k = 3, 3 classes) with random weights and batch-norm statistics and logits of order 10, saved with
    the keys train.py writes (`extra` added); returns the model in eval mode."""
    torch.manual_seed(seed)
    model = GCN(GCNConfig(num_classes=3, backbone="resnet18", kernel_size=3)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        for p in model.heads.parameters():
            p.mul_(30)
    torch.save({"state_dict": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "class_names": CLASS_NAMES, "palette": PALETTE,
                "params": TRAINING_PARAMS, **extra}, path)
    return model


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 H×W×3: colour blobs (bilinear upsampled noise), so that the prediction has regions."""
    g = torch.Generator().manual_seed(seed)
    blobs = F.interpolate(torch.rand(1, 3, 4, 5, generator=g), size=(height, width), mode="bilinear")
    return (blobs[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def assert_labels_match_logits(labels: np.ndarray, logits: torch.Tensor) -> None:
    """labels (H×W) is the argmax of logits (1×C×H×W) wherever the best class wins by more than TIE."""
    top2 = logits[0].topk(2, dim=0).values
    decided = (top2[0] - top2[1] > TIE).numpy()
    expected = logits[0].argmax(0).numpy()
    assert labels.shape == expected.shape
    assert (labels == expected)[decided].all()
    assert decided.mean() > 0.99


def reference_logits(model: GCN, path: Path, **options) -> torch.Tensor:
    rgb = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    return predict_logits(model, normalise(rgb)[None], **options)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, GCN]:
    path = tmp_path_factory.mktemp("model") / "best.pth.tar"
    return path, write_checkpoint(path)


def run_predict(checkpoint_file: Path, *args: str) -> int:
    return predict.main(["--restore_file", str(checkpoint_file), *args])


def test_a_folder_gives_one_label_map_and_overlay_per_readable_image(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b").mkdir()
    (photos / ".cache").mkdir()
    Image.fromarray(smooth_image(37, 53, 0)).save(photos / "odd.png")
    Image.fromarray(smooth_image(64, 48, 1)).save(photos / "a" / "x.jpg", quality=95)
    Image.fromarray(smooth_image(64, 48, 2)).save(photos / "b" / "x.jpg", quality=95)  # same stem, same size: batched
    Image.fromarray(smooth_image(45, 29, 3)).convert("L").save(photos / "gray.png")
    rgba = np.concatenate([smooth_image(33, 71, 4), np.full((33, 71, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(photos / "rgba.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")  # fails at the header
    (photos / "truncated.jpg").write_bytes((photos / "a" / "x.jpg").read_bytes()[:700])  # fails when decoded
    (photos / "notes.txt").write_text("not an image, not an image suffix: ignored")
    Image.fromarray(smooth_image(20, 20, 5)).save(photos / ".cache" / "hidden.png")

    out = tmp_path / "out"
    assert run_predict(path, str(photos), "--out", str(out), "--batch_size", "2") == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "broken.jpg" in line] == \
        [f"unreadable image {photos / 'broken.jpg'}: cannot identify image file '{photos / 'broken.jpg'}'"]
    [truncated] = [line for line in err.splitlines() if "truncated.jpg" in line]
    assert truncated.startswith(f"unreadable image {photos / 'truncated.jpg'}: image file is truncated")
    names = {"odd.png": "odd.png", "a/x.jpg": "a/x.png", "b/x.jpg": "b/x.png", "gray.png": "gray.png",
             "rgba.png": "rgba.png"}
    for folder in ("labels", "overlays"):
        assert sorted(str(p.relative_to(out / folder)) for p in (out / folder).rglob("*.png")) == sorted(names.values())
    for source, name in names.items():
        image = Image.open(photos / source)
        label_png = Image.open(out / "labels" / name)
        assert label_png.mode == "P" and label_png.size == image.size
        assert label_png.getpalette()[:9] == [v for rgb in PALETTE for v in rgb]
        assert_labels_match_logits(np.array(label_png), reference_logits(model, photos / source))
        overlay = Image.open(out / "overlays" / name)
        lay = picture_layout(image.height, image.width, 1)
        assert overlay.mode == "RGB" and overlay.width == lay.width and overlay.height > lay.panel_height


def test_predictions_equal_evaluate_py_on_a_folder_data_set(checkpoint, tmp_path):
    path, _ = checkpoint
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    names = []
    for i, (h, w) in enumerate([(65, 97), (96, 128), (77, 50), (41, 83)]):
        names.append(f"img{i}")
        Image.fromarray(smooth_image(h, w, 10 + i)).save(data / "images" / f"img{i}.png")
        Image.fromarray(np.zeros((h, w), np.uint8)).save(data / "masks" / f"img{i}.png")
    (data / "val.txt").write_text("\n".join(names) + "\n")
    model_dir = tmp_path / "experiment"
    model_dir.mkdir()
    (model_dir / "params.json").write_text(json.dumps({
        "dataset": "folder", "data_dir": str(data), "num_classes": 3, "class_names": CLASS_NAMES, "num_workers": 0,
        "backbone": "resnet18", "kernel_size": 3, "amp": False}))
    (model_dir / utils.BEST_CHECKPOINT).write_bytes(path.read_bytes())

    evaluate.evaluate_checkpoint(evaluate.parse_args(["--model_dir", str(model_dir), "--save_predictions",
                                                      str(tmp_path / "eval"), "--num_pictures", "0"]))
    assert predict.main(["--model_dir", str(model_dir), str(data / "images"), "--out", str(tmp_path / "pred")]) == 0
    for name in names:
        expected = Image.open(tmp_path / "eval" / f"{name}.png")
        got = Image.open(tmp_path / "pred" / "labels" / f"{name}.png")
        assert np.array_equal(np.array(got), np.array(expected)), name
        assert got.getpalette() == expected.getpalette()


def test_batches_tta_and_windows_give_the_logits_of_predict_logits(checkpoint, tmp_path):
    path, model = checkpoint
    for i in range(3):
        Image.fromarray(smooth_image(70, 90, 20 + i)).save(tmp_path / f"{i}.png")
    for batch_size in ("1", "3"):
        out = tmp_path / f"out{batch_size}"
        assert run_predict(path, str(tmp_path / "*.png"), "--out", str(out), "--batch_size", batch_size,
                           "--tta", "--window", "64") == 0
        for i in range(3):
            logits = reference_logits(model, tmp_path / f"{i}.png", scales=[0.75, 1.0], flip=True, window=64)
            assert_labels_match_logits(np.array(Image.open(out / "labels" / f"{i}.png")), logits)
    plain = reference_logits(model, tmp_path / "0.png")
    with_options = reference_logits(model, tmp_path / "0.png", scales=[0.75, 1.0], flip=True, window=64)
    assert not torch.equal(plain.argmax(1), with_options.argmax(1))  # the options do change the prediction


def test_output_names_mirror_the_inputs_and_never_collide(tmp_path):
    for rel in ("a/x.jpg", "b/x.jpg", "b/deep/y.png", "c/z.jpg", "c/z.png", "c/.hidden/w.png", "c/out/old.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "c" / "readme.md").write_bytes(b"")
    names = predict.find_images([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")], tmp_path / "c/out")
    assert {str(f.relative_to(tmp_path)): str(n) for f, n in names.items()} == {
        "a/x.jpg": "a/x.png", "b/x.jpg": "b/x.png", "b/deep/y.png": "b/deep/y.png",
        "c/z.jpg": "c/z.jpg.png", "c/z.png": "c/z.png.png"}
    one_folder = predict.find_images([str(tmp_path / "b")], tmp_path / "out")
    assert sorted(map(str, one_folder.values())) == ["deep/y.png", "x.png"]
    globbed = predict.find_images([str(tmp_path / "*" / "x.jpg"), str(tmp_path / "a" / "x.jpg")], tmp_path / "out")
    assert [str(n) for n in globbed.values()] == ["a/x.png", "b/x.png"]  # each file once
    for missing in (tmp_path / "nope", tmp_path / "*.tif"):
        with pytest.raises(errors.UserError, match="nope: no such file|matches nothing"):
            predict.find_images([str(missing)], tmp_path / "out")


def test_bad_arguments_and_checkpoints_are_one_line_and_status_2(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    Image.fromarray(smooth_image(40, 40, 0)).save(tmp_path / "a.png")
    no_names = tmp_path / "old.pth.tar"
    torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if k != "palette"}, no_names)
    cases = [([str(tmp_path / "missing.png")], "missing.png: no such file or folder"),
             (["--restore_file", str(tmp_path / "none.pth")], "does not exist"),
             (["--restore_file", str(no_names)], "has no palette"),
             (["--batch_size", "0"], "must be positive")]
    for args, message in cases:
        assert predict.main(["--restore_file", str(path), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"),
                            *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_segment_takes_pil_images_and_uint8_or_float_tensors(checkpoint):
    _, model = checkpoint
    rgb = smooth_image(50, 70, 7)
    expected = predict_logits(model, normalise(torch.from_numpy(rgb).permute(2, 0, 1))[None]).argmax(1)[0]
    rgba = Image.fromarray(np.concatenate([rgb, np.zeros((50, 70, 1), np.uint8)], axis=2), "RGBA")
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    for image in (Image.fromarray(rgb), rgba, tensor, tensor / 255):
        labels = segment(model, image)
        assert labels.dtype == torch.int64 and (labels == expected).float().mean() > 0.999
    with pytest.raises(ValueError, match="3×H×W"):
        segment(model, tensor[0])


def test_torch_hub_loads_the_model_with_its_class_names_and_palette(checkpoint):
    path, model = checkpoint
    hub_model = torch.hub.load(str(REPO), "gcn", checkpoint=str(path), source="local")
    assert not hub_model.training and hub_model.class_names == CLASS_NAMES
    assert hub_model.palette == [tuple(c) for c in PALETTE]
    x = normalise(torch.from_numpy(smooth_image(33, 47, 8)).permute(2, 0, 1))[None]
    with torch.no_grad():
        assert torch.equal(hub_model(x), model(x))


def test_overlay_blends_class_colours_and_leaves_black_untinted():
    image = torch.from_numpy(smooth_image(40, 50, 9)).permute(2, 0, 1).contiguous()
    pred = torch.zeros(40, 50, dtype=torch.int64)
    pred[10:30, 5:25] = 1
    pred[:, 40:] = 2
    picture = overlay_picture(image, pred, PALETTE, CLASS_NAMES)
    lay = picture_layout(40, 50, 1)
    shown = picture[:, lay.gap:lay.gap + lay.panel_height:lay.scale, lay.gap:lay.gap + lay.panel_width:lay.scale]
    color = torch.tensor(PALETTE)[pred].permute(2, 0, 1).float()
    blended = (1 - OVERLAY_ALPHA) * image.float() + OVERLAY_ALPHA * color
    expected = torch.where(pred == 0, image.float(), blended)
    assert (shown.float() - expected).abs().max() <= 1

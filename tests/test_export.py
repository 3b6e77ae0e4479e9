"""export.py: the weights-only file round-trips through predict.py and hubconf.py; the ONNX model has dynamic batch
and image size, no CPU-only transposes, and ONNX Runtime's logits equal PyTorch's within
export.logits_tolerance."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

import checkpoints
import export
import predict
import utils
from model.net import GCN
from model import IMAGENET_MEAN, IMAGENET_STD, normalise
from test_predict import (CLASS_NAMES, PALETTE, REPO, TRAINING_PARAMS, assert_labels_match_logits, smooth_image,
                          write_checkpoint)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An experiment folder whose best.pth.tar also holds an optimiser state, as train.py's does."""
    folder = tmp_path_factory.mktemp("experiment")
    model = write_checkpoint(folder / utils.BEST_CHECKPOINT)
    checkpoint = torch.load(folder / utils.BEST_CHECKPOINT, weights_only=True)
    checkpoint["optimizer"] = {"state": {i: {"momentum_buffer": torch.zeros_like(p)}
                                         for i, p in enumerate(model.parameters())}}
    torch.save(checkpoint, folder / utils.BEST_CHECKPOINT)
    return folder


@pytest.fixture(scope="module")
def onnx_file(model_dir) -> Path:
    assert export.main(["--model_dir", str(model_dir), "--format", "onnx"]) == 0
    return model_dir / "best.onnx"


def test_weights_only_file_round_trips(model_dir, tmp_path, capsys):
    assert export.main(["--model_dir", str(model_dir), "--format", "weights"]) == 0
    [path] = model_dir.glob("best-*.pth")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.name == f"best-{digest[:8]}.pth" and digest in capsys.readouterr().out
    full = torch.load(model_dir / utils.BEST_CHECKPOINT, weights_only=True)
    weights = checkpoints.load_checkpoint(path)
    assert set(weights) == {"state_dict", "model_config", "class_names", "palette", "params"}
    assert path.stat().st_size < 0.6 * (model_dir / utils.BEST_CHECKPOINT).stat().st_size
    assert weights["class_names"] == CLASS_NAMES and weights["palette"] == PALETTE
    assert weights["model_config"] == full["model_config"] and weights["params"] == full["params"]
    rebuilt = GCN.from_checkpoint(weights).state_dict()
    assert rebuilt.keys() == full["state_dict"].keys()
    assert all(torch.equal(rebuilt[k], full["state_dict"][k]) for k in rebuilt)

    Image.fromarray(smooth_image(45, 61, 0)).save(tmp_path / "a.png")
    for restore, out in (("best", "full"), (str(path), "weights")):
        assert predict.main(["--model_dir", str(model_dir), "--restore_file", restore, str(tmp_path / "a.png"),
                            "--out", str(tmp_path / out)]) == 0
    assert (tmp_path / "weights/labels/a.png").read_bytes() == (tmp_path / "full/labels/a.png").read_bytes()
    hub_model = torch.hub.load(str(REPO), "gcn", checkpoint=str(path), source="local")
    assert hub_model.class_names == CLASS_NAMES

    named = tmp_path / "gcn.pth"
    assert export.main(["--model_dir", str(model_dir), "--format", "weights", "--out", str(named)]) == 0
    assert (tmp_path / "gcn.pth.sha256").read_text() == f"{hashlib.sha256(named.read_bytes()).hexdigest()}  gcn.pth\n"


def test_onnx_graph_has_dynamic_sizes_metadata_and_no_transposes(onnx_file):
    graph_model = onnx.load(str(onnx_file))
    onnx.checker.check_model(graph_model)
    ops = Counter(node.op_type for node in graph_model.graph.node)
    assert ops["Transpose"] == 0 and ops["Conv"] > 0  # HorizontalConv's CPU trick stays out of the graph
    [image], [logits] = graph_model.graph.input, graph_model.graph.output

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    assert (image.name, dims(image)) == ("image", ["batch", 3, "height", "width"])
    assert (logits.name, dims(logits)) == ("logits", ["batch", 3, "height", "width"])
    metadata = {p.key: p.value for p in graph_model.metadata_props}
    assert json.loads(metadata["class_names"]) == CLASS_NAMES and json.loads(metadata["palette"]) == PALETTE
    assert json.loads(metadata["mean"]) == list(IMAGENET_MEAN) and json.loads(metadata["std"]) == list(IMAGENET_STD)


@pytest.mark.parametrize("shape", [(1, 3, 65, 97), (2, 3, 128, 128), (2, 3, 200, 173), (1, 3, 31, 17)])
def test_onnx_logits_equal_pytorch_at_any_size(onnx_file, model_dir, shape):
    model = GCN.from_checkpoint(checkpoints.load_checkpoint(model_dir / utils.BEST_CHECKPOINT)).eval()
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= export.logits_tolerance(expected.numpy())
    for i in range(shape[0]):
        assert_labels_match_logits(got[i].argmax(0).numpy(), expected[i:i + 1])


def test_onnx_input_is_the_image_as_predict_py_normalises_it(onnx_file, model_dir, tmp_path):
    rgb = smooth_image(75, 101, 3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert predict.main(["--model_dir", str(model_dir), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]) == 0
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    scaled = rgb.astype(np.float32) / 255
    x = ((scaled - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(x, normalise(torch.from_numpy(rgb).permute(2, 0, 1))[None].numpy(), atol=1e-5)
    logits = torch.from_numpy(session.run(None, {"image": x})[0])
    assert_labels_match_logits(np.array(Image.open(tmp_path / "out/labels/a.png")), logits)


def test_predict_labels_equal_onnx_by_default_where_amp_trains_in_bf16(onnx_file, tmp_path, monkeypatch):
    """On a CPU where amp trains in bf16 (AMX), predict.py still computes in float32 by default, as the exported
    model does: the label maps of odd-size images agree with ONNX Runtime's argmax (on 98.9 % of pixels in bf16)."""
    monkeypatch.setattr(utils, "cpu_bf16_pays", lambda: True)
    model_dir = tmp_path / "amp"
    model_dir.mkdir()
    write_checkpoint(model_dir / utils.BEST_CHECKPOINT, params={**TRAINING_PARAMS, "amp": True})  # onnx_file's weights
    sizes = [(97, 131), (120, 161), (75, 101)]
    for i, (height, width) in enumerate(sizes):
        Image.fromarray(smooth_image(height, width, 10 + i)).save(tmp_path / f"{i}.png")
    assert predict.main(["--model_dir", str(model_dir), *(str(tmp_path / f"{i}.png") for i in range(len(sizes))),
                        "--out", str(tmp_path / "out")]) == 0
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    agree = total = 0
    for i in range(len(sizes)):
        rgb = torch.from_numpy(np.array(Image.open(tmp_path / f"{i}.png"))).permute(2, 0, 1)
        logits = torch.from_numpy(session.run(None, {"image": normalise(rgb)[None].numpy()})[0])
        labels = np.array(Image.open(tmp_path / "out" / "labels" / f"{i}.png"))
        assert_labels_match_logits(labels, logits)
        agree += (labels == logits[0].argmax(0).numpy()).sum()
        total += labels.size
    assert agree / total >= 0.999


# export.py with a 2.4 MB stand-in network and a 1 MB file-size limit: every write past it fails with EFBIG, as on a
# full disk (SIGXFSZ ignored). The network's file goes through export.py's own path.
FULL_DISK_EXPORT = """
import resource, signal, sys, types
import torch
import export

class Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 256, 1), torch.nn.Conv2d(256, 256, 3, padding=1),
                                          torch.nn.Conv2d(256, 2, 1))
        self.config = types.SimpleNamespace(num_classes=2)

    def forward(self, x):
        return self.layers(x)

export.load_trained_model = lambda path: types.SimpleNamespace(
    path=path, checkpoint={}, class_names=["a", "b"], palette=[(0, 0, 0), (9, 9, 9)], net=Wide())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (10**6, 10**6))
sys.exit(export.main(sys.argv[1:]))
"""


def test_an_onnx_export_that_fills_the_disk_leaves_no_partial_file(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    result = subprocess.run([sys.executable, "-c", FULL_DISK_EXPORT, "--model_dir", str(folder), "--format", "onnx"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr[-3000:]
    assert os.listdir(folder) == []  # neither the file nor its temporary: the space is given back
    assert result.stderr.splitlines()[-1] == f"error: cannot write {folder / 'best.onnx'}: File too large"

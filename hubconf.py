"""torch.hub entry point: a trained GCN from a checkpoint, in a clone of this repository.

>>> model = torch.hub.load("path/to/clone", "gcn", checkpoint="experiments/demo/best.pth.tar", source="local")
>>> from model.inference import segment          # importable once torch.hub has loaded this file
>>> labels = segment(model, PIL.Image.open("street.jpg"))   # H×W class indices; names: model.class_names
"""
from __future__ import annotations

from pathlib import Path

from checkpoints import load_trained_model
from model.net import GCN

dependencies = ["torch", "torchvision", "PIL", "numpy"]


def gcn(checkpoint: str) -> GCN:
    """The GCN a checkpoint describes (train.py's, or export.py's weights-only file), on the CPU in eval mode, with
    its class names and palette as `model.class_names` and `model.palette` (one RGB triple per class)."""
    trained = load_trained_model(Path(checkpoint))
    model = trained.net
    model.class_names, model.palette = trained.class_names, trained.palette  # torch.hub's users get one object
    return model

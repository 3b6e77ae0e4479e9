"""torch.hub entry point: a trained GCN from a checkpoint, in a clone of this repository.

>>> model = torch.hub.load("path/to/clone", "gcn", checkpoint="experiments/demo/best.pth.tar", source="local")
>>> from model.inference import segment          # importable once torch.hub has loaded this file
>>> labels = segment(model, PIL.Image.open("street.jpg"))   # H×W class indices; names: model.class_names
"""
from __future__ import annotations

from pathlib import Path

import utils
from model.data_loader import DataConfig
from model.net import GCN, GCNConfig

dependencies = ["torch", "torchvision", "PIL", "numpy"]


def gcn(checkpoint: str) -> GCN:
    """The GCN a checkpoint describes (train.py's, or export.py's weights-only file), on the CPU in eval mode, with
    its class names and palette as `model.class_names` and `model.palette` (one RGB triple per class)."""
    path = Path(checkpoint)
    state = utils.load_checkpoint(path, GCNConfig, DataConfig)
    model = GCN.from_checkpoint(state, f"checkpoint {path}").eval()
    model.class_names, model.palette = list(state["class_names"]), [tuple(c) for c in state["palette"]]
    return model

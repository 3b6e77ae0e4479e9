"""A trained model as its checkpoint describes it: the network with its weights, the class names and palette it was
trained on, and the settings it was trained with (typed). evaluate.py, predict.py, export.py and hubconf.py load
it through load_trained_model; train.py writes it.

Its own module because it needs both sides of a line DESIGN.md draws: checkpoint files (utils) and the network
(model/net.py), which knows nothing of files; utils imports nothing of model/.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import utils
from model.data_loader import DataConfig
from model.net import GCN, GCNConfig


@dataclass
class TrainedModel:
    """A checkpoint, loaded: `net` is on the CPU in eval mode."""

    path: Path
    net: GCN
    class_names: list[str]
    palette: list[tuple[int, int, int]]  # one RGB triple per class
    train_config: utils.TrainConfig  # as trained (defaults where the checkpoint holds no params)
    eval_config: utils.EvalConfig
    checkpoint: dict[str, Any]  # everything the file holds

    @property
    def epoch(self) -> int | None:
        """Epochs trained (None for a weights-only file)."""
        return self.checkpoint.get("progress", {}).get("epoch")


def load_trained_model(path: Path, architecture: dict[str, Any] | None = None) -> TrainedModel:
    """The model of a checkpoint (train.py's, or export.py's weights-only file), loaded with weights_only=True;
    with `architecture` (GCNConfig.architecture()), a checkpoint built for another model is refused. Every key is
    validated before the network is built (utils.load_checkpoint), and its weights must fit it."""
    checkpoint = utils.load_checkpoint(path, GCNConfig, DataConfig)
    if architecture is not None:
        utils.check_same_architecture(path, checkpoint["model_config"], architecture)
    params = checkpoint.get("params", {})
    net = GCN.from_checkpoint(checkpoint, f"checkpoint {path}").eval()
    return TrainedModel(path, net, list(checkpoint["class_names"]), [tuple(c) for c in checkpoint["palette"]],
                        _config(utils.TrainConfig, params), _config(utils.EvalConfig, params), checkpoint)


def _config(config_class: type, params: dict[str, Any]) -> Any:
    return config_class(**{f.name: params[f.name] for f in dataclasses.fields(config_class) if f.name in params})

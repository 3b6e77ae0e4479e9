"""Export a checkpoint: python export.py --model_dir experiments/demo [--restore_file best] --format weights|onnx

weights: the state dict, model config, class names, palette and training params, without the optimiser state;
  named <checkpoint>-<first 8 hex digits of its sha256>.pth beside the checkpoint (torch.hub's convention; with
  --out FILE, the digest goes to FILE.sha256). predict.py --restore_file and hubconf.py load it.
onnx: the network with dynamic batch, height and width (any size): input "image" N×3×H×W float32, the RGB image
  scaled to [0, 1] and normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), as
  predict.py feeds it; output "logits" N×C×H×W. Class names, palette, mean and std are in its metadata. Checked
  against PyTorch with onnxruntime before it is kept. Default FILE: <checkpoint>.onnx beside the checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import utils
from checkpoints import checkpoint_path, load_trained_model
from model import IMAGENET_MEAN, IMAGENET_STD
from model.net import GCN

WEIGHTS_KEYS = ("state_dict", "model_config", "class_names", "palette", "params", "pretrained_weights")
CHECK_SHAPE = (2, 3, 97, 131)  # odd sizes: every decoder crop is exercised
# ONNX Runtime vs PyTorch logits: |onnx - torch| <= TOLERANCE * (1 + max |torch|) everywhere: float32 rounding grows
# with the scale of the logits (and of the activations before them), not with each logit's own size
TOLERANCE = 1e-4


def weights_only(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What using a model needs: state dict, config, class names, palette and (if present) the training params and
    the record of the backbone's starting weights."""
    return {key: checkpoint[key] for key in WEIGHTS_KEYS if key in checkpoint}


def save_weights(checkpoint: dict[str, Any], out: Path | None, default_stem: Path) -> tuple[Path, str]:
    """Write the weights-only file (to `out`, or to <default_stem>-<sha256[:8]>.pth); returns (path, sha256)."""
    buffer = io.BytesIO()
    torch.save(weights_only(checkpoint), buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = out or default_stem.with_name(f"{default_stem.name}-{digest[:8]}.pth")
    utils.atomic_write(path, lambda f: f.write(data))
    if out is not None:  # the name says nothing: the digest goes beside it, as sha256sum writes it
        line = f"{digest}  {path.name}\n".encode()
        utils.atomic_write(path.with_name(path.name + ".sha256"), lambda f: f.write(line))
    return path, digest


def export_onnx(model: GCN, path: Path, metadata: dict[str, str]) -> float:
    """Write `model` as ONNX (dynamic batch, height, width) with `metadata`, after checking ONNX Runtime's logits
    against PyTorch's at CHECK_SHAPE; returns the largest absolute difference."""
    import onnx_ir  # noqa: PLC0415 -- only this format needs these (onnx_ir comes with onnxscript)
    import onnxruntime  # noqa: PLC0415

    model = model.cpu().float().eval()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    program = torch.onnx.export(model, (torch.zeros(2, 3, 128, 160),), dynamic_shapes={"x": dims},
                                input_names=["image"], output_names=["logits"], dynamo=True, verbose=False)
    logits = program.model.graph.outputs[0]
    logits.shape = onnx_ir.Shape(["batch", model.config.num_classes, "height", "width"])
    program.model.metadata_props.update(metadata)
    data = onnx_ir.to_proto(program.model).SerializeToString()  # checked in memory: no file until it is kept
    x = torch.randn(CHECK_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    if got.shape != expected.shape or np.abs(got - expected).max() > logits_tolerance(expected):
        raise RuntimeError(f"the exported model's logits differ from PyTorch's (max abs diff "
                           f"{np.abs(got - expected).max() if got.shape == expected.shape else got.shape})")
    utils.atomic_write(path, lambda f: f.write(data))  # a full disk leaves no partial file behind
    return float(np.abs(got - expected).max())


def logits_tolerance(expected: np.ndarray) -> float:
    """The largest difference allowed between ONNX Runtime's logits and PyTorch's `expected`."""
    return TOLERANCE * (1 + float(np.abs(expected).max()))


def parse_args(argv: Sequence[str] | None):
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="experiments/base_model", help="folder holding the checkpoint")
    parser.add_argument("--restore_file", default="best", help="best | last | path to a checkpoint")
    parser.add_argument("--format", required=True, choices=("weights", "onnx"),
                        help="weights: a weights-only checkpoint (no optimiser, half the size) for predict.py and "
                             "torch.hub; onnx: the network for ONNX Runtime (dynamic batch, height, width)")
    parser.add_argument("--out", default=None, metavar="FILE", help="output file (default: beside the checkpoint)")
    return parser.parse_args(argv)


def export_checkpoint(args) -> Path:
    trained = load_trained_model(checkpoint_path(Path(args.model_dir), args.restore_file))
    path, checkpoint = trained.path, trained.checkpoint
    out = Path(args.out) if args.out else None
    stem = path.with_name(path.name.split(".")[0])
    utils.output_file(out or stem, "--out" if out else "the output")  # before 45 MB are serialised
    if args.format == "weights":
        out, digest = save_weights(checkpoint, out, stem)
        print(f"Wrote {out} ({out.stat().st_size / 1e6:.1f} MB; sha256 {digest})")
        return out
    out = out or stem.with_suffix(".onnx")
    utils.check_output_names([out])  # before the export, which takes a while
    metadata = {"class_names": json.dumps(trained.class_names), "palette": json.dumps(trained.palette),
                "mean": json.dumps(IMAGENET_MEAN), "std": json.dumps(IMAGENET_STD)}
    diff = export_onnx(trained.net, out, metadata)
    print(f"Wrote {out} ({out.stat().st_size / 1e6:.1f} MB; ONNX Runtime vs PyTorch max abs diff {diff:.1e} "
          f"at {CHECK_SHAPE})")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        export_checkpoint(args)
        return 0
    return utils.run_cli(run)


if __name__ == "__main__":
    sys.exit(main())

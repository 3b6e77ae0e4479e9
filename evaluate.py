"""Score a checkpoint: python evaluate.py --model_dir experiments/demo --restore_file best --split val [--tta]

Also home of what train.py and evaluate.py share: the params spec, building the model, and evaluate().
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import utils
from model.data_loader import DATA_PARAMS, DatasetError, build_dataloader, build_dataset, colorize, denormalize
from model.metrics import SegmentationMetrics
from model.net import GCN, MODEL_PARAMS, PretrainedWeightsError

PARAM_SPEC: utils.ParamSpec = {**DATA_PARAMS, **MODEL_PARAMS, **utils.TRAIN_PARAMS}
USER_ERRORS = (utils.UserError, DatasetError, PretrainedWeightsError)


def load_params(model_dir: Path, data_dir: str | None = None) -> utils.Params:
    """The experiment's params.json, validated, with an optional --data_dir override."""
    params = utils.Params(model_dir / "params.json", PARAM_SPEC)
    if data_dir is not None:
        params.set({"data_dir": data_dir}, source="--data_dir")
    return params


def build_model(params: utils.Params, pretrained: bool = True) -> GCN:
    """The GCN described by params (ImageNet weights only when asked and when `pretrained`)."""
    return GCN(params.num_classes, backbone=params.backbone, kernel_size=params.kernel_size,
               pretrained=params.pretrained if pretrained else False, head=params.head,
               boundary_refine=params.boundary_refine, upsample=params.upsample,
               stack_channels=params.stack_channels)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled (fp16 where bf16 is unsupported); a no-op on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled and device.type == "cuda")


def sliding_window_logits(model: nn.Module, image: Tensor, window: int) -> Tensor:
    """Logits of a large image from overlapping window×window tiles (stride 2/3 of the window), averaged."""
    _, _, h, w = image.shape
    padded = F.pad(image, (0, max(window - w, 0), 0, max(window - h, 0)))
    ph, pw = padded.shape[-2:]
    stride = max(window * 2 // 3, 1)
    rows = sorted({*range(0, ph - window, stride), ph - window})
    cols = sorted({*range(0, pw - window, stride), pw - window})
    logits = counts = None
    for top in rows:
        for left in cols:
            tile = model(padded[..., top:top + window, left:left + window]).float()
            if logits is None:
                logits = tile.new_zeros(tile.shape[0], tile.shape[1], ph, pw)
                counts = tile.new_zeros(1, 1, ph, pw)
            logits[..., top:top + window, left:left + window] += tile
            counts[..., top:top + window, left:left + window] += 1
    return (logits / counts)[..., :h, :w]


@torch.no_grad()
def predict_logits(model: nn.Module, image: Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
                   window: int | None = None) -> Tensor:
    """Logits at the image's own resolution, averaged over scales (and horizontal flips) if asked."""
    size = image.shape[-2:]
    total = None
    for scale in scales:
        scaled = image if scale == 1 else F.interpolate(image, scale_factor=scale, mode="bilinear",
                                                        align_corners=False)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            big = window is not None and max(x.shape[-2:]) > window
            logits = sliding_window_logits(model, x, window) if big else model(x).float()
            logits = logits.flip(-1) if flipped else logits
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
    return total / (len(scales) * (2 if flip else 1))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, params: utils.Params, device: torch.device,
             tta: bool = False, on_image=None) -> dict[str, Any]:
    """Dataset-level metrics at original resolution (all-reduced across ranks), plus the mean pixel cross entropy.

    `on_image(index, image, label, pred)` is called for every image (e.g. to save predictions).
    """
    model.eval()
    dataset = loader.dataset
    metrics = SegmentationMetrics(params.num_classes, dataset.classes, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # sum of pixel losses, labelled pixels
    scales = params.tta_scales if tta else (1.0,)
    window = params.crop_size if params.sliding_window else None
    for index, (image, label) in zip(loader.sampler, loader):
        image = image.to(device, non_blocking=True)
        label = label.to(device, non_blocking=True)
        if params.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast(device, params.amp):
            logits = predict_logits(model, image, scales, flip=tta and params.tta_flip, window=window)
        pred = logits.argmax(1)
        if dataset.has_labels:
            pixel_loss = F.cross_entropy(logits, label, ignore_index=255, reduction="sum")
            loss_sum += torch.stack([pixel_loss.double(), (label != 255).sum().double()])
            metrics.update(pred, label)
        if on_image is not None:
            on_image(index, image[0], label[0], pred[0])
    if not dataset.has_labels:
        return {}
    metrics.all_reduce()
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    results = metrics.compute()
    results["loss"] = (loss_sum[0] / loss_sum[1].clamp(min=1)).item()
    return results


class ShardSampler(torch.utils.data.Sampler[int]):
    """Every index exactly once over all ranks (rank r takes r, r + world, ...): no padded duplicates."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(dataset: Dataset, num_workers: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Whole images one at a time (no padding, which would add false label boundaries), sharded over ranks."""
    return build_dataloader(dataset, 1, ShardSampler(len(dataset), rank, world_size), num_workers)


def side_by_side(image: Tensor, label: Tensor | None, pred: Tensor, palette) -> Tensor:
    """uint8 3×H×(kW) picture: input | ground truth (if any) | prediction."""
    panels = [denormalize(image.float().cpu()), *([colorize(label.cpu(), palette)] if label is not None else []),
              colorize(pred.cpu(), palette)]
    return torch.cat(panels, dim=-1)


def write_json(path: Path, values: dict[str, Any]) -> None:
    utils.atomic_write_text(path, json.dumps(values, indent=4) + "\n")


def prediction_path(out_dir: Path, dataset_name: str, name: str) -> Path:
    """Where a prediction PNG goes; VOC uses the layout its evaluation server accepts."""
    if dataset_name in ("voc", "voc_aug"):
        return out_dir / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls" / f"{name}.png"
    return out_dir / f"{name}.png"


def prediction_saver(out_dir: Path, dataset: Dataset, dataset_name: str, num_pictures: int):
    """An on_image callback writing palette PNGs (and a few side-by-side pictures) under out_dir."""
    flat_palette = [c for rgb in dataset.palette for c in rgb]

    def save(index: int, image: Tensor, label: Tensor, pred: Tensor) -> None:
        name = str(dataset.names[index])
        path = prediction_path(out_dir, dataset_name, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        png = Image.fromarray(pred.to(torch.uint8).cpu().numpy(), mode="P")
        png.putpalette(flat_palette)
        png.save(path)
        if index < num_pictures:
            picture = side_by_side(image, label if dataset.has_labels else None, pred, dataset.palette)
            (out_dir / "pictures").mkdir(exist_ok=True)
            Image.fromarray(picture.permute(1, 2, 0).numpy()).save(out_dir / "pictures" / f"{Path(name).name}.jpg")

    return save


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="experiments/base_model", help="folder holding params.json")
    parser.add_argument("--data_dir", default=None, help="overrides params.json's data_dir")
    parser.add_argument("--restore_file", default="best", help="best | last | path to a checkpoint")
    parser.add_argument("--split", default="val", help="val | test | any split the data set has")
    parser.add_argument("--tta", action="store_true", help="multi-scale (tta_scales) + flip test-time augmentation")
    parser.add_argument("--save_predictions", default=None, metavar="DIR", help="write prediction PNGs here")
    return parser.parse_args(argv)


def checkpoint_path(model_dir: Path, restore_file: str) -> Path:
    """best/last -> <model_dir>/<name>.pth.tar; anything else is a path."""
    return model_dir / f"{restore_file}.pth.tar" if restore_file in ("best", "last") else Path(restore_file)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = Path(args.model_dir)
    params = load_params(model_dir, args.data_dir)
    utils.set_logger(model_dir / "evaluate.log")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = build_dataset(params, args.split, train=False)
    model = build_model(params, pretrained=False)
    checkpoint = utils.load_checkpoint(checkpoint_path(model_dir, args.restore_file), model, model.config)
    model.to(device)
    if params.channels_last:
        model.to(memory_format=torch.channels_last)
    on_image = None
    if args.save_predictions:
        on_image = prediction_saver(Path(args.save_predictions), dataset, params.dataset, params.num_logged_images)
    logging.info("Evaluating %s (epoch %s) on %d %s images%s", args.restore_file, checkpoint.get("epoch"),
                 len(dataset), args.split, " with TTA" if args.tta else "")
    metrics = evaluate(model, eval_loader(dataset, params.num_workers), params, device, tta=args.tta,
                       on_image=on_image)
    if not metrics:
        logging.info("Split %s has no ground truth: wrote predictions only", args.split)
        return metrics
    tag = Path(args.restore_file).name.split(".")[0]
    write_json(model_dir / f"metrics_{args.split}_{tag}.json", {**metrics, "epoch": checkpoint.get("epoch")})
    logging.info("mIoU %.4f, pixel accuracy %.4f, mean accuracy %.4f", metrics["miou"],
                 metrics["pixel_accuracy"], metrics["mean_accuracy"])
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

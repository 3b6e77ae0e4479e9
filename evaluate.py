"""Score a checkpoint: python evaluate.py --model_dir experiments/demo [--restore_file best] [--split val] [--tta]

Writes metrics_<split>_<checkpoint>.json (metrics, per-class table, confusion matrix) and
confusion_<split>_<checkpoint>.png; with --save_predictions DIR, prediction PNGs and titled pictures
(image | truth | prediction | errors).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import errors
import settings
import utils
from checkpoints import checkpoint_path, load_trained_model
from model import IGNORE_INDEX, visualize
from model.data_loader import DataConfig, DatasetError, build_dataset, eval_loader, worker_death
from model.datasets.base import is_safe_id
from model.inference import padded_logits, predict_logits
from model.metrics import SegmentationMetrics
from model.net import GCNConfig, SegmentationLoss
from terminal import progress_bar

WORST_MARK = "  <- worst"  # flags the lowest-IoU classes of the per-class table: 1 in 4, at most 3


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, criterion: SegmentationLoss, config: settings.EvalConfig,
             placement: utils.Placement, tta: bool = False, window: int | None = None,
             on_image: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
             should_stop: Callable[[], bool] | None = None, bar: str | None = None) -> dict[str, Any] | None:
    """Dataset-level metrics at original resolution (all-reduced across ranks; inputs padded to `eval_pad_size`
    first if set, the logits cropped back), `loss`, the training objective `criterion` over the whole split, and
    `precision`, what the forward passes computed in (placement's); {} for a split without labels, None if
    `should_stop` said so before the end.

    With `tta`, logits are averaged over config's scales and flips; images larger than `window` are scored in
    overlapping windows. `on_image(index, image, label, pred)` is called for every image (e.g. to save predictions),
    with the uint8 image as the loader gave it. `bar`: the title of a progress bar over this rank's images (None:
    no bar).
    """
    model.eval()
    dataset = loader.dataset
    metrics = SegmentationMetrics(len(dataset.classes), dataset.classes, device=placement.device,
                                  boundary_distance=config.boundary_distance, boundary_void=config.boundary_void)
    loss_sums = criterion.zero_sums(len(dataset.classes), placement.device)  # over batches, as one batch
    labelled = torch.zeros((), dtype=torch.int64, device=placement.device)
    with without_cudnn_autotuning(), progress_bar(zip(loader.sampler, loader), total=len(loader), desc=bar,
                                                  unit="img", show=bar is not None) as images:
        for index, (image, label) in images:
            if should_stop is not None and should_stop():
                return None
            picture_source = image
            image, label = placement.batch(image, label)
            with placement.autocast():
                logits = padded_logits(lambda x: predict_logits(
                    model, x, config.tta_scales if tta else (1.0,), flip=tta and config.tta_flip, window=window,
                    gaussian=config.gaussian_windows), image, config.eval_pad_size)
            pred = logits.argmax(1)
            if dataset.has_labels:
                loss_sums += criterion.sums(logits, label)
                labelled += (label != IGNORE_INDEX).sum()
                metrics.update(pred, label)
            if on_image is not None:
                on_image(index, picture_source[0], label[0], pred[0])
    if not dataset.has_labels:
        return {}
    metrics.all_reduce()
    if dist.is_initialized():
        dist.all_reduce(loss_sums)
        dist.all_reduce(labelled)
    if labelled == 0:
        raise DatasetError(f"the {len(dataset)} labels of this split mark every pixel void ({IGNORE_INDEX}): nothing "
                           f"to score (placeholder labels, e.g. Cityscapes' test split?)")
    results = metrics.compute()
    results["loss"] = criterion.from_sums(loss_sums).item()
    results["precision"] = placement.precision
    return results


@contextlib.contextmanager
def without_cudnn_autotuning() -> Iterator[None]:
    """cudnn.benchmark off within: evaluation scores each image at its own size (94 sizes among VOC's first 321 val
    images), and autotuning would time every convolution's algorithms again at each new size. (Not
    torch.backends.cudnn.flags: it sets every flag, and its defaults turn cuDNN off.)"""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def per_class_table(metrics: dict[str, Any]) -> str:
    """Class | IoU | accuracy | share of the labelled pixels, in the data set's class order, the worst IoUs marked
    (one class in four, at most three)."""
    names = list(metrics["per_class_iou"])
    ious = metrics["per_class_iou"]
    ranked = sorted((n for n in names if ious[n] is not None), key=lambda n: ious[n])
    worst = ranked[:max(1, min(3, len(names) // 4))]
    width = max(len("class"), *map(len, names))

    def percent(value: float | None) -> str:
        return "     -" if value is None else f"{100 * value:6.2f}"

    lines = [f"{'class':<{width}}   IoU %  acc. %  pixels %", "-" * (width + 28)]
    for name in names:
        lines.append(f"{name:<{width}}  {percent(ious[name])}  {percent(metrics['per_class_accuracy'][name])}  "
                     f"{percent(metrics['per_class_pixel_share'][name])}{WORST_MARK if name in worst else ''}")
    lines.append(f"{'mean':<{width}}  {percent(metrics['miou'])}  {percent(metrics['mean_accuracy'])}")
    return "\n".join(lines)


def prediction_path(out_dir: Path, dataset_name: str, name: str) -> Path:
    """Where a prediction PNG goes; VOC uses the layout its evaluation server accepts. An image name that would
    land outside out_dir (the data sets refuse such ids already) is refused."""
    if not is_safe_id(name):
        raise DatasetError(f"image name {name!r} would be written outside {out_dir}")
    if dataset_name in ("voc", "voc_aug"):
        return out_dir / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls" / f"{name}.png"
    return out_dir / f"{name}.png"


def metrics_tag(model_dir: Path, checkpoint: Path, split: str, tta: bool) -> str:
    """The name of a metrics file: <split>_<checkpoint>[_tta]; a checkpoint from another folder is tagged with that
    folder too (<split>_<folder>.<checkpoint>), so that its scores never replace this folder's own."""
    stem = checkpoint.name.split(".")[0]
    own = checkpoint.resolve().parent == model_dir.resolve()
    return f"{split}_{stem if own else checkpoint.resolve().parent.name + '.' + stem}{'_tta' if tta else ''}"


def prediction_saver(out_dir: Path, dataset: Dataset, dataset_name: str, num_pictures: int | None):
    """An on_image callback writing palette PNGs, and titled pictures for the first `num_pictures` images (None:
    all), under out_dir."""
    def save(index: int, image: Tensor, label: Tensor, pred: Tensor) -> None:
        name = str(dataset.names[index])
        utils.write_png(prediction_path(out_dir, dataset_name, name), visualize.label_png(pred.cpu(), dataset.palette))
        if num_pictures is None or index < num_pictures:  # the name was checked by prediction_path
            picture = visualize.prediction_picture(image, label.cpu() if dataset.has_labels else
                                                   None, pred.cpu(), dataset.palette, dataset.classes)
            utils.write_png(out_dir / "pictures" / f"{name}.png", visualize.picture_png(picture))
    return save


def parse_args(argv: Sequence[str] | None):
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="experiments/base_model", help="folder holding params.json")
    parser.add_argument("--data_dir", default=None, help="overrides params.json's data_dir")
    parser.add_argument("--restore_file", default="best", help="best | last | path to a checkpoint")
    parser.add_argument("--split", default="val", help="val | test | any split the data set has")
    parser.add_argument("--tta", action="store_true", help="multi-scale (tta_scales) + flip test-time augmentation")
    parser.add_argument("--save_predictions", default=None, metavar="DIR", help="write prediction PNGs here")
    parser.add_argument("--num_pictures", default=None, metavar="N|all",
                        help="pictures to write with --save_predictions (default: num_logged_images)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.json value (JSON), e.g. --set tta_flip=false; repeatable")
    return parser.parse_args(argv)


def evaluate_checkpoint(args) -> dict[str, Any]:
    """Score a checkpoint on a split with the experiment's params.json settings; writes the metrics and pictures."""
    model_dir = Path(args.model_dir)
    overrides = settings.parse_overrides(args.set) | ({"data_dir": args.data_dir} if args.data_dir is not None else {})
    params = settings.load_params(model_dir, overrides)
    data_config, config = params.config(DataConfig), params.config(settings.TrainConfig)
    eval_config = params.config(settings.EvalConfig)
    if args.num_pictures not in (None, "all") and not args.num_pictures.isdigit():
        raise errors.UserError(f"--num_pictures {args.num_pictures!r}: expected a number or 'all'")
    num_pictures = None if args.num_pictures == "all" else int(args.num_pictures or eval_config.num_logged_images)
    device = utils.default_device()
    placement = utils.Placement(device, config.channels_last,
                                utils.eval_autocast_dtype(device, eval_config.eval_precision))
    dataset = build_dataset(data_config, params.num_classes, args.split, train=False)
    trained = load_trained_model(checkpoint_path(model_dir, args.restore_file),
                                 params.config(GCNConfig).architecture())
    utils.output_folder(model_dir, "the model folder")  # metrics, confusion matrix and log go there
    tag = metrics_tag(model_dir, trained.path, args.split, args.tta)
    utils.check_output_names([model_dir / f"metrics_{tag}.json", model_dir / f"confusion_{tag}.png"])
    on_image = None
    if args.save_predictions:
        out_dir = utils.output_folder(Path(args.save_predictions), "--save_predictions")
        on_image = prediction_saver(out_dir, dataset, data_config.dataset, num_pictures)
    utils.set_logger(model_dir / utils.EVALUATE_LOG)
    logging.info("Evaluating %s (epoch %s) on %d %s images%s in %s", trained.path, trained.epoch, len(dataset),
                 args.split, " with TTA" if args.tta else "", placement.precision)
    criterion = SegmentationLoss(config.class_weights, config.dice_term_weight).to(device)
    metrics = evaluate(placement.module(trained.net), eval_loader(dataset, data_config.num_workers), criterion,
                       eval_config, placement, tta=args.tta,
                       window=data_config.crop_size if eval_config.sliding_window else None, on_image=on_image,
                       bar=f"{args.split}{' TTA' if args.tta else ''}")
    if not metrics:
        logging.info("Split %s has no ground truth: wrote predictions only", args.split)
        return metrics
    utils.write_json(model_dir / f"metrics_{tag}.json", {**metrics, "epoch": trained.epoch})
    report(metrics, tag, dataset.classes, model_dir)
    return metrics


def report(metrics: dict[str, Any], tag: str, class_names: Sequence[str], model_dir: Path) -> None:
    """The confusion matrix picture and the per-class table and summary line in evaluate.log."""
    utils.write_png(model_dir / f"confusion_{tag}.png", visualize.confusion_matrix_png(
        metrics["confusion_matrix"]["counts"], class_names, title=f"{model_dir.name}: {tag}"))
    logging.info("Per class (%s):\n%s", tag, per_class_table(metrics))
    logging.info("mIoU %.4f, pixel accuracy %.4f, mean accuracy %.4f, boundary / interior accuracy %s / %s",
                 metrics["miou"], metrics["pixel_accuracy"], metrics["mean_accuracy"],
                 *(f"{metrics[k]:.4f}" if metrics[k] is not None else "-"
                   for k in ("boundary_accuracy", "interior_accuracy")))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        try:
            evaluate_checkpoint(args)
        except RuntimeError as error:  # a DataLoader worker killed (the out-of-memory killer) is one line too
            if (died := worker_death(error)) is None:
                raise
            raise died from None
        return 0
    return utils.run_cli(run)


if __name__ == "__main__":
    sys.exit(main())

"""Train the GCN of an experiment folder: python train.py --model_dir experiments/demo

Everything the run produces lands in --model_dir: train.log, params_resolved.json, last.pth.tar / best.pth.tar,
metrics JSON, TensorBoard events. Several GPUs or nodes: torchrun --nproc_per_node N train.py --model_dir ...
SIGTERM/SIGINT (Ctrl-C, pre-emption) saves a resumable checkpoint and exits 128+N; --restore_file last resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import utils
from evaluate import evaluate
from model import visualize
from model.data_loader import (DataConfig, DatasetError, EpochSampler, build_dataloader, build_dataset,
                               check_label_values, eval_loader)
from model.net import GCN, GCNConfig, PretrainedWeightsError, SegmentationLoss
from model.transforms import denormalise

OUTPUTS = (utils.LAST_CHECKPOINT, utils.BEST_CHECKPOINT, utils.METRICS_LAST, utils.METRICS_BEST,
           utils.COMPLETE_MARKER)  # a previous run's files
CONFIGS = utils.experiment_configs((DataConfig, GCNConfig))  # every setting of an experiment
STALE_WITH_A_NEW_RUN = ("events.out.tfevents.*", "metrics_*.json", "confusion_*.png")  # --force clears them too


class TrainingDiverged(utils.UserError):
    """The loss became NaN or infinite."""


@dataclass
class Progress:
    """Where a run stands; every checkpoint holds it, so that a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    iteration: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained
    best_miou: float = -1.0
    best_epoch: int = 0
    validation_pending: bool = False  # the last epoch is saved but not validated yet
    seconds: float = 0.0  # wall time spent training and validating, over every resumption


class StopSignal:
    """While active, SIGINT/SIGTERM/SIGHUP only raise a flag, which the loops check; a second signal stops at once.

    The previous handlers come back on exit, so an in-process run leaves Ctrl-C working.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in utils.STOP_SIGNALS
                          if signal.getsignal(sig) is not signal.SIG_IGN}  # under nohup, SIGHUP stays ignored
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum:
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
        self.signum = signum


def poly_lr_lambda(total_iterations: int, power: float, warmup: int):
    """Per-iteration factor: linear warm-up, then (1 - it / total) ** power."""
    def factor(iteration: int) -> float:
        ramp = min(1.0, (iteration + 1) / warmup) if warmup else 1.0
        return ramp * max(0.0, 1 - iteration / total_iterations) ** power
    return factor


def build_optimizer(model: GCN, params: utils.Params) -> torch.optim.SGD:
    """SGD; the new layers (heads, BR, decoder) learn head_lr_multiplier× faster than the backbone."""
    groups = model.parameter_groups()
    return torch.optim.SGD(
        [{"params": groups["backbone"], "lr": params.learning_rate},
         {"params": groups["heads"] + groups["decoder"], "lr": params.learning_rate * params.head_lr_multiplier}],
        lr=params.learning_rate, momentum=params.momentum, weight_decay=params.weight_decay)


def parse_args(argv: Sequence[str] | None):
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="experiments/base_model", help="folder holding params.json")
    parser.add_argument("--data_dir", default=None, help="overrides params.json's data_dir")
    parser.add_argument("--restore_file", default=None,
                        help="resume from last | best | a checkpoint path; auto: last if it exists, else start afresh")
    parser.add_argument("--force", action="store_true", help="start afresh, deleting the folder's previous run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.json value (JSON), e.g. --set learning_rate=0.02; repeatable")
    parser.add_argument("--params", default=None, metavar="FILE",
                        help="read the settings from FILE instead of <model_dir>/params.json (a run's "
                             "params_resolved.json works: it reruns that run's settings)")
    parser.add_argument("--help-params", action=utils.ListSettings, configs=CONFIGS,
                        help="list every params.json key: default, allowed values, meaning; then exit")
    return parser.parse_args(argv)


def main(args) -> int:
    model_dir = Path(args.model_dir)
    overrides = utils.parse_overrides(args.set) | ({"data_dir": args.data_dir} if args.data_dir is not None else {})
    params = utils.load_params(model_dir, (DataConfig, GCNConfig), overrides, args.params and Path(args.params))
    try:
        str(model_dir.resolve()).encode("utf-8")
    except UnicodeEncodeError:
        raise utils.UserError(f"{model_dir!s}: the folder name is not valid UTF-8 (TensorBoard cannot write "
                              f"there); rename it") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = utils.init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    with contextlib.ExitStack() as exit_stack:
        return train(params, overrides, model_dir, args, device, rank, world_size, exit_stack)


def train(params: utils.Params, overrides: dict, model_dir: Path, args, device: torch.device, rank: int,
          world_size: int, exit_stack: contextlib.ExitStack) -> int:
    """Check every input, then train to the end of the budget (or a stop signal); returns the exit status.

    The folder lock and the stop-signal handlers live on `exit_stack` until the caller closes it.
    """
    main_process = rank == 0
    if params.compile and device.type == "cpu":
        raise utils.ParamsError("compile: true is for CUDA; on the CPU, compiling the training step takes minutes "
                                "for about 10 % less time per step, and this project does not test it: set compile "
                                "to false (--set compile=false)")
    last = model_dir / utils.LAST_CHECKPOINT
    restore_file = args.restore_file
    if restore_file and args.force:
        raise utils.UserError(f"--force starts afresh, --restore_file {restore_file} resumes: pass one of them")
    if restore_file == "auto":
        if not last.exists() and (model_dir / utils.COMPLETE_MARKER).exists():  # keep_checkpoints: best_weights
            print(f"{model_dir}: nothing to do, this run is complete ({utils.COMPLETE_MARKER})")
            return 0
        restore_file = "last" if last.exists() else None
    checkpoint = None
    if restore_file:  # the run's own settings, with this command's execution settings
        path = utils.checkpoint_path(model_dir, restore_file)
        checkpoint = utils.load_checkpoint(path)
        if not {"optimizer", "scheduler", "scaler", "progress", "params"} <= checkpoint.keys():
            raise utils.CheckpointError(f"cannot resume from {path}: it holds no training state (an export.py "
                                        f"weights file, or best.pth.tar kept as weights only?)")
        params, overrides = params.resumed(checkpoint["params"], checkpoint.get("overrides", {}), overrides,
                                           str(path))
    previous_run = [name for name in OUTPUTS if (model_dir / name).exists()]
    if not restore_file and previous_run and not args.force:
        resume = "resume with --restore_file last, or " if last.exists() else ""
        raise utils.UserError(f"{model_dir} holds a previous run ({', '.join(previous_run)}): {resume}pass --force "
                              f"to delete it and start afresh")

    # Data
    data_config = params.config(DataConfig)
    train_set = build_dataset(data_config, params.num_classes, params.train_split, train=True)
    val_set = build_dataset(data_config, params.num_classes, params.val_split, train=False)
    for dataset in (train_set, val_set):
        check_label_values(dataset)  # now, rather than at the first batch of training or validation
    if len(train_set) < params.batch_size * world_size:
        raise utils.ParamsError(f"batch_size {params.batch_size} × {world_size} process(es) exceeds the "
                                f"{len(train_set)} training images")
    sampler = EpochSampler(len(train_set), params.batch_size, params.seed, rank, world_size)
    train_loader = build_dataloader(train_set, params.batch_size, sampler, params.num_workers, drop_last=True)
    val_loader = eval_loader(val_set, params.num_workers, rank, world_size)
    batches_per_epoch = sampler.per_rank // params.batch_size
    total_iterations = params.num_iterations or params.num_epochs * batches_per_epoch
    num_epochs = math.ceil(total_iterations / batches_per_epoch)

    # Model, optimiser, schedule, loss
    utils.seed_everything(params.seed)
    model_config = params.config(GCNConfig)
    model_without_ddp = GCN(model_config).to(device)
    if params.sync_bn and world_size > 1:
        model_without_ddp = nn.SyncBatchNorm.convert_sync_batchnorm(model_without_ddp)
    if params.channels_last:
        model_without_ddp.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model_without_ddp, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lr_lambda(total_iterations, params.lr_power, params.warmup_iterations))
    amp_dtype = utils.autocast_dtype(device, params.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = SegmentationLoss(params.class_weights,
                               params.dice_weight if params.loss == "cross_entropy+dice" else 0.0).to(device)
    progress = Progress()
    if checkpoint is not None:
        utils.check_same_architecture(path, checkpoint["model_config"], model_config.architecture())
        model_without_ddp.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        progress = Progress(**checkpoint["progress"])
    done = progress.iteration >= total_iterations and not progress.validation_pending
    if done and (model_dir / utils.COMPLETE_MARKER).exists():
        print(f"{model_dir}: nothing to do, this run already trained its {total_iterations} iterations")
        return 0

    # Every input is checked: from here on, the run writes into its folder, which it holds alone.
    writer = None
    if main_process:
        exit_stack.enter_context(utils.RunLock(model_dir))
        utils.remove_stale_temporary_files(model_dir, (*OUTPUTS, utils.RESOLVED_PARAMS_FILE))
        if not restore_file:
            stale = [model_dir / name for name in OUTPUTS]
            for pattern in STALE_WITH_A_NEW_RUN:
                stale += model_dir.glob(pattern)
            for path in stale:
                path.unlink(missing_ok=True)
        record = utils.run_record(params, overrides, vars(args), device)
        utils.write_json(model_dir / utils.RESOLVED_PARAMS_FILE, record)
        utils.set_logger(model_dir / utils.TRAIN_LOG)
        exit_stack.enter_context(utils.errors_in_log((utils.UserError, DatasetError, PretrainedWeightsError)))
        writer = SummaryWriter(model_dir)
    if restore_file:
        logging.info("Resumed from %s: epoch %d, iteration %d, best mIoU %.4f", restore_file, progress.epoch,
                     progress.iteration, progress.best_miou)
    model = scoring_model = torch.compile(model_without_ddp) if params.compile else model_without_ddp
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    logging.info("Training %s on %s (%d images, %d batches/epoch) for %d iterations on %s × %d", model_dir,
                 params.dataset, len(train_set), batches_per_epoch, total_iterations, device, world_size)

    clock = time.monotonic()

    def save(path: Path) -> None:
        nonlocal clock
        progress.seconds += time.monotonic() - clock
        clock = time.monotonic()
        if main_process:
            state = {
                "state_dict": model_without_ddp.state_dict(), "model_config": dataclasses.asdict(model_config),
                "class_names": list(val_set.classes), "palette": [list(c) for c in val_set.palette],
                "params": params.dict}  # export.py's weights-only format
            if not (path.name == utils.BEST_CHECKPOINT and params.keep_checkpoints == "best_weights"):
                state |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "progress": dataclasses.asdict(progress),
                          "overrides": overrides}
            utils.save_checkpoint(state, path)

    def validate() -> bool:
        """Score the model on the val split and record it (best first, then last); False if stopped midway."""
        pictures: list[torch.Tensor] = []

        def keep_picture(index: int, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> None:
            if main_process and len(pictures) < params.num_logged_images:
                pictures.append(visualize.prediction_picture(
                    denormalise(image.cpu()), label.cpu() if val_set.has_labels else None, pred.cpu(),
                    val_set.palette, val_set.classes))

        if world_size > 1:  # score with rank 0's batch-norm statistics, those the checkpoint holds
            for buffer in model_without_ddp.buffers():
                dist.broadcast(buffer, 0)
        # Not through DDP: its forward synchronises buffers, which would deadlock ranks with fewer images.
        metrics = evaluate(scoring_model, val_loader, params, device, on_image=keep_picture,
                           should_stop=(lambda: bool(stop.signum)) if world_size == 1 else None)
        if metrics is None:
            return False
        metrics["epoch"] = progress.epoch
        progress.validation_pending = False
        if metrics["miou"] > progress.best_miou:
            progress.best_miou, progress.best_epoch = metrics["miou"], progress.epoch
            save(model_dir / utils.BEST_CHECKPOINT)  # best before last: last.pth.tar is what a resume trusts
            if main_process:
                utils.write_json(model_dir / utils.METRICS_BEST, metrics)
        if main_process:
            utils.write_json(model_dir / utils.METRICS_LAST, metrics)
            log_validation(writer, metrics, pictures, progress)
        save(model_dir / utils.LAST_CHECKPOINT)
        return True

    stop = exit_stack.enter_context(StopSignal())
    if progress.validation_pending and not validate():
        return stopped(stop, progress, model_dir)
    while progress.iteration < total_iterations:
        sampler.set_epoch(progress.epoch, progress.batch_in_epoch)
        finished = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, loss_fn, params, device,
                                   amp_dtype, progress, total_iterations, stop, writer, world_size,
                                   f"epoch {progress.epoch + 1}/{num_epochs}")
        if not finished:
            save(model_dir / utils.LAST_CHECKPOINT)
            return stopped(stop, progress, model_dir)
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
        last_epoch = progress.iteration >= total_iterations
        progress.validation_pending = last_epoch or progress.epoch % params.val_every_epochs == 0
        save(model_dir / utils.LAST_CHECKPOINT)  # the epoch is safe before validation runs
        if progress.validation_pending and not validate():
            return stopped(stop, progress, model_dir)
        if any_rank(bool(stop.signum), world_size, device):  # rank 0 may have been saving while others went on
            return stopped(stop, progress, model_dir)
    if main_process:
        utils.write_json(model_dir / utils.COMPLETE_MARKER, {
            "epochs": progress.epoch, "iterations": progress.iteration, "best_miou": progress.best_miou,
            "best_epoch": progress.best_epoch, "wall_time_s": round(progress.seconds, 1)})
        if params.keep_checkpoints == "best_weights":
            last.unlink()
        writer.close()
    logging.info("Done: best val mIoU %.4f at epoch %d (%s)", progress.best_miou, progress.best_epoch,
                 model_dir / utils.BEST_CHECKPOINT)
    return 0


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, loss_fn: nn.Module, params: utils.Params,
                    device: torch.device, amp_dtype, progress: Progress, total_iterations: int, stop: StopSignal,
                    writer: SummaryWriter | None, world_size: int, description: str) -> bool:
    """One pass over this epoch's remaining batches; False if a stop signal arrived before its last step."""
    model.train()
    loss_sum = loss_count = 0.0
    tick = time.time()
    stop_now = False
    for images, labels in tqdm(loader, desc=description, disable=writer is None, dynamic_ncols=True, leave=False):
        if stop_now:  # checked here, not after the step: a stop during an epoch's last step lets it finish
            return False
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if params.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with utils.autocast(device, amp_dtype):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if params.grad_clip_norm:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        progress.iteration += 1
        progress.batch_in_epoch += 1
        loss_value, stop_now = synchronise(loss.detach(), bool(stop.signum), world_size)
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"loss is {loss_value} at iteration {progress.iteration} (epoch "
                                   f"{progress.epoch + 1}); kept the last good checkpoint; try a lower learning_rate "
                                   f"or set grad_clip_norm (README: Training from scratch)")
        loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
        if writer is not None and progress.iteration % params.save_summary_steps == 0:
            rate = params.batch_size * world_size * params.save_summary_steps / (time.time() - tick)
            tick = time.time()
            for name, value in (("loss", loss_value), ("lr", optimizer.param_groups[0]["lr"]),
                                ("images_per_s", rate)):
                writer.add_scalar(f"train/{name}", value, progress.iteration)
        if progress.iteration >= total_iterations:
            break
    logging.info("Epoch %d: train loss %.4f", progress.epoch + 1, loss_sum / max(loss_count, 1))
    return True


def synchronise(loss: torch.Tensor, stop: bool, world_size: int) -> tuple[float, bool]:
    """The loss averaged over ranks and whether any rank was asked to stop (so that every rank decides alike)."""
    if world_size == 1:
        return loss.item(), stop
    flags = torch.stack([loss.float(), torch.tensor(float(stop), device=loss.device)])
    dist.all_reduce(flags)
    return flags[0].item() / world_size, flags[1].item() > 0


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """Whether the flag is set on any rank."""
    if world_size == 1:
        return flag
    flags = torch.tensor(float(flag), device=device)
    dist.all_reduce(flags)
    return flags.item() > 0


def log_validation(writer: SummaryWriter, metrics: dict, pictures: list[torch.Tensor], progress: Progress) -> None:
    """The validation's line in train.log and its TensorBoard scalars, per-class IoU and pictures."""
    logging.info("Epoch %d: val mIoU %.4f (best %.4f at epoch %d), pixel acc %.4f, loss %.4f", progress.epoch,
                 metrics["miou"], progress.best_miou, progress.best_epoch, metrics["pixel_accuracy"], metrics["loss"])
    for key in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "loss", "boundary_accuracy",
                "interior_accuracy"):
        if metrics.get(key) is not None:
            writer.add_scalar(f"val/{key}", metrics[key], progress.iteration)
    for name, iou in metrics["per_class_iou"].items():
        if iou is not None:
            writer.add_scalar(f"val_iou/{name}", iou, progress.iteration)
    for i, picture in enumerate(pictures):
        writer.add_image(f"val_image/{i}", picture, progress.iteration)
    writer.flush()


def stopped(stop: StopSignal, progress: Progress, model_dir: Path) -> int:
    logging.info("Stopped by signal %d at iteration %d: saved %s; resume with --restore_file last", stop.signum,
                 progress.iteration, model_dir / utils.LAST_CHECKPOINT)
    return 128 + stop.signum


def cli(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return utils.run_cli(lambda: main(args), (DatasetError, PretrainedWeightsError))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())

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
from train_step import TrainingDiverged  # noqa: F401 -- the error train.py raises, importable from here
from train_step import LossMonitor, build_sgd, build_step, host_learning_rates
from model import visualize
from model.data_loader import DataConfig, DatasetError, EpochSampler, build_dataloader, build_dataset, eval_loader
from model.net import GCN, GCNConfig, PretrainedWeightsError, SegmentationLoss
from model.transforms import denormalise

OUTPUTS = (utils.LAST_CHECKPOINT, utils.BEST_CHECKPOINT, utils.METRICS_LAST, utils.METRICS_BEST,
           utils.COMPLETE_MARKER)  # a previous run's files
STALE_WITH_A_NEW_RUN = ("events.out.tfevents.*", "metrics_*.json", "confusion_*.png")  # --force clears them too


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
    return build_sgd(
        [{"params": groups["backbone"], "lr": params.learning_rate},
         {"params": groups["heads"] + groups["decoder"], "lr": params.learning_rate * params.head_lr_multiplier}],
        params.momentum, params.weight_decay, next(model.parameters()).device)


def parse_args(argv: Sequence[str] | None):
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="experiments/base_model", help="folder holding params.json")
    parser.add_argument("--data_dir", default=None, help="overrides params.json's data_dir")
    parser.add_argument("--restore_file", default=None,
                        help="resume from last | best | a checkpoint path; auto: last if it exists, else start afresh")
    parser.add_argument("--force", action="store_true", help="start afresh, deleting the folder's previous run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.json value (JSON), e.g. --set learning_rate=0.02; repeatable")
    return parser.parse_args(argv)


def main(args) -> int:
    model_dir = Path(args.model_dir)
    overrides = utils.parse_overrides(args.set) | ({"data_dir": args.data_dir} if args.data_dir is not None else {})
    params = utils.load_params(model_dir, (DataConfig, GCNConfig), overrides)
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
    last = model_dir / utils.LAST_CHECKPOINT
    restore_file = args.restore_file
    if restore_file and args.force:
        raise utils.UserError(f"--force starts afresh, --restore_file {restore_file} resumes: pass one of them")
    if restore_file == "auto":
        restore_file = "last" if last.exists() else None
    previous_run = [name for name in OUTPUTS if (model_dir / name).exists()]
    if not restore_file and previous_run and not args.force:
        resume = "resume with --restore_file last, or " if last.exists() else ""
        raise utils.UserError(f"{model_dir} holds a previous run ({', '.join(previous_run)}): {resume}pass --force "
                              f"to delete it and start afresh")

    # Data
    data_config = params.config(DataConfig)
    train_set = build_dataset(data_config, params.num_classes, params.train_split, train=True)
    val_set = build_dataset(data_config, params.num_classes, params.val_split, train=False)
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
    if restore_file:
        path = utils.checkpoint_path(model_dir, restore_file)
        checkpoint = utils.load_checkpoint(path)
        utils.check_same_architecture(path, checkpoint["model_config"], model_config.architecture())
        if not {"optimizer", "scheduler", "scaler", "progress"} <= checkpoint.keys():
            raise utils.CheckpointError(f"cannot resume from {path}: it holds no training state (an export.py "
                                        f"weights file?)")
        changed = params.experiment_differences(checkpoint["params"])
        if changed:
            raise utils.UserError(f"{path} was trained with other settings: {', '.join(changed)} differ (params.json "
                                  f"or --set); resume with the same ones, or start afresh with --force")
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
            utils.save_checkpoint({
                "state_dict": model_without_ddp.state_dict(), "model_config": dataclasses.asdict(model_config),
                "class_names": list(val_set.classes), "palette": [list(c) for c in val_set.palette],
                "optimizer": host_learning_rates(optimizer.state_dict()),
                "scheduler": host_learning_rates(scheduler.state_dict()),
                "scaler": scaler.state_dict(), "progress": dataclasses.asdict(progress), "params": params.dict}, path)

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

    step = build_step(params, model, optimizer, scheduler, scaler, loss_fn, device, amp_dtype, world_size)
    monitor = LossMonitor(params.save_summary_steps, world_size, device)
    stop = exit_stack.enter_context(StopSignal())
    if progress.validation_pending and not validate():
        return stopped(stop, progress, model_dir)
    while progress.iteration < total_iterations:
        sampler.set_epoch(progress.epoch, progress.batch_in_epoch)
        finished = train_one_epoch(model, step, monitor, train_loader, params, progress, total_iterations, stop,
                                   writer, world_size, f"epoch {progress.epoch + 1}/{num_epochs}")
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
        writer.close()
    logging.info("Done: best val mIoU %.4f at epoch %d (%s)", progress.best_miou, progress.best_epoch,
                 model_dir / utils.BEST_CHECKPOINT)
    return 0


def train_one_epoch(model: nn.Module, step, monitor: LossMonitor, loader, params: utils.Params,
                    progress: Progress, total_iterations: int, stop: StopSignal, writer: SummaryWriter | None,
                    world_size: int, description: str) -> bool:
    """One pass over this epoch's remaining batches; False if a stop signal arrived before its last step.

    `step` (train_step.build_step) trains on one batch; `monitor` checks the losses every save_summary_steps and
    before returning, so that whatever the caller saves next is not a diverged model."""
    model.train()
    tick = time.time()
    stop_now = False
    for images, labels in tqdm(loader, desc=description, disable=writer is None, dynamic_ncols=True, leave=False):
        if stop_now:  # checked here, not after the step: a stop during an epoch's last step lets it finish
            monitor.read(True, progress.iteration, progress.epoch)
            return False
        monitor.record(step(images, labels))
        progress.iteration += 1
        progress.batch_in_epoch += 1
        stop_now = synchronise(monitor, bool(stop.signum), progress, world_size)
        if writer is not None and progress.iteration % params.save_summary_steps == 0:
            rate = params.batch_size * world_size * params.save_summary_steps / (time.time() - tick)
            tick = time.time()
            for name, value in (("loss", monitor.last_loss), ("lr", float(step.optimizer.param_groups[0]["lr"])),
                                ("images_per_s", rate)):
                writer.add_scalar(f"train/{name}", value, progress.iteration)
        if progress.iteration >= total_iterations:
            break
    monitor.read(False, progress.iteration, progress.epoch)
    logging.info("Epoch %d: train loss %.4f", progress.epoch + 1, monitor.epoch_mean())
    return True


def synchronise(monitor: LossMonitor, stop: bool, progress: Progress, world_size: int) -> bool:
    """Whether to stop now, alike on every rank. One process acts on its own flag at once; under DDP the ranks
    agree when the monitor reads the losses back (every save_summary_steps), which is also when they are checked."""
    if monitor.due(progress.iteration):
        stop = monitor.read(stop, progress.iteration, progress.epoch)
    return stop if world_size == 1 or monitor.count == 0 else False


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

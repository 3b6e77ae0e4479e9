"""Train the GCN of an experiment folder: python train.py --model_dir experiments/demo

Everything the run produces lands in --model_dir: train.log, params_resolved.json, last.pth.tar / best.pth.tar,
metrics JSON, TensorBoard events; `tracker: "tensorboard+mlflow"` (or +wandb) copies the scalars to MLflow (W&B).
Several GPUs or nodes: torchrun --nproc_per_node N train.py --model_dir ...
SIGTERM/SIGINT (Ctrl-C, pre-emption) saves a resumable checkpoint and exits 128+N; --restore_file last resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

import checkpoints
import errors
import settings
import tracking
import utils
from evaluate import evaluate
from model import visualize
from model.data_loader import (DataConfig, EpochSampler, build_dataloader, build_dataset,
                               check_label_values, eval_loader, worker_death)
from model.net import GCN, GCNConfig, SegmentationLoss
from terminal import progress_bar
from train_step import EagerStep, LossMonitor, build_sgd, build_step, host_learning_rates

OUTPUTS = (utils.LAST_CHECKPOINT, utils.BEST_CHECKPOINT, utils.METRICS_LAST, utils.METRICS_BEST,
           utils.COMPLETE_MARKER)  # a previous run's files
STALE_WITH_A_NEW_RUN = ("events.out.tfevents.*", "metrics_*.json", "confusion_*.png",  # --force clears them too
                        *tracking.RUN_FILES)


@dataclass(kw_only=True)
class Run:
    """One training run's parts, built by train_experiment(); the loop below takes everything from here."""

    model_dir: Path
    config: settings.TrainConfig
    eval_config: settings.EvalConfig
    net: GCN  # the network itself: checkpoints hold its weights
    model: nn.Module  # `net` as the step calls it: compiled if asked, in DistributedDataParallel over processes
    step: EagerStep  # one batch's forward, backward, optimiser and scheduler step (eager or a CUDA graph)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    monitor: LossMonitor  # the steps' losses, kept on the device, checked every save_summary_steps
    criterion: SegmentationLoss  # the training objective, which validation scores too
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    placement: utils.Placement  # device, memory layout and autocast of every training forward pass
    eval_placement: utils.Placement  # validation's: the same in eval_precision
    total_iterations: int
    record: dict[str, Any]  # what every checkpoint holds beside the states: class names, palette, params
    overrides: dict[str, Any]  # the run's --set settings, kept with the training state: a resume need not retype them
    rank: int = 0
    world_size: int = 1
    window: int | None = None  # validation's sliding window (None: whole images)
    progress: checkpoints.Progress = field(default_factory=checkpoints.Progress)
    stop: utils.StopSignal = field(default_factory=utils.StopSignal)
    tracker: tracking.Tracker | None = None  # the main process's TensorBoard (and MLflow, W&B) logging
    clock: float = field(default_factory=time.monotonic)  # when progress.seconds was last brought up to date

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.per_rank // self.config.batch_size

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_iterations / self.batches_per_epoch)


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
    parser.add_argument("--help-params", action=settings.ListSettings, configs=settings.EXPERIMENT_CONFIGS,
                        help="list every params.json key: default, allowed values, meaning; then exit")
    return parser.parse_args(argv)


def train_experiment(args) -> int:
    """Check every input, build the run (data, model, optimiser, schedule, loss, resumed state), train it."""
    model_dir = Path(args.model_dir)
    overrides = settings.parse_overrides(args.set) | ({"data_dir": args.data_dir} if args.data_dir is not None else {})
    params = settings.load_params(model_dir, overrides, args.params and Path(args.params))
    check_folder_name(model_dir)
    definition = own_params(model_dir, Path(args.params)) if args.params else None
    if args.restore_file == "auto" and completed_without_last(model_dir):
        print(f"{model_dir}: nothing to do, this run is complete ({utils.COMPLETE_MARKER})")
        return 0
    seen = run_folder_state(model_dir)  # what every decision below is taken on; checked again under the lock
    restore_file = choose_restore_file(model_dir, args.restore_file, args.force)
    checkpoint, checkpoint_file = None, restore_file and checkpoints.checkpoint_path(model_dir, restore_file)
    if checkpoint_file:
        checkpoint, params, overrides = resume_settings(checkpoint_file, params, overrides)
    data_config, model_config = params.config(DataConfig), params.config(GCNConfig)
    config, eval_config = params.config(settings.TrainConfig), params.config(settings.EvalConfig)
    tracking.check_tracker(config)
    device, rank, world_size = start_processes(config)
    placement = utils.Placement(device, config.channels_last, utils.autocast_dtype(device, config.amp))
    eval_placement = dataclasses.replace(placement, dtype=utils.eval_autocast_dtype(device,
                                                                                    eval_config.eval_precision))

    sampler, train_loader, val_loader = build_data(data_config, model_config.num_classes, config, rank, world_size)
    total_iterations = config.num_iterations or config.num_epochs * (sampler.per_rank // config.batch_size)

    torch.manual_seed(config.seed)  # the model's initialisation; the data pipeline seeds every sample itself
    net = placement.module(build_net(model_config, config.sync_bn and world_size > 1, checkpoint))
    optimizer = build_optimizer(net, config, placement)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_lr_lambda(total_iterations, config.lr_power, config.warmup_iterations))
    scaler = torch.amp.GradScaler(device.type, enabled=placement.needs_grad_scaler)
    criterion = SegmentationLoss(config.class_weights, config.dice_term_weight).to(device)
    model = torch.compile(net) if config.compile else net
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step = build_step(config, model, optimizer, scheduler, scaler, criterion, placement, world_size)
    monitor = LossMonitor(config.save_summary_steps, world_size, device)
    run = Run(model_dir=model_dir, config=config, eval_config=eval_config, net=net, model=model, step=step,
              optimizer=optimizer, scheduler=scheduler, scaler=scaler, monitor=monitor, criterion=criterion,
              sampler=sampler, train_loader=train_loader, val_loader=val_loader, placement=placement,
              eval_placement=eval_placement, total_iterations=total_iterations,
              record=checkpoint_record(val_loader.dataset, params, net), overrides=overrides, rank=rank,
              world_size=world_size, window=data_config.crop_size if eval_config.sliding_window else None)
    if checkpoint is not None:
        restore(run, checkpoint, checkpoint_file)
    if run_is_complete(run):
        if run.main_process and restore_file == "last" and config.keep_checkpoints == "best_weights":
            with claim_run_folder(model_dir, fresh=False, seen=seen):  # a kill as the run ended left it
                checkpoint_file.unlink()
        print(f"{model_dir}: nothing to do, this run already trained its {total_iterations} iterations")
        return 0

    # Every input is checked: from here on, the run writes into its folder, which it holds alone, and a stop signal
    # is a flag (a stop after --force deleted the previous run saves the new one).
    with contextlib.ExitStack() as exit_stack:
        exit_stack.enter_context(run.stop)
        if run.main_process:
            exit_stack.enter_context(claim_run_folder(model_dir, fresh=not restore_file, seen=seen))
            if definition is not None:  # the folder stands alone: evaluate.py and resumes read its params.json
                utils.write_json(model_dir / utils.PARAMS_FILE, definition)
            utils.write_json(model_dir / utils.RESOLVED_PARAMS_FILE, utils.run_record(
                params.dict, overrides, vars(args), device) | {"pretrained_weights": net.pretrained_weights,
                                                               "precision": placement.precision})
            utils.set_logger(model_dir / utils.TRAIN_LOG)
            exit_stack.enter_context(utils.errors_in_log())
            run.tracker = exit_stack.enter_context(tracking.open_tracker(model_dir, config, params.dict,
                                                                         run.stop.requested))
        if restore_file:
            logging.info("Resumed from %s: epoch %d, iteration %d, best mIoU %.4f", restore_file,
                         run.progress.epoch, run.progress.iteration, run.progress.best_miou)
        logging.info("Training %s on %s (%d images, %d batches/epoch) for %d iterations on %s × %d in %s "
                     "(validation in %s)", model_dir, data_config.dataset, len(train_loader.dataset),
                     run.batches_per_epoch, total_iterations, device, world_size, placement.precision,
                     eval_placement.precision)
        return train(run)


def train(run: Run) -> int:
    """Train to the end of the budget, validating as params.json asks; 128+N if signal N stopped it (saved)."""
    progress = run.progress
    run.clock = time.monotonic()
    if progress.validation_pending and not validate(run):
        return stopped(run)
    while progress.iteration < run.total_iterations:
        run.sampler.set_epoch(progress.epoch, progress.batch_in_epoch)
        try:
            finished = train_one_epoch(run)
        except RuntimeError as error:
            raise saved_after_worker_death(run, error) from None
        if not finished:
            save(run, utils.LAST_CHECKPOINT)
            return stopped(run)
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
        last_epoch = progress.iteration >= run.total_iterations
        progress.validation_pending = last_epoch or progress.epoch % run.config.val_every_epochs == 0
        save(run, utils.LAST_CHECKPOINT)  # the epoch is safe before validation runs
        if progress.validation_pending and not validate(run):
            return stopped(run)
        if any_rank(bool(run.stop.signum), run.world_size, run.placement.device):  # rank 0 may have been saving
            return stopped(run)
    if run.main_process:
        utils.write_json(run.model_dir / utils.COMPLETE_MARKER, {
            "epochs": progress.epoch, "iterations": progress.iteration, "best_miou": progress.best_miou,
            "best_epoch": progress.best_epoch, "wall_time_s": round(progress.seconds, 1)})
        run.tracker.finish(run.model_dir / utils.METRICS_BEST, progress.iteration)
        if run.config.keep_checkpoints == "best_weights":
            (run.model_dir / utils.LAST_CHECKPOINT).unlink()
    logging.info("Done: best val mIoU %.4f at epoch %d (%s)", progress.best_miou, progress.best_epoch,
                 run.model_dir / utils.BEST_CHECKPOINT)
    return 0


def train_one_epoch(run: Run) -> bool:
    """One pass over this epoch's remaining batches; False if a stop signal arrived before its last step.

    The losses stay on the device; run.monitor checks them every save_summary_steps and before returning, so that
    whatever the caller saves next is never a diverged model."""
    config, progress = run.config, run.progress
    run.model.train()
    tick = time.time()
    stop_now = False
    # The bar counts the batches this epoch trains in all (fewer in a last epoch that num_iterations ends early)
    batches = min(run.batches_per_epoch, progress.batch_in_epoch + run.total_iterations - progress.iteration)
    for images, labels in progress_bar(run.train_loader, total=batches, initial=progress.batch_in_epoch,
                                       desc=f"epoch {progress.epoch + 1}/{run.num_epochs}", unit="step",
                                       show=run.main_process):
        if stop_now:  # checked here, not after the step: a stop during an epoch's last step lets it finish
            run.monitor.read(True, progress.iteration, progress.epoch)
            return False
        run.monitor.record(run.step(images, labels))
        progress.iteration += 1
        progress.batch_in_epoch += 1
        stop_now = synchronise(run.monitor, bool(run.stop.signum), progress, run.world_size)
        if run.tracker is not None and progress.iteration % config.save_summary_steps == 0:
            rate = config.batch_size * run.world_size * config.save_summary_steps / (time.time() - tick)
            tick = time.time()
            run.tracker.scalars({"train/loss": run.monitor.last_loss, "train/images_per_s": rate,
                                 "train/lr": float(run.optimizer.param_groups[0]["lr"])}, progress.iteration)
        if progress.iteration >= run.total_iterations:
            break
    run.monitor.read(False, progress.iteration, progress.epoch)
    logging.info("Epoch %d: train loss %.4f", progress.epoch + 1, run.monitor.epoch_mean())
    return True


def validate(run: Run) -> bool:
    """Score the model on the val split and record it (best first, then last); False if stopped midway."""
    progress = run.progress
    dataset = run.val_loader.dataset
    pictures = PictureKeeper(dataset, run.eval_config.num_logged_images if run.main_process else 0)
    if run.world_size > 1:  # score with rank 0's batch-norm statistics, those the checkpoint holds
        for buffer in run.net.buffers():
            dist.broadcast(buffer, 0)
    # Not through DDP: its forward synchronises buffers, which would deadlock ranks with fewer images.
    model = run.model.module if isinstance(run.model, DistributedDataParallel) else run.model
    try:
        metrics = evaluate(model, run.val_loader, run.criterion, run.eval_config, run.eval_placement,
                           window=run.window, on_image=pictures,
                           should_stop=run.stop.requested if run.world_size == 1 else None,
                           bar=f"val {progress.epoch}" if run.main_process else None)
    except RuntimeError as error:
        raise saved_after_worker_death(run, error) from None
    if metrics is None:
        return False
    metrics["epoch"] = progress.epoch
    progress.validation_pending = False
    if metrics["miou"] > progress.best_miou:
        progress.best_miou, progress.best_epoch = metrics["miou"], progress.epoch
        save(run, utils.BEST_CHECKPOINT)  # best before last: last.pth.tar is what a resume trusts
        if run.main_process:
            utils.write_json(run.model_dir / utils.METRICS_BEST, metrics)
    if run.main_process:
        utils.write_json(run.model_dir / utils.METRICS_LAST, metrics)
        log_validation(run.tracker, metrics, pictures, progress)
    save(run, utils.LAST_CHECKPOINT)
    return True


class PictureKeeper(list):
    """An evaluate() on_image callback keeping the first `limit` prediction pictures (image | truth | prediction)."""

    def __init__(self, dataset: Dataset, limit: int) -> None:
        super().__init__()
        self.dataset, self.limit = dataset, limit

    def __call__(self, _index: int, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> None:
        if len(self) < self.limit:
            self.append(visualize.prediction_picture(
                image, label.cpu() if self.dataset.has_labels else None, pred.cpu(),
                self.dataset.palette, self.dataset.classes))


def save(run: Run, name: str) -> None:
    """Bring progress.seconds up to date and (main process) write the run's whole state to model_dir/name."""
    now = time.monotonic()
    run.progress.seconds += now - run.clock
    run.clock = now
    if not run.main_process:
        return
    state = {"state_dict": run.net.state_dict(), "model_config": dataclasses.asdict(run.net.config), **run.record}
    if not (name == utils.BEST_CHECKPOINT and run.config.keep_checkpoints == "best_weights"):  # else weights only
        state |= {"optimizer": host_learning_rates(run.optimizer.state_dict(), run.scheduler),
                  "scheduler": host_learning_rates(run.scheduler.state_dict(), run.scheduler),
                  "scaler": run.scaler.state_dict(), "progress": dataclasses.asdict(run.progress),
                  "overrides": run.overrides}
    checkpoints.save_checkpoint(state, run.model_dir / name)


def saved_after_worker_death(run: Run, error: RuntimeError) -> errors.UserError:
    """A dead DataLoader worker ends like a stop: the main process saves what it holds (in training, the batches
    trained; in validation, the epoch, saved before it and still to validate) and the error says how to resume.
    Any other error is raised again."""
    if (died := worker_death(error)) is None:
        raise error
    save(run, utils.LAST_CHECKPOINT)
    return errors.UserError(f"{died}; saved {run.model_dir / utils.LAST_CHECKPOINT} at iteration "
                            f"{run.progress.iteration}: resume with --restore_file last")


def restore(run: Run, checkpoint: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's weights and training state (resume_settings's) into `run`."""
    checkpoints.check_same_architecture(path, checkpoint["model_config"], run.net.config.architecture())
    GCN.check_checkpoint(checkpoint, f"checkpoint {path}")
    run.net.load_state_dict(checkpoint["state_dict"])
    for key, target in (("optimizer", run.optimizer), ("scheduler", run.scheduler), ("scaler", run.scaler)):
        checkpoints.restore_state(path, key, target, checkpoint[key])
    run.progress = checkpoints.Progress(**checkpoint["progress"])


# ----------------------------------------------------------------------------------------------- building the run

def check_folder_name(model_dir: Path) -> None:
    """Refuse a folder TensorBoard cannot write to (a name that is not valid UTF-8)."""
    try:
        str(model_dir.resolve()).encode("utf-8")
    except UnicodeEncodeError:
        raise errors.UserError(f"{model_dir!s}: the folder name is not valid UTF-8 (TensorBoard cannot write "
                               f"there); rename it") from None


def start_processes(config: settings.TrainConfig) -> tuple[torch.device, int, int]:
    """This process's device, rank and the number of processes (several under torchrun); CUDA tuned for speed.
    `compile: true` is refused on the CPU, where compiling takes minutes and is not tested."""
    device = utils.default_device()
    if config.compile and device.type == "cpu":
        raise errors.ParamsError("compile: true is for CUDA; on the CPU, compiling the training step takes minutes "
                                 "for about 10 % less time per step, and this project does not test it: set compile "
                                 "to false (--set compile=false)")
    rank, world_size = utils.init_distributed(device.type)
    if device.type == "cuda":
        device = utils.default_device()  # the GPU init_distributed chose for this rank
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    return device, rank, world_size


def build_data(data_config: DataConfig, num_classes: int, config: settings.TrainConfig, rank: int,
               world_size: int) -> tuple[EpochSampler, DataLoader, DataLoader]:
    """The training sampler and loader and the validation loader; every label value is checked now, rather than
    at the first batch of training or validation."""
    train_set = build_dataset(data_config, num_classes, data_config.train_split, train=True)
    val_set = build_dataset(data_config, num_classes, data_config.val_split, train=False)
    check_label_values(train_set, min_classes=min(2, num_classes))  # a model of one class learns nothing
    check_label_values(val_set)
    if len(train_set) < config.batch_size * world_size:
        raise errors.ParamsError(f"batch_size {config.batch_size} × {world_size} process(es) exceeds the "
                                 f"{len(train_set)} training images")
    sampler = EpochSampler(len(train_set), config.batch_size, config.seed, rank, world_size)
    return (sampler, build_dataloader(train_set, config.batch_size, sampler, data_config.num_workers, drop_last=True),
            eval_loader(val_set, data_config.num_workers, rank, world_size))


def build_net(config: GCNConfig, sync_bn: bool, resumed: dict[str, Any] | None = None) -> GCN:
    """The GCN of `config`, its batch norms synchronised across processes if asked. Resuming from the checkpoint
    `resumed`, which holds every weight, the backbone is not built from its pretrained weights (a file may have moved
    or changed since), and the record of the weights the run started from stays the checkpoint's."""
    net = GCN(config if resumed is None else dataclasses.replace(config, pretrained=False))
    if resumed is not None:
        net.pretrained_weights = resumed.get("pretrained_weights")
    return nn.SyncBatchNorm.convert_sync_batchnorm(net) if sync_bn else net


def build_optimizer(net: GCN, config: settings.TrainConfig, placement: utils.Placement) -> torch.optim.SGD:
    """SGD; the new layers (heads, BR, decoder) learn head_lr_multiplier× faster than the backbone."""
    groups = net.parameter_groups()
    return build_sgd(
        [{"params": groups["backbone"], "lr": config.learning_rate},
         {"params": groups["heads"] + groups["decoder"], "lr": config.learning_rate * config.head_lr_multiplier}],
        config.momentum, config.weight_decay, placement)


def poly_lr_lambda(total_iterations: int, power: float, warmup: int):
    """Per-iteration factor: linear warm-up, then (1 - it / total) ** power."""
    def factor(iteration: int) -> float:
        ramp = min(1.0, (iteration + 1) / warmup) if warmup else 1.0
        return ramp * max(0.0, 1 - iteration / total_iterations) ** power
    return factor


def checkpoint_record(dataset: Dataset, params: settings.Params, net: GCN) -> dict[str, Any]:
    """What every checkpoint holds beside the weights (export.py's weights-only files too): class names, palette,
    the run's settings and the weights the backbone started from."""
    return {"class_names": list(dataset.classes), "palette": [list(c) for c in dataset.palette],
            "params": params.dict, "pretrained_weights": net.pretrained_weights}


# ----------------------------------------------------------------------------------------------- the run folder

def choose_restore_file(model_dir: Path, restore_file: str | None, force: bool) -> str | None:
    """The checkpoint to resume from (None: start afresh); a previous run is never overwritten unless --force."""
    last = model_dir / utils.LAST_CHECKPOINT
    if restore_file and force:
        raise errors.UserError(f"--force starts afresh, --restore_file {restore_file} resumes: pass one of them")
    if restore_file == "auto":
        restore_file = "last" if last.exists() else None
    previous_run = [name for name in OUTPUTS if (model_dir / name).exists()]
    if not restore_file and previous_run and not force:
        resume = "resume with --restore_file last, or " if last.exists() else ""
        raise errors.UserError(f"{model_dir} holds a previous run ({', '.join(previous_run)}): {resume}pass --force "
                               f"to delete it and start afresh")
    return restore_file


def own_params(model_dir: Path, params_file: Path) -> dict[str, Any] | None:
    """The settings of --params FILE, which become the folder's params.json; None if it holds them already. A
    params.json with other settings is refused (evaluate.py and resumes in the folder would use them)."""
    wanted = settings.load_params(model_dir, params_file=params_file).dict
    if not (model_dir / utils.PARAMS_FILE).exists():
        return wanted
    existing = settings.load_params(model_dir).dict
    if existing == wanted:
        return None
    differing = sorted(key for key in wanted if existing[key] != wanted[key])
    raise errors.UserError(f"{model_dir / utils.PARAMS_FILE} holds other settings than {params_file} "
                           f"({', '.join(differing)}): the folder's evaluations and resumes would use them; remove it "
                           f"or choose another --model_dir")


def completed_without_last(model_dir: Path) -> bool:
    """Whether the folder holds a complete run whose last.pth.tar is gone (keep_checkpoints: best_weights)."""
    return not (model_dir / utils.LAST_CHECKPOINT).exists() and (model_dir / utils.COMPLETE_MARKER).exists()


def resume_settings(path: Path, params: settings.Params, overrides: dict[str, Any]
                    ) -> tuple[dict[str, Any], settings.Params, dict[str, Any]]:
    """The checkpoint to resume from, and the settings the run continues with: the checkpoint's own (its --set
    included, not retyped), with this command's settings that may change on resume; a contradiction is refused."""
    checkpoint = checkpoints.load_checkpoint(path)
    if not set(checkpoints.TRAINING_STATE_KEYS) <= checkpoint.keys():
        raise checkpoints.CheckpointError(f"cannot resume from {path}: it holds no training state (an export.py "
                                          f"weights file, or best.pth.tar kept as weights only?)")
    params, overrides = params.resumed(checkpoint["params"], checkpoint.get("overrides", {}), overrides, str(path))
    return checkpoint, params, overrides


def run_is_complete(run: Run) -> bool:
    """Whether the run has trained and validated its whole budget and said so (train_complete.json)."""
    done = run.progress.iteration >= run.total_iterations and not run.progress.validation_pending
    return done and (run.model_dir / utils.COMPLETE_MARKER).exists()


def run_folder_state(model_dir: Path) -> dict[str, tuple[int, int, int]]:
    """What the folder holds of a run: each output's identity, size and time."""
    state = {}
    for name in OUTPUTS:
        with contextlib.suppress(FileNotFoundError):
            found = os.lstat(model_dir / name)
            state[name] = (found.st_ino, found.st_size, found.st_mtime_ns)
    return state


@contextlib.contextmanager
def claim_run_folder(model_dir: Path, fresh: bool, seen: dict[str, tuple[int, int, int]]):
    """Hold the folder's lock; refuse a folder at an output's name, and a folder that changed since the run decided
    what to do (`seen`: another writer saved or finished there meanwhile); clear what killed writers left and, for a
    fresh run, the previous run's outputs."""
    with utils.RunLock(model_dir):
        if run_folder_state(model_dir) != seen:
            raise errors.UserError(f"{model_dir} changed while this run was starting (another train.py saved or "
                                   f"finished there meanwhile); nothing was changed: run the command again")
        utils.check_output_names(model_dir / name for name in (*OUTPUTS, utils.RESOLVED_PARAMS_FILE, utils.TRAIN_LOG))
        utils.remove_stale_temporary_files(model_dir, (*OUTPUTS, utils.RESOLVED_PARAMS_FILE, *tracking.RUN_FILES))
        if fresh:
            stale = [model_dir / name for name in OUTPUTS]
            for pattern in STALE_WITH_A_NEW_RUN:
                stale += model_dir.glob(pattern)
            for path in stale:
                path.unlink(missing_ok=True)
        yield


# ----------------------------------------------------------------------------------------------- across processes

def synchronise(monitor: LossMonitor, stop: bool, progress: checkpoints.Progress, world_size: int) -> bool:
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


# ----------------------------------------------------------------------------------------------- reporting

def log_validation(tracker: tracking.Tracker, metrics: dict, pictures: list[torch.Tensor],
                   progress: checkpoints.Progress) -> None:
    """The validation's line in train.log and its scalars (per-class IoU too) and pictures."""
    logging.info("Epoch %d: val mIoU %.4f (best %.4f at epoch %d), pixel acc %.4f, loss %.4f", progress.epoch,
                 metrics["miou"], progress.best_miou, progress.best_epoch, metrics["pixel_accuracy"], metrics["loss"])
    tracker.scalars({f"val/{key}": metrics[key] for key in utils.SCALAR_METRICS if metrics.get(key) is not None}
                    | {f"val_iou/{name}": iou for name, iou in metrics["per_class_iou"].items() if iou is not None},
                    progress.iteration)
    tracker.pictures("val_image", pictures, progress.iteration)


def stopped(run: Run) -> int:
    logging.info("Stopped by signal %d at iteration %d: saved %s; resume with --restore_file last", run.stop.signum,
                 run.progress.iteration, run.model_dir / utils.LAST_CHECKPOINT)
    return 128 + run.stop.signum


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return utils.run_cli(lambda: train_experiment(args))
    except KeyboardInterrupt:  # Ctrl-C before the run holds its folder: nothing was written or deleted
        print("error: interrupted at once (Ctrl-C while starting, or a second one): nothing new was saved",
              file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

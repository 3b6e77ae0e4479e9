"""Train the GCN of an experiment folder: python train.py --model_dir experiments/demo

Everything the run produces lands in --model_dir: train.log, last.pth.tar / best.pth.tar, metrics JSON,
TensorBoard events. Several GPUs or nodes: torchrun --nproc_per_node N train.py --model_dir ...
"""
from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import utils
from evaluate import (USER_ERRORS, autocast, build_model, checkpoint_path, eval_loader, evaluate, load_params,
                      side_by_side, write_json)
from model.data_loader import build_dataloader, build_dataset
from model.net import SegmentationLoss


class TrainingDiverged(utils.UserError):
    """The loss became NaN or infinite."""


class EpochSampler(torch.utils.data.Sampler[int]):
    """This rank's share of a per-epoch permutation seeded by (seed, epoch), minus the batches already trained.

    The order depends only on (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(length / world_size)
        self.epoch = self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self):
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        order += order[: self.per_rank * self.world_size - self.length]  # equal shares for every rank
        return iter(order[self.rank:: self.world_size][self.skip_batches * self.batch_size:])

    def __len__(self) -> int:
        return max(self.per_rank - self.skip_batches * self.batch_size, 0)


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (a resumable checkpoint is then saved)."""

    def __init__(self) -> None:
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum


def poly_lr_lambda(total_iterations: int, power: float, warmup: int):
    """Per-iteration factor: linear warm-up, then (1 - it / total) ** power."""
    def factor(iteration: int) -> float:
        ramp = min(1.0, (iteration + 1) / warmup) if warmup else 1.0
        return ramp * max(0.0, 1 - iteration / total_iterations) ** power
    return factor


def build_optimizer(net: nn.Module, params: utils.Params) -> torch.optim.SGD:
    """SGD; the new layers (heads, BR, decoder) learn head_lr_multiplier× faster than the backbone."""
    groups = net.parameter_groups()
    new = groups["heads"] + groups["decoder"]
    return torch.optim.SGD(
        [{"params": groups["backbone"], "lr": params.learning_rate},
         {"params": new, "lr": params.learning_rate * params.head_lr_multiplier}],
        lr=params.learning_rate, momentum=params.momentum, weight_decay=params.weight_decay)


def build_loss(params: utils.Params) -> SegmentationLoss:
    if params.loss not in ("cross_entropy", "cross_entropy+dice"):
        raise utils.ParamsError(f"params 'loss' must be 'cross_entropy' or 'cross_entropy+dice', got {params.loss!r}")
    if params.class_weights is not None and len(params.class_weights) != params.num_classes:
        raise utils.ParamsError(f"params 'class_weights' needs {params.num_classes} values, "
                                f"got {len(params.class_weights)}")
    return SegmentationLoss(params.class_weights, params.dice_weight if params.loss == "cross_entropy+dice" else 0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="experiments/base_model", help="folder holding params.json")
    parser.add_argument("--data_dir", default=None, help="overrides params.json's data_dir")
    parser.add_argument("--restore_file", default=None, help="resume from last | best | a checkpoint path")
    parser.add_argument("--force", action="store_true", help="start afresh even if the folder holds checkpoints")
    return parser.parse_args(argv)


class Trainer:
    """One training run: the model, its optimiser and schedule, the loaders, and the run's progress counters."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.model_dir = Path(args.model_dir)
        self.params = params = load_params(self.model_dir, args.data_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.rank, self.world_size = utils.init_distributed(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        self.main = self.rank == 0
        if self.main:
            utils.set_logger(self.model_dir / "train.log")
        self._check_fresh_start(args)

        utils.seed_everything(params.seed)
        train_set = build_dataset(params, params.train_split, train=True)
        self.val_set = build_dataset(params, params.val_split, train=False)
        if len(train_set) < params.batch_size * self.world_size:
            raise utils.ParamsError(f"batch_size {params.batch_size} × {self.world_size} process(es) exceeds the "
                                    f"{len(train_set)} training images")
        self.sampler = EpochSampler(len(train_set), params.batch_size, params.seed, self.rank, self.world_size)
        self.train_loader = build_dataloader(train_set, params.batch_size, self.sampler, params.num_workers,
                                             drop_last=True)
        self.val_loader = eval_loader(self.val_set, params.num_workers, self.rank, self.world_size)
        self.batches_per_epoch = self.sampler.per_rank // params.batch_size
        self.total_iterations = params.num_iterations or params.num_epochs * self.batches_per_epoch
        self.num_epochs = math.ceil(self.total_iterations / self.batches_per_epoch)

        self.net = build_model(params).to(self.device)
        if params.sync_bn and self.world_size > 1:
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        if params.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.net, params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, poly_lr_lambda(self.total_iterations, params.lr_power, params.warmup_iterations))
        fp16 = params.amp and self.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.loss_fn = build_loss(params).to(self.device)
        self.epoch = self.iteration = self.batch_in_epoch = 0
        self.best_miou = -1.0
        if args.restore_file:
            self._restore(checkpoint_path(self.model_dir, args.restore_file))
        self.model: nn.Module = torch.compile(self.net) if params.compile else self.net
        if self.world_size > 1:
            self.model = DistributedDataParallel(self.model, device_ids=[self.device.index] if
                                                 self.device.type == "cuda" else None)
        self.writer = SummaryWriter(self.model_dir) if self.main else None
        self.stop = StopSignal()

    def _check_fresh_start(self, args: argparse.Namespace) -> None:
        last = self.model_dir / "last.pth.tar"
        if not args.restore_file and last.exists() and not args.force:
            raise utils.UserError(f"{last} exists: resume with --restore_file last, or pass --force to start "
                                  f"afresh and overwrite it")
        if not args.restore_file and self.main:
            (self.model_dir / "train_complete.json").unlink(missing_ok=True)

    def _restore(self, path: Path) -> None:
        checkpoint = utils.load_checkpoint(path, self.net, self.net.config)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch, self.iteration = checkpoint["epoch"], checkpoint["iteration"]
        self.batch_in_epoch, self.best_miou = checkpoint["batch_in_epoch"], checkpoint["best_miou"]
        logging.info("Resumed from %s: epoch %d, iteration %d, best mIoU %.4f", path, self.epoch, self.iteration,
                     self.best_miou)

    def save(self, is_best: bool) -> None:
        if not self.main:
            return
        state = {"state_dict": self.net.state_dict(), "model_config": self.net.config,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "epoch": self.epoch, "iteration": self.iteration,
                 "batch_in_epoch": self.batch_in_epoch, "best_miou": self.best_miou, "params": self.params.dict}
        utils.save_checkpoint(state, is_best, self.model_dir)

    def fit(self) -> int:
        """Train to the end of the budget (or until a stop signal); returns the process exit status."""
        params = self.params
        logging.info("Training %s on %s (%d images, %d batches/epoch) for %d iterations on %s × %d",
                     self.model_dir, params.dataset, len(self.train_loader.dataset), self.batches_per_epoch,
                     self.total_iterations, self.device, self.world_size)
        if self.iteration >= self.total_iterations and (self.model_dir / "train_complete.json").exists():
            logging.info("Nothing to do: this run already trained its %d iterations", self.total_iterations)
            return 0
        start = time.time()
        while self.iteration < self.total_iterations:
            utils.seed_everything(params.seed + self.epoch * self.world_size + self.rank)
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            if not self.train_epoch():
                self.save(is_best=False)
                logging.info("Stopped by signal %d at iteration %d: saved %s; resume with --restore_file last",
                             self.stop.signum, self.iteration, self.model_dir / "last.pth.tar")
                return 128 + self.stop.signum
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            done = self.iteration >= self.total_iterations
            if done or self.epoch % params.val_every_epochs == 0:
                self.validate()
            else:
                self.save(is_best=False)
        if self.main:
            write_json(self.model_dir / "train_complete.json",
                       {"epochs": self.epoch, "iterations": self.iteration, "best_miou": self.best_miou,
                        "wall_time_s": round(time.time() - start, 1)})
            self.writer.close()
        logging.info("Done: best val mIoU %.4f", self.best_miou)
        return 0

    def train_epoch(self) -> bool:
        """One pass over this epoch's remaining batches; False if a stop signal arrived."""
        params, device = self.params, self.device
        self.model.train()
        loss_avg = utils.RunningAverage()
        progress = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.num_epochs}", disable=not self.main,
                        dynamic_ncols=True, leave=False)
        tick = time.time()
        for images, labels in progress:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if params.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, params.amp):
                loss = self.loss_fn(self.model(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if params.grad_clip_norm:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.net.parameters(), params.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.iteration += 1
            self.batch_in_epoch += 1
            loss_value, stop = self._synchronise(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss is {loss_value} at iteration {self.iteration} (epoch {self.epoch + 1}); "
                                       f"kept the last good checkpoint in {self.model_dir}; try a lower "
                                       f"learning_rate or set grad_clip_norm")
            loss_avg.update(loss_value)
            if self.iteration % params.save_summary_steps == 0 and self.main:
                rate = params.batch_size * self.world_size * params.save_summary_steps / (time.time() - tick)
                tick = time.time()
                lr = self.optimizer.param_groups[0]["lr"]
                progress.set_postfix(loss=f"{loss_avg():.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                for name, value in (("loss", loss_value), ("lr", lr), ("images_per_s", rate)):
                    self.writer.add_scalar(f"train/{name}", value, self.iteration)
            if stop:
                return False
            if self.iteration >= self.total_iterations:
                break
        logging.info("Epoch %d: train loss %.4f", self.epoch + 1, loss_avg())
        return True

    def _synchronise(self, loss: torch.Tensor) -> tuple[float, bool]:
        """The loss averaged over ranks and whether any rank was asked to stop (so every rank decides alike)."""
        if self.world_size == 1:
            return loss.item(), bool(self.stop.signum)
        flags = torch.stack([loss.float(), torch.tensor(float(bool(self.stop.signum)), device=loss.device)])
        dist.all_reduce(flags)
        return flags[0].item() / self.world_size, flags[1].item() > 0

    def validate(self) -> None:
        pictures: list[torch.Tensor] = []

        def keep_picture(index: int, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor) -> None:
            if len(pictures) < self.params.num_logged_images:
                pictures.append(side_by_side(image, label, pred, self.val_set.palette))

        metrics = evaluate(self.model, self.val_loader, self.params, self.device,
                           on_image=keep_picture if self.main else None)
        metrics["epoch"] = self.epoch
        is_best = metrics["miou"] > self.best_miou
        self.best_miou = max(self.best_miou, metrics["miou"])
        self.save(is_best)
        if not self.main:
            return
        write_json(self.model_dir / "metrics_val_last_weights.json", metrics)
        if is_best:
            write_json(self.model_dir / "metrics_val_best_weights.json", metrics)
        logging.info("Epoch %d: val mIoU %.4f (best %.4f), pixel acc %.4f, loss %.4f", self.epoch, metrics["miou"],
                     self.best_miou, metrics["pixel_accuracy"], metrics["loss"])
        for key in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "loss", "boundary_accuracy",
                    "interior_accuracy"):
            if metrics.get(key) is not None:
                self.writer.add_scalar(f"val/{key}", metrics[key], self.iteration)
        for name, iou in metrics["per_class_iou"].items():
            if iou is not None:
                self.writer.add_scalar(f"val_iou/{name}", iou, self.iteration)
        for i, picture in enumerate(pictures):
            self.writer.add_image(f"val_image/{i}", picture, self.iteration)
        self.writer.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        status = Trainer(args).fit()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())

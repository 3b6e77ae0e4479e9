"""One training step and what train.py checks after it, kept apart from the training loop: the step itself (eager,
or replayed from a CUDA graph), the optimiser (fused SGD) and the loss monitor, which keeps every step's loss on
the device and reads it back only every save_summary_steps, so that no step waits for the host."""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

import errors
import settings
import utils

GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before the capture (cuDNN autotuning, momentum buffers)


class TrainingDiverged(errors.UserError):
    """The loss became NaN or infinite."""


def build_sgd(groups: list[dict[str, Any]], momentum: float, weight_decay: float,
              placement: utils.Placement) -> torch.optim.SGD:
    """SGD over the parameter groups; fused (one kernel for all parameters) on CPU and CUDA, which reads a tensor
    learning rate on the device (what a captured step needs), foreach elsewhere and under fp16's GradScaler: a
    scaled step that overflows (the usual first step) makes the fused kernel skip it without initialising the
    momentum buffers it allocated, which then hold garbage (NaN) from the next step on."""
    fused = placement.device.type in ("cpu", "cuda") and not placement.needs_grad_scaler
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, weight_decay=weight_decay,
                           fused=fused or None, foreach=None if fused else True)


class LossMonitor:
    """Every step's loss stays on the device; every `every` iterations (and at flush, before anything is saved)
    they are read back at once, averaged over the ranks with the stop flags, and checked: a NaN or infinite loss
    raises TrainingDiverged naming its iteration, at most `every` steps after it happened, before any checkpoint
    could hold the diverged model."""

    def __init__(self, every: int, world_size: int, device: torch.device) -> None:
        self.every, self.world_size = every, world_size
        self.losses = torch.zeros(every, device=device)
        self.count = 0  # losses recorded since the last read
        self.last_loss = math.nan  # the latest read's last loss (averaged over ranks)
        self.epoch_sum, self.epoch_count = 0.0, 0

    def record(self, loss: Tensor) -> None:
        self.losses[self.count].copy_(loss.detach())  # no host synchronisation
        self.count += 1

    def due(self, iteration: int) -> bool:
        return iteration % self.every == 0 or self.count == self.every

    def read(self, stop: bool, iteration: int, epoch: int) -> bool:
        """Read the recorded losses back (iteration: the last one's); returns whether any rank asked to stop."""
        values = self.losses[:self.count].float()
        if self.world_size > 1:
            flags = torch.cat([values, torch.tensor([float(stop)], device=values.device)])
            dist.all_reduce(flags)
            values, stop = flags[:-1] / self.world_size, bool(flags[-1].item() > 0)
        losses, first = values.tolist(), iteration - self.count + 1
        self.count = 0
        for i, value in enumerate(losses):
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss is {value} at iteration {first + i} (epoch {epoch + 1}); kept the last "
                                       f"good checkpoint; try a lower learning_rate or set grad_clip_norm "
                                       f"(docs/training.md: Training from scratch)")
        if losses:
            self.last_loss = losses[-1]
            self.epoch_sum, self.epoch_count = self.epoch_sum + sum(losses), self.epoch_count + len(losses)
        return stop

    def epoch_mean(self) -> float:
        """The mean loss of the epoch's steps read so far; starts the next epoch's."""
        mean = self.epoch_sum / max(self.epoch_count, 1)
        self.epoch_sum, self.epoch_count = 0.0, 0
        return mean


class EagerStep:
    """forward, loss, backward, (clipping), optimiser and scheduler for one batch; returns the loss (on the device)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                 scaler: torch.amp.GradScaler, criterion: nn.Module, placement: utils.Placement,
                 grad_clip_norm: float | None) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.criterion, self.placement, self.grad_clip_norm = criterion, placement, grad_clip_norm

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        loss = self.update(*self.placement.batch(images, labels))
        self.scheduler.step()
        return loss

    def update(self, images: Tensor, labels: Tensor, cache_enabled: bool = True) -> Tensor:
        """Everything but the scheduler (which a graph cannot hold: it runs on the host)."""
        with self.placement.autocast(cache_enabled):
            loss = self.criterion(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


class CudaGraphStep(EagerStep):
    """The same step captured once in a CUDA graph (forward, backward, clipping, fused SGD) and replayed for every
    batch: one launch instead of hundreds. Needs static shapes (fixed crops, drop_last) and a learning rate the
    graph reads on the device: at the first step the groups' lr become device tensors (after any resume loaded
    its plain floats), which the scheduler then fills in place.

    The first GRAPH_WARMUP_STEPS batches train eagerly on a side stream (as torch.cuda.graphs asks), then the
    capture runs the next batch's step; both are real steps, so the trajectory is the eager one's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[Tensor, Tensor] | None = None
        self.static_loss: Tensor | None = None
        self.steps = 0

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        images, labels = self.placement.batch(images, labels)
        device = self.placement.device
        if self.static is None:
            for group in self.optimizer.param_groups:
                group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=device)
            self.static = images.clone(), labels.clone()
        elif images.shape != self.static[0].shape or labels.shape != self.static[1].shape:
            raise RuntimeError(f"a captured training step needs static shapes: got {tuple(images.shape)} after "
                               f"{tuple(self.static[0].shape)}; set cuda_graph false")
        self.static[0].copy_(images)
        self.static[1].copy_(labels)
        if self.graph is not None:
            self.graph.replay()
        elif self.steps < GRAPH_WARMUP_STEPS:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self.static_loss = self.update(*self.static, cache_enabled=False)
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (the DataLoader's pin-memory thread) must not invalidate
            # the capture, as they do in the default "global" mode.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.static_loss = self.update(*self.static, cache_enabled=False)
            self.graph.replay()  # capturing ran nothing: this is the step
            logging.info("Training step captured in a CUDA graph after %d eager steps", self.steps)
        self.steps += 1
        self.scheduler.step()
        return self.static_loss.clone()


def graph_unsupported(config: settings.TrainConfig, placement: utils.Placement, world_size: int) -> str | None:
    """Why the training step cannot be captured in a CUDA graph here (None: it can)."""
    reasons = [(placement.device.type != "cuda", "not on CUDA"), (world_size > 1, "DDP (several processes)"),
               (placement.dtype == torch.float16, "fp16 needs a GradScaler, which synchronises"),
               (config.compile, "compile is on"),
               (config.loss != "cross_entropy", "the Dice loss is not captured yet")]
    return next((why for unsupported, why in reasons if unsupported), None)


def build_step(config: settings.TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: LRScheduler, scaler: torch.amp.GradScaler, criterion: nn.Module,
               placement: utils.Placement, world_size: int) -> EagerStep:
    """The training step: captured in a CUDA graph where config.cuda_graph asks and it can be, else eager."""
    step_class = EagerStep
    if config.cuda_graph:
        why = graph_unsupported(config, placement, world_size)
        if why:
            logging.info("cuda_graph: training eagerly (%s)", why)
        else:
            step_class = CudaGraphStep
    return step_class(model, optimizer, scheduler, scaler, criterion, placement, config.grad_clip_norm)


def host_learning_rates(state: dict[str, Any], scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict[str, Any]:
    """An optimiser's or scheduler's state_dict with tensor learning rates (CudaGraphStep's) as plain floats, so
    that a checkpoint resumes alike with or without a graph. The floats are the scheduler's, computed on the host as
    it computes them (base lr × factor): reading the device tensors back would wait for the GPU."""
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    state = dict(state)
    if "param_groups" in state:
        state["param_groups"] = [{**g, "lr": lr if isinstance(g["lr"], Tensor) else g["lr"]}
                                 for g, lr in zip(state["param_groups"], lrs)]
    if "_last_lr" in state:
        state["_last_lr"] = [lr if isinstance(last, Tensor) else last for last, lr in zip(state["_last_lr"], lrs)]
    return state

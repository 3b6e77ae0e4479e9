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

import utils

GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before the capture (cuDNN autotuning, momentum buffers)


class TrainingDiverged(utils.UserError):
    """The loss became NaN or infinite."""


def build_sgd(groups: list[dict[str, Any]], momentum: float, weight_decay: float,
              device: torch.device) -> torch.optim.SGD:
    """SGD over the parameter groups; fused (one kernel for all parameters) on CPU and CUDA, which reads a tensor
    learning rate on the device (what a captured step needs), foreach elsewhere."""
    fused = device.type in ("cpu", "cuda")
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
                                       f"good checkpoint; try a lower learning_rate or set grad_clip_norm (README: "
                                       f"Training from scratch)")
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

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                 loss_fn: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool,
                 grad_clip_norm: float | None) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler, self.loss_fn = (model, optimizer, scheduler, scaler,
                                                                                 loss_fn)
        self.device, self.amp_dtype, self.channels_last, self.grad_clip_norm = (device, amp_dtype, channels_last,
                                                                                grad_clip_norm)

    def to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        images, labels = self.to_device(images, labels)
        loss = self.update(images, labels)
        self.scheduler.step()
        return loss

    def update(self, images: Tensor, labels: Tensor, cache_enabled: bool = True) -> Tensor:
        """Everything but the scheduler (which a graph cannot hold: it runs on the host)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None, cache_enabled=cache_enabled):
            loss = self.loss_fn(self.model(images), labels)
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
    graph reads on the device: the groups' lr become device tensors, which the scheduler fills in place.

    The first GRAPH_WARMUP_STEPS batches train eagerly on a side stream (as torch.cuda.graphs asks), then the
    capture runs the next batch's step; both are real steps, so the trajectory is the eager one's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for group in self.optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[Tensor, Tensor] | None = None
        self.static_loss: Tensor | None = None
        self.steps = 0

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        images, labels = self.to_device(images, labels)
        if self.static is None:
            self.static = images.clone(), labels.clone()
        elif images.shape != self.static[0].shape or labels.shape != self.static[1].shape:
            raise RuntimeError(f"a captured training step needs static shapes: got {tuple(images.shape)} after "
                               f"{tuple(self.static[0].shape)}; set cuda_graph false")
        self.static[0].copy_(images)
        self.static[1].copy_(labels)
        if self.graph is not None:
            self.graph.replay()
        elif self.steps < GRAPH_WARMUP_STEPS:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.static_loss = self.update(*self.static, cache_enabled=False)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_loss = self.update(*self.static, cache_enabled=False)
            self.graph.replay()  # capturing ran nothing: this is the step
            logging.info("Training step captured in a CUDA graph after %d eager steps", self.steps)
        self.steps += 1
        self.scheduler.step()
        return self.static_loss.clone()


def graph_unsupported(params: utils.Params, device: torch.device, amp_dtype: torch.dtype | None,
                      world_size: int) -> str | None:
    """Why the training step cannot be captured in a CUDA graph here (None: it can)."""
    reasons = [(device.type != "cuda", "not on CUDA"), (world_size > 1, "DDP (several processes)"),
               (amp_dtype == torch.float16, "fp16 needs a GradScaler, which synchronises"),
               (params.compile, "compile is on"),
               (params.loss != "cross_entropy", "the Dice loss is not captured yet")]
    return next((why for unsupported, why in reasons if unsupported), None)


def build_step(params: utils.Params, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               scaler: torch.amp.GradScaler, loss_fn: nn.Module, device: torch.device,
               amp_dtype: torch.dtype | None, world_size: int) -> EagerStep:
    """The training step: captured in a CUDA graph where params.cuda_graph asks and it can be, else eager."""
    step_class = EagerStep
    if params.cuda_graph:
        why = graph_unsupported(params, device, amp_dtype, world_size)
        if why:
            logging.info("cuda_graph: training eagerly (%s)", why)
        else:
            step_class = CudaGraphStep
    return step_class(model, optimizer, scheduler, scaler, loss_fn, device, amp_dtype, params.channels_last,
                      params.grad_clip_norm)


def host_learning_rates(state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser's or scheduler's state_dict with tensor learning rates (CudaGraphStep's) as plain floats, so
    that a checkpoint resumes alike with or without a graph."""
    def plain(value: Any) -> Any:
        return float(value) if isinstance(value, Tensor) else value
    state = dict(state)
    if "param_groups" in state:
        state["param_groups"] = [{**g, "lr": plain(g["lr"])} for g in state["param_groups"]]
    if "_last_lr" in state:
        state["_last_lr"] = [plain(lr) for lr in state["_last_lr"]]
    return state

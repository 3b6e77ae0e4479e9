"""The CUDA code paths, run on the CPU: the real training step, loss monitor, validation, prediction and checkpoint
code on device "cuda" under PyTorch's fake tensors (FakeTensorMode), which carry shapes, dtypes, devices and memory
layouts but no values. CUDA autocast really applies (two availability checks are patched), and any host
synchronisation (.item(), .tolist(), bool() of a tensor, a shape that depends on values) raises
DataDependentOutputException: code that must not wait for the GPU is checked for it.

What fake tensors cannot run is stubbed, and each test says where: the autograd engine's backward (it needs a CUDA
context: the stub gives every parameter the loss reaches a gradient, so the optimiser runs), the fused SGD kernel
(no fake kernel: the stub checks its arguments), CUDA streams and graph capture (driver calls), and saving (no
bytes to write). tests/test_cuda.py runs the same paths for real on a GPU."""
from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils.data import Dataset

import checkpoints
import evaluate
import model
import predict
import settings
import train
import train_step
import utils
from model.net import GCN, GCNConfig, SegmentationLoss
from test_predict import smooth_image, write_checkpoint

CUDA = torch.device("cuda", 0)
NUM_CLASSES = 5  # padded to 8 score channels on CUDA
SCORE_WIDTH = 8


@pytest.fixture
def fake_cuda(monkeypatch):
    """Within: tensors on "cuda" are fake, CUDA autocast applies (bf16 native), and Tensor.backward and the fused
    SGD kernel are stubbed. Yields a record of the stubs' calls."""
    calls = SimpleNamespace(backward=[], fused_sgd=[], leaves=[])
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    def backward(loss, *_args, **_kwargs):  # stub: the autograd engine needs a CUDA context
        leaves = reached_leaves(loss)
        for leaf in leaves:
            leaf.grad = torch.zeros_like(leaf)
        calls.backward.append(loss)
        calls.leaves.append(leaves)

    def fused_sgd(params, grads, momentum_buffers, **kwargs):  # stub: no fake kernel
        assert len(params) == len(grads) and all(p.shape == g.shape for p, g in zip(params, grads))
        calls.fused_sgd.append(kwargs)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    monkeypatch.setattr(torch, "_fused_sgd_", fused_sgd)
    model._mean_std_255.cache_clear()  # it keeps one tensor per device: none may outlive the fake mode
    with FakeTensorMode(allow_non_fake_inputs=True):  # real CPU inputs (weights, batches) become fake
        yield calls
    model._mean_std_255.cache_clear()


def reached_leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors (parameters) whose gradient backward would compute: those the loss's graph reaches."""
    leaves, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def tiny_net() -> GCN:
    """A real GCN-R18 on the CPU (a module built as fake cannot be moved), which Placement.module makes fake."""
    with fake_cuda_paused():
        torch.manual_seed(0)
        return GCN(GCNConfig(NUM_CLASSES, "resnet18", kernel_size=3))


def uint8_batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """What a DataLoader delivers: uint8 images and labels, on the CPU."""
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, NUM_CLASSES, (2, size, size), dtype=torch.uint8, generator=g))


class Recorder(nn.Module):
    """A module wrapped to record what it is called with (and what it returns)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.inputs, self.outputs = module, [], []

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        self.inputs.append(args)
        self.outputs.append(self.module(*args))
        return self.outputs[-1]


def build_step(config: settings.TrainConfig, placement: utils.Placement):
    """train.py's parts for one process: the network on the device, its optimiser, schedule, scaler, the recorded
    criterion and the step."""
    net = placement.module(tiny_net())
    optimizer = train.build_optimizer(net, config, placement)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.poly_lr_lambda(100, 0.9, 0))
    scaler = torch.amp.GradScaler("cuda", enabled=placement.needs_grad_scaler)
    criterion = Recorder(SegmentationLoss(dice_weight=config.dice_term_weight).to(CUDA))
    step = train_step.build_step(config, net, optimizer, scheduler, scaler, criterion, placement, 1)
    return net, step, criterion


def score_width_seen(net: GCN) -> list[int]:
    """Records the channels of the last BR's output (the full-resolution score map) at every forward."""
    widths: list[int] = []
    net.decoder_refines[-1].register_forward_hook(lambda _module, _inputs, out: widths.append(out.shape[1]))
    return widths


@pytest.mark.parametrize("loss", ["cross_entropy", "cross_entropy+dice"])
def test_fake_cuda_eager_step_pads_the_score_maps_and_never_waits_for_the_gpu(fake_cuda, loss):
    """bf16 autocast, channels_last, fused SGD, padded score maps: the step runs on "cuda" with no host
    synchronisation, computes the scores on 8 channels and hands the loss the 5 real ones, in bf16; the loss is a
    float32 scalar; the gradient reaches every parameter (through the padding too); the schedule steps."""
    config = settings.TrainConfig(loss=loss)
    placement = utils.Placement(CUDA, True, utils.autocast_dtype(CUDA, config.amp))
    assert placement.dtype == torch.bfloat16
    net, step, criterion = build_step(config, placement)
    widths = score_width_seen(net)
    losses = [step(*uint8_batch()) for _ in range(2)]
    assert widths == [SCORE_WIDTH] * 2
    for logits, labels in criterion.inputs:
        assert logits.shape == (2, NUM_CLASSES, 64, 64) and logits.dtype == torch.bfloat16
        assert logits.device == CUDA and labels.dtype == torch.int64
    assert all(loss.shape == () and loss.dtype == torch.float32 and loss.device == CUDA for loss in losses)
    trainable = {id(p) for p in net.parameters()}
    assert all({id(leaf) for leaf in leaves} == trainable for leaves in fake_cuda.leaves)
    assert len(fake_cuda.fused_sgd) == 2 * 2  # a kernel per parameter group (backbone, new layers) and step
    assert all(isinstance(call["lr"], float) for call in fake_cuda.fused_sgd)
    assert step.scheduler.last_epoch == 2


def test_fake_cuda_fp16_step_scales_the_loss_and_steps_without_the_fused_kernel(fake_cuda, monkeypatch):
    """A GPU without native bf16 trains in fp16 with a GradScaler: the scaled loss goes to backward, the optimiser
    is not the fused one (see train_step.build_sgd), the logits are fp16 and the loss float32 (the pixels counted
    in float32: in fp16 a 512² crop's count overflows). The scaler reads its overflow flag on the host (the one
    synchronisation of an fp16 step, why a CUDA graph refuses fp16): that read is stubbed as "no overflow"."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    placement = utils.Placement(CUDA, True, utils.autocast_dtype(CUDA, True))
    assert placement.dtype == torch.float16 and placement.needs_grad_scaler
    stepped = []
    monkeypatch.setattr(torch.amp.GradScaler, "_maybe_opt_step",
                        lambda self, optimizer, state, *args, **kwargs: stepped.append(optimizer.step()))
    net, step, criterion = build_step(settings.TrainConfig(grad_clip_norm=1.0), placement)
    assert not step.optimizer.defaults["fused"] and step.scaler.is_enabled()
    loss = step(*uint8_batch())
    (logits, _labels), = criterion.inputs
    assert logits.dtype == torch.float16 and loss.dtype == torch.float32 and loss.shape == ()
    assert fake_cuda.backward[0] is not criterion.outputs[0]  # the scaled loss, not the loss
    assert len(stepped) == 1 and not fake_cuda.fused_sgd


def test_fake_cuda_loss_monitor_reads_the_device_only_when_due(fake_cuda):
    """Recording a step's loss copies it on the device; only read() (every save_summary_steps) looks at values."""
    monitor = train_step.LossMonitor(every=3, world_size=1, device=CUDA)
    for iteration in (1, 2, 3):
        monitor.record(torch.ones((), device=CUDA) * iteration)
        assert monitor.due(iteration) == (iteration == 3)
    assert monitor.losses.device == CUDA
    with pytest.raises(DataDependentOutputException):
        monitor.read(False, iteration=3, epoch=0)


class FakeStreamsAndGraphs:
    """Stubs for torch.cuda's streams and graphs (driver calls): a capture runs the captured code once, as eager
    code, and records its capture_error_mode; replay() counts."""

    def __init__(self, monkeypatch) -> None:
        self.captures, self.replays = [], 0
        stream = SimpleNamespace(wait_stream=lambda _other: None)
        monkeypatch.setattr(torch.cuda, "Stream", lambda *_args, **_kwargs: stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *_args, **_kwargs: stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda _stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(replay=self.replay))
        monkeypatch.setattr(torch.cuda, "graph", self.graph)

    def replay(self) -> None:
        self.replays += 1

    @contextlib.contextmanager
    def graph(self, _graph, capture_error_mode: str = "global", **_kwargs):
        self.captures.append(capture_error_mode)
        yield


def test_fake_cuda_graph_step_captures_thread_local_and_the_schedule_fills_its_lr_in_place(fake_cuda, monkeypatch):
    """cuda_graph: warm-up steps, one capture in "thread_local" mode (the DataLoader's pin-memory thread must not
    invalidate it), then replays; the learning rates become device tensors the fused kernel reads and the
    scheduler fills in place (the graph holds their addresses); a checkpoint holds them as the eager floats."""
    graphs = FakeStreamsAndGraphs(monkeypatch)
    config = settings.TrainConfig(cuda_graph=True)
    placement = utils.Placement(CUDA, True, torch.bfloat16)
    net, step, _criterion = build_step(config, placement)
    assert type(step) is train_step.CudaGraphStep
    steps = train_step.GRAPH_WARMUP_STEPS + 3
    for i in range(steps):
        step(*uint8_batch())
        if i == 0:
            lrs = [group["lr"] for group in step.optimizer.param_groups]
            versions = [lr._version for lr in lrs]
    assert graphs.captures == ["thread_local"] and graphs.replays == 3
    assert all(group["lr"] is lr and lr.device == CUDA for group, lr in zip(step.optimizer.param_groups, lrs))
    assert [lr._version for lr in lrs] == [v + steps - 1 for v in versions]  # filled once per later step
    assert all(call["lr"] is lrs[0] or call["lr"] is lrs[1] for call in fake_cuda.fused_sgd)

    saved = []
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda state, path: saved.append(state))
    run = SimpleNamespace(net=net, record={}, config=config, optimizer=step.optimizer, scheduler=step.scheduler,
                          scaler=step.scaler, progress=checkpoints.Progress(), overrides={}, main_process=True,
                          clock=0.0, model_dir=Path("unused"))
    train.save(run, utils.LAST_CHECKPOINT)  # no look at the device: the floats come from the schedule
    groups = saved[0]["optimizer"]["param_groups"]
    factor = train.poly_lr_lambda(100, 0.9, 0)(steps)
    assert [group["lr"] for group in groups] == [config.learning_rate * factor,
                                                 config.learning_rate * config.head_lr_multiplier * factor]
    assert saved[0]["scheduler"]["_last_lr"] == [group["lr"] for group in groups]


class SizedImages(Dataset):
    """Labelled uint8 images of different sizes, as a validation split delivers them."""

    classes = [f"class_{i}" for i in range(NUM_CLASSES)]
    palette = [(i, i, i) for i in range(NUM_CLASSES)]
    has_labels = True
    sizes = [(37, 50), (64, 64), (45, 33)]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = self.sizes[index]
        return (torch.full((3, height, width), 100, dtype=torch.uint8),
                torch.full((height, width), index, dtype=torch.uint8))


class RealBatches:
    """A DataLoader iterated with the fake mode paused, as it runs on the CPU on a GPU machine (it draws real
    numbers, e.g. its workers' seeds)."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.dataset, self.sampler, self.loader = loader.dataset, loader.sampler, loader

    def __iter__(self):
        with fake_cuda_paused():
            return iter(list(self.loader))

    def __len__(self) -> int:
        return len(self.loader)


class RecordedSums(SegmentationLoss):
    """The training objective, recording the logits and labels validation scores with it."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def sums(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.inputs.append((logits, labels))
        return super().sums(logits, labels)


@pytest.mark.parametrize("options", [{}, {"tta": True}, {"window": 40}])
def test_fake_cuda_validation_looks_at_no_value_before_the_last_image(fake_cuda, options):
    """evaluate() on "cuda": every image (TTA and sliding windows too) is scored, its loss sums and metric counts
    added up on the device, without a host synchronisation: the first is the final read-back. The logits reaching
    the loss and the metrics have the real classes only, and cuDNN never autotunes (a new tuning per image size)."""
    placement = utils.Placement(CUDA, True, torch.bfloat16)
    net = placement.module(tiny_net())
    model = Recorder(net)
    autotuning = []
    net.register_forward_pre_hook(lambda *_: autotuning.append(torch.backends.cudnn.benchmark))
    criterion = RecordedSums().to(CUDA)
    seen = []
    dataset = SizedImages()
    torch.backends.cudnn.benchmark = True
    try:
        with pytest.raises(DataDependentOutputException):
            evaluate.evaluate(model, RealBatches(train.eval_loader(dataset, 0)), criterion, settings.EvalConfig(),
                              placement, on_image=lambda index, *_: seen.append(index), **options)
        assert torch.backends.cudnn.benchmark is True  # as it was
    finally:
        torch.backends.cudnn.benchmark = False
    assert seen == [0, 1, 2] and autotuning and not any(autotuning)
    assert [logits.shape for logits, _ in criterion.inputs] == [(1, NUM_CLASSES, h, w) for h, w in dataset.sizes]
    assert all(logits.device == CUDA for logits, _ in criterion.inputs)


def test_fake_cuda_prediction_batches_images_of_one_size(fake_cuda, tmp_path, monkeypatch):
    """predict.py on "cuda": images of one size go through the network together, each label map has its image's
    size and the real classes only (the padded score channels sliced off); the files are stubbed (fake tensors hold
    no pixels to write)."""
    trained = predict.load_trained_model  # the checkpoint is read outside the fake mode
    with fake_cuda_paused():
        write_checkpoint(tmp_path / "best.pth.tar")
        model = trained(tmp_path / "best.pth.tar")
    monkeypatch.setattr(predict, "load_trained_model", lambda _path: model)
    monkeypatch.setattr(utils, "default_device", lambda: CUDA)  # what predict.py picks on a GPU machine
    photos = tmp_path / "photos"
    photos.mkdir()
    with fake_cuda_paused():
        for name, (height, width) in {"a": (40, 56), "b": (40, 56), "c": (33, 47)}.items():
            Image.fromarray(smooth_image(height, width, 0)).save(photos / f"{name}.png")
    batches, written = [], {}
    model.net.register_forward_hook(lambda _m, inputs, out: batches.append((inputs[0].shape, out.shape)))
    monkeypatch.setattr(predict.visualize, "label_png", lambda pred, _palette: pred)
    monkeypatch.setattr(predict.visualize, "overlay_picture", lambda *_args: None)
    monkeypatch.setattr(predict.visualize, "picture_png", lambda _picture: None)
    monkeypatch.setattr(utils, "write_png", lambda path, png: written.setdefault(path.name, png)
                        if path.parent.name == "labels" else None)
    assert predict.main([str(photos), "--out", str(tmp_path / "out")]) == 0
    assert sorted(batches) == [((1, 3, 33, 47), (1, 3, 33, 47)), ((2, 3, 40, 56), (2, 3, 40, 56))]
    assert {name: tuple(pred.shape) for name, pred in written.items()} == {
        "a.png": (40, 56), "b.png": (40, 56), "c.png": (33, 47)}


@contextlib.contextmanager
def fake_cuda_paused():
    """Real tensors within (e.g. to read a checkpoint), inside a fake_cuda test."""
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        yield


@pytest.mark.parametrize("native_bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_fake_cuda_amp_computes_in_bf16_only_where_the_gpu_has_it(fake_cuda, monkeypatch, native_bf16, dtype):
    """amp's dtype on CUDA, and what the network's convolutions then compute in: bf16 on Ampere and newer, fp16 on a
    GPU that only emulates bf16 (T4, V100), whose emulated bf16 is slow or fails."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    placement = utils.Placement(CUDA, True, utils.autocast_dtype(CUDA, True))
    net = placement.module(tiny_net())
    with placement.autocast():
        logits = net(placement.images(uint8_batch()[0]))
    assert placement.dtype == dtype and logits.dtype == dtype and logits.shape == (2, NUM_CLASSES, 64, 64)

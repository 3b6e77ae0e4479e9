"""The CUDA code paths: bf16 autocast, fp16 with GradScaler, channels_last, torch.compile, SyncBatchNorm, the
training step captured in a CUDA graph and the score maps padded to a multiple of 8. They run
where a GPU is present and are skipped, saying why, elsewhere (CI has none)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import predict
import settings
import train
import train_step
import utils
from benchmarks import benchmark
from model.inference import predict_logits
from model.metrics import SegmentationMetrics
from model.net import GCN, GCNConfig, SegmentationLoss, cross_entropy_loss
from test_predict import reference_logits, smooth_image, write_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def batch(device: torch.device, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return (torch.randn(2, 3, size, size, device=device).contiguous(memory_format=torch.channels_last),
            torch.randint(0, 5, (2, size, size), device=device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_steps_match_float32_closely(dtype):
    device = torch.device("cuda")
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16")
    images, labels = batch(device)
    model = GCN(GCNConfig(5, "resnet18", kernel_size=7)).to(device).to(memory_format=torch.channels_last).eval()
    with torch.no_grad():
        reference = model(images).float()
        with utils.autocast(device, dtype):
            mixed = model(images).float()
    assert (mixed - reference).norm() / reference.norm() < 2e-2
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    losses = []
    for _ in range(5):
        with utils.autocast(device, dtype):
            loss = cross_entropy_loss(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_compiled_model_equals_eager():
    device = torch.device("cuda")
    images, _ = batch(device, size=65)
    model = GCN(GCNConfig(5, "resnet18", kernel_size=7)).to(device).eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-3, atol=1e-3)


def test_a_cuda_training_run_with_amp_and_channels_last(experiment):
    model_dir = experiment(num_epochs=1, amp=True, channels_last=True, sync_bn=True)
    assert train.main(["--model_dir", str(model_dir)]) == 0
    assert (model_dir / utils.COMPLETE_MARKER).exists()


def test_sync_batch_norm_conversion_keeps_the_model_equal():
    model = GCN(GCNConfig(5, "resnet18", kernel_size=3)).eval()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(GCN(GCNConfig(5, "resnet18", kernel_size=3))).eval()
    converted.load_state_dict(model.state_dict())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))


def test_predict_on_the_gpu_agrees_with_the_float32_cpu_logits(tmp_path):
    """predict.py moves the images, their normalisation and the model to the GPU (bf16 autocast): its labels are
    the CPU's float32 argmax wherever the two best logits differ by more than bf16's error could bridge."""
    path = tmp_path / "best.pth.tar"
    model = write_checkpoint(path)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (height, width) in enumerate([(37, 53), (64, 48)]):
        Image.fromarray(smooth_image(height, width, i)).save(photos / f"img{i}.png")
    assert predict.main(["--restore_file", str(path), str(photos), "--out", str(tmp_path / "out"),
                        "--eval_precision", "bfloat16"]) == 0
    for i in range(2):
        labels = np.array(Image.open(tmp_path / "out" / "labels" / f"img{i}.png"))
        logits = reference_logits(model, photos / f"img{i}.png")[0]
        top2 = logits.topk(2, dim=0).values
        decided = (top2[0] - top2[1] > 0.05 * logits.abs().max()).numpy()
        assert decided.mean() > 0.5
        assert (labels == logits.argmax(0).numpy())[decided].all()


def two_steps(graph: bool, model: GCN, amp_dtype, grad_clip_norm=5.0):
    """train.py's step for `model` (fused SGD with momentum and weight decay, poly schedule), eager or graphed."""
    device = torch.device("cuda")
    groups = model.parameter_groups()
    optimizer = train_step.build_sgd([{"params": groups["backbone"], "lr": 0.01},
                                      {"params": groups["heads"] + groups["decoder"], "lr": 0.1}], 0.9, 1e-4,
                                     placement := utils.Placement(device, True, amp_dtype))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.poly_lr_lambda(20, 0.9, 3))
    step_class = train_step.CudaGraphStep if graph else train_step.EagerStep
    return step_class(model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False),
                      SegmentationLoss().cuda(), placement, grad_clip_norm)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_the_graphed_step_follows_the_eager_trajectory(amp_dtype):
    """Warm-up, capture and replays train like the eager step: same losses, learning rates and weights, step by
    step over fresh batches (float32 with TF32 off: to rounding; bf16: closely)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        eager_model = GCN(GCNConfig(5, "resnet18", kernel_size=7)).cuda().to(memory_format=torch.channels_last)
        graph_model = copy.deepcopy(eager_model)
        eager, graphed = two_steps(False, eager_model, amp_dtype), two_steps(True, graph_model, amp_dtype)
        tolerance = 2e-3 if amp_dtype is None else 5e-2
        for i in range(train_step.GRAPH_WARMUP_STEPS + 5):
            images, labels = batch(torch.device("cuda"))
            images, labels = images + 0.1 * i, (labels + i) % 5  # a new batch each step, copied into the graph's
            expected, got = eager(images, labels).float(), graphed(images, labels).float()
            assert torch.isfinite(got) and abs(got - expected) <= tolerance * abs(expected), i
            graphed_lr, eager_lr = graphed.optimizer.param_groups[1]["lr"], eager.optimizer.param_groups[1]["lr"]
            assert float(graphed_lr) == pytest.approx(eager_lr)
        assert graphed.graph is not None
        for (name, p), q in zip(eager_model.named_parameters(), graph_model.parameters()):
            error = ((q - p).norm() / p.norm().clamp(min=1e-12)).item()
            assert error < 10 * tolerance, name
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


@pytest.mark.parametrize("graph", [False, True])
def test_the_training_step_never_synchronises(graph):
    """After the warm-up (and capture), steps queue without the host waiting: torch.cuda's sync debug mode raises
    on any synchronising call (.item(), a blocking copy, bincount's output size...)."""
    step = two_steps(graph, GCN(GCNConfig(5, "resnet18", kernel_size=3)).cuda().to(
        memory_format=torch.channels_last), torch.bfloat16)
    images, labels = (t.cpu().pin_memory() for t in batch(torch.device("cuda")))
    monitor = train_step.LossMonitor(every=8, world_size=1, device=torch.device("cuda"))
    for _ in range(train_step.GRAPH_WARMUP_STEPS + 1):
        step(images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            monitor.record(step(images, labels))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert monitor.read(False, 3, 0) is False


def test_a_cuda_graph_run_with_dataloader_workers_captures_and_trains(experiment):
    """With workers the pin-memory thread makes CUDA calls while the step is captured: the capture runs in
    thread_local mode, which they do not invalidate."""
    model_dir = experiment(num_epochs=1, cuda_graph=True, num_workers=2)
    assert train.main(["--model_dir", str(model_dir)]) == 0
    assert "captured in a CUDA graph" in (model_dir / utils.TRAIN_LOG).read_text()


def test_validation_queues_every_image_without_synchronising():
    """evaluate()'s per-image work (forward, loss sums, metric counts) makes no synchronising call."""
    device = torch.device("cuda")
    model = GCN(GCNConfig(5, "resnet18", kernel_size=3)).cuda().eval()
    placement = utils.Placement(device, True, torch.bfloat16)
    dataset = [(torch.randint(0, 256, (3, h, w), dtype=torch.uint8), torch.randint(0, 5, (h, w), dtype=torch.uint8))
               for h, w in ((37, 50), (64, 64))]
    loss, metrics = SegmentationLoss().cuda(), SegmentationMetrics(5, device=device)
    sums = loss.zero_sums(5, device)
    for image, label in dataset:  # warm-up: cuDNN's first calls at these sizes
        with torch.no_grad(), placement.autocast():
            model(placement.images(image[None]))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for image, label in dataset:
            images, labels = placement.batch(image[None].pin_memory(), label[None].pin_memory())
            with torch.no_grad(), placement.autocast():
                logits = predict_logits(model, images)
            sums += loss.sums(logits, labels)
            metrics.update(logits.argmax(1), labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metrics.compute()["pixel_accuracy"] >= 0 and loss.from_sums(sums).item() > 0


def test_the_graphed_step_refuses_a_new_shape():
    step = two_steps(True, GCN(GCNConfig(5, "resnet18", kernel_size=3)).cuda(), torch.bfloat16)
    step(*batch(torch.device("cuda"), 64))
    with pytest.raises(RuntimeError, match="static shapes"):
        step(*batch(torch.device("cuda"), 96))


def test_score_maps_are_padded_on_cuda_and_give_the_unpadded_logits():
    torch.backends.cudnn.allow_tf32 = False
    try:
        model = GCN(GCNConfig(5, "resnet18", kernel_size=7)).cuda().eval()
        images, _ = batch(torch.device("cuda"), size=67)
        assert model.score_width(images) == 8
        with torch.no_grad():
            padded = model(images)
            model.score_channel_multiple = 1
            plain = model(images)
        assert padded.shape == plain.shape == (2, 5, 67, 67)
        assert ((padded - plain).norm() / plain.norm()).item() < 1e-4
    finally:
        torch.backends.cudnn.allow_tf32 = True


def test_a_cuda_graph_training_run_checkpoints_what_an_eager_run_resumes(experiment):
    """cuda_graph on: the run captures its step, and its checkpoint holds plain learning rates, which an eager
    optimiser (a resume with cuda_graph false: an execution setting) loads and steps with."""
    model_dir = experiment(num_epochs=1, cuda_graph=True)
    assert train.main(["--model_dir", str(model_dir)]) == 0
    assert "captured in a CUDA graph" in (model_dir / utils.TRAIN_LOG).read_text()
    checkpoint = torch.load(model_dir / utils.LAST_CHECKPOINT, weights_only=True)
    assert all(isinstance(g["lr"], float) for g in checkpoint["optimizer"]["param_groups"])
    assert all(isinstance(lr, float) for lr in checkpoint["scheduler"]["_last_lr"])
    model = GCN.from_checkpoint(checkpoint).cuda()
    params = settings.load_params(model_dir)
    optimizer = train.build_optimizer(model, params.config(settings.TrainConfig),
                                      utils.Placement(torch.device("cuda"), True, torch.bfloat16))
    optimizer.load_state_dict(checkpoint["optimizer"])
    step = two_steps(False, model, torch.bfloat16)
    step.optimizer = optimizer
    assert torch.isfinite(step(*batch(torch.device("cuda"))))


def test_the_benchmark_counts_kernel_time_within_the_profiled_steps():
    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device)
    def step():
        for _ in range(4):
            a @ a
    step()
    benchmark.synchronise(device)
    table, kernel_s = benchmark.profile_step(step, device, steps=5)
    step_s = benchmark.median_seconds(step, device, warmup=2, repeats=5)
    # four back-to-back 4096³ matmuls keep the GPU busy: kernel time is most of the step, and cannot exceed it
    assert "gemm" in table.lower() or "matmul" in table.lower()
    assert 0.5 * step_s < kernel_s < 1.2 * step_s

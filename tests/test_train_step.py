"""The fast paths on the CPU: bf16 autocast where the CPU has native bf16 and it is faster (only there), the step
without host synchronisation (losses checked every save_summary_steps), fused SGD, and the score maps padded to a
multiple of 8 (CUDA's layout) computing exactly the unpadded model's function."""
from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import checkpoints
import predict
import settings
import train
import train_step
import utils
from model.net import GCN, GCNConfig, SegmentationLoss, dice_loss
from test_predict import TRAINING_PARAMS, reference_logits, smooth_image, write_checkpoint

CPU = torch.device("cpu")
NATIVE_BF16 = utils.cpu_has_native_bf16()


@pytest.mark.parametrize("capabilities,speedup,amp,expected", [
    ({"amx_bf16": True, "avx512_bf16": True}, None, True, torch.bfloat16),  # Intel Sapphire Rapids on: not probed
    ({"amx_bf16": False, "avx512_bf16": True}, 1.6, True, torch.bfloat16),  # AMD Zen 4: the probe finds bf16 faster
    ({"amx_bf16": False, "avx512_bf16": True}, 0.6, True, None),            # Intel Xeon, AMX hidden: bf16 slower
    ({"amx_bf16": False, "avx512_bf16": False, "avx512_vnni": True}, None, True, None),  # bf16 only emulated
    ({"avx2": True}, None, True, None),                                     # AVX2: bf16 channels_last would fail
    ({"amx_bf16": True}, None, False, None),                                # amp false forces float32
])
def test_cpu_autocast_is_bf16_only_where_bf16_is_native_and_faster(monkeypatch, capabilities, speedup, amp,
                                                                    expected):
    def probe() -> float:
        assert speedup is not None, "probed although the capabilities decide"
        return speedup
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)  # it lies
    monkeypatch.setattr(utils, "cpu_bf16_speedup", probe)
    assert utils.autocast_dtype(CPU, amp) is expected


@pytest.mark.parametrize("slow_dtype,speedup", [(torch.bfloat16, 1 / 3), (None, 3.0)])
def test_the_bf16_probe_measures_float32_time_over_bf16_time(monkeypatch, slow_dtype, speedup):
    """On a clock that each pass moves by 1 s, and by 3 s in one precision, the probe's figure is 3 or 1/3. The
    global random state is untouched: evaluate.py and predict.py do not reseed after probing."""
    autocast, clock = utils.autocast, [0.0]

    @contextlib.contextmanager
    def timed(device, dtype, *rest):
        clock[0] += 3.0 if dtype is slow_dtype else 1.0
        with autocast(device, dtype, *rest):
            yield
    monkeypatch.setattr(utils, "autocast", timed)
    monkeypatch.setattr(utils.time, "perf_counter", lambda: clock[0])
    utils.cpu_bf16_speedup.cache_clear()
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    try:
        assert utils.cpu_bf16_speedup(rounds=2) == pytest.approx(speedup)
    finally:
        utils.cpu_bf16_speedup.cache_clear()
    assert torch.equal(torch.rand(3), expected_next)


@pytest.mark.parametrize("pays_here", [True, False])
def test_every_torchrun_rank_makes_the_same_bf16_choice(tmp_path, monkeypatch, pays_here):
    """Under a process group the ranks' choices are all-reduced (bf16 only if every rank's pays), whichever way
    each rank decided: here a one-rank gloo group."""
    all_reduce, ops = dist.all_reduce, []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op: (ops.append(op), all_reduce(tensor, op=op))[1])
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": pays_here})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        pays = utils.cpu_bf16_pays()
    finally:
        dist.destroy_process_group()
    assert ops == [dist.ReduceOp.MIN] and pays is pays_here


def tiny_model(channels_last: bool = False, **config) -> GCN:
    torch.manual_seed(0)
    model = GCN(GCNConfig(**{"num_classes": 5, "backbone": "resnet18", "kernel_size": 3, **config}))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def tiny_batch(size: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, size, size, generator=g), torch.randint(0, 5, (2, size, size), generator=g)


def assert_near(got: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5, name: str = "") -> None:
    """‖got - expected‖ / ‖expected‖ under tolerance: float32 rounding of other summation orders, nothing more."""
    error = ((got - expected).norm() / expected.norm().clamp(min=1e-12)).item()
    assert error < tolerance, f"{name}: relative error {error:.2e}"


def eager_step(model: GCN, amp_dtype: torch.dtype | None, channels_last: bool, lr: float = 0.01,
               multiplier: float = 1.0, dice_weight: float = 0.0,
               scaler: torch.amp.GradScaler | None = None) -> train_step.EagerStep:
    groups = model.parameter_groups()
    placement = utils.Placement(CPU, channels_last, amp_dtype)
    optimizer = train_step.build_sgd([{"params": groups["backbone"], "lr": lr},
                                      {"params": groups["heads"] + groups["decoder"], "lr": lr * multiplier}],
                                     momentum=0.9, weight_decay=1e-2, placement=placement)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1 - it / 100)
    return train_step.EagerStep(model, optimizer, scheduler, scaler or torch.amp.GradScaler("cpu", enabled=False),
                                SegmentationLoss(dice_weight=dice_weight), placement, grad_clip_norm=5.0)


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no bf16 instructions (AMX-BF16 / AVX512-BF16): "
                                            "amp trains in float32 here, tested elsewhere")
@pytest.mark.parametrize("channels_last", [True, False])
def test_a_cpu_bf16_training_step_learns_in_either_layout(channels_last):
    model = tiny_model(channels_last)
    images, labels = tiny_batch()
    with utils.autocast(CPU, torch.bfloat16):
        assert model(images).dtype is torch.bfloat16  # autocast really runs the convolutions in bf16
    step = eager_step(model, torch.bfloat16, channels_last, lr=0.05, multiplier=10)
    losses = [step(images, labels).item() for _ in range(6)]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype is torch.float32 for p in model.parameters())  # master weights stay float32


def test_the_step_never_waits_for_the_host(monkeypatch):
    """No .item(), .tolist() or bool() of a tensor in the step or the loss monitor's record: the host queues steps
    without waiting (on CUDA), and reads the losses back only when due. With the Dice term, the heaviest loss."""
    model = tiny_model()
    images, labels = tiny_batch(32)
    step = eager_step(model, None, channels_last=False, dice_weight=1.0)
    monitor = train_step.LossMonitor(every=3, world_size=1, device=CPU)
    step(images, labels)  # the first step creates the momentum buffers

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host synchronisation in the training step")
    for name in ("item", "tolist", "__bool__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for _ in range(2):
        monitor.record(step(images, labels))
    monkeypatch.undo()
    assert not monitor.due(2) and monitor.due(3)
    assert monitor.read(False, iteration=2, epoch=0) is False and monitor.epoch_count == 2


def test_an_fp16_first_step_that_overflows_is_skipped_and_the_next_one_is_finite():
    """fp16 trains with a GradScaler, whose first scaled steps overflow (here on purpose: 2**40), so it skips them.
    The optimiser must not be the fused one there: its kernel skips too, but leaves the momentum buffers it just
    allocated uninitialised (NaN here: deterministic mode fills uninitialised memory with NaN), and every later
    step is NaN."""
    model = tiny_model()
    images, labels = tiny_batch(32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -36)  # then 16: no overflow
    step = eager_step(model, torch.float16, channels_last=False, scaler=scaler)
    assert not step.optimizer.defaults["fused"]
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        before = [p.detach().clone() for p in model.parameters()]
        step(images, labels)
        assert scaler.get_scale() == 16.0  # the overflow was seen and the step skipped
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        step(images, labels)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the second step trained


def test_the_monitor_names_the_first_nonfinite_iteration():
    monitor = train_step.LossMonitor(every=4, world_size=1, device=CPU)
    for value in (1.0, 0.5, float("inf"), float("nan")):
        monitor.record(torch.tensor(value))
    message = r"^loss is inf at iteration 11 \(epoch 3\); kept the last good"
    with pytest.raises(train_step.TrainingDiverged, match=message):
        monitor.read(False, iteration=12, epoch=2)


@pytest.mark.parametrize("bad,calls,epoch,saved_iteration", [
    (5, 6, 2, 4),     # read with iteration 6 (save_summary_steps 3): one step late; epoch 1's checkpoint stays
    (4, 4, 1, None),  # the last step of epoch 1: read before the end-of-epoch save, so nothing is saved at all
])
def test_a_divergence_is_caught_before_the_next_save(experiment, monkeypatch, capsys, bad, calls, epoch,
                                                     saved_iteration):
    """save_summary_steps 3, 4 steps per epoch: a NaN loss stops the run at the next read, naming its iteration,
    and no checkpoint ever holds NaN weights."""
    model_dir = experiment(save_summary_steps=3)
    original, losses, saved = SegmentationLoss.forward, [], []

    def nan_on_one_call(self, logits, labels):
        losses.append(1)
        loss = original(self, logits, labels)
        return loss * float("nan") if len(losses) == bad else loss
    monkeypatch.setattr(SegmentationLoss, "forward", nan_on_one_call)
    save = checkpoints.save_checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda state, path: (
        saved.append([t.clone() for t in state["state_dict"].values() if t.is_floating_point()]), save(state, path)))
    assert train.main(["--model_dir", str(model_dir)]) == 2
    assert f"error: loss is nan at iteration {bad} (epoch {epoch})" in capsys.readouterr().err
    assert len(losses) == calls  # at most save_summary_steps late
    if saved_iteration is None:
        assert not saved and not (model_dir / utils.LAST_CHECKPOINT).exists()
    else:
        last = torch.load(model_dir / utils.LAST_CHECKPOINT, weights_only=True)
        assert last["progress"]["iteration"] == saved_iteration
    assert all(torch.isfinite(t).all() for weights in saved for t in weights)


@pytest.mark.parametrize("config", [
    {},                                                           # gcn heads, learned deconvolutions
    {"head": "stack", "stack_channels": 5, "upsample": "bilinear"},  # a mid width equal to num_classes
    {"head": "1x1", "boundary_refine": False},
    {"head": "conv", "num_classes": 8},                           # already a multiple of 8: nothing padded
])
def test_padded_score_maps_compute_the_unpadded_model(config):
    """Same weights, padding on (CUDA's layout, forced here on the CPU): the same logits and gradients, and
    training both alike (SGD with momentum and weight decay) keeps them equal: the padding holds no weights."""
    reference = tiny_model(**config)
    padded = copy.deepcopy(reference)
    padded.score_channel_multiple = 8
    assert padded.score_width(torch.zeros(1)) == (8 if reference.config.num_classes <= 8 else 16)
    with torch.no_grad():  # weights of order 1, so that the heads' and BRs' contributions are not negligible
        for model in (reference, padded):
            torch.manual_seed(2)
            for p in [*model.heads.parameters(), *model.head_refines.parameters(), *model.decoder_refines.parameters()]:
                p.normal_(0, 0.3)
    images, labels = tiny_batch(37)
    labels = labels % reference.config.num_classes
    for model in (reference, padded):
        model.train()
    out_ref, out_pad = reference(images), padded(images)
    assert out_pad.shape == out_ref.shape == (2, reference.config.num_classes, 37, 37)
    assert_near(out_pad, out_ref)
    SegmentationLoss()(out_ref, labels).backward()
    SegmentationLoss()(out_pad, labels).backward()
    for (name, p), q in zip(reference.named_parameters(), padded.parameters()):
        assert_near(q.grad, p.grad, 1e-4, name)
    steps = [eager_step(model, None, channels_last=False) for model in (reference, padded)]
    for _ in range(2):
        losses = [step(images, labels) for step in steps]
    assert_near(losses[1], losses[0], 1e-4)
    assert {k: v.shape for k, v in padded.state_dict().items()} == {k: v.shape for k, v in
                                                                    reference.state_dict().items()}
    for model in (reference, padded):
        model.eval()
    with torch.no_grad():
        assert_near(padded(images), reference(images), 1e-4)


def test_the_padded_model_is_traced_as_one_graph():
    """torch.compile sees one graph with padded score maps, as without: no graph break in the padded forward."""
    model = tiny_model().eval()
    model.score_channel_multiple = 8
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_score_maps_are_padded_on_cuda_only_and_never_in_an_export():
    model = tiny_model()
    assert model.score_width(torch.zeros(1)) == 5
    assert model.score_width(torch.zeros(1, device="meta")) == 5


def test_dice_loss_of_an_all_void_batch_is_zero_with_zero_gradients():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = dice_loss(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0 and not logits.grad.any()


def test_checkpoints_hold_plain_learning_rates():
    """A graphed run's tensor learning rates are saved as the floats an eager run holds at the same iteration."""
    optimizers, schedulers = [], []
    for graphed in (True, False):
        optimizers.append(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimizers[-1], lambda it: 0.5 ** it))
        if graphed:  # as CudaGraphStep does at its first step
            optimizers[-1].param_groups[0]["lr"] = torch.tensor(0.1)
        for _ in range(3):
            optimizers[-1].step()
            schedulers[-1].step()
    (graphed, graphed_scheduler), (eager, eager_scheduler) = zip(optimizers, schedulers)
    for graphed_state, eager_state in ((graphed.state_dict(), eager.state_dict()),
                                       (graphed_scheduler.state_dict(), eager_scheduler.state_dict())):
        plain = train_step.host_learning_rates(graphed_state, graphed_scheduler)
        json.dumps(plain.get("param_groups", [{}])[0].get("lr", 0.0))  # a float, not a tensor
        assert not any(isinstance(v, torch.Tensor) for v in plain.get("_last_lr", []))
        assert plain == train_step.host_learning_rates(eager_state, eager_scheduler) == eager_state


def test_cuda_graph_is_off_by_default_and_falls_back_to_eager_on_the_cpu(experiment):
    assert settings.TrainConfig().cuda_graph is False
    config = settings.load_params(experiment(cuda_graph=True)).config(
        settings.TrainConfig)
    placement = utils.Placement(CPU)
    assert train_step.graph_unsupported(config, placement, 1) == "not on CUDA"
    assert config.cuda_graph and type(train_step.build_step(config, *[None] * 5, placement, 1)) is \
        train_step.EagerStep


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no bf16 instructions (AMX-BF16 / AVX512-BF16): "
                                            "eval_precision bfloat16 is refused here")
def test_predict_runs_in_bf16_on_a_cpu_with_native_bf16(tmp_path, monkeypatch):
    """A checkpoint trained with amp true and eval_precision bfloat16: predict.py autocasts to bf16 (float32, the
    default, whatever amp) and still labels every pixel whose two best float32 logits differ by more than bf16's
    error could bridge as the float32 argmax."""
    path = tmp_path / "best.pth.tar"
    model = write_checkpoint(path, params={**TRAINING_PARAMS, "amp": True, "eval_precision": "bfloat16"})
    dtypes = []
    autocast = utils.autocast
    monkeypatch.setattr(utils, "autocast", lambda device, dtype, *rest: (dtypes.append(dtype),
                                                                         autocast(device, dtype, *rest))[1])
    photo = tmp_path / "photos" / "img.png"
    photo.parent.mkdir()
    Image.fromarray(smooth_image(45, 61, 0)).save(photo)
    assert predict.main(["--restore_file", str(path), str(photo.parent), "--out", str(tmp_path / "out")]) == 0
    assert dtypes == [torch.bfloat16]
    labels = np.array(Image.open(tmp_path / "out" / "labels" / "img.png"))
    logits = reference_logits(model, photo)[0]
    top2 = logits.topk(2, dim=0).values
    decided = (top2[0] - top2[1] > 0.05 * logits.abs().max()).numpy()
    assert decided.mean() > 0.5 and (labels == logits.argmax(0).numpy())[decided].all()

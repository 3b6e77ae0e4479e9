"""The CUDA code paths: bf16 autocast, fp16 with GradScaler, channels_last, torch.compile and SyncBatchNorm. They run
where a GPU is present and are skipped, saying why, elsewhere (CI has none)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import predict
import train
import utils
from model.net import GCN, GCNConfig, cross_entropy_loss
from test_predict import reference_logits, smooth_image, write_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def batch(device: torch.device, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return (torch.randn(2, 3, size, size, device=device).contiguous(memory_format=torch.channels_last),
            torch.randint(0, 5, (2, size, size), device=device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_steps_match_float32_closely(dtype):
    device = torch.device("cuda")
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
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
    assert train.cli(["--model_dir", str(model_dir)]) == 0
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
    assert predict.cli(["--restore_file", str(path), str(photos), "--out", str(tmp_path / "out")]) == 0
    for i in range(2):
        labels = np.array(Image.open(tmp_path / "out" / "labels" / f"img{i}.png"))
        logits = reference_logits(model, photos / f"img{i}.png")[0]
        top2 = logits.topk(2, dim=0).values
        decided = (top2[0] - top2[1] > 0.05 * logits.abs().max()).numpy()
        assert decided.mean() > 0.5
        assert (labels == logits.argmax(0).numpy())[decided].all()

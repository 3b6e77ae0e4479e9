"""model/net.py: shapes for every switch, GCN/BR/deconv against hand-built references, paper parameter counts,
initialisation stability, the loss, pretrained-weight loading and the parameter-summary CLI."""
import dataclasses
import hashlib
import itertools
import math
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from model import net
from model.net import (GCN, BoundaryRefine, GCNConfig, GlobalConvBlock, SegmentationLoss, Upsample2x, dice_loss,
                       ROW_LOSS_MIN_CLASSES, cross_entropy_loss, make_head)

REPO_ROOT = Path(__file__).resolve().parents[1]
ODD_SIZES = [(97, 131), (33, 47), (65, 64)]
VOC_SIZE = (375, 500)


def forward_eval(model: nn.Module, height: int, width: int, batch: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(batch, 3, height, width))


def brs(model: GCN) -> list[BoundaryRefine]:
    return [m for m in model.modules() if isinstance(m, BoundaryRefine)]


def reset_to_pytorch_default(model: GCN) -> None:
    """Undo the custom initialisation of the new (non-backbone) layers."""
    for part in (model.heads, model.head_refines, model.decoder_refines):
        for m in part.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.reset_parameters()


# ---------------------------------------------------------------- output shapes

@pytest.fixture(scope="module")
def backbone_models():
    """One eval-mode GCN per backbone, built on first use and shared by the whole module."""
    cache: dict[str, GCN] = {}

    def get(name: str) -> GCN:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = GCN(GCNConfig(21, name)).eval()
        return cache[name]

    return get


@pytest.mark.parametrize("backbone", net.BACKBONES)
def test_output_shape_equals_input_shape_for_every_backbone(backbone_models, backbone):
    model = backbone_models(backbone)
    for height, width in ODD_SIZES:
        out = forward_eval(model, height, width, batch=2)
        assert out.shape == (2, 21, height, width)
        assert torch.isfinite(out).all()


def test_output_shape_voc_sized_input(backbone_models):
    out = forward_eval(backbone_models("resnet50"), *VOC_SIZE)
    assert out.shape == (1, 21, *VOC_SIZE)


@pytest.mark.parametrize("head,upsample,boundary_refine",
                         list(itertools.product(net.HEADS, net.UPSAMPLES, [True, False])))
def test_output_shape_for_every_head_upsample_and_refine(head, upsample, boundary_refine):
    torch.manual_seed(0)
    model = GCN(GCNConfig(7, "resnet18", kernel_size=7, head=head, upsample=upsample,
                boundary_refine=boundary_refine)).eval()
    for height, width in ODD_SIZES:
        assert forward_eval(model, height, width).shape == (1, 7, height, width)


@pytest.mark.parametrize("kwargs", [{"backbone": "resnet11"}, {"head": "dense"}, {"upsample": "nearest"},
                                    {"kernel_size": 4}, {"head": "stack", "kernel_size": 1}])
def test_bad_switch_values_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        GCN(GCNConfig(3, **{"backbone": "resnet18", **kwargs}))


# ---------------------------------------------------------------- GlobalConvBlock

@pytest.mark.parametrize("k", [1, 3, 5, 9, 15])
def test_global_conv_block_equals_sum_of_two_separable_kernels(k):
    torch.manual_seed(k)
    block = GlobalConvBlock(1, 1, k)
    convs = [block.left[0], block.left[1], block.right[0], block.right[1]]
    with torch.no_grad():
        for conv in convs:
            conv.weight.normal_()
            conv.bias.zero_()
    left_col, left_row = block.left[0].weight.reshape(k), block.left[1].weight.reshape(k)
    right_row, right_col = block.right[0].weight.reshape(k), block.right[1].weight.reshape(k)
    kernel = torch.outer(left_col, left_row) + torch.outer(right_col, right_row)
    x = torch.randn(2, 1, 23, 29)
    with torch.no_grad():
        expected = F.conv2d(x, kernel.reshape(1, 1, k, k), padding=k // 2)
        got = block(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_global_conv_block_impulse_response_with_ones(k):
    block = GlobalConvBlock(1, 1, k)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 11] = 1.0
    expected = torch.zeros_like(x)
    r = k // 2
    expected[0, 0, 10 - r:10 + r + 1, 11 - r:11 + r + 1] = 2.0
    with torch.no_grad():
        assert torch.equal(block(x), expected)


@pytest.mark.parametrize("c_in,c_out,k", [(1, 1, 3), (8, 3, 5), (64, 21, 15)])
def test_global_conv_block_parameter_count(c_in, c_out, k):
    block = GlobalConvBlock(c_in, c_out, k)
    expected = 2 * (k * c_in * c_out + k * c_out * c_out) + 4 * c_out
    assert sum(p.numel() for p in block.parameters()) == expected


def weight_count_k(module: nn.Module) -> float:
    """Thousands of weights (biases excluded, as the paper counts)."""
    return sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight")) / 1000


@pytest.mark.parametrize("k,gcn_k,conv_k", [(3, 260, 387), (5, 434, 1075), (7, 608, 2107), (9, 782, 3484)])
def test_head_parameter_counts_match_paper_table2(k, gcn_k, conv_k):
    with torch.device("meta"):
        gcn_head = make_head("gcn", 2048, 21, k)
        conv_head = make_head("conv", 2048, 21, k)
    assert abs(weight_count_k(gcn_head) - gcn_k) < 1
    assert abs(weight_count_k(conv_head) - conv_k) < 1
    with_biases = sum(p.numel() for p in gcn_head.parameters()) / 1000
    assert abs(with_biases - gcn_k) < 1


@pytest.mark.parametrize("mid,paper_k", [(2048, 75885), (1024, 28505), (210, 4307)])
def test_stack_head_parameter_counts_match_paper_table4(mid, paper_k):
    with torch.device("meta"):
        head = make_head("stack", 2048, 21, 7, stack_channels=mid)
    assert len(head) == 3
    assert abs(weight_count_k(head) - paper_k) < 1


@pytest.mark.parametrize("k,depth", [(3, 1), (5, 2), (11, 5)])
def test_stack_depth_gives_k_by_k_receptive_field(k, depth):
    head = make_head("stack", 16, 4, k)
    assert len(head) == depth
    assert all(conv.kernel_size == (3, 3) for conv in head)


@pytest.mark.parametrize("k", [0, 2, 4, 14])
def test_global_conv_block_rejects_even_kernel(k):
    with pytest.raises(ValueError):
        GlobalConvBlock(4, 2, k)


# ---------------------------------------------------------------- Boundary Refinement

def test_boundary_refine_equals_residual_of_two_convs():
    torch.manual_seed(1)
    br = BoundaryRefine(5)
    with torch.no_grad():
        for p in br.parameters():
            p.normal_(std=0.3)
    x = torch.randn(2, 5, 13, 17)
    w1, b1, w2, b2 = br.conv1.weight, br.conv1.bias, br.conv2.weight, br.conv2.bias
    with torch.no_grad():
        expected = x + F.conv2d(F.conv2d(x, w1, b1, padding=1).clamp(min=0), w2, b2, padding=1)
        got = br(x)
    assert not torch.allclose(got, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_every_boundary_refine_is_identity_at_init():
    torch.manual_seed(0)
    model = GCN(GCNConfig(6, "resnet18", kernel_size=5))
    assert len(brs(model)) == 9
    x = torch.randn(2, 6, 11, 9)
    with torch.no_grad():
        for br in brs(model):
            assert torch.equal(br(x), x)


def test_network_with_br_at_init_equals_network_without_br():
    torch.manual_seed(0)
    plain = GCN(GCNConfig(6, "resnet18", kernel_size=5, boundary_refine=False)).eval()
    refined = GCN(GCNConfig(6, "resnet18", kernel_size=5, boundary_refine=True)).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("refines" in key for key in missing)
    x = torch.randn(1, 3, 67, 45)
    with torch.no_grad():
        torch.testing.assert_close(refined(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("boundary_refine,count", [(True, 9), (False, 0)])
def test_number_of_boundary_refine_blocks(boundary_refine, count):
    model = GCN(GCNConfig(4, "resnet18", kernel_size=3, boundary_refine=boundary_refine))
    assert len(brs(model)) == count
    assert len(model.head_refines) == 4 and len(model.decoder_refines) == 5
    if not boundary_refine:
        assert all(isinstance(m, nn.Identity) for m in [*model.head_refines, *model.decoder_refines])


# ---------------------------------------------------------------- upsampling

@pytest.mark.parametrize("target", [(14, 18), (13, 17)])
def test_deconv_starts_as_the_fixed_bilinear_upsampling_and_is_learned(target):
    torch.manual_seed(0)
    deconv, bilinear = Upsample2x(4, "deconv"), Upsample2x(4, "bilinear")
    x = torch.randn(2, 4, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(deconv(x, target), bilinear(x, target), rtol=0, atol=1e-6)
    assert deconv.deconv.weight.requires_grad and deconv.deconv.weight.shape == (4, 4, 3, 3)


def test_bilinear_upsample_has_no_parameters():
    model = GCN(GCNConfig(3, "resnet18", kernel_size=3, upsample="bilinear"))
    assert sum(p.numel() for p in model.upsamples.parameters()) == 0


# ---------------------------------------------------------------- wiring (Figure 2, restated)

def gcn_reference(block: GlobalConvBlock, x: torch.Tensor) -> torch.Tensor:
    """(k×1 -> 1×k) + (1×k -> k×1) from the block's weights, each checked to have the shape its place needs."""
    (left_col, left_row), (right_row, right_col) = block.left, block.right
    k = left_col.weight.shape[-2]
    p = k // 2
    for conv, shape in ((left_col, (k, 1)), (left_row, (1, k)), (right_row, (1, k)), (right_col, (k, 1))):
        assert tuple(conv.weight.shape[-2:]) == shape
    left = F.conv2d(F.conv2d(x, left_col.weight, left_col.bias, padding=(p, 0)), left_row.weight, left_row.bias,
                    padding=(0, p))
    right = F.conv2d(F.conv2d(x, right_row.weight, right_row.bias, padding=(0, p)), right_col.weight,
                     right_col.bias, padding=(p, 0))
    return left + right


def br_reference(br: BoundaryRefine, x: torch.Tensor) -> torch.Tensor:
    return x + F.conv2d(F.relu(F.conv2d(x, br.conv1.weight, br.conv1.bias, padding=1)), br.conv2.weight,
                        br.conv2.bias, padding=1)


def upsample_reference(up: Upsample2x, x: torch.Tensor, size) -> torch.Tensor:
    """Fine pixel i reads coarse coordinate i/2 through the learned 3×3 stride-2 transposed convolution."""
    padded = F.pad(x, (0, 1, 0, 1), mode="replicate")
    return F.conv_transpose2d(padded, up.deconv.weight, stride=2, padding=1)[..., :size[0], :size[1]]


def figure2_reference(model: GCN, x: torch.Tensor) -> torch.Tensor:
    """The paper's Figure 2 from the model's weights: res2..res5 -> GCN -> BR; res5 up + res4 -> BR, up + res3 ->
    BR, up + res2 -> BR; then up -> BR twice to the input size. Only the torchvision backbone modules are called."""
    backbone = model.backbone
    features, y = [], backbone["stem"](x)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        y = backbone[stage](y)
        features.append(y)
    scores = [br_reference(model.head_refines[i], gcn_reference(model.heads[i], features[i])) for i in range(4)]
    out = scores[3]
    for step, skip in enumerate((scores[2], scores[1], scores[0])):
        out = br_reference(model.decoder_refines[step],
                           upsample_reference(model.upsamples[step], out, skip.shape[-2:]) + skip)
    half = (-(-x.shape[-2] // 2), -(-x.shape[-1] // 2))
    out = br_reference(model.decoder_refines[3], upsample_reference(model.upsamples[3], out, half))
    return br_reference(model.decoder_refines[4], upsample_reference(model.upsamples[4], out, x.shape[-2:]))


@pytest.mark.parametrize("height,width", [(67, 45), (64, 96)])
def test_forward_is_figure2_with_trained_looking_weights(height, width):
    """Every BR, deconvolution and head gets distinct random weights (at init the BRs are identities and the
    deconvolutions alike, so a mis-wired decoder would look right): the model must equal the restatement."""
    torch.manual_seed(0)
    model = GCN(GCNConfig(4, "resnet18", kernel_size=5)).eval()
    with torch.no_grad():
        for part in (model.heads, model.head_refines, model.upsamples, model.decoder_refines):
            for param in part.parameters():
                param.add_(torch.randn_like(param) * 0.1)
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        torch.testing.assert_close(model(x), figure2_reference(model, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("part", ["heads", "head_refines", "upsamples", "decoder_refines"])
def test_every_block_of_every_part_changes_the_output(part):
    """Perturbing any single block changes the logits: nothing is built and then left unused."""
    torch.manual_seed(0)
    model = GCN(GCNConfig(4, "resnet18", kernel_size=5)).eval()
    x = torch.randn(1, 3, 67, 45)
    with torch.no_grad():
        before = model(x)
        for block in getattr(model, part):
            saved = [p.clone() for p in block.parameters()]
            for param in block.parameters():
                param.add_(torch.randn_like(param) * 0.1)
            assert not torch.allclose(model(x), before, atol=1e-5), f"{part} block {block} is not used"
            for param, value in zip(block.parameters(), saved):
                param.copy_(value)


# ---------------------------------------------------------------- initialisation stability

def stability_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 3, 256, 256)
    blocks = torch.randint(0, 21, (2, 1, 8, 8)).float()
    labels = F.interpolate(blocks, size=(256, 256), mode="nearest").long()[:, 0]
    return x, labels


def train_losses(model: GCN, x: torch.Tensor, labels: torch.Tensor, steps: int = 30,
                 stop_on_failure: bool = False) -> list[float]:
    """SGD(lr 0.01, momentum 0.9) losses; optionally stop at the first non-finite or above-start loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses: list[float] = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = cross_entropy_loss(model(x), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if stop_on_failure and not stable_so_far(losses):
            break
    return losses


def stable_so_far(losses: list[float]) -> bool:
    return all(math.isfinite(v) for v in losses) and max(losses) <= losses[0] * 1.05


@pytest.mark.parametrize("upsample", net.UPSAMPLES)
def test_initialisation_trains_stably(upsample):
    torch.manual_seed(0)
    model = GCN(GCNConfig(21, "resnet18", 15, upsample=upsample))
    losses = train_losses(model, *stability_batch(), stop_on_failure=True)
    assert stable_so_far(losses), losses
    assert len(losses) == 30
    assert losses[-1] < losses[0], losses


def test_default_pytorch_init_diverges_so_stability_test_discriminates():
    torch.manual_seed(0)
    model = GCN(GCNConfig(21, "resnet18", 15, upsample="bilinear"))
    reset_to_pytorch_default(model)
    losses = train_losses(model, *stability_batch(), stop_on_failure=True)
    assert not stable_so_far(losses), losses


# ---------------------------------------------------------------- loss

def test_loss_ignores_void_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7)
    labels = torch.randint(0, 5, (2, 6, 7))
    labels[0, :2] = 255
    labels[1, 3, 4] = 255
    log_probs = logits.log_softmax(dim=1)
    terms = [-log_probs[n, labels[n, i, j], i, j]
             for n in range(2) for i in range(6) for j in range(7) if labels[n, i, j] != 255]
    assert len(terms) == 2 * 6 * 7 - 15
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(cross_entropy_loss(logits, labels), expected)
    perturbed = logits.clone()
    perturbed[0, :, :2] += 100 * torch.randn(5, 2, 7)
    torch.testing.assert_close(cross_entropy_loss(perturbed, labels), expected)


def void_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels where every class occurs and some pixels are void (255)."""
    torch.manual_seed(seed)
    logits = torch.randn(2, 4, 5, 6)
    labels = torch.arange(60).reshape(2, 5, 6) % 4
    labels[0, 0] = 255
    labels[1, 2, 3] = 255
    return logits, labels


def test_all_void_batch_gives_zero_loss_and_finite_gradients():
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    labels = torch.full((2, 5, 6), 255)
    weighted_dice = SegmentationLoss([1.0, 2.0, 0.5, 1.0], dice_weight=1.0)
    for loss in (cross_entropy_loss(logits, labels), weighted_dice(logits, labels)):
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_segmentation_loss_class_weights_match_hand_computation():
    logits, labels = void_batch()
    weights = [0.5, 2.0, 1.0, 3.0]
    log_probs = logits.log_softmax(dim=1)
    numerator, denominator = 0.0, 0.0
    for n, i, j in itertools.product(range(2), range(5), range(6)):
        y = int(labels[n, i, j])
        if y != 255:
            numerator += -weights[y] * log_probs[n, y, i, j]
            denominator += weights[y]
    torch.testing.assert_close(SegmentationLoss(weights)(logits, labels), numerator / denominator)
    torch.testing.assert_close(SegmentationLoss()(logits, labels), cross_entropy_loss(logits, labels))


@pytest.mark.parametrize("num_classes", [4, ROW_LOSS_MIN_CLASSES, 21])  # channels, then pixel rows
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_of_channels_last_logits_equals_nchw_with_gradients(num_classes, weighted):
    torch.manual_seed(2)
    logits = torch.randn(2, num_classes, 5, 6)
    labels = torch.arange(60).reshape(2, 5, 6) % num_classes
    labels[0, 0] = 255
    nchw = logits.clone().requires_grad_()
    nhwc = logits.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert not nhwc.is_contiguous()
    weight = torch.rand(num_classes) + 0.5 if weighted else None
    loss_nchw, loss_nhwc = cross_entropy_loss(nchw, labels, weight), cross_entropy_loss(nhwc, labels, weight)
    torch.testing.assert_close(loss_nhwc, loss_nchw)
    loss_nchw.backward()
    loss_nhwc.backward()
    torch.testing.assert_close(nhwc.grad, nchw.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("void_rows", [0, 3])  # 76,800 labelled pixels, or 75,900: not a bf16 number
@pytest.mark.parametrize("num_classes", [5, 21])  # the loss over channels, then over pixel rows
def test_half_precision_logits_give_the_float64_loss(dtype, void_rows, num_classes):
    """Under autocast the logits are bf16 or fp16, but the labelled pixels are counted in float32: in bf16 the count
    keeps 8 significant bits (0.3 % off here), in fp16 it overflows above 65,504 (a loss of exactly 0)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, num_classes, 256, 300, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (1, 256, 300), generator=g)
    labels[:, :void_rows] = 255
    expected = F.cross_entropy(logits.double(), labels, ignore_index=255)
    weights = torch.rand(num_classes, generator=g) + 0.5
    expected_weighted = F.cross_entropy(logits.double(), labels, weights.double(), ignore_index=255)
    with torch.autocast("cpu", dtype=dtype):
        loss, weighted = SegmentationLoss()(logits, labels), SegmentationLoss(weights.tolist())(logits, labels)
    assert loss.dtype == torch.float32
    assert abs(loss.item() / expected.item() - 1) < 1e-4
    assert abs(weighted.item() / expected_weighted.item() - 1) < 1e-4


def test_dice_loss_matches_hand_computation_and_is_added_with_its_weight():
    logits, labels = void_batch(1)
    probs = logits.softmax(dim=1)
    valid = labels != 255
    dices = []
    for c in range(4):
        p = probs[:, c][valid]
        g = (labels[valid] == c).float()
        dices.append((2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1))
    expected = 1 - torch.stack(dices).mean()
    torch.testing.assert_close(dice_loss(logits, labels), expected)
    torch.testing.assert_close(SegmentationLoss(dice_weight=0.3)(logits, labels),
                               cross_entropy_loss(logits, labels) + 0.3 * expected)


def test_a_checkpoint_rebuilds_the_same_model_without_downloading():
    torch.manual_seed(0)
    model = GCN(GCNConfig(3, "resnet18", kernel_size=5, head="conv", upsample="bilinear")).eval()
    checkpoint = {"state_dict": model.state_dict(), "model_config": {**dataclasses.asdict(model.config),
                                                                     "pretrained": "/no/such/file.pth"}}
    rebuilt = GCN.from_checkpoint(checkpoint).eval()
    assert rebuilt.config == dataclasses.replace(model.config, pretrained=False)
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert "pretrained" not in model.config.architecture() and model.config.architecture()["head"] == "conv"


# ---------------------------------------------------------------- pretrained weights

def random_resnet_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A torchvision state dict where every tensor (BN statistics included) is random."""
    torch.manual_seed(seed)
    state = getattr(torchvision.models, name)(weights=None).state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = torch.rand_like(value) + 0.5 if "running_var" in key else torch.randn_like(value)
        else:
            state[key] = torch.randint_like(value, 1, 1000)
    return state


def backbone_key(torchvision_key: str) -> str | None:
    stage, rest = torchvision_key.split(".", 1)
    if stage == "fc":
        return None
    return {"conv1": "stem.0", "bn1": "stem.1"}.get(stage, stage) + "." + rest


def test_pretrained_local_file_loads_every_backbone_tensor(tmp_path):
    saved = random_resnet_state("resnet18", seed=3)
    path = tmp_path / "resnet18.pth"
    torch.save(saved, path)
    model = GCN(GCNConfig(5, "resnet18", pretrained=path))
    loaded = model.backbone.state_dict()
    expected = {backbone_key(k): v for k, v in saved.items() if backbone_key(k) is not None}
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    also_str = GCN(GCNConfig(5, "resnet18", pretrained=str(path)))
    assert torch.equal(also_str.backbone["stem"][0].weight, saved["conv1.weight"])


def test_pretrained_accepts_wrapped_state_dict(tmp_path):
    saved = random_resnet_state("resnet18", seed=4)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": saved}, path)
    model = GCN(GCNConfig(5, "resnet18", pretrained=path))
    assert torch.equal(model.backbone["layer4"][1].bn2.running_var, saved["layer4.1.bn2.running_var"])


def wrong_state_resnet34(_path: Path) -> dict:
    return random_resnet_state("resnet34", seed=0)


def wrong_state_renamed(_path: Path) -> dict:
    return {"module." + k: v for k, v in random_resnet_state("resnet18", seed=0).items()}


def wrong_state_shapes(_path: Path) -> dict:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).state_dict()


@pytest.mark.parametrize("make_state", [wrong_state_resnet34, wrong_state_renamed, wrong_state_shapes])
def test_pretrained_file_with_wrong_contents_raises(tmp_path, make_state):
    path = tmp_path / "weights.pth"
    torch.save(make_state(path), path)
    with pytest.raises(net.PretrainedWeightsError, match=re.escape(str(path))):
        GCN(GCNConfig(5, "resnet18", pretrained=path))


def test_pretrained_garbage_file_raises(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(net.PretrainedWeightsError, match=re.escape(str(path))):
        GCN(GCNConfig(5, "resnet18", pretrained=path))


def test_pretrained_missing_file_raises(tmp_path):
    path = tmp_path / "nope" / "resnet18.pth"
    with pytest.raises(net.PretrainedWeightsError, match=re.escape(str(path))):
        GCN(GCNConfig(5, "resnet18", pretrained=path))


def test_pretrained_true_without_network_raises_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    with pytest.raises(net.PretrainedWeightsError) as info:
        GCN(GCNConfig(5, "resnet18", pretrained=True))
    message = str(info.value)
    assert calls, "the download function was never attempted"
    assert "pretrained" in message and "local path" in message
    assert str(tmp_path) in message  # where a manually downloaded file can be placed
    assert calls[0] in message  # the URL to download elsewhere


def cache_torchvision_weights(torch_home: Path, weights: torchvision.models.WeightsEnum,
                              state: dict[str, torch.Tensor]) -> None:
    """Put `state` where torchvision's weights API finds `weights` without downloading: the hub cache of
    $TORCH_HOME under the URL's file name."""
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(state, checkpoints / Path(weights.url).name)


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch) -> Path:
    """An empty $TORCH_HOME, with every download failing."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch"


@pytest.mark.parametrize("pretrained", ["IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT", True])
def test_pretrained_weight_names_load_through_torchvisions_weights_api(offline_torch_home, pretrained):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    saved = random_resnet_state("resnet18", seed=5)
    cache_torchvision_weights(offline_torch_home, weights, saved)
    model = GCN(GCNConfig(5, "resnet18", pretrained=pretrained))
    assert torch.equal(model.backbone["stem"][0].weight, saved["conv1.weight"])
    assert torch.equal(model.backbone["layer3"][0].bn1.running_mean, saved["layer3.0.bn1.running_mean"])
    assert model.pretrained_weights == {"torchvision": "ResNet18_Weights.IMAGENET1K_V1", "url": weights.url}


def test_true_means_torchvisions_default_and_names_select_other_weights():
    resnet50 = torchvision.models.ResNet50_Weights
    assert net.torchvision_weights("resnet50", True) is resnet50.DEFAULT is resnet50.IMAGENET1K_V2
    assert net.torchvision_weights("resnet50", "IMAGENET1K_V1") is resnet50.IMAGENET1K_V1
    assert net.torchvision_weights("resnet152", "ResNet152_Weights.IMAGENET1K_V1").name == "IMAGENET1K_V1"
    assert net.torchvision_weights("resnet50", "weights/IMAGENET1K_V1.pth") is None  # a path
    assert net.torchvision_weights("resnet50", False) is None


@pytest.mark.parametrize("name", ["IMAGENET1K_V2", "IMAGENET22K", "ResNet50_Weights.IMAGENET1K_V1"])
def test_a_weight_name_torchvision_does_not_know_is_one_line_listing_the_valid_ones(name):
    with pytest.raises(net.PretrainedWeightsError) as info:
        GCN(GCNConfig(5, "resnet18", pretrained=name))
    message = str(info.value)
    assert "\n" not in message and repr(name) in message and "resnet18" in message
    assert "IMAGENET1K_V1, DEFAULT" in message


def test_a_local_file_is_recorded_with_its_path_and_sha256(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(random_resnet_state("resnet18", seed=6), path)
    model = GCN(GCNConfig(5, "resnet18", pretrained=str(path)))
    assert model.pretrained_weights == {"file": str(path.resolve()),
                                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert GCN(GCNConfig(5, "resnet18")).pretrained_weights is None


# ---------------------------------------------------------------- frozen batch norm

def backbone_norm_state(model: GCN) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.backbone.state_dict().items()
            if ".bn" in name or "downsample.1" in name or name.startswith("stem.1")}


@pytest.mark.parametrize("frozen_bn", [True, False])
def test_frozen_bn_keeps_backbone_statistics_and_affine_parameters_through_training_steps(frozen_bn):
    torch.manual_seed(0)
    model = GCN(GCNConfig(3, "resnet18", kernel_size=3, frozen_bn=frozen_bn))
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20  # stem, 2 per basic block, 3 downsamples
    with torch.no_grad():  # statistics and affine parameters as a pretrained backbone has them
        for norm in norms:
            norm.running_mean.normal_(0, 0.1)
            norm.running_var.uniform_(0.5, 1.5)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
    before = backbone_norm_state(model)
    conv_before = model.backbone["layer2"][0].conv1.weight.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    model.train()
    assert model.heads.training and all(norm.training != frozen_bn for norm in norms)
    for _ in range(3):
        loss = cross_entropy_loss(model(torch.randn(2, 3, 64, 64)), torch.randint(0, 3, (2, 64, 64)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = backbone_norm_state(model)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not torch.equal(conv_before, model.backbone["layer2"][0].conv1.weight)  # the backbone did train
    if frozen_bn:
        assert unchanged == list(before)
        assert not any(p.requires_grad for norm in norms for p in norm.parameters())
    else:
        assert not [name for name in unchanged if not name.endswith("num_batches_tracked")]
    model.eval()
    assert not any(m.training for m in model.modules())
    assert "frozen_bn" not in model.config.architecture()


# ---------------------------------------------------------------- parameter summary CLI

def counts_by_prefix(model: GCN) -> dict[str, int]:
    parts = {"backbone": ("backbone.",), "heads": ("heads.", "head_refines."),
             "decoder": ("upsamples.", "decoder_refines.")}
    counts = {part: sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefixes))
              for part, prefixes in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def test_cli_parameter_summary_adds_up_and_matches_model():
    result = subprocess.run([sys.executable, "-m", "model.net", "--backbone", "resnet50", "--num_classes", "21"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = {m.group(1): int(m.group(2).replace(",", ""))
               for m in re.finditer(r"^(backbone|heads|decoder|total)\s+([\d,]+)\s*$", result.stdout, re.M)}
    assert set(printed) == {"backbone", "heads", "decoder", "total"}, result.stdout
    assert printed["backbone"] + printed["heads"] + printed["decoder"] == printed["total"]
    expected = counts_by_prefix(GCN(GCNConfig(21, "resnet50")))
    assert printed == expected
    resnet50 = torchvision.models.resnet50(weights=None)
    assert printed["backbone"] == sum(p.numel() for p in resnet50.parameters()) - (2048 * 1000 + 1000)


@pytest.mark.parametrize("channels_last", [False, True])
def test_horizontal_conv_equals_a_plain_1xk_convolution_with_gradients(channels_last):
    torch.manual_seed(0)
    fast = net.HorizontalConv(6, 4, 7)
    plain = nn.Conv2d(6, 4, (1, 7), padding=(0, 3))
    plain.load_state_dict(fast.state_dict())  # same parameter names and shapes as a 1×k nn.Conv2d
    x = torch.randn(2, 6, 9, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_fast, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fast, out_plain = fast(x_fast), plain(x_plain)
    assert torch.allclose(out_fast, out_plain, atol=1e-5)
    grad = torch.randn_like(out_plain)
    out_fast.backward(grad)
    out_plain.backward(grad)
    assert torch.allclose(x_fast.grad, x_plain.grad, atol=1e-5)
    assert torch.allclose(fast.weight.grad, plain.weight.grad, atol=1e-4)
    assert torch.allclose(fast.bias.grad, plain.bias.grad, atol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_every_gradient_comes_back_in_its_parameters_strides(memory_format):
    """DistributedDataParallel lays its buckets out like the parameters: a gradient with other strides, even only in
    a dimension of size 1 (the GCN's 1×k weights through a transpose), makes every rank warn "Grad strides do not
    match bucket view strides" and copy the gradient."""
    model = GCN(GCNConfig(3, "resnet18", 3)).to(memory_format=memory_format)
    model(torch.randn(2, 3, 64, 64).contiguous(memory_format=memory_format)).sum().backward()
    mismatched = {name: (p.stride(), p.grad.stride()) for name, p in model.named_parameters()
                  if p.grad.stride() != p.stride()}
    assert not mismatched


@pytest.mark.parametrize("class_weights, dice_weight", [(None, 0.0), ([1.0, 3.0, 0.5], 0.0), ([1.0, 3.0, 0.5], 0.7)])
def test_loss_sums_over_batches_give_the_loss_of_one_batch(class_weights, dice_weight):
    """Validation's val/loss: sums of batches of other sizes, added up, equal the training objective of the images
    taken as one batch, class weights and Dice included; an empty split gives 0."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 3, 7, 9, generator=generator)
    labels = torch.randint(0, 3, (3, 7, 9), generator=generator)
    labels[0, :2] = 255
    criterion = SegmentationLoss(class_weights, dice_weight)
    sums = criterion.zero_sums(3)
    for part in (slice(0, 1), slice(1, 3)):
        sums += criterion.sums(logits[part], labels[part])
    torch.testing.assert_close(criterion.from_sums(sums).float(), criterion(logits, labels))
    assert criterion.from_sums(criterion.zero_sums(3)).item() == 0.0

"""The Global Convolutional Network (Peng et al., 2017, "Large Kernel Matters", Figure 2) and its loss.

ResNet stages res2..res5 -> one head per stage (GCN, or an ablation alternative) -> Boundary Refinement
-> coarse-to-fine fusion (upsample x2, add the finer stage's score map, BR) -> two more upsample + BR steps
to full resolution. Nine BR blocks in all (4 after the heads, 3 after the fusions, 2 at the end).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from errors import UserError
from model import IGNORE_INDEX
from model.summary import flops_summary, inference_flops, parameter_summary

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
HEADS = ("gcn", "conv", "stack", "1x1")
UPSAMPLES = ("deconv", "bilinear")
STAGES = ("layer1", "layer2", "layer3", "layer4")  # res2 .. res5 in the paper's naming
MAX_KERNEL_SIZE = 255  # beyond any feature map of a 4096² crop at stride 32 (the paper's largest k is 15)
SCORE_CHANNEL_MULTIPLE = 8  # on CUDA the score maps are computed on channels padded to this (tensor-core tiles)
ROW_LOSS_MIN_CLASSES = 16  # channels-last logits with this many classes or more: the loss over pixel rows


@dataclass
class GCNConfig:
    """Every setting of the network: params.json's model keys, the checkpoint's record and the model's blueprint.

    Each field's metadata says which values params.json may give it (settings.Params checks them at load).
    """

    num_classes: int = field(metadata={"at_least": 1, "at_most": 255})  # void (255) aside: labels are uint8
    backbone: str = field(default="resnet50", metadata={"choices": BACKBONES})  # torchvision ResNet
    kernel_size: int = field(default=15, metadata={  # k of gcn (and conv/stack) heads
        "at_least": 1, "odd": True, "at_most": MAX_KERNEL_SIZE,
        "memory": lambda k: f"a gcn head on res5 holds {2 * 2048 * k * 4 / 1e9:.3g} GB of weights per class"})
    head: str = field(default="gcn", metadata={"choices": HEADS})  # the paper's ablation alternatives
    boundary_refine: bool = True  # false removes all nine BR blocks
    upsample: str = field(default="deconv", metadata={"choices": UPSAMPLES})  # learned (bilinear init) or fixed
    stack_channels: int | None = field(default=None, metadata={  # stack head width (None: input's)
        "at_least": 1, "at_most": 4096, "memory": lambda c: f"each 3×3 layer would hold {c * c * 36 / 1e9:.3g} GB"})
    # ImageNet weights: false, true (torchvision's DEFAULT), a torchvision weight name ("IMAGENET1K_V1") or a file
    pretrained: bool | str = False
    frozen_bn: bool = False  # backbone batch norm in eval mode with frozen affine parameters, also while training

    def architecture(self) -> dict:
        """The fields that shape the weights (not `pretrained` nor `frozen_bn`, which say how they are trained)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _TRAINING_ONLY}


_TRAINING_ONLY = ("pretrained", "frozen_bn")  # GCNConfig fields that do not shape the weights


class PretrainedWeightsError(UserError):
    """ImageNet weights could not be loaded; the message says what to do."""


# Whether torch.export (and so torch.onnx) is tracing; older torch lacks is_exporting, is_compiling covers it.
_exporting = getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)


class HorizontalConv(nn.Conv2d):
    """A 1×k convolution ("same" padding). On CPU it runs as a k×1 convolution of the H/W-transposed input,
    which oneDNN trains about 2× faster (benchmarks/benchmark.py; docs/performance.md). Same weights and result.
    An exported graph (ONNX, torch.export) gets the plain 1×k convolution: the trick is eager oneDNN's only.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(in_channels, out_channels, (1, kernel_size), padding=(0, kernel_size // 2))

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or torch.onnx.is_in_onnx_export() or _exporting():
            return super().forward(x)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        # The transposed view is neither NCHW nor NHWC: without the copy oneDNN falls back to a slow path.
        x_t = x.transpose(-1, -2).contiguous(memory_format=layout)
        # A reshape, not a transpose (the same for a dimension of size 1): its gradient comes back in the weight's
        # own strides, which DistributedDataParallel's buckets expect ("Grad strides do not match bucket view").
        out_channels, in_channels, _, k = self.weight.shape
        weight_t = self.weight.reshape(out_channels, in_channels, k, 1).contiguous(memory_format=layout)
        return F.conv2d(x_t, weight_t, self.bias, padding=self.padding[::-1]).transpose(-1, -2)


class GlobalConvBlock(nn.Module):
    """(k×1 -> 1×k) + (1×k -> k×1), summed, no nonlinearity, "same" padding (paper Fig. 2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"GlobalConvBlock kernel_size must be a positive odd integer, got {kernel_size}")
        k, p = kernel_size, kernel_size // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, (k, 1), padding=(p, 0)),
            HorizontalConv(out_channels, out_channels, k),
        )
        self.right = nn.Sequential(
            HorizontalConv(in_channels, out_channels, k),
            nn.Conv2d(out_channels, out_channels, (k, 1), padding=(p, 0)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.left(x) + self.right(x)


class BoundaryRefine(nn.Module):
    """Residual boundary refinement: x + conv3×3(ReLU(conv3×3(x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def conv_stack(in_channels: int, out_channels: int, kernel_size: int, mid_channels: int | None) -> nn.Sequential:
    """(k-1)/2 stacked 3×3 convolutions with a k×k receptive field, no nonlinearity (paper Tables 3-4)."""
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"head 'stack' needs an odd kernel_size >= 3, got {kernel_size}")
    depth = (kernel_size - 1) // 2
    mid = mid_channels or in_channels
    widths = [in_channels] + [mid] * (depth - 1) + [out_channels]
    return nn.Sequential(*(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:])))


def make_head(kind: str, in_channels: int, num_classes: int, kernel_size: int,
              stack_channels: int | None = None) -> nn.Module:
    """The per-stage score head: the paper's GCN or one of its ablation alternatives."""
    if kind == "gcn":
        return GlobalConvBlock(in_channels, num_classes, kernel_size)
    if kind == "conv":
        if kernel_size % 2 == 0:
            raise ValueError(f"head 'conv' needs an odd kernel_size, got {kernel_size}")
        return nn.Conv2d(in_channels, num_classes, kernel_size, padding=kernel_size // 2)
    if kind == "stack":
        return conv_stack(in_channels, num_classes, kernel_size, stack_channels)
    if kind == "1x1":
        return nn.Conv2d(in_channels, num_classes, 1)
    raise ValueError(f"unknown head {kind!r}; choose one of {HEADS}")


def bilinear_kernel(channels: int) -> Tensor:
    """C×C×3×3 weights of a per-channel ×2 linear interpolation in the top-left convention (see Upsample2x)."""
    tent = torch.tensor([0.5, 1.0, 0.5])
    weight = torch.zeros(channels, channels, 3, 3)
    weight[range(channels), range(channels)] = torch.outer(tent, tent)
    return weight


class Upsample2x(nn.Module):
    """×2 upsampling on torchvision's pixel grid: coarse pixel j lands on fine pixel 2j.

    torchvision's ResNet places feature j of a stride-s stage on image pixel s·j (its strided convolutions and
    max-pool are top-left aligned), not on s·j + (s-1)/2 as F.interpolate(align_corners=False) or FCN's 4×4
    deconvolution assume (which shifts res-5 by 15 px). So fine pixel 2j copies j and 2j+1 averages j and j+1:
    a stride-2 transposed 3×3 convolution with the kernel [½, 1, ½]ᵀ[½, 1, ½], learned from there ("deconv", as
    in the paper) or fixed ("bilinear"). The last row and column are replicated first, so a constant map stays
    constant up to the border; the result (2h+1 × 2w+1) is cropped to the target size (2h or 2h-1).
    """

    def __init__(self, channels: int, mode: str) -> None:
        super().__init__()
        if mode not in UPSAMPLES:
            raise ValueError(f"unknown upsample {mode!r}; choose one of {UPSAMPLES}")
        self.deconv = None
        if mode == "deconv":
            self.deconv = nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, bias=False)
            with torch.no_grad():
                self.deconv.weight.copy_(bilinear_kernel(channels))

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        # The last row and column replicated by concatenation: the same values as F.pad(mode="replicate"), whose
        # backward inductor miscompiles on CPU (it assumes NCHW strides where the kernel returns channels_last).
        x = torch.cat([x, x[..., -1:, :]], dim=-2)
        x = torch.cat([x, x[..., :, -1:]], dim=-1)
        if self.deconv is None:  # align_corners=True from (h+1) to (2h+1) pixels maps fine i to coarse i/2 exactly
            y = F.interpolate(x, size=(2 * x.shape[-2] - 1, 2 * x.shape[-1] - 1), mode="bilinear",
                              align_corners=True)
        else:
            y = self.deconv(x)
        return y.narrow(-2, 0, size[0]).narrow(-1, 0, size[1])  # narrow, not slicing: older torch.export needs it


_WEIGHT_NAME = re.compile(r"(\w+_Weights\.)?[A-Z][A-Z0-9_]*")  # "IMAGENET1K_V1", "ResNet50_Weights.DEFAULT"


def torchvision_weights(name: str, pretrained: bool | str) -> torchvision.models.WeightsEnum | None:
    """The torchvision weights `pretrained` names for backbone `name`: true is DEFAULT, a string such as
    "IMAGENET1K_V1" (or "ResNet50_Weights.IMAGENET1K_V1") one of its weight names; None for false or a file path."""
    if pretrained is True or (isinstance(pretrained, str) and _WEIGHT_NAME.fullmatch(pretrained)):
        enum = torchvision.models.get_model_weights(name)
        key = "DEFAULT" if pretrained is True else pretrained.rpartition(".")[2]
        valid = [w.name for w in enum] + ["DEFAULT"]
        if key not in valid or (isinstance(pretrained, str) and "." in pretrained
                                and not pretrained.startswith(f"{enum.__name__}.")):
            raise PretrainedWeightsError(f"pretrained {pretrained!r} is not a torchvision weight name for {name}; "
                                         f"choose one of {', '.join(valid)} (or true, false, or a file path)")
        return enum[key]
    return None


def build_backbone(name: str, pretrained: bool | str | os.PathLike) -> tuple[torchvision.models.ResNet, dict | None]:
    """A torchvision ResNet: randomly initialised (false), with torchvision's ImageNet weights (true: DEFAULT, or a
    weight name such as "IMAGENET1K_V1") or loaded from a local state dict; and the record of the weights used."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    builder = getattr(torchvision.models, name)
    if pretrained is False or pretrained is None:
        return builder(weights=None), None
    weights = torchvision_weights(name, pretrained)
    if weights is not None:
        try:
            net = builder(weights=weights)
        except Exception as exc:  # noqa: BLE001 -- any download/cache failure becomes one actionable error
            raise PretrainedWeightsError(
                f"could not load ImageNet weights {weights} for {name} ({type(exc).__name__}: {exc}); "
                f"with no network, download {weights.url} elsewhere and set params 'pretrained' to its local path "
                f"(or place it in {torch.hub.get_dir()}/checkpoints/)"
            ) from exc
        return net, {"torchvision": str(weights), "url": weights.url}
    path = Path(pretrained)
    net = _load_local_backbone(builder, name, path)
    return net, {"file": str(path.resolve()), "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_local_backbone(builder, name: str, path: Path) -> torchvision.models.ResNet:
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise PretrainedWeightsError(f"{path} is not a readable PyTorch state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    net = builder(weights=None)
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path} does not hold a state dict (found {type(state).__name__})")
    missing, unexpected = _key_mismatch(net.state_dict(), state)
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"{path} is not a torchvision {name} state dict: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise PretrainedWeightsError(f"{path} does not match torchvision {name}: {str(exc).splitlines()[1:3]}") from exc
    return net


def _key_mismatch(expected: dict, given: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(given)), sorted(set(given) - set(expected))


class CheckpointMismatchError(UserError):
    """A checkpoint's weights do not fit the network its model_config describes."""


def state_dict_mismatch(expected: dict[str, Tensor], given: dict[str, Tensor]) -> str | None:
    """What keeps `given` from loading where `expected` is (missing or unknown keys, shapes); None if nothing."""
    missing, unknown = _key_mismatch(expected, given)
    if missing or unknown:
        return f"missing {', '.join(missing[:3]) or '-'}; unknown {', '.join(unknown[:3]) or '-'}"
    shapes = [f"{k} is {list(given[k].shape)}, not {list(v.shape)}" for k, v in expected.items()
              if given[k].shape != v.shape]
    return ", ".join(shapes[:3]) or None


def _stage_channels(backbone: nn.Module) -> list[int]:
    return [getattr(backbone, stage)[-1].conv1.in_channels for stage in STAGES]


class GCN(nn.Module):
    """GCN + BR segmentation network of Figure 2, with the paper's ablation switches."""

    def __init__(self, config: GCNConfig) -> None:
        super().__init__()
        if config.head not in HEADS:
            raise ValueError(f"unknown head {config.head!r}; choose one of {HEADS}")
        self.config = config
        num_classes = config.num_classes
        # pretrained_weights: which weights the backbone started from (torchvision name, or file and sha256)
        resnet, self.pretrained_weights = build_backbone(config.backbone, config.pretrained)
        self.backbone = nn.ModuleDict({
            "stem": nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool),
            **{stage: getattr(resnet, stage) for stage in STAGES},
        })
        channels = _stage_channels(resnet)

        def refine() -> nn.Module:
            return BoundaryRefine(num_classes) if config.boundary_refine else nn.Identity()

        self.heads = nn.ModuleList(make_head(config.head, c, num_classes, config.kernel_size, config.stack_channels)
                                   for c in channels)
        self.head_refines = nn.ModuleList(refine() for _ in channels)
        # Decoder: 3 fusions (res5->res4->res3->res2), then stride 4 -> 2 -> 1.
        self.upsamples = nn.ModuleList(Upsample2x(num_classes, config.upsample) for _ in range(5))
        self.decoder_refines = nn.ModuleList(refine() for _ in range(5))
        self.score_channel_multiple: int | None = None  # None: SCORE_CHANNEL_MULTIPLE on CUDA, 1 on CPU
        # decode() as a module for functional_call on padded weights, built once (one built in forward breaks a
        # compiled model into three graphs), kept out of the module tree (as a submodule it would hold it twice).
        object.__setattr__(self, "_decoding", _Decoding(self))
        self.reset_new_parameters()
        if config.frozen_bn:
            for norm in self._backbone_norms():
                norm.requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, source: str = "the checkpoint") -> GCN:
        """The model a checkpoint (train.py's or export.py's weights-only file) describes, with its weights."""
        cls.check_checkpoint(checkpoint, source)
        model = cls(GCNConfig(**{**checkpoint["model_config"], "pretrained": False}))
        model.load_state_dict(checkpoint["state_dict"])
        return model

    @classmethod
    def check_checkpoint(cls, checkpoint: dict, source: str = "the checkpoint") -> None:
        """Refuse (CheckpointMismatchError naming `source`) a state_dict that does not fit its model_config: keys
        and shapes are compared with the network built on the meta device (no memory, no initialisation cost)."""
        with torch.device("meta"):
            expected = cls(GCNConfig(**{**checkpoint["model_config"], "pretrained": False})).state_dict()
        problem = state_dict_mismatch(expected, checkpoint["state_dict"])
        if problem:
            raise CheckpointMismatchError(f"{source}: its state_dict does not fit its model_config ({problem})")

    def reset_new_parameters(self) -> None:
        """Initialise heads and BR blocks for stable training from the first step (docs/model.md: Initialisation).

        Score heads: N(0, 0.01) weights (as FCN/DeepLab classifiers), zero bias. BR blocks: first conv N(0, 0.01),
        second conv zero, so every BR starts as the identity and its residual grows slowly. Deconvolutions keep
        their bilinear init. PyTorch's default init (and even a He-initialised first BR conv) diverges within
        ~20 SGD steps at lr 0.01, momentum 0.9: the residuals of nine chained BRs compound.
        """
        for head in self.heads:
            for m in head.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.01)
                    nn.init.zeros_(m.bias)
        for br in [*self.head_refines, *self.decoder_refines]:
            if isinstance(br, BoundaryRefine):
                nn.init.normal_(br.conv1.weight, std=0.01)
                nn.init.zeros_(br.conv1.bias)
                nn.init.zeros_(br.conv2.weight)
                nn.init.zeros_(br.conv2.bias)

    def _backbone_norms(self) -> list[nn.Module]:
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> GCN:
        """As nn.Module.train; with `frozen_bn` the backbone's batch norm stays in eval mode (running statistics
        used and never updated, as Caffe-era recipes and MMSegmentation's norm_eval do)."""
        super().train(mode)
        if mode and self.config.frozen_bn:
            for norm in self._backbone_norms():
                norm.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part: the (pretrainable) backbone, the per-stage heads + their BRs, and the decoder."""
        return {
            "backbone": list(self.backbone.parameters()),
            "heads": [*self.heads.parameters(), *self.head_refines.parameters()],
            "decoder": [*self.upsamples.parameters(), *self.decoder_refines.parameters()],
        }

    def forward(self, x: Tensor) -> Tensor:
        features = []
        y = self.backbone["stem"](x)
        for stage in STAGES:
            y = self.backbone[stage](y)
            features.append(y)
        width = self.score_width(x)
        if width == self.config.num_classes:
            return self.decode(features, x)
        # The heads, BR and decoder on zero-padded weights: every score map has `width` channels, the extra ones
        # stay zero (zero weights and biases), gradients reach the real weights through the padding.
        padded = {f"model.{name}": _pad_score_channels(p, self.config.num_classes, width)
                  for name, p in self.named_parameters() if not name.startswith("backbone.")}
        out = torch.func.functional_call(self._decoding, padded, (features, x))
        return out[:, :self.config.num_classes]

    def score_width(self, x: Tensor) -> int:
        """The channels the score maps are computed on: num_classes, or on CUDA (outside export) num_classes
        rounded up to a multiple of SCORE_CHANNEL_MULTIPLE, which spares cuDNN padding every 21-channel map
        (docs/performance.md). `score_channel_multiple` overrides the multiple (1: no padding; tests pad on CPU)."""
        multiple = self.score_channel_multiple
        if multiple is None:
            exporting = torch.onnx.is_in_onnx_export() or _exporting()
            multiple = SCORE_CHANNEL_MULTIPLE if x.device.type == "cuda" and not exporting else 1
        return -(-self.config.num_classes // multiple) * multiple

    def decode(self, features: list[Tensor], x: Tensor) -> Tensor:
        """Heads, BR and the coarse-to-fine decoder: the score map at the size of the input x."""
        scores = [refine(head(f)) for f, head, refine in zip(features, self.heads, self.head_refines)]
        # Coarse to fine: res5 -> res4 -> res3 -> res2 (stride 32 -> 4).
        out = scores[-1]
        for i, skip in enumerate(reversed(scores[:-1])):
            out = self.decoder_refines[i](self.upsamples[i](out, skip.shape[-2:]) + skip)
        # Stride 4 -> 2 -> 1, to the exact input size even when it is not a multiple of 32.
        half = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
        out = self.decoder_refines[3](self.upsamples[3](out, half))
        return self.decoder_refines[4](self.upsamples[4](out, tuple(x.shape[-2:])))


class _Decoding(nn.Module):
    """GCN.decode as a module call, so that torch.func.functional_call can run it on padded weights."""

    def __init__(self, model: GCN) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: list[Tensor], x: Tensor) -> Tensor:
        return self.model.decode(features, x)


def _pad_score_channels(weight: Tensor, channels: int, width: int) -> Tensor:
    """A head, BR or decoder parameter with its score-channel dimensions (the first two of a weight, the bias's
    only one, wherever they hold `channels`) zero-padded to `width`."""
    pad = [0, 0] * (weight.dim() - min(weight.dim(), 2))
    for size in reversed(weight.shape[:2]):
        pad += [0, width - channels if size == channels else 0]
    return F.pad(weight, pad)


def cross_entropy_loss(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """Pixel-wise cross entropy (optionally class-weighted); void pixels (IGNORE_INDEX) are ignored.

    Unlike F.cross_entropy's mean, an all-void batch (a crop inside an ignored region) gives 0, not NaN.
    """
    total = _cross_entropy_sum(logits, labels, weight)
    return total / _pixel_weights(labels, weight).sum().clamp(min=torch.finfo(torch.float32).tiny)


def _cross_entropy_sum(logits: Tensor, labels: Tensor, weight: Tensor | None) -> Tensor:
    """The (weighted) cross entropy summed over the non-void pixels."""
    if (logits.dim() == 4 and logits.shape[1] >= ROW_LOSS_MIN_CLASSES and not logits.is_contiguous()
            and logits.is_contiguous(memory_format=torch.channels_last)):
        # NHWC logits as (pixels × classes) rows, a free view: log-softmax over rows is faster on CPU from
        # 16 classes on (1.4–1.6× at 21), 2–3× slower below (docs/performance.md).
        logits, labels = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]), labels.reshape(-1)
    return F.cross_entropy(logits, labels, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")


def _pixel_weights(labels: Tensor, weight: Tensor | None) -> Tensor:
    """Each pixel's weight in the cross entropy, in float32 whatever the logits' dtype (their sum counts pixels: bf16
    keeps 8 significant bits, fp16 overflows above 65,504): its class's weight (1 without weights), 0 for void."""
    valid = labels != IGNORE_INDEX
    return valid.float() if weight is None else weight.float()[labels.masked_fill(~valid, 0)] * valid


def dice_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """1 - soft Dice, averaged over the classes present in labels; void pixels are ignored."""
    return _dice_from_terms(*_dice_terms(logits, labels))


def _dice_terms(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per class: the soft intersection, the soft total (prediction + truth) and the labelled pixels."""
    valid = labels != IGNORE_INDEX
    probs = logits.float().softmax(1) * valid.unsqueeze(1)
    one_hot = F.one_hot(labels.masked_fill(~valid, 0), logits.shape[1]).permute(0, 3, 1, 2) * valid.unsqueeze(1)
    pixels = one_hot.sum((0, 2, 3))
    return (probs * one_hot).sum((0, 2, 3)), probs.sum((0, 2, 3)) + pixels, pixels


def _dice_from_terms(intersection: Tensor, total: Tensor, pixels: Tensor) -> Tensor:
    present = (pixels > 0).to(total.dtype)
    dice = (2 * intersection + 1) / (total + 1)
    # Without boolean indexing or a host test: no synchronisation (an all-void batch gives 0).
    return (present * (1 - dice)).sum() / present.sum().clamp(min=1)


class SegmentationLoss(nn.Module):
    """Cross entropy (optionally class-weighted, void ignored), plus dice_weight × Dice loss if asked.

    Validation scores the same objective over a whole split: `sums` of each batch, added up, then `from_sums`
    give the loss of all the batches taken as one (exactly, whatever their sizes or the ranks they ran on).
    """

    def __init__(self, class_weights: list[float] | None = None, dice_weight: float = 0.0) -> None:
        super().__init__()
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("weight", weight, persistent=False)
        self.dice_weight = dice_weight

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        loss = cross_entropy_loss(logits, labels, self.weight)
        if self.dice_weight:
            loss = loss + self.dice_weight * dice_loss(logits, labels)
        return loss

    def zero_sums(self, num_classes: int, device: torch.device | None = None) -> Tensor:
        """The sums of no pixels at all, to add batches' `sums` to."""
        return torch.zeros(2 + (3 * num_classes if self.dice_weight else 0), dtype=torch.float64, device=device)

    @torch.no_grad()
    def sums(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Float64 sums of a batch (N×C×H×W logits) that add up over batches: the weighted pixel cross entropy,
        the pixel weights and, with Dice, its per-class terms."""
        logits = logits.float()
        parts = [_cross_entropy_sum(logits, labels, self.weight).reshape(1),
                 _pixel_weights(labels, self.weight).sum().reshape(1)]
        if self.dice_weight:
            parts += _dice_terms(logits, labels)
        return torch.cat([part.double() for part in parts])

    def from_sums(self, sums: Tensor) -> Tensor:
        """The loss of every batch whose `sums` were added up into `sums`."""
        loss = sums[0] / sums[1].clamp(min=torch.finfo(sums.dtype).tiny)
        if self.dice_weight:
            intersection, total, pixels = sums[2:].view(3, -1)
            if (pixels > 0).any():
                loss = loss + self.dice_weight * _dice_from_terms(intersection, total, pixels)
        return loss


def main() -> None:
    """python -m model.net [--backbone resnet18 --num_classes 11 ... --size H W]: the parameter summary of any
    GCNConfig and its FLOPs for one H×W image (model/summary.py)."""
    parser = argparse.ArgumentParser(description="Print the GCN's parameters and FLOPs by part.")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"),
                        help="image size for the FLOPs (default 512 512)")
    for f in dataclasses.fields(GCNConfig):
        if f.name == "pretrained":
            continue
        default = 21 if f.name == "num_classes" else f.default
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(f"--{f.name}", type=int if f.type.startswith("int") else str, default=default,
                                choices=f.metadata.get("choices"))
    args = vars(parser.parse_args())
    height, width = args.pop("size")
    config = GCNConfig(**args)
    print(f"GCN {config.backbone}, k={config.kernel_size}, head={config.head}, {config.num_classes} classes")
    print(parameter_summary(GCN(config)))
    print(flops_summary(inference_flops(lambda: GCN(config), height, width), height, width))


if __name__ == "__main__":
    main()

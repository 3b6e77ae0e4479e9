"""The GCN (net.py), its data (data_loader.py, transforms.py, datasets/), metrics and pictures; here, what they all
share: the void label and the network's input normalisation (light: utils imports it without torchvision)."""
import functools

import torch

IGNORE_INDEX = 255  # the void label of every data set: ignored by the loss and the metrics
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the input normalisation of torchvision's ImageNet backbones (RGB in 0..1)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _mean_std_255(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(values, device=device).view(3, 1, 1) * 255 for values in (IMAGENET_MEAN, IMAGENET_STD))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (3×H×W or N×3×H×W) -> float32 normalised with the ImageNet mean/std, what the network expects;
    on the images' device, in their memory layout."""
    mean, std = _mean_std_255(images.device)
    return images.to(torch.float32).sub_(mean).div_(std)

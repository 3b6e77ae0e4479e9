"""Segmentation data sets: files (or a generator) -> (image, label) items; see model/data_loader.py."""
from .base import DatasetError, SegmentationDataset
from .camvid import CamVidSegmentation
from .cityscapes import CityscapesSegmentation
from .folder import FolderSegmentation
from .synthetic import SyntheticSegmentation
from .voc import VOCAugSegmentation, VOCSegmentation

__all__ = ["DatasetError", "SegmentationDataset", "CamVidSegmentation", "CityscapesSegmentation",
           "FolderSegmentation", "SyntheticSegmentation", "VOCAugSegmentation", "VOCSegmentation"]

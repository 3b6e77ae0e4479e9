"""Segmentation data sets: files (or a generator) -> (image, label) items; see model/data_loader.py."""
from .base import IGNORE_INDEX, DatasetError, SegmentationDataset
from .camvid import CamVidSegmentation
from .cityscapes import CityscapesSegmentation
from .folder import FolderSegmentation
from .synthetic import SyntheticSegmentation
from .voc import VOCAugSegmentation, VOCSegmentation

__all__ = ["IGNORE_INDEX", "DatasetError", "SegmentationDataset", "CamVidSegmentation", "CityscapesSegmentation",
           "FolderSegmentation", "SyntheticSegmentation", "VOCAugSegmentation", "VOCSegmentation"]

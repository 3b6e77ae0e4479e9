"""Files on disk -> batches for the model: the data settings, data set construction, samplers and DataLoaders.

    config = DataConfig(dataset="voc", data_dir="data/VOCdevkit/VOC2012")
    train_set = build_dataset(config, num_classes=21, split="train", train=True)  # (image 3×H×W, label H×W)
    loader = build_dataloader(train_set, batch_size=8, sampler=EpochSampler(len(train_set), 8, seed=0),
                              num_workers=4, drop_last=True)
"""
from __future__ import annotations

import functools
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from model import IGNORE_INDEX
from model.datasets import (CamVidSegmentation, CityscapesSegmentation, DatasetError, FolderSegmentation,
                            SyntheticSegmentation, VOCAugSegmentation, VOCSegmentation)
from model.datasets.base import Transform, check_num_classes, read_label
from model.transforms import eval_transform, train_transform


def _ascending_pair(value: list) -> bool:
    return value[0] <= value[1]


def _disjoint_splits(value: dict) -> bool:
    lists = list(value.values())
    if not all(isinstance(v, list) and v and all(isinstance(s, str) for s in v) for v in lists):
        return False
    every = [s for v in lists for s in v]
    return len(every) == len(set(every))


def _stored_values_to_classes(value: dict) -> bool:
    return all(k.isdigit() and int(k) < 256 and isinstance(v, int) and not isinstance(v, bool)
               for k, v in value.items())


MAX_IMAGE_SIZE = 4096  # crop_size, synthetic_image_size: a 4096² float image is 0.2 GB, its activations far more
SYNTHETIC_BYTES_PER_PIXEL = 15  # what drawing a synthetic image holds at once (float coordinates, masks, colours)
MAX_WORKERS = 64  # num_workers: each is a process of its own
WORKER_BYTES = 5e8  # what a DataLoader worker holds at least (its copy of the main process's touched pages)
MAX_SYNTHETIC_IMAGES = 10**6  # synthetic_train_images, synthetic_val_images
SAMPLER_BYTES_PER_IMAGE = 200  # what the samplers' index lists hold per image of a split (measured: 180)


def _gigabytes(num_bytes: float) -> str:
    return f"it would need {num_bytes / 1e9:.3g} GB"


def _sampler_memory(images: int) -> str:
    return f"{_gigabytes(images * SAMPLER_BYTES_PER_IMAGE)} for the sampler's index lists alone"


DATASET_NAMES = ("voc", "voc_aug", "cityscapes", "camvid", "folder", "synthetic")
SYNTHETIC_SPLITS = ("train", "val")
LABEL_CHECK_SAMPLE = 64  # label files read before training starts (all of them in a smaller split)


@dataclass
class DataConfig:
    """Every data setting (params.json's data keys); each field's metadata says which values params.json may give
    (`may_change_on_resume`: how to run, not what)."""

    dataset: str = field(metadata={"choices": DATASET_NAMES})  # the data set's layout (data/README.md)
    data_dir: str = field(metadata={"may_change_on_resume": True})  # root of the data set (ignored by synthetic)
    crop_size: int = field(default=512, metadata={  # square training crop, padded when larger
        "at_least": 1, "at_most": MAX_IMAGE_SIZE, "memory": lambda v: f"{_gigabytes(v * v * 3 * 4)} per float image"})
    scale_range: list = field(default_factory=lambda: [0.5, 2.0], metadata={  # random rescaling before the crop
        "items": (float, int), "length": 2, "above": 0, "at_most": 8,
        "rule": ("[low, high] with low <= high", _ascending_pair)})
    flip: bool = True  # random horizontal flip
    color_jitter: float = field(default=0.0, metadata={"at_least": 0, "at_most": 1})  # brightness/contrast/saturation
    num_workers: int = field(default=4, metadata={  # DataLoader processes
        "at_least": 0, "at_most": MAX_WORKERS, "may_change_on_resume": True,
        "memory": lambda v: f"{v} processes: {_gigabytes(v * WORKER_BYTES)} or more"})
    train_split: str = "train"  # split names (voc_aug: train_aug)
    val_split: str = "val"  # the split validated during training
    mask_values: dict | None = field(default=None, metadata={  # folder: stored mask value -> class
        "rule": ('{"stored value 0..255": class index, ...}', _stored_values_to_classes)})
    val_fraction: float = field(default=0.2, metadata={"above": 0, "below": 1})  # folder without split lists
    class_names: list | None = field(default=None, metadata={"items": (str,), "length": "num_classes"})  # folder
    split_sequences: dict | None = field(default=None, metadata={  # camvid: build each split from whole drives
        "rule": ('{"split": ["sequence", ...], ...} with no sequence in two splits', _disjoint_splits)})
    synthetic_seed: int = field(default=0, metadata={  # the synthetic set's shapes and colours
        "at_least": 0, "at_most": 2**32 - 1})
    synthetic_image_size: int = field(default=128, metadata={  # its square images' side
        "at_least": 8, "at_most": MAX_IMAGE_SIZE,
        "memory": lambda v: f"{_gigabytes(v * v * SYNTHETIC_BYTES_PER_PIXEL)} to draw one image"})
    synthetic_train_images: int = field(default=1000, metadata={  # its split sizes
        "at_least": 1, "at_most": MAX_SYNTHETIC_IMAGES, "memory": _sampler_memory})
    synthetic_val_images: int = field(default=100, metadata={  # its split sizes
        "at_least": 1, "at_most": MAX_SYNTHETIC_IMAGES, "memory": _sampler_memory})


def _open(config: DataConfig, num_classes: int, split: str, transform: Transform) -> Dataset:
    root = Path(config.data_dir)
    if config.split_sequences is not None and config.dataset != "camvid":
        raise DatasetError(f"split_sequences is for camvid only, not for dataset '{config.dataset}'")
    if config.dataset == "voc":
        return VOCSegmentation(root, split, transform)
    if config.dataset == "voc_aug":
        return VOCAugSegmentation(root, split, transform)
    if config.dataset == "cityscapes":
        return CityscapesSegmentation(root, split, transform)
    if config.dataset == "camvid":
        if config.split_sequences is None:
            return CamVidSegmentation(root, split, transform)
        if split not in config.split_sequences:  # the SegNet list would share drives with the named splits
            raise DatasetError(f"split {split!r} is not in split_sequences (which names "
                               f"{', '.join(config.split_sequences)}); add its sequences there")
        return CamVidSegmentation(root, split, transform, config.split_sequences[split])
    if config.dataset == "folder":
        return FolderSegmentation(root, split, transform, num_classes, config.mask_values, config.val_fraction,
                                  config.class_names)
    if config.dataset != "synthetic":
        raise DatasetError(f"unknown dataset '{config.dataset}'; choose one of {', '.join(DATASET_NAMES)}")
    if split not in SYNTHETIC_SPLITS:
        raise DatasetError(f"the synthetic set has the splits {' and '.join(map(repr, SYNTHETIC_SPLITS))}, not "
                           f"{split!r}")
    length = config.synthetic_train_images if split == "train" else config.synthetic_val_images
    return SyntheticSegmentation(split, transform, config.synthetic_seed, length, config.synthetic_image_size)


def check_label_values(dataset: Dataset, min_classes: int = 1, sample: int = LABEL_CHECK_SAMPLE) -> None:
    """Read the label files of `sample` images spread evenly over the split (all of them when fewer): a value that
    is neither a class nor void is a DatasetError naming the file and the fix, before any training step. So is a
    split whose labels hold fewer than `min_classes` classes (void aside: e.g. 0/255 masks read without
    mask_values, whose foreground is void); only then are the split's other labels read too, for a rare class."""
    paths = getattr(dataset, "label_paths", None)
    if not paths:  # generated data, or a split without ground truth
        return
    sampled = sorted({i * len(paths) // sample for i in range(sample)}) if len(paths) > sample else range(len(paths))
    rest = sorted(set(range(len(paths))) - set(sampled))
    present = np.zeros(256, dtype=bool)
    for count, index in enumerate([*sampled, *rest]):
        if count >= len(sampled) and present[:IGNORE_INDEX].sum() >= min_classes:
            return
        present |= np.bincount(read_label(paths[index], dataset.lut, dataset.num_classes).ravel(), minlength=256) > 0
    classes = np.flatnonzero(present[:IGNORE_INDEX]).tolist()
    if len(classes) < min_classes:
        held = f"only class {classes[0]}" if classes else "no class"
        raise DatasetError(f"the {len(paths)} labels in {paths[0].parent} hold {held} besides void ({IGNORE_INDEX}): "
                           f"nothing to learn or score; masks stored as 0/255 read 255 as void: map each stored value "
                           f"to its class with mask_values, e.g. {{\"0\": 0, \"255\": 1}}")


def build_dataset(config: DataConfig, num_classes: int, split: str, train: bool) -> Dataset:
    """The data set of `split`: augmented fixed-size crops if `train`, else whole images at original resolution.

    It has .classes, .palette, .names and .has_labels, and exactly `num_classes` classes.
    """
    transform = (train_transform(config.crop_size, config.scale_range, config.flip, float(config.color_jitter))
                 if train else eval_transform())
    dataset = _open(config, num_classes, split, transform)
    check_num_classes(config.dataset, len(dataset.classes), num_classes)
    return dataset


class SeededItems(Dataset):
    """Item (index, seed) of `dataset`, drawn with torch's random generator seeded with `seed`.

    With seeds from EpochSampler, a sample's augmentation depends on (run seed, epoch, index) alone: not on the
    worker that loads it, the number of workers, or the batches a resumed run skips.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's share of a per-epoch permutation, as (index, augmentation seed), minus the batches already trained.

    Order and seeds depend only on (seed, epoch), so a resumed run sees exactly the batches of an uninterrupted one.
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(length / world_size)
        self.epoch = self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, np.uint64)
        generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        order = torch.randperm(self.length, generator=generator).tolist()
        sample_seeds = torch.randint(0, 2**62, (self.length,), generator=generator).tolist()
        order += order[: self.per_rank * self.world_size - self.length]  # equal shares for every rank
        mine = order[self.rank:: self.world_size][self.skip_batches * self.batch_size:]
        return iter([(index, sample_seeds[index]) for index in mine])

    def __len__(self) -> int:
        return max(self.per_rank - self.skip_batches * self.batch_size, 0)


class ShardSampler(Sampler[int]):
    """Every index exactly once over all ranks (rank r takes r, r + world, ...): no padded duplicates."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _leave_stop_signals_to_the_main_process(main_process: int, _worker_id: int) -> None:
    """SIGINT/SIGTERM/SIGHUP sent to the whole process group (Ctrl-C, Slurm, a pod stop) must not kill a worker: the
    main process finishes its step, saves a checkpoint and then shuts the workers down itself. A SIGTERM from the
    main process (DataLoader shutdown, multiprocessing's exit handler) still ends the worker at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # not on macOS: there a group SIGTERM still ends the workers
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # every thread leaves it pending for this one:
        threading.Thread(target=_exit_on_sigterm_from, args=(main_process,), daemon=True).start()


def _exit_on_sigterm_from(main_process: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_process:
        pass
    os._exit(0)


def worker_death(error: RuntimeError) -> DatasetError | None:
    """The one-line error for a DataLoader worker that died (most often the out-of-memory killer's SIGKILL), or None
    if `error` is something else."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not message.startswith("DataLoader worker") or "exited unexpectedly" not in message and "killed" not in message:
        return None
    return DatasetError(f"{message.rstrip('. ')}: most likely out of memory (the OOM killer); lower num_workers, "
                        f"batch_size or crop_size")


def build_dataloader(dataset: Dataset, batch_size: int, sampler: Sampler, num_workers: int,
                     drop_last: bool = False, pin_memory: bool | None = None) -> DataLoader:
    """Batches in the sampler's order; workers persist across epochs and ignore stop signals; memory is pinned when
    CUDA is available. With an EpochSampler the data set is read through SeededItems."""
    if isinstance(sampler, EpochSampler):
        dataset = SeededItems(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      persistent_workers=num_workers > 0,
                      worker_init_fn=functools.partial(_leave_stop_signals_to_the_main_process, os.getpid()))


def eval_loader(dataset: Dataset, num_workers: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Whole images one at a time (no padding, which would add false label boundaries), sharded over ranks."""
    return build_dataloader(dataset, 1, ShardSampler(len(dataset), rank, world_size), num_workers)

"""Datasets, transforms and loaders: ImageFolder trees or the embedded digits set, timm transforms.

Determinism (needed for exact resume): the training order comes from a sampler seeded by
``(seed, epoch)`` that can skip the samples already seen, and every sample's augmentation is drawn
from RNGs seeded by ``(seed, epoch, index)`` (:class:`SeededTransformDataset`), so the batches do
not depend on the worker count, the rank's global RNG or where a run was resumed.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

__all__ = [
    "DigitsDataset", "SeededTransformDataset", "ResumableSampler", "ShardSampler", "seeded_rng",
    "build_transforms", "check_data", "build_datasets", "build_loaders", "Loaders", "UnreadableImageError", "read_image",
]


# ------------------------------------------------------------------------------- image files
class UnreadableImageError(ValueError):
    """An image file that PIL cannot decode (truncated, not an image); the message names the file."""


def read_image(path: str) -> Image.Image:
    """Decode ``path`` fully as RGB (ImageFolder's loader); :class:`UnreadableImageError` naming the
    file if it is truncated or not an image."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # decode now: a truncated file fails here, not deep inside a transform
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"cannot read image {path}: {e} (--skip-bad-images skips unreadable files)") from None


# ------------------------------------------------------------------------------------- datasets
class DigitsDataset(Dataset):
    """scikit-learn's digits (1,797 real 8x8 grey images, 10 classes) as RGB PIL images.

    The split is stratified and fixed (``random_state=0``): 1,437 train / 360 val images at the
    default ``val_fraction=0.2``. Grey levels 0..16 are mapped to 0..255; the transform resizes.
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = "train", transform: Optional[Callable] = None, val_fraction: float = 0.2):
        if split not in ("train", "val"):
            raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        from .._extras import require

        require("sklearn", "the embedded digits set", "train")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        idx_train, idx_val = train_test_split(
            np.arange(len(images)), test_size=val_fraction, random_state=0, stratify=digits.target
        )
        idx = np.sort(idx_train if split == "train" else idx_val)
        self.images = images[idx]
        self.targets = [int(t) for t in digits.target[idx]]
        self.indices = idx  # positions in load_digits()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        img = Image.fromarray(self.images[i]).convert("RGB")
        return (self.transform(img) if self.transform else img), self.targets[i]


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Seed the python, numpy and torch (CPU) global RNGs with ``seed`` inside the block.

    The python and torch states are restored on exit; numpy's global RNG is only re-seeded
    (saving and restoring it costs ~0.25 ms, more than a digits sample; the training loop draws
    from numpy only inside seeded blocks).
    """
    py, th = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)  # torch.manual_seed costs ~0.4 ms (device seeding)
    try:
        yield
    finally:
        random.setstate(py)
        torch.set_rng_state(th)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and runs)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes()) | (zlib.adler32(repr(parts).encode()) << 32)


class SeededTransformDataset(Dataset):
    """Applies ``transform`` to ``base[i]`` with RNGs seeded by ``(seed, epoch, i)``.

    ``base`` must return untransformed ``(image, target)`` pairs. Call :meth:`set_epoch` before
    creating the epoch's iterator (workers copy the dataset when the iterator starts).
    """

    def __init__(self, base: Dataset, transform: Optional[Callable], seed: int = 0, skip_bad_images: bool = False):
        self.base, self.transform, self.seed, self.epoch = base, transform, int(seed), 0
        self.skip_bad_images = bool(skip_bad_images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, i: int):
        """``base[i]``; with ``skip_bad_images`` an unreadable file is logged and replaced by the next
        readable sample (deterministic, and the batch keeps its size)."""
        if not self.skip_bad_images:
            return self.base[i]
        n = len(self.base)
        for step in range(n):
            try:
                return self.base[(i + step) % n]
            except UnreadableImageError as e:
                _warn_once(str(e).split(" (--skip-bad-images")[0])
        raise UnreadableImageError(f"no readable image among the {n} samples")

    def __getitem__(self, i: int):
        img, target = self._load(i)
        if self.transform is not None:
            with seeded_rng(mix_seed(self.seed, self.epoch, int(i))):
                img = self.transform(img)
        return img, target


_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        import sys

        print(f"warning: skipped: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- samplers
class ResumableSampler(Sampler):
    """Wraps a per-epoch sampler (DistributedSampler / timm RepeatAugSampler) and can skip the first
    ``skip`` indices of an epoch, so a run resumed mid-epoch sees exactly the remaining samples."""

    def __init__(self, base: Sampler):
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


class ShardSampler(Sampler):
    """Evaluation: rank ``r`` takes indices ``r, r + world, ...`` in order, no padding (exact metrics
    after summing counts across ranks)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------------- transforms
def build_transforms(cfg, is_training: bool) -> Callable:
    """timm transforms. Training: RandomResizedCrop + flip + RandAugment + RandomErasing (official
    ``create_transform(is_training=True)``). Eval: official square resize to ``img_size/crop_pct``
    then center crop (``test_crop``), or a straight resize to ``img_size``; ``eval_resize='shorter'``
    keeps the aspect ratio (timm's usual eval)."""
    from timm.data import create_transform

    common = dict(interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std))
    if is_training:
        aa = cfg.auto_augment if cfg.auto_augment not in (None, "", "none") else None
        return create_transform(
            cfg.img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter if cfg.color_jitter > 0 else None, auto_augment=aa, re_prob=cfg.reprob, re_mode=cfg.remode,
            re_count=cfg.recount, **common,
        )
    crop_pct = cfg.crop_pct if cfg.test_crop else 1.0
    mode = "squash" if cfg.eval_resize == "square" else "center"
    return create_transform(cfg.img_size, is_training=False, crop_pct=crop_pct, crop_mode=mode, **common)


# ------------------------------------------------------------------------------------ datasets
def check_data(cfg, train: bool = True) -> None:
    """A one-line ValueError when ``cfg.data`` is set but is not a folder with the split folders a
    run needs (``train_split`` and ``val_split``; only ``val_split`` when ``train=False``)."""
    if not cfg.data:
        return
    root = Path(cfg.data)
    if not root.is_dir():
        raise ValueError(f"--data {root}: no such directory")
    for split in (cfg.train_split, cfg.val_split) if train else (cfg.val_split,):
        if not (root / split).is_dir():
            raise ValueError(f"--data {root}: expected an ImageFolder tree with {split}/<class>/<images>")


def build_datasets(cfg, train: bool = True) -> Tuple[Optional[Dataset], Dataset, int, str]:
    """Untransformed (train, val) datasets, the class count and a description. ``train=False``
    (evaluation): only the ``val_split`` folder is needed and the train dataset is None."""
    if cfg.data:
        from torchvision.datasets import ImageFolder

        root = Path(cfg.data)
        check_data(cfg, train)
        parts = []
        for split in (cfg.train_split, cfg.val_split) if train else (cfg.val_split,):
            parts.append(ImageFolder(str(root / split), loader=read_image))
        train_set, val = parts if train else (None, parts[0])
        if train_set is not None and train_set.classes != val.classes:
            raise ValueError(f"--data {root}: {cfg.train_split} and {cfg.val_split} have different class folders")
        num_classes, desc = len(val.classes), f"ImageFolder {root / cfg.val_split if not train else root}"
    else:
        train_set = DigitsDataset("train", val_fraction=cfg.val_fraction) if train else None
        val = DigitsDataset("val", val_fraction=cfg.val_fraction)
        num_classes, desc = 10, "embedded digits (scikit-learn, 8x8 resized)"
    if cfg.train_subset and train_set is not None:
        train_set = Subset(train_set, range(min(cfg.train_subset, len(train_set))))
    if cfg.val_subset:
        val = Subset(val, range(min(cfg.val_subset, len(val))))
    return train_set, val, num_classes, desc


@dataclass
class Loaders:
    train: Optional[DataLoader]
    val: DataLoader
    train_sampler: Optional[ResumableSampler]
    train_set: Optional[SeededTransformDataset]
    num_classes: int
    description: str


def _loader(dataset, sampler, batch_size, cfg, device, drop_last, seed) -> DataLoader:
    workers = min(cfg.num_workers, os.cpu_count() or 1)  # never more workers than CPUs
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=bool(cfg.pin_memory and device.type == "cuda"),
        generator=torch.Generator().manual_seed(seed),  # keep the global RNG untouched
    )


def build_loaders(cfg, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None,
                  train: bool = True) -> Loaders:
    """Train loader (seeded per-sample augmentation, distributed + resumable sampler, ``drop_last``)
    and val loader (sharded without padding)."""
    device = device or torch.device("cpu")
    train_base, val_base, num_classes, desc = build_datasets(cfg, train=train)
    skip = bool(getattr(cfg, "skip_bad_images", False))
    val_set = SeededTransformDataset(val_base, build_transforms(cfg, False), cfg.seed, skip_bad_images=skip)
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    val_loader = _loader(val_set, ShardSampler(len(val_set), rank, world_size), eval_bs, cfg, device, False, cfg.seed)
    if not train:
        return Loaders(None, val_loader, None, None, num_classes, desc)
    train_set = SeededTransformDataset(train_base, build_transforms(cfg, True), cfg.seed, skip_bad_images=skip)
    if cfg.repeated_aug and cfg.repeated_aug > 1:
        from timm.data.distributed_sampler import RepeatAugSampler

        base = RepeatAugSampler(train_set, num_replicas=world_size, rank=rank, num_repeats=cfg.repeated_aug)
    else:
        base = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    sampler = ResumableSampler(base)
    if len(base) < cfg.batch_size:  # a small folder with an ImageNet recipe: one batch of everything
        if rank == 0:
            print(f"note: batch_size {cfg.batch_size} is larger than the {len(base)} training samples of a process: "
                  f"using batch_size {len(base)}", flush=True)
        cfg["batch_size"] = len(base)
    train_loader = _loader(train_set, sampler, cfg.batch_size, cfg, device, True, cfg.seed)
    return Loaders(train_loader, val_loader, sampler, train_set, num_classes, desc)


def sample_batch(loader: DataLoader) -> List[Any]:
    """The first batch of a loader (used by the throughput measurement)."""
    return next(iter(loader))

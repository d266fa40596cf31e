"""Embedded digits set, ImageFolder loading, deterministic augmentation and resumable samplers."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from agent_attention.train.config import load_recipe
from agent_attention.train.data import (
    DigitsDataset, ResumableSampler, SeededTransformDataset, ShardSampler, build_loaders, build_transforms,
    seeded_rng,
)


def test_digits_split_sizes_stratified_and_fixed():
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert set(train.indices).isdisjoint(val.indices)
    counts = Counter(val.targets)
    assert set(counts) == set(range(10)) and max(counts.values()) - min(counts.values()) <= 2  # stratified
    again = DigitsDataset("val")
    assert np.array_equal(again.indices, val.indices) and np.array_equal(again.images, val.images)
    img, target = train[0]
    assert img.size == (8, 8) and img.mode == "RGB" and 0 <= target < 10
    assert np.asarray(img).max() > 200  # grey levels 0..16 mapped to 0..255


def test_digits_bad_split():
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("test")


def test_seeded_transform_is_a_function_of_seed_epoch_index():
    cfg = load_recipe("agent_swin_tiny", {"img_size": 32})  # the full official pipeline (RandAugment, erasing)
    base = DigitsDataset("val")
    ds = SeededTransformDataset(base, build_transforms(cfg, True), seed=3)
    a = ds[5][0]
    torch.manual_seed(123)  # the global RNG state does not matter ...
    assert torch.equal(ds[5][0], a)
    ds.set_epoch(1)  # ... the epoch does
    assert not torch.equal(ds[5][0], a)
    # the global RNGs are left as they were (python and torch)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ds[7]
    assert torch.equal(torch.rand(3), expected)


def test_loader_batches_do_not_depend_on_workers():
    cfg = load_recipe("digits", {"train_subset": 48, "batch_size": 8})
    batches = {}
    for workers in (0, 2):
        cfg.num_workers = workers
        loaders = build_loaders(cfg)
        loaders.train_sampler.set_epoch(2)
        loaders.train_set.set_epoch(2)
        batches[workers] = [x for x, _ in loaders.train]
    assert len(batches[0]) == 6
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))


def test_resumable_sampler_skips_seen_samples():
    data = list(range(50))
    full = list(ResumableSampler(DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=4)))
    s = ResumableSampler(DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=4))
    s.set_epoch(0, skip=10)
    assert list(s) == full[10:] and len(s) == len(full) - 10
    s.set_epoch(1)
    assert list(s) != full  # another epoch, another order


def test_shard_sampler_covers_everything_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_eval_transform_official_square_resize():
    cfg = load_recipe("agent_cswin_base_384")
    tf = build_transforms(cfg, False)
    img = Image.new("RGB", (500, 300))
    assert tuple(tf(img).shape) == (3, 384, 384)
    resize = tf.transforms[0]
    assert tuple(resize.size) == (438, 438)  # int(384 / 0.875), square (aspect ratio not kept)
    cfg = load_recipe("agent_swin_small_288")  # TEST.CROP False: straight resize
    assert tuple(build_transforms(cfg, False).transforms[0].size) == (288, 288)
    cfg.eval_resize = "shorter"  # timm's usual eval keeps the aspect ratio
    cfg.test_crop = True
    assert build_transforms(cfg, False).transforms[0].size in (329, [329], (329,))


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(d / f"{i}.png")
    cfg = load_recipe("digits", {"data": str(tmp_path), "batch_size": 4, "img_size": 16})
    loaders = build_loaders(cfg)
    assert loaders.num_classes == 2 and "ImageFolder" in loaders.description
    x, y = next(iter(loaders.train))
    assert tuple(x.shape) == (4, 3, 16, 16) and set(y.tolist()) <= {0, 1}
    assert sum(len(b[1]) for b in loaders.val) == 6
    with pytest.raises(ValueError, match="ImageFolder"):
        build_loaders(load_recipe("digits", {"data": str(tmp_path / "train")}))


def test_seeded_rng_restores_python_and_torch():
    import random

    random.seed(1)
    torch.manual_seed(1)
    want = (random.random(), torch.rand(1).item())
    random.seed(1)
    torch.manual_seed(1)
    with seeded_rng(99):
        inside = (random.random(), torch.rand(1).item())
    assert (random.random(), torch.rand(1).item()) == want
    with seeded_rng(99):
        assert (random.random(), torch.rand(1).item()) == inside


def test_val_loader_has_no_padding_under_sharding():
    cfg = load_recipe("digits", {"val_subset": 13, "batch_size": 4})
    total = 0
    for r in range(3):
        loaders = build_loaders(cfg, rank=r, world_size=3, train=False)
        total += sum(len(t) for _, t in loaders.val)
    assert total == 13
    assert isinstance(loaders.val, DataLoader)

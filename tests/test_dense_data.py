"""The embedded shapes data set: determinism, consistent targets, COCO export, folder loaders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agent_attention.dense import data as D


def test_shapes_deterministic_and_seeded():
    a, b = D.ShapesDetection(6, (64, 80), seed=3), D.ShapesDetection(6, (64, 80), seed=3)
    for i in range(6):
        (ia, ta), (ib, tb) = a[i], b[i]
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["masks"], tb["masks"])
    c = D.ShapesDetection(6, (64, 80), seed=4)
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(6))
    # a sample does not depend on which other samples were generated before
    assert torch.equal(D.ShapesDetection(6, (64, 80), seed=3)[5][0], a[5][0])


def test_shapes_detection_targets_consistent():
    ds = D.ShapesDetection(16, (64, 96), seed=0)
    for i in range(len(ds)):
        img, t = ds[i]
        assert img.shape == (3, 64, 96) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        n = len(t["labels"])
        assert 1 <= n <= 4 and t["boxes"].shape == (n, 4) and t["masks"].shape == (n, 64, 96)
        assert set(t["labels"].tolist()) <= {1, 2, 3}
        for box, m in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert (t["masks"].sum(0) <= 1).all()  # shapes do not overlap
        assert torch.equal(t["area"], t["masks"].flatten(1).sum(1).float())


def test_shapes_segmentation_matches_instances():
    det, seg = D.ShapesDetection(8, 64, seed=1), D.ShapesSegmentation(8, 64, seed=1)
    for i in range(8):
        img, t = det[i]
        img2, lab = seg[i]
        assert torch.equal(img, img2) and lab.dtype == torch.int64
        expect = torch.zeros(64, 64, dtype=torch.int64)
        for c, m in zip(t["labels"], t["masks"]):
            expect[m.bool()] = c
        assert torch.equal(lab, expect)


def test_train_flip_keeps_boxes_on_masks():
    ds = D.ShapesDetection(4, (64, 96), seed=2, train=True)
    torch.manual_seed(0)
    import random

    random.seed(0)
    for _ in range(6):
        img, t = ds[1]
        for box, m in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_coco_export_scores_ground_truth_perfectly():
    pytest.importorskip("pycocotools")
    from agent_attention.dense.metrics import coco_evaluate, coco_from_dict, detections_to_coco

    ds = D.ShapesDetection(5, (64, 80), seed=0)
    gt = D.shapes_coco_gt(ds)
    json.dumps(gt)  # plain JSON
    assert len(gt["images"]) == 5 and {c["id"] for c in gt["categories"]} == {1, 2, 3}
    outs = []
    for i in range(5):
        t = ds[i][1]
        outs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                     "masks": t["masks"].float()[:, None]})
    r = coco_evaluate(coco_from_dict(gt), detections_to_coco(outs, range(5)), ("bbox", "segm"))
    assert r["bbox_mAP"] == pytest.approx(1.0) and r["segm_mAP"] == pytest.approx(1.0)


def test_dataset_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        D.ShapesDetection(0)
    with pytest.raises(ValueError, match="image_size"):
        D.ShapesSegmentation(4, 16)
    with pytest.raises(IndexError):
        D.ShapesDetection(2).sample(2)
    with pytest.raises(FileNotFoundError, match="annotation"):
        D.CocoFolder(str(tmp_path), "val2017")
    with pytest.raises(FileNotFoundError, match="ADE20K"):
        D.ADE20KFolder(str(tmp_path), "validation")


def _png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)


def test_ade20k_folder_reduce_zero_label_and_crop(tmp_path):
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
    rng = np.random.default_rng(0)
    _png(tmp_path / "images/validation/a.png", rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    lab = np.array([[0, 1, 150]] * 40, dtype=np.uint8).repeat(20, axis=1)
    _png(tmp_path / "annotations/validation/a.png", lab)
    ds = D.ADE20KFolder(str(tmp_path), "validation", scale=(120, 80))
    img, y = ds[0]
    assert y.shape == (40, 60) and set(y.unique().tolist()) == {255, 0, 149}  # 0 -> ignore, k -> k-1
    assert img.shape == (3, 80, 120)  # keep-ratio resize to fit (120, 80)
    tr = D.ADE20KFolder(str(tmp_path), "validation", train=True, crop_size=32, scale=(120, 80))
    img, y = tr[0]
    assert img.shape == (3, 32, 32) and y.shape == (32, 32)


def test_coco_folder(tmp_path):
    pytest.importorskip("pycocotools")
    ds = D.ShapesDetection(3, (48, 64), seed=0)
    gt = D.shapes_coco_gt(ds)
    for c in gt["categories"]:  # non-contiguous ids as in COCO
        c["id"] *= 10
    for a in gt["annotations"]:
        a["category_id"] *= 10
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    D.write_coco_json(gt, str(tmp_path / "annotations" / "instances_val.json"))
    for i, im in enumerate(gt["images"]):
        _png(tmp_path / "val" / im["file_name"], (ds[i][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    cf = D.CocoFolder(str(tmp_path), "val")
    assert cf.label_to_cat == [0, 10, 20, 30] and len(cf) == 3
    img, t = cf[0]
    assert img.shape == (3, 48, 64)
    assert torch.equal(t["labels"], ds[0][1]["labels"]) and torch.allclose(t["boxes"], ds[0][1]["boxes"])
    # polygons/RLE -> masks via pycocotools
    assert torch.equal(t["masks"], ds[0][1]["masks"])

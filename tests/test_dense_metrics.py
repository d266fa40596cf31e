"""Dense evaluation code against hand-computed values: mIoU/mAcc/aAcc and COCO mAP on tiny cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from agent_attention.dense.metrics import (coco_evaluate, coco_from_dict, confusion_matrix, detections_to_coco,
                                           segmentation_scores)


# --------------------------------------------------------------------------- segmentation
def test_miou_hand_computed():
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 2, 0, 2]])
    cm = confusion_matrix(pred, target, num_classes=4)
    # rows = gt: class 0: 3 px (2 correct, 1 -> 1); class 1: 2 px correct; class 2: 2 px (1 correct, 1 -> 0)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2], expected[2, 0] = 2, 1, 2, 1, 1
    assert torch.equal(cm, expected)
    s = segmentation_scores(cm)
    iou = [2 / (3 + 3 - 2), 2 / (2 + 3 - 2), 1 / (2 + 1 - 1)]  # TP / (gt + pred - TP); class 3 absent -> NaN
    acc = [2 / 3, 2 / 2, 1 / 2]
    assert s["mIoU"] == pytest.approx(sum(iou) / 3)
    assert s["mAcc"] == pytest.approx(sum(acc) / 3)
    assert s["aAcc"] == pytest.approx(5 / 7)
    assert math.isnan(s["per_class_IoU"]["3"])


def test_miou_perfect_and_ignore_only():
    t = torch.randint(0, 3, (5, 7), generator=torch.Generator().manual_seed(0))
    s = segmentation_scores(confusion_matrix(t, t, 3))
    assert s["mIoU"] == 1.0 and s["aAcc"] == 1.0
    cm = confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255), 3)
    assert cm.sum() == 0 and math.isnan(segmentation_scores(cm)["mIoU"])


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match="target labels"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), 2)


# --------------------------------------------------------------------------- detection
def _gt(boxes_xywh, cats=None):
    anns = []
    for k, b in enumerate(boxes_xywh):
        anns.append({"id": k + 1, "image_id": 0, "category_id": (cats or [1] * len(boxes_xywh))[k], "bbox": list(b),
                     "area": float(b[2] * b[3]), "iscrowd": 0})
    return coco_from_dict({"images": [{"id": 0, "width": 200, "height": 200}], "annotations": anns,
                           "categories": [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]})


def _out(boxes_xyxy, scores, labels):
    return {"boxes": torch.tensor(boxes_xyxy, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_map_perfect_and_false_positive_first():
    gt = _gt([[10, 20, 50, 40]])
    perfect = detections_to_coco([_out([[10, 20, 60, 60]], [0.9], [1])], [0])
    assert perfect[0]["bbox"] == [10.0, 20.0, 50.0, 40.0]  # xyxy -> xywh
    assert coco_evaluate(gt, perfect, ("bbox",))["bbox_mAP"] == pytest.approx(1.0)
    # a higher-scored false positive first: precision 1/2 at recall 1 -> AP 0.5 at every IoU threshold
    fp_first = detections_to_coco([_out([[120, 120, 180, 180], [10, 20, 60, 60]], [0.95, 0.9], [1, 1])], [0])
    r = coco_evaluate(gt, fp_first, ("bbox",))
    assert r["bbox_mAP"] == pytest.approx(0.5) and r["bbox_mAP_50"] == pytest.approx(0.5)
    # the false positive ranked last does not hurt
    fp_last = detections_to_coco([_out([[120, 120, 180, 180], [10, 20, 60, 60]], [0.5, 0.9], [1, 1])], [0])
    assert coco_evaluate(gt, fp_last, ("bbox",))["bbox_mAP"] == pytest.approx(1.0)


def test_map_partial_overlap_counts_thresholds():
    gt = _gt([[0, 0, 100, 100]])
    # box 100 x 72 inside the gt: IoU 0.72 -> a hit for thresholds 0.50..0.70 (5 of 10) -> mAP 0.5
    res = detections_to_coco([_out([[0, 0, 100, 72]], [0.8], [1])], [0])
    r = coco_evaluate(gt, res, ("bbox",))
    assert r["bbox_mAP"] == pytest.approx(0.5)
    assert r["bbox_mAP_50"] == pytest.approx(1.0) and r["bbox_mAP_75"] == pytest.approx(0.0)


def test_map_category_mapping_and_two_classes():
    gt = _gt([[0, 0, 40, 40], [100, 100, 50, 50]], cats=[1, 7])
    # label 2 maps to COCO id 7; one class found perfectly, the other missed -> mean AP 0.5
    res = detections_to_coco([_out([[100, 100, 150, 150]], [0.9], [2])], [0], label_to_cat=[0, 1, 7])
    assert res[0]["category_id"] == 7
    assert coco_evaluate(gt, res, ("bbox",))["bbox_mAP"] == pytest.approx(0.5)


def test_map_masks_and_empty_results():
    from pycocotools import mask as mask_utils

    m = np.zeros((200, 200), dtype=np.uint8)
    m[20:60, 10:60] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    gt = coco_from_dict({"images": [{"id": 0, "width": 200, "height": 200}],
                         "annotations": [{"id": 1, "image_id": 0, "category_id": 1, "bbox": [10, 20, 50, 40],
                                          "area": float(m.sum()), "iscrowd": 0, "segmentation": rle}],
                         "categories": [{"id": 1, "name": "a"}]})
    half = np.zeros_like(m)
    half[20:40, 10:60] = 1  # mask IoU exactly 0.5 -> counted at the 0.5 threshold only
    out = _out([[10, 20, 60, 60]], [0.9], [1])
    out["masks"] = torch.from_numpy(half).float()[None, None]
    r = coco_evaluate(gt, detections_to_coco([out], [0]), ("bbox", "segm"))
    assert r["bbox_mAP"] == pytest.approx(1.0)
    assert r["segm_mAP"] == pytest.approx(0.1) and r["segm_mAP_50"] == pytest.approx(1.0)
    empty = coco_evaluate(gt, [], ("bbox", "segm"))
    assert empty["bbox_mAP"] == 0.0 and empty["segm_mAP"] == 0.0
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(gt, [], ("keypoints",))

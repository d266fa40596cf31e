"""Evaluation metrics: COCO box/mask mAP (pycocotools) and segmentation mIoU / mAcc / aAcc."""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .data import IGNORE_INDEX

__all__ = [
    "confusion_matrix",
    "segmentation_scores",
    "detections_to_coco",
    "coco_from_dict",
    "coco_evaluate",
]


# --------------------------------------------------------------------------- segmentation
def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(K, K)`` int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels skipped."""
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"confusion_matrix: target labels must be in [0, {num_classes}) or {ignore_index}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"confusion_matrix: predictions must be in [0, {num_classes})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def segmentation_scores(cm: Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """mmseg's metrics from a confusion matrix.

    ``IoU_c = TP / (TP + FP + FN)``, ``Acc_c = TP / (TP + FN)``; classes that never occur in the
    ground truth have undefined (NaN) IoU/Acc and are left out of the means (``nanmean``, as mmseg).
    ``aAcc`` is the overall pixel accuracy. Values are fractions in [0, 1].
    """
    cm = cm.double()
    tp = cm.diag()
    gt = cm.sum(1)
    pred = cm.sum(0)
    union = gt + pred - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(gt > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
    total = cm.sum()
    out: Dict[str, object] = {
        "mIoU": float(np.nanmean(iou.numpy())) if (gt > 0).any() else float("nan"),
        "mAcc": float(np.nanmean(acc.numpy())) if (gt > 0).any() else float("nan"),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
    }
    names = class_names or [str(i) for i in range(cm.shape[0])]
    out["per_class_IoU"] = {n: float(v) for n, v in zip(names, iou.tolist())}
    return out


# --------------------------------------------------------------------------- detection
def detections_to_coco(outputs: Iterable[dict], image_ids: Iterable[int], label_to_cat: Optional[Sequence[int]] = None,
                       mask_threshold: float = 0.5) -> List[dict]:
    """Detector outputs (torchvision-style dicts) -> COCO result dicts (``bbox`` as xywh; ``segmentation`` as RLE).

    ``label_to_cat[label]`` maps contiguous labels to COCO category ids (identity when ``None``).
    Masks (``(N, 1, H, W)`` probabilities or booleans) are thresholded at ``mask_threshold``.
    """
    from pycocotools import mask as mask_utils

    results: List[dict] = []
    for out, img_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        rles = None
        if "masks" in out:
            m = (out["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
        for k, (b, s, lab) in enumerate(zip(xywh, scores, labels)):
            cat = int(label_to_cat[lab]) if label_to_cat is not None else int(lab)
            r = {"image_id": int(img_id), "category_id": cat, "bbox": [float(v) for v in b], "score": float(s)}
            if rles is not None:
                rle = dict(rles[k])
                rle["counts"] = rle["counts"].decode("ascii")
                r["segmentation"] = rle
            results.append(r)
    return results


def coco_from_dict(dataset: dict):
    """A ``pycocotools.coco.COCO`` index over an in-memory COCO dict (no file needed)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


_STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def coco_evaluate(coco_gt, results: List[dict], iou_types: Sequence[str] = ("bbox", "segm"),
                  image_ids: Optional[Sequence[int]] = None, verbose: bool = False) -> Dict[str, float]:
    """COCO AP with pycocotools: ``{'bbox_mAP', 'bbox_mAP_50', …, 'segm_mAP', …}`` (fractions in [0, 1]).

    ``image_ids`` restricts the evaluation to those images (default: all images of ``coco_gt``).
    With no detections at all every AP is 0 (pycocotools cannot load an empty result list).
    """
    from pycocotools.cocoeval import COCOeval

    out: Dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"coco_evaluate: iou_type must be 'bbox' or 'segm', got {iou_type!r}")
        res = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not res:
            out.update({f"{iou_type}_{n}": 0.0 for n in _STAT_NAMES})
            continue
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with sink:
            # loadRes mutates its input (adds area/id): give it copies. For masks leave the box out so
            # that the area (used by the size ranges) is the mask area, as torchvision's reference.
            drop = "bbox" if iou_type == "segm" else "segmentation"
            dt = coco_gt.loadRes([{k: copy.deepcopy(v) for k, v in r.items() if k != drop} for r in res])
            ev = COCOeval(coco_gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # pycocotools reports -1 where no ground truth exists in an area range; keep that as NaN
        out.update({f"{iou_type}_{n}": (float(v) if v >= 0 else float("nan")) for n, v in zip(_STAT_NAMES, ev.stats[:6])})
    return out

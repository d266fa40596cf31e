"""Box operations of the official detectors: NMS as mmcv calls it, mmdet's ``multiclass_nms``, RoI
lists and the multi-level RoI feature extractor (``torchvision.ops.roi_align``, aligned).

What is written here and why: mmcv's ``batched_nms`` offsets the boxes of each class by
``class · (max coordinate + 1)`` and runs one NMS below 10000 boxes (torchvision's ``batched_nms``
loops over the classes above 4000 boxes on CPU; the float offsets change IoUs in the last bit, so
near-threshold pairs could go the other way); mmdet maps a RoI to a level by
``floor(log2(sqrt(area) / 56 + 1e-6))`` (torchvision's ``LevelMapper`` puts the epsilon outside the
logarithm).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import nms, roi_align

__all__ = ["batched_nms", "multiclass_nms", "boxes_to_rois", "RoIExtractor"]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                split_thr: int = 10000) -> Tuple[Tensor, Tensor]:
    """NMS within each ``idxs`` group as mmcv 1.x does it; returns ``(dets (K, 5), keep)``, scores descending."""
    if boxes.numel() == 0:
        return boxes.new_zeros((0, 5)), idxs.new_zeros((0,), dtype=torch.long)
    if boxes.shape[0] < split_thr:
        offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        keep = nms(boxes + offsets[:, None], scores, iou_threshold)
    else:
        keep = tv_batched_nms(boxes, scores, idxs, iou_threshold)
    return torch.cat([boxes[keep], scores[keep, None]], dim=-1), keep


def multiclass_nms(multi_bboxes: Tensor, multi_scores: Tensor, score_thr: float, iou_threshold: float,
                   max_num: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    """mmdet's ``multiclass_nms``: ``multi_scores`` (N, C+1) with the background last, class-specific
    ``multi_bboxes`` (N, 4·C) or shared (N, 4); returns ``(dets (K, 5), labels (K,), index of the
    kept (box, class) pair in the flattened N·C list)``."""
    num_classes = multi_scores.size(1) - 1
    if multi_bboxes.shape[1] > 4:
        bboxes = multi_bboxes.view(multi_scores.size(0), -1, 4)
    else:
        bboxes = multi_bboxes[:, None].expand(multi_scores.size(0), num_classes, 4)
    scores = multi_scores[:, :-1]
    labels = torch.arange(num_classes, dtype=torch.long, device=scores.device).view(1, -1).expand_as(scores)
    bboxes, scores, labels = bboxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    inds = (scores > score_thr).nonzero(as_tuple=False).squeeze(1)
    bboxes, scores, labels = bboxes[inds], scores[inds], labels[inds]
    dets, keep = batched_nms(bboxes, scores, labels, iou_threshold)
    if max_num > 0:
        dets, keep = dets[:max_num], keep[:max_num]
    return dets, labels[keep], inds[keep]


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """``[(N_i, ≥4)]`` per image -> ``(ΣN_i, 5)`` rows ``(image index, x1, y1, x2, y2)`` (mmdet's ``bbox2roi``)."""
    rois = [torch.cat([b.new_full((b.size(0), 1), i), b[:, :4]], dim=-1) for i, b in enumerate(boxes)]
    return torch.cat(rois, 0) if rois else torch.zeros(0, 5)


class RoIExtractor(nn.Module):
    """mmdet's ``SingleRoIExtractor`` with ``RoIAlign(aligned=True, sampling_ratio=0)``: each RoI is
    pooled from one level chosen by its scale (``finest_scale`` 56)."""

    def __init__(self, output_size: int, strides: Sequence[int] = (4, 8, 16, 32), finest_scale: int = 56):
        super().__init__()
        self.output_size, self.strides, self.finest_scale = int(output_size), tuple(strides), finest_scale

    def map_levels(self, rois: Tensor) -> Tensor:
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        lvl = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return lvl.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, feats: List[Tensor], rois: Tensor) -> Tensor:
        feats = feats[:len(self.strides)]
        s = self.output_size
        out = feats[0].new_zeros(rois.size(0), feats[0].size(1), s, s)
        levels = self.map_levels(rois)
        for i, (f, stride) in enumerate(zip(feats, self.strides)):
            inds = (levels == i).nonzero(as_tuple=False).squeeze(1)
            if inds.numel() > 0:
                out[inds] = roi_align(f, rois[inds], (s, s), spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)
            elif self.training:  # keep every level in the graph (DDP), as mmdet does
                out = out + f.sum() * 0.0
        return out

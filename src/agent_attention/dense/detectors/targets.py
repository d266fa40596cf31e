"""Training targets of the official configs: mmdet's ``MaxIoUAssigner`` and ``RandomSampler``
(torchvision's :class:`BalancedPositiveNegativeSampler` draws the same way: ``int(num · fraction)``
positives at most, the rest negatives), mask targets by aligned RoIAlign of the instance masks.

The assigner is written here because torchvision's ``Matcher`` differs in the low-quality rule:
mmdet gives each ground truth the boxes that overlap it most only when that overlap reaches
``min_pos_iou`` (0.3 for the RPN), and assigns them to *that* ground truth.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.ops import box_iou, roi_align

__all__ = ["assign", "sample", "mask_targets"]


def assign(boxes: Tensor, gt: Tensor, pos_iou: float, neg_iou: float, min_pos_iou: float,
           valid: Tensor = None) -> Tuple[Tensor, Tensor]:
    """``(assigned, max_iou)``: per box ``-1`` ignore, ``0`` negative, ``k + 1`` positive for ground truth ``k``."""
    n = boxes.size(0)
    assigned = torch.full((n,), -1, dtype=torch.long, device=boxes.device)
    if gt.numel() == 0 or n == 0:
        assigned[:] = 0
        max_iou = boxes.new_zeros(n)
    else:
        iou = box_iou(gt, boxes)  # (G, N)
        max_iou, argmax = iou.max(dim=0)
        assigned[(max_iou >= 0) & (max_iou < neg_iou)] = 0
        pos = max_iou >= pos_iou
        assigned[pos] = argmax[pos] + 1
        gt_max = iou.max(dim=1).values
        best = (iou == gt_max[:, None]) & (gt_max[:, None] >= min_pos_iou)  # low-quality matches
        order = torch.arange(1, gt.size(0) + 1, device=boxes.device)[:, None]
        last = (best.long() * order).max(dim=0).values  # the last ground truth wins, as mmdet's loop
        assigned = torch.where(last > 0, last, assigned)
    if valid is not None:
        assigned[~valid] = -1
    return assigned, max_iou


def sample(assigned: Tensor, num: int, pos_fraction: float) -> Tuple[Tensor, Tensor]:
    """Random positives (at most ``int(num · pos_fraction)``) and negatives up to ``num``: index tensors."""
    labels = torch.where(assigned > 0, 1, torch.where(assigned == 0, 0, -1))
    pos, neg = BalancedPositiveNegativeSampler(num, pos_fraction)([labels])
    return pos[0].nonzero(as_tuple=False).squeeze(1), neg[0].nonzero(as_tuple=False).squeeze(1)


def mask_targets(masks: Tensor, rois: Tensor, gt_index: Tensor, size: int) -> Tensor:
    """``(P, size, size)`` binary targets: each positive RoI's instance mask cropped and resized."""
    if rois.numel() == 0:
        return rois.new_zeros((0, size, size))
    boxes = torch.cat([torch.arange(rois.size(0), device=rois.device, dtype=rois.dtype)[:, None], rois], dim=1)
    m = masks[gt_index][:, None].to(rois.dtype)
    return (roi_align(m, boxes, (size, size), 1.0, sampling_ratio=0, aligned=True)[:, 0] >= 0.5).to(rois.dtype)

"""mmdet's ``RPNHead``: a shared 3×3 conv + ReLU, 1×1 objectness (sigmoid) and 1×1 deltas per level;
proposals by per-level top-k, decoding, empty-box filtering and NMS across levels kept apart."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .anchors import AnchorGenerator
from .coder import DeltaXYWHCoder
from .ops import batched_nms
from .targets import assign, sample
from .taps import tap

__all__ = ["RPNHead"]


class RPNHead(nn.Module):
    """Region proposal head (official layout ``rpn_conv``, ``rpn_cls``, ``rpn_reg``).

    ``smooth_l1_beta``: the box loss (``None``: L1, Mask R-CNN configs; ``1/9``: Cascade configs).
    ``anchor_scale``: anchor size in strides (official 8: 32 pixels on P2).
    """

    def __init__(self, channels: int = 256, strides: Sequence[int] = (4, 8, 16, 32, 64),
                 smooth_l1_beta: Optional[float] = None, anchor_scale: float = 8.0,
                 test_cfg: Optional[dict] = None, train_cfg: Optional[dict] = None):
        super().__init__()
        self.anchors = AnchorGenerator(strides, ratios=(0.5, 1.0, 2.0), scales=(anchor_scale,))
        a = self.anchors.num_anchors
        self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, a, 1)
        self.rpn_reg = nn.Conv2d(channels, a * 4, 1)
        for m in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        self.coder = DeltaXYWHCoder()
        self.smooth_l1_beta = smooth_l1_beta
        self.test_cfg = {**dict(nms_pre=1000, max_per_img=1000, iou_threshold=0.7, min_bbox_size=0), **(test_cfg or {})}
        self.train_cfg = {**dict(nms_pre=2000, max_per_img=1000, iou_threshold=0.7, min_bbox_size=0, num=256,
                              pos_fraction=0.5, pos_iou=0.7, neg_iou=0.3, min_pos_iou=0.3), **(train_cfg or {})}

    def forward(self, feats: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        cls, reg = [], []
        for i, f in enumerate(feats):
            x = F.relu(self.rpn_conv(f))
            cls.append(self.rpn_cls(x))
            reg.append(self.rpn_reg(x))
            tap(f"rpn_head.cls_score.{i}", cls[-1])
            tap(f"rpn_head.bbox_pred.{i}", reg[-1])
        return cls, reg

    def proposals(self, cls: List[Tensor], reg: List[Tensor], img_shapes: Sequence[Tuple[int, int]],
                  training: bool = False) -> List[Tensor]:
        """``(K, 5)`` proposals ``x1 y1 x2 y2 score`` per image (mmdet's ``_get_bboxes_single``)."""
        cfg = self.train_cfg if training else self.test_cfg
        anchors = self.anchors.grid_anchors([c.shape[-2:] for c in cls], device=cls[0].device)
        out = []
        for b, shape in enumerate(img_shapes):
            scores, deltas, priors, ids = [], [], [], []
            for lvl, (c, r, a) in enumerate(zip(cls, reg, anchors)):
                s = c[b].detach().permute(1, 2, 0).reshape(-1).sigmoid()
                d = r[b].detach().permute(1, 2, 0).reshape(-1, 4)
                if 0 < cfg["nms_pre"] < s.shape[0]:
                    s, order = s.sort(descending=True)
                    s, order = s[:cfg["nms_pre"]], order[:cfg["nms_pre"]]
                    d, a = d[order], a[order]
                scores.append(s)
                deltas.append(d)
                priors.append(a)
                ids.append(s.new_full((s.size(0),), lvl, dtype=torch.long))
            scores, ids = torch.cat(scores), torch.cat(ids)
            boxes = self.coder.decode(torch.cat(priors), torch.cat(deltas), max_shape=shape)
            if cfg["min_bbox_size"] >= 0:
                w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
                ok = (w > cfg["min_bbox_size"]) & (h > cfg["min_bbox_size"])
                if not ok.all():
                    boxes, scores, ids = boxes[ok], scores[ok], ids[ok]
            tap("rpn.batched_nms.0.in.boxes", boxes)
            tap("rpn.batched_nms.0.in.scores", scores)
            tap("rpn.batched_nms.0.in.idxs", ids)
            dets, keep = batched_nms(boxes, scores, ids, cfg["iou_threshold"])
            tap("rpn.batched_nms.0.out.dets", dets)
            tap("rpn.batched_nms.0.out.keep", keep)
            out.append(dets[:cfg["max_per_img"]])
            tap("rpn.proposals", out[-1])
        return out

    def loss(self, cls: List[Tensor], reg: List[Tensor], gt_boxes: Sequence[Tensor],
             img_shapes: Sequence[Tuple[int, int]]) -> Dict[str, Tensor]:
        cfg = self.train_cfg
        sizes = [c.shape[-2:] for c in cls]
        anchors = torch.cat(self.anchors.grid_anchors(sizes, device=cls[0].device))
        logits = torch.cat([c.permute(0, 2, 3, 1).reshape(c.size(0), -1) for c in cls], dim=1)
        deltas = torch.cat([r.permute(0, 2, 3, 1).reshape(r.size(0), -1, 4) for r in reg], dim=1)
        loss_cls, loss_box, n_samples = logits.sum() * 0, deltas.sum() * 0, 0
        for b, (gt, shape) in enumerate(zip(gt_boxes, img_shapes)):
            valid = torch.cat(self.anchors.valid_flags(sizes, shape, device=anchors.device))
            assigned, _ = assign(anchors, gt, cfg["pos_iou"], cfg["neg_iou"], cfg["min_pos_iou"], valid)
            pos, neg = sample(assigned, cfg["num"], cfg["pos_fraction"])
            idx = torch.cat([pos, neg])
            target = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).to(logits.dtype)
            loss_cls = loss_cls + F.binary_cross_entropy_with_logits(logits[b, idx], target, reduction="sum")
            if pos.numel():
                t = self.coder.encode(anchors[pos], gt[assigned[pos] - 1])
                loss_box = loss_box + _box_loss(deltas[b, pos], t, self.smooth_l1_beta)
            n_samples += idx.numel()
        n = max(n_samples, 1)
        return {"loss_rpn_cls": loss_cls / n, "loss_rpn_bbox": loss_box / n}


def _box_loss(pred: Tensor, target: Tensor, beta: Optional[float] = None) -> Tensor:
    if beta is None:
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, reduction="sum", beta=beta)

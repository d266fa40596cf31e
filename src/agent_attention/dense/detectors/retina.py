"""mmdet's ``RetinaHead``: four 3×3 conv + ReLU towers for classes and boxes, 9 anchors per location
(3 ratios × 3 octave scales), sigmoid class scores (no background), focal loss + L1 in training."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from .anchors import AnchorGenerator
from .coder import DeltaXYWHCoder
from .heads import ConvModule
from .ops import batched_nms
from .targets import assign
from .taps import tap

__all__ = ["RetinaHead"]


class RetinaHead(nn.Module):
    """``anchor_scale``: the octave base scale (official 4: anchors of 32–50 pixels on P3)."""

    def __init__(self, num_classes: int, channels: int = 256, strides: Sequence[int] = (8, 16, 32, 64, 128),
                 stacked_convs: int = 4, anchor_scale: float = 4.0, test_cfg: Optional[dict] = None,
                 train_cfg: Optional[dict] = None):
        super().__init__()
        self.num_classes = num_classes
        self.anchors = AnchorGenerator(strides, ratios=(0.5, 1.0, 2.0), octave_base_scale=anchor_scale, scales_per_octave=3)
        a = self.anchors.num_anchors
        self.cls_convs = nn.ModuleList([ConvModule(channels, channels, 3) for _ in range(stacked_convs)])
        self.reg_convs = nn.ModuleList([ConvModule(channels, channels, 3) for _ in range(stacked_convs)])
        self.retina_cls = nn.Conv2d(channels, a * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(channels, a * 4, 3, padding=1)
        for m in self.modules():  # mmdet's RetinaHead init: normal(0.01), prior 0.01 for the class bias
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - 0.01) / 0.01))
        self.coder = DeltaXYWHCoder()
        self.test_cfg = {**dict(nms_pre=1000, score_thr=0.05, iou_threshold=0.5, max_per_img=100), **(test_cfg or {})}
        self.train_cfg = {**dict(pos_iou=0.5, neg_iou=0.4, min_pos_iou=0.0, alpha=0.25, gamma=2.0), **(train_cfg or {})}

    def forward(self, feats: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        cls, reg = [], []
        for i, f in enumerate(feats):
            c, r = f, f
            for conv in self.cls_convs:
                c = conv(c)
            for conv in self.reg_convs:
                r = conv(r)
            cls.append(self.retina_cls(c))
            reg.append(self.retina_reg(r))
            tap(f"bbox_head.cls_score.{i}", cls[-1])
            tap(f"bbox_head.bbox_pred.{i}", reg[-1])
        return cls, reg

    @torch.no_grad()
    def detect(self, cls: List[Tensor], reg: List[Tensor], img_shapes, scale_factors) -> List[dict]:
        """mmdet's ``_get_bboxes_single``: per level the top ``nms_pre`` (score, class) pairs above
        ``score_thr``, decoded, then class-wise NMS over all levels."""
        cfg = self.test_cfg
        anchors = self.anchors.grid_anchors([c.shape[-2:] for c in cls], device=cls[0].device)
        out = []
        for b, shape in enumerate(img_shapes):
            boxes, scores, labels = [], [], []
            for c, r, a in zip(cls, reg, anchors):
                s = c[b].permute(1, 2, 0).reshape(-1, self.num_classes).sigmoid()
                d = r[b].permute(1, 2, 0).reshape(-1, 4)
                valid = s > cfg["score_thr"]
                s = s[valid]
                valid_idx = torch.nonzero(valid)
                k = min(cfg["nms_pre"], valid_idx.size(0))
                s, order = s.sort(descending=True)
                s, top = s[:k], valid_idx[order[:k]]
                keep, lab = top.unbind(dim=1)
                boxes.append(self.coder.decode(a[keep], d[keep], max_shape=shape))
                scores.append(s)
                labels.append(lab)
            boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            boxes = boxes / boxes.new_tensor(scale_factors[b])
            tap("head.batched_nms.0.in.boxes", boxes)
            tap("head.batched_nms.0.in.scores", scores)
            tap("head.batched_nms.0.in.idxs", labels)
            dets, keep = batched_nms(boxes, scores, labels, cfg["iou_threshold"])
            tap("head.batched_nms.0.out.dets", dets)
            tap("head.batched_nms.0.out.keep", keep)
            dets, keep = dets[:cfg["max_per_img"]], keep[:cfg["max_per_img"]]
            out.append({"boxes": dets[:, :4], "scores": dets[:, 4], "labels": labels[keep]})
        return out

    def loss(self, cls: List[Tensor], reg: List[Tensor], gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
             img_shapes) -> Dict[str, Tensor]:
        """Focal loss (alpha 0.25, gamma 2) over all valid anchors and L1 on the positives' deltas, both
        divided by the number of positives (no sampling, as the official config)."""
        cfg = self.train_cfg
        sizes = [c.shape[-2:] for c in cls]
        anchors = torch.cat(self.anchors.grid_anchors(sizes, device=cls[0].device))
        logits = torch.cat([c.permute(0, 2, 3, 1).reshape(c.size(0), -1, self.num_classes) for c in cls], dim=1)
        deltas = torch.cat([r.permute(0, 2, 3, 1).reshape(r.size(0), -1, 4) for r in reg], dim=1)
        loss_cls, loss_box, n_pos = logits.sum() * 0, deltas.sum() * 0, 0
        for b, (gt, lab, shape) in enumerate(zip(gt_boxes, gt_labels, img_shapes)):
            valid = torch.cat(self.anchors.valid_flags(sizes, shape, device=anchors.device))
            assigned, _ = assign(anchors, gt, cfg["pos_iou"], cfg["neg_iou"], cfg["min_pos_iou"], valid)
            used = assigned >= 0
            pos = assigned > 0
            target = torch.zeros_like(logits[b])
            if pos.any():
                target[pos, lab[assigned[pos] - 1]] = 1.0
                t = self.coder.encode(anchors[pos], gt[assigned[pos] - 1])
                loss_box = loss_box + F.l1_loss(deltas[b, pos], t, reduction="sum")
            loss_cls = loss_cls + sigmoid_focal_loss(logits[b, used], target[used], cfg["alpha"], cfg["gamma"], "sum")
            n_pos += int(pos.sum())
        n = max(n_pos, 1)
        return {"loss_cls": loss_cls / n, "loss_bbox": loss_box / n}

"""mmdet's ``StandardRoIHead`` (Mask R-CNN) and ``CascadeRoIHead`` (Cascade Mask R-CNN).

Test (``simple_test``): RoIs from the proposals -> box head(s) -> softmax scores (background last) ->
class-specific boxes -> ``multiclass_nms`` -> masks of the kept boxes (sigmoid of the label's
channel; Cascade: the mean of the three stages' sigmoids) pasted at the original image size.
Cascade: between stages each RoI is refined with the deltas of its best non-background class;
the class logits of the three stages are averaged before the softmax, boxes come from the last stage.

Training: per stage, proposals (+ ground truths) are assigned by IoU (0.5 / 0.6 / 0.7), 512 sampled
(a quarter positives at most), CE on the classes, L1 on the deltas (Mask R-CNN) or 10 · GIoU on the
decoded boxes (Cascade, ``reg_decoded_bbox``), BCE on the 28×28 mask targets; Cascade stage
losses weighted 1, 0.5, 0.25.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from .coder import DeltaXYWHCoder
from .heads import ConvFCBBoxHead, FCNMaskHead
from .masks import paste_masks
from .ops import RoIExtractor, boxes_to_rois, multiclass_nms
from .targets import assign, mask_targets, sample
from .taps import tap

__all__ = ["RoIHead", "STAGE_STDS"]

#: target stds of the box coder per stage: Mask R-CNN, then the three Cascade stages
STAGE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


class RoIHead(nn.Module):
    """Box (and mask) heads on RoI features; ``cascade=True``: three stages (``bbox_head.i``, ``mask_head.i``)."""

    def __init__(self, num_classes: int, cascade: bool = False, with_mask: bool = True, channels: int = 256,
                 fc_channels: int = 1024, strides: Sequence[int] = (4, 8, 16, 32), test_cfg: Optional[dict] = None,
                 train_cfg: Optional[dict] = None):
        super().__init__()
        self.num_classes, self.cascade, self.with_mask = num_classes, cascade, with_mask
        self.bbox_roi_extractor = RoIExtractor(7, strides)
        self.mask_roi_extractor = RoIExtractor(14, strides)
        if cascade:
            self.bbox_head = nn.ModuleList([ConvFCBBoxHead(num_classes, 4, 1, channels, channels, fc_channels, norm=True)
                                            for _ in range(3)])
            self.mask_head = nn.ModuleList([FCNMaskHead(num_classes, channels, channels) for _ in range(3)]) if with_mask else None
            self.coders = [DeltaXYWHCoder(stds=s) for s in STAGE_STDS]
        else:
            self.bbox_head = ConvFCBBoxHead(num_classes, 0, 2, channels, channels, fc_channels)
            self.mask_head = FCNMaskHead(num_classes, channels, channels) if with_mask else None
            self.coders = [DeltaXYWHCoder(stds=STAGE_STDS[0])]
        self.test_cfg = {**dict(score_thr=0.05, iou_threshold=0.5, max_per_img=100, mask_thr_binary=0.5), **(test_cfg or {})}
        self.train_cfg = {**dict(num=512, pos_fraction=0.25, iou=(0.5, 0.6, 0.7) if cascade else (0.5,),
                              stage_weights=(1.0, 0.5, 0.25) if cascade else (1.0,), mask_size=28), **(train_cfg or {})}

    @property
    def num_stages(self) -> int:
        return 3 if self.cascade else 1

    def _box_head(self, i: int) -> ConvFCBBoxHead:
        return self.bbox_head[i] if self.cascade else self.bbox_head

    def _mask_head(self, i: int) -> FCNMaskHead:
        return self.mask_head[i] if self.cascade else self.mask_head

    def _name(self, kind: str, i: int) -> str:
        return f"{kind}.{i}" if self.cascade else kind

    def _refine(self, i: int, rois: Tensor, cls: Tensor, reg: Tensor, labels: Tensor, shapes) -> Tensor:
        """mmdet's ``regress_by_class``: decode each RoI with the deltas of ``labels``."""
        idx = (labels * 4)[:, None] + torch.arange(4, device=labels.device)
        deltas = torch.gather(reg, 1, idx)
        out = rois.clone()
        for b, shape in enumerate(shapes):
            m = rois[:, 0] == b
            out[m, 1:] = self.coders[i].decode(rois[m, 1:], deltas[m], max_shape=shape)
        return out

    # ------------------------------------------------------------------ test
    @torch.no_grad()
    def simple_test(self, feats: List[Tensor], proposals: List[Tensor], img_shapes, ori_shapes, scale_factors) -> List[dict]:
        n_per = [len(p) for p in proposals]
        rois = boxes_to_rois(proposals)
        scores_sum, reg = None, None
        for i in range(self.num_stages):
            tap(self._name("roi", i) + ".rois", rois)
            cls, reg = self._box_head(i)(self.bbox_roi_extractor(feats, rois))
            tap(self._name("roi", i) + ".cls_score", cls)
            tap(self._name("roi", i) + ".bbox_pred", reg)
            scores_sum = cls if scores_sum is None else scores_sum + cls
            if i < self.num_stages - 1:
                rois = self._refine(i, rois, cls, reg, cls[:, :-1].argmax(dim=1), img_shapes)
        cls = scores_sum / float(self.num_stages) if self.cascade else scores_sum
        cfg = self.test_cfg
        results = []
        for b, (rois_b, cls_b, reg_b) in enumerate(zip(rois.split(n_per), cls.split(n_per), reg.split(n_per))):
            scores = F.softmax(cls_b, dim=-1)
            boxes = self.coders[-1].decode(rois_b[:, 1:], reg_b, max_shape=img_shapes[b])
            sf = boxes.new_tensor(scale_factors[b])
            boxes = (boxes.view(boxes.size(0), -1, 4) / sf).view(boxes.size(0), -1)
            tap("rcnn.multiclass_nms.0.in.bboxes", boxes)
            tap("rcnn.multiclass_nms.0.in.scores", scores)
            dets, labels, _ = multiclass_nms(boxes, scores, cfg["score_thr"], cfg["iou_threshold"], cfg["max_per_img"])
            tap("rcnn.multiclass_nms.0.out.det_bboxes", dets)
            tap("rcnn.multiclass_nms.0.out.det_labels", labels)
            results.append({"boxes": dets[:, :4], "scores": dets[:, 4], "labels": labels})
        if self.with_mask:
            self._test_masks(feats, results, ori_shapes, scale_factors)
        return results

    def _test_masks(self, feats, results, ori_shapes, scale_factors) -> None:
        boxes = [r["boxes"] * r["boxes"].new_tensor(sf) for r, sf in zip(results, scale_factors)]
        n_per = [len(b) for b in boxes]
        if sum(n_per) == 0:
            for r, (h, w) in zip(results, ori_shapes):
                r["masks"] = torch.zeros(0, 1, h, w, dtype=torch.bool)
            return
        rois = boxes_to_rois(boxes)
        labels = torch.cat([r["labels"] for r in results])
        idx = torch.arange(len(labels))
        probs = None
        for i in range(self.num_stages):
            tap(self._name("mask", i) + ".rois", rois)
            logits = self._mask_head(i)(self.mask_roi_extractor(feats, rois))
            tap(self._name("mask", i) + ".mask_pred", logits[idx, labels])
            p = logits.sigmoid()
            probs = p if probs is None else probs + p
        probs = probs / float(self.num_stages) if self.cascade else probs
        thr = self.test_cfg["mask_thr_binary"]
        for r, p, (h, w) in zip(results, probs.split(n_per), ori_shapes):
            r["masks"] = paste_masks(p[torch.arange(len(r["labels"])), r["labels"]], r["boxes"], h, w, thr)[:, None]

    # ------------------------------------------------------------------ training
    def loss(self, feats: List[Tensor], proposals: List[Tensor], gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
             gt_masks: Optional[Sequence[Tensor]], img_shapes) -> Dict[str, Tensor]:
        """Losses of every stage; ``gt_labels`` are 0-based, ``gt_masks`` (G, H, W) per image in the padded frame."""
        cfg = self.train_cfg
        losses: Dict[str, Tensor] = {}
        props = [p[:, :4].detach() for p in proposals]
        for i in range(self.num_stages):
            w = cfg["stage_weights"][i]
            sampled = [self._sample(p, g, lab, cfg["iou"][i]) for p, g, lab in zip(props, gt_boxes, gt_labels)]
            rois = boxes_to_rois([s["boxes"] for s in sampled])
            labels = torch.cat([s["labels"] for s in sampled])
            cls, reg = self._box_head(i)(self.bbox_roi_extractor(feats, rois))
            n = max(len(labels), 1)
            pos = labels < self.num_classes
            loss_cls = F.cross_entropy(cls, labels, reduction="sum") / n
            pred = reg.view(reg.size(0), -1, 4)[pos, labels[pos]]
            gt_pos = torch.cat([s["gt"] for s in sampled])[pos]
            if self.cascade:  # reg_decoded_bbox: GIoU loss (weight 10) on the decoded boxes
                decoded = self.coders[i].decode(rois[pos, 1:], pred)
                loss_box = 10.0 * generalized_box_iou_loss(decoded, gt_pos, reduction="sum") / n
            else:
                loss_box = F.l1_loss(pred, self.coders[i].encode(rois[pos, 1:], gt_pos), reduction="sum") / n
            sfx = f"_s{i}" if self.cascade else ""
            losses[f"loss_cls{sfx}"] = w * loss_cls
            losses[f"loss_bbox{sfx}"] = w * (loss_box if pos.any() else reg.sum() * 0)
            if self.with_mask:
                losses[f"loss_mask{sfx}"] = w * self._mask_loss(i, feats, rois[pos], labels[pos], sampled, gt_masks)
            if i < self.num_stages - 1:
                with torch.no_grad():
                    lab = torch.where(pos, labels, cls[:, :-1].argmax(dim=1))
                    refined = self._refine(i, rois, cls.detach(), reg.detach(), lab, img_shapes)
                    not_gt = ~torch.cat([s["is_gt"] for s in sampled])
                    props = [refined[(refined[:, 0] == b) & not_gt, 1:] for b in range(len(props))]
        return losses

    def _sample(self, proposals: Tensor, gt: Tensor, gt_labels: Tensor, iou: float) -> dict:
        boxes = torch.cat([gt, proposals]) if gt.numel() else proposals
        is_gt = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
        is_gt[:len(gt)] = True
        assigned, _ = assign(boxes, gt, iou, iou, iou)
        pos, neg = sample(assigned, self.train_cfg["num"], self.train_cfg["pos_fraction"])
        idx = torch.cat([pos, neg])
        gt_idx = (assigned[idx] - 1).clamp(min=0)
        labels = torch.full((len(idx),), self.num_classes, dtype=torch.long, device=boxes.device)
        if gt.numel():
            labels[:len(pos)] = gt_labels[gt_idx[:len(pos)]]
        gt_box = gt[gt_idx] if gt.numel() else boxes[idx]
        return {"boxes": boxes[idx], "labels": labels, "gt": gt_box, "gt_index": gt_idx, "is_gt": is_gt[idx],
                "num_pos": len(pos)}

    def _mask_loss(self, i, feats, pos_rois, pos_labels, sampled, gt_masks) -> Tensor:
        if pos_rois.numel() == 0 or gt_masks is None:
            return feats[0].sum() * 0
        size = self.train_cfg["mask_size"]
        targets = torch.cat([mask_targets(m, s["boxes"][:s["num_pos"]], s["gt_index"][:s["num_pos"]], size)
                             for s, m in zip(sampled, gt_masks)])
        logits = self._mask_head(i)(self.mask_roi_extractor(feats, pos_rois))
        logits = logits[torch.arange(len(pos_labels)), pos_labels]
        return F.binary_cross_entropy_with_logits(logits, targets)

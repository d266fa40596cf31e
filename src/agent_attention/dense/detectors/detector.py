"""The official detectors as one module: agent backbone -> FPN -> RPN + RoI heads (Mask R-CNN,
Cascade Mask R-CNN) or RetinaHead (RetinaNet), with mmdet's test pipeline around them.

* :meth:`Detector.forward` takes what the data sets give (a list of ``(3, H, W)`` images in [0, 1],
  torchvision-style targets with labels from 1) and returns the training losses or, in eval mode,
  one dict per image (``boxes`` xyxy in the image's pixels, ``scores``, ``labels`` from 1,
  ``masks`` bool ``(N, 1, H, W)``);
* :meth:`Detector.predict` runs mmdet's ``simple_test`` on an already normalised, padded batch
  (labels from 0, as mmdet) — the path the parity tests check;
* :meth:`Detector.load_official` loads an mmdet checkpoint's ``state_dict`` (official key names).

The pipeline is the official one: resize to fit ``max_size × min_size`` keeping the ratio (mmcv's
``rescale_size``: the side rounded, per-axis scale factors), normalise with the ImageNet mean/std
in 0–255 RGB, zero-pad right/bottom to a multiple of 32; boxes are divided by the scale factors
and masks pasted at the original size. The image resize is bilinear with torch rather than
OpenCV's, which is not bitwise equal.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import AgentBackbone
from .neck import FPN
from .retina import RetinaHead
from .roi_heads import RoIHead
from .rpn import RPNHead
from .taps import tap

__all__ = ["Detector", "DETECTORS", "MEAN", "STD"]

DETECTORS = ("mask_rcnn", "cascade_mask_rcnn", "retinanet")
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class Detector(nn.Module):
    """An official mmdet detector over an :class:`AgentBackbone` (official state-dict layout after
    :meth:`official_to_ours`). ``num_classes``: object classes (80 for COCO), without background;
    ``anchor_scale``: anchor size in strides (official: RPN 8, RetinaNet 4; smaller for tiny images)."""

    def __init__(self, kind: str, backbone: AgentBackbone, num_classes: int = 80, *, fpn_channels: int = 256,
                 fc_channels: int = 1024, with_mask: Optional[bool] = None, min_size: int = 800, max_size: int = 1333,
                 size_divisor: int = 32, rpn_smooth_l1_beta: Optional[float] = None, anchor_scale: Optional[float] = None,
                 test_cfg: Optional[Dict[str, dict]] = None, train_cfg: Optional[Dict[str, dict]] = None):
        super().__init__()
        if kind not in DETECTORS:
            raise ValueError(f"unknown detector {kind!r}; choose one of {', '.join(DETECTORS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes counts object classes (background excluded) and must be >= 1, got {num_classes}")
        self.kind, self.num_classes = kind, int(num_classes)
        self.min_size, self.max_size, self.size_divisor = int(min_size), int(max_size), int(size_divisor)
        test_cfg, train_cfg = test_cfg or {}, train_cfg or {}
        self.backbone = backbone
        chans = list(backbone.out_channels)
        if kind == "retinanet":
            self.neck = FPN(chans[1:], fpn_channels, 5, extra="on_input")
            self.bbox_head = RetinaHead(num_classes, fpn_channels, anchor_scale=anchor_scale or 4.0,
                                        test_cfg=test_cfg.get("head"), train_cfg=train_cfg.get("head"))
            self.with_mask = False
        else:
            self.neck = FPN(chans, fpn_channels, 5, extra="pool")
            if rpn_smooth_l1_beta is None and kind == "cascade_mask_rcnn":
                rpn_smooth_l1_beta = 1.0 / 9.0  # the official Cascade configs' RPN box loss
            self.rpn_head = RPNHead(fpn_channels, smooth_l1_beta=rpn_smooth_l1_beta, anchor_scale=anchor_scale or 8.0,
                                    test_cfg=test_cfg.get("rpn"),
                                    train_cfg=train_cfg.get("rpn"))
            self.with_mask = True if with_mask is None else bool(with_mask)
            self.roi_head = RoIHead(num_classes, cascade=kind == "cascade_mask_rcnn", with_mask=self.with_mask,
                                    channels=fpn_channels, fc_channels=fc_channels, test_cfg=test_cfg.get("rcnn"),
                                    train_cfg=train_cfg.get("rcnn"))
        self.register_buffer("pixel_mean", torch.tensor(MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(STD).view(3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ features
    def features(self, x: Tensor) -> List[Tensor]:
        feats = self.backbone(x)
        for i, f in enumerate(feats):
            tap(f"backbone.{i}", f)
        outs = self.neck(feats[1:] if self.kind == "retinanet" else feats)
        for i, f in enumerate(outs):
            tap(f"neck.{i}", f)
        return outs

    @torch.no_grad()
    def predict(self, x: Tensor, img_shapes: Optional[Sequence[Tuple[int, int]]] = None,
                ori_shapes: Optional[Sequence[Tuple[int, int]]] = None,
                scale_factors: Optional[Sequence[Sequence[float]]] = None) -> List[dict]:
        """mmdet's ``simple_test`` on a normalised, padded batch ``x``; labels from 0."""
        n = x.shape[0]
        img_shapes = list(img_shapes or [tuple(x.shape[-2:])] * n)
        ori_shapes = list(ori_shapes or img_shapes)
        scale_factors = list(scale_factors or [(1.0, 1.0, 1.0, 1.0)] * n)
        feats = self.features(x)
        if self.kind == "retinanet":
            return self.bbox_head.detect(*self.bbox_head(feats), img_shapes, scale_factors)
        proposals = self.rpn_head.proposals(*self.rpn_head(feats), img_shapes)
        return self.roi_head.simple_test(feats[:4], proposals, img_shapes, ori_shapes, scale_factors)

    # ------------------------------------------------------------------ pipeline
    def _scale(self, h: int, w: int) -> Tuple[int, int]:
        s = min(self.max_size / max(h, w), self.min_size / min(h, w))
        return int(h * s + 0.5), int(w * s + 0.5)

    def preprocess(self, images: Sequence[Tensor]):
        """Resize, normalise, pad and batch ``[0, 1]`` images; returns ``(batch, metas)``."""
        resized, metas = [], []
        for im in images:
            if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"detector images must be (3, H, W) tensors, got {getattr(im, 'shape', type(im))}")
            h, w = im.shape[-2:]
            nh, nw = self._scale(h, w)
            x = im.float() * 255.0
            if (nh, nw) != (h, w):
                x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
            resized.append((x - self.pixel_mean) / self.pixel_std)
            metas.append({"ori_shape": (h, w), "img_shape": (nh, nw), "scale_factor": (nw / w, nh / h, nw / w, nh / h)})
        d = self.size_divisor
        ph = -(-max(r.shape[1] for r in resized) // d) * d
        pw = -(-max(r.shape[2] for r in resized) // d) * d
        batch = resized[0].new_zeros(len(resized), 3, ph, pw)
        for i, r in enumerate(resized):
            batch[i, :, :r.shape[1], :r.shape[2]] = r
        return batch, metas

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None):
        x, metas = self.preprocess(images)
        img_shapes = [m["img_shape"] for m in metas]
        if not self.training:
            out = self.predict(x, img_shapes, [m["ori_shape"] for m in metas], [m["scale_factor"] for m in metas])
            for r in out:
                r["labels"] = r["labels"] + 1  # data-set convention: labels from 1
            return out
        if targets is None:
            raise ValueError("training needs targets (boxes, labels and, for masks, masks)")
        gt_boxes, gt_labels, gt_masks = [], [], []
        for t, m in zip(targets, metas):
            gt_boxes.append(t["boxes"].float() * t["boxes"].new_tensor(m["scale_factor"]).float())
            lab = t["labels"].long() - 1
            if lab.numel() and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise ValueError(f"target labels must be in 1..{self.num_classes}, got {t['labels'].tolist()}")
            gt_labels.append(lab)
            if self.with_mask and "masks" in t:
                mk = t["masks"].float()[None]
                if mk.shape[1]:
                    mk = F.interpolate(mk, size=m["img_shape"], mode="nearest")
                gt_masks.append(F.pad(mk[0], (0, x.shape[-1] - mk.shape[-1], 0, x.shape[-2] - mk.shape[-2])))
        feats = self.features(x)
        if self.kind == "retinanet":
            return self.bbox_head.loss(*self.bbox_head(feats), gt_boxes, gt_labels, img_shapes)
        cls, reg = self.rpn_head(feats)
        losses = self.rpn_head.loss(cls, reg, gt_boxes, img_shapes)
        proposals = self.rpn_head.proposals(cls, reg, img_shapes, training=True)
        masks = gt_masks if (self.with_mask and len(gt_masks) == len(targets)) else None
        losses.update(self.roi_head.loss(feats[:4], proposals, gt_boxes, gt_labels, masks, img_shapes))
        return losses

    # ------------------------------------------------------------------ official layout
    def official_to_ours(self, key: str) -> str:
        """An mmdet checkpoint key -> this module's key."""
        if key.startswith("backbone."):
            rest = key[len("backbone."):]
            return key if re.fullmatch(r"norm\d+\.(weight|bias)", rest) else "backbone.body.model." + rest
        if key.startswith("neck."):
            return "neck." + self.neck.official_to_ours(key[len("neck."):])
        return key

    def load_official(self, state: Dict[str, Tensor], strict: bool = True):
        """Load an mmdet ``state_dict`` (official keys); returns ``load_state_dict``'s result."""
        return self.load_state_dict({self.official_to_ours(k): v for k, v in state.items()}, strict=strict)

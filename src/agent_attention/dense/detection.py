"""torchvision detectors (Mask R-CNN, RetinaNet, FCOS) over an agent backbone with an FPN.

The structure follows the official mmdet configs (spec §6.2):

* Mask R-CNN: FPN on the four stages (strides 4–32) plus a max-pooled P6, RPN anchors of one size
  per level and three aspect ratios;
* RetinaNet: FPN from stage 2 on (``start_level=1``) plus P6/P7 computed from C5
  (``add_extra_convs='on_input'``), anchors ``4·stride × 2^{0, 1/3, 2/3}``;
* FCOS: same levels with P6/P7 computed from P5.

Images of any size are resized by torchvision's ``GeneralizedRCNNTransform`` (``min_size`` /
``max_size``) and padded to a multiple of 32; the agent biases follow the actual map sizes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional, Sequence

from torch import Tensor, nn
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from .backbone import AgentBackbone, AgentShapesSpec

DETECTORS = ("mask_rcnn", "retinanet", "fcos")

__all__ = ["DETECTORS", "AgentFPN", "build_detector", "anchor_generator"]


class AgentFPN(nn.Module):
    """Agent backbone + FPN, returning the ``OrderedDict`` of maps torchvision detectors expect.

    ``levels``: which backbone outputs feed the FPN (by position in ``body.out_channels``).
    """

    def __init__(self, body: AgentBackbone, out_channels: int = 256, levels: Sequence[int] = (0, 1, 2, 3),
                 extra_blocks: Optional[ExtraFPNBlock] = None):
        super().__init__()
        self.body = body
        self.levels = tuple(int(i) for i in levels)
        if not self.levels or max(self.levels) >= len(body.out_channels):
            raise ValueError(f"FPN levels {self.levels} do not fit the backbone's {len(body.out_channels)} outputs")
        self.fpn = FeaturePyramidNetwork([body.out_channels[i] for i in self.levels], out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.levels)))


def anchor_generator(kind: str, base_size: Optional[float] = None) -> AnchorGenerator:
    """Anchors for five FPN levels: ``base_size · 2^level`` (default 32 for Mask R-CNN/RetinaNet, 8 for FCOS).

    RetinaNet uses three octave scales per level and FCOS a single square "anchor" (its size sets
    the level's object-size range in torchvision's FCOS).
    """
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}; choose one of {DETECTORS}")
    base = float(base_size if base_size is not None else (8 if kind == "fcos" else 32))
    if base <= 0:
        raise ValueError(f"anchor base size must be positive, got {base}")
    sizes = [base * 2 ** i for i in range(5)]
    if kind == "retinanet":
        return AnchorGenerator(tuple(tuple(int(round(s * 2 ** (k / 3))) for k in range(3)) for s in sizes),
                               ((0.5, 1.0, 2.0),) * 5)
    if kind == "fcos":
        return AnchorGenerator(tuple((int(round(s)),) for s in sizes), ((1.0,),) * 5)
    return AnchorGenerator(tuple((int(round(s)),) for s in sizes), ((0.5, 1.0, 2.0),) * 5)


def build_detector(kind: str = "mask_rcnn", backbone: str = "agent_pvt_s", num_classes: int = 91, *,
                   pretrained_backbone=None, strict: bool = True, agent_shapes: AgentShapesSpec = "official",
                   fpn_channels: int = 256, min_size: int = 800, max_size: int = 1333, anchor_size: Optional[float] = None,
                   box_rep_size: int = 1024, mask_channels: int = 256, backbone_kwargs: Optional[Dict] = None,
                   **detector_kwargs) -> nn.Module:
    """A torchvision detector with an agent backbone + FPN.

    Args:
        kind: ``"mask_rcnn"``, ``"retinanet"`` or ``"fcos"``.
        backbone: timm name of a hierarchical model (``agent_pvt_s``, ``agent_swin_t``, ``agent_cswin_t`` …).
        num_classes: classes **including** background (torchvision convention; COCO: 91 ids or 81).
        pretrained_backbone: classification checkpoint for the backbone (path or state dict).
        strict: the checkpoint must fit the classifier exactly.
        agent_shapes: per-stage agent grids (``"official"``: PVT 12-16-28-28, Swin 9-12-14-7).
        fpn_channels: FPN width (256 official; a multiple of 32 for FCOS's GroupNorm).
        min_size, max_size: torchvision's resize (1333×800 official; small for the embedded data).
        anchor_size: smallest anchor (level P2 for Mask R-CNN, P3 otherwise); see :func:`anchor_generator`.
        box_rep_size, mask_channels: widths of Mask R-CNN's box MLP (1024) and mask head convs (256).
        backbone_kwargs: for ``timm.create_model`` (``drop_path_rate``, ``img_size``, dims of tiny models …).
        **detector_kwargs: passed to the torchvision detector (``rpn_batch_size_per_image``,
            ``box_score_thresh``, ``score_thresh``, ``detections_per_img`` …).
    """
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}; choose one of {DETECTORS}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
    if kind == "fcos" and fpn_channels % 32:
        raise ValueError(f"FCOS heads use GroupNorm(32): fpn_channels must be a multiple of 32, got {fpn_channels}")
    body = AgentBackbone(backbone, agent_shapes=agent_shapes, checkpoint=pretrained_backbone, strict=strict,
                         **(backbone_kwargs or {}))
    anchors = anchor_generator(kind, anchor_size)
    common = dict(min_size=min_size, max_size=max_size, **detector_kwargs)
    if kind == "mask_rcnn":
        fpn = AgentFPN(body, fpn_channels, levels=(0, 1, 2, 3), extra_blocks=LastLevelMaxPool())
        box_head = TwoMLPHead(fpn_channels * 7 * 7, box_rep_size)
        model = MaskRCNN(fpn, None, rpn_anchor_generator=anchors, box_head=box_head,
                         box_predictor=FastRCNNPredictor(box_rep_size, num_classes),
                         mask_head=MaskRCNNHeads(fpn_channels, (mask_channels,) * 4, 1),
                         mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes), **common)
    else:
        c5 = body.out_channels[3]
        extra = LastLevelP6P7(c5 if kind == "retinanet" else fpn_channels, fpn_channels)
        extra.use_P5 = kind == "fcos"  # RetinaNet: P6 from C5 ('on_input'); FCOS: from P5 ('on_output')
        fpn = AgentFPN(body, fpn_channels, levels=(1, 2, 3), extra_blocks=extra)
        cls = RetinaNet if kind == "retinanet" else FCOS
        model = cls(fpn, num_classes, anchor_generator=anchors, **common)
    model.kind, model.num_classes_with_bg = kind, num_classes
    return model


def detector_backbone(model: nn.Module) -> AgentBackbone:
    """The :class:`AgentBackbone` inside a detector built by :func:`build_detector`."""
    return model.backbone.body

"""The official detectors of Agent Attention's downstream code (mmdetection 2.25), on torch and torchvision ops.

Mask R-CNN, Cascade Mask R-CNN and RetinaNet with an agent backbone compute what the official
models compute and load the released checkpoints through a key map (:meth:`Detector.load_official`).
One file per part: :mod:`.anchors` (anchor generator), :mod:`.coder` (delta coder), :mod:`.ops`
(NMS, RoI extraction), :mod:`.neck` (FPN), :mod:`.rpn`, :mod:`.heads` (box and mask heads),
:mod:`.roi_heads` (standard and cascade), :mod:`.masks` (pasting), :mod:`.retina`, :mod:`.targets`
(training assignment and sampling), :mod:`.detector` (the model and its pipeline).
"""
from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from ..backbone import AgentBackbone, AgentShapesSpec
from .detector import DETECTORS, Detector
from .taps import recording


def __getattr__(name):  # the release helpers import the builder below: load them lazily
    if name in ("build_released_detector", "pretrained_detector"):
        from . import pretrained

        return getattr(pretrained, name)
    raise AttributeError(name)

__all__ = ["DETECTORS", "Detector", "build_detector", "recording", "build_released_detector", "pretrained_detector"]


def build_detector(kind: str = "mask_rcnn", backbone: str = "agent_pvt_tiny", num_classes: int = 80, *,
                   pretrained_backbone=None, strict: bool = True, agent_shapes: AgentShapesSpec = "official",
                   fpn_channels: int = 256, fc_channels: int = 1024, min_size: int = 800, max_size: int = 1333,
                   backbone_kwargs: Optional[Dict] = None, test_cfg: Optional[Dict[str, dict]] = None,
                   train_cfg: Optional[Dict[str, dict]] = None, **kwargs) -> Detector:
    """An official detector with an agent backbone + FPN.

    Args:
        kind: ``"mask_rcnn"``, ``"cascade_mask_rcnn"`` or ``"retinanet"``.
        backbone: hierarchical model name (``agent_pvt_tiny``, ``agent_swin_t`` …).
        num_classes: object classes, background excluded (COCO: 80).
        pretrained_backbone: classification checkpoint for the backbone (path or state dict).
        strict: the checkpoint must fit the classifier exactly.
        agent_shapes: per-stage agent grids (``"official"``: PVT 12-16-28-28, Swin 9-12-14-7).
        fpn_channels, fc_channels: FPN width (256) and box-head FC width (1024).
        min_size, max_size: the test/train resize (official 800 × 1333).
        backbone_kwargs: for ``timm.create_model`` (``drop_path_rate``, dims of tiny models …).
        test_cfg, train_cfg: overrides by part (``rpn``, ``rcnn``, ``head``), e.g.
            ``{"rcnn": {"score_thr": 0.05, "max_per_img": 100}}``.
        **kwargs: for :class:`Detector` (``with_mask``, ``anchor_scale``, ``rpn_smooth_l1_beta``, ``size_divisor``).
    """
    body = AgentBackbone(backbone, agent_shapes=agent_shapes, checkpoint=pretrained_backbone, strict=strict,
                         **(backbone_kwargs or {}))
    return Detector(kind, body, num_classes, fpn_channels=fpn_channels, fc_channels=fc_channels, min_size=min_size,
                    max_size=max_size, test_cfg=test_cfg, train_cfg=train_cfg, **kwargs)


def detector_backbone(model: nn.Module) -> AgentBackbone:
    """The :class:`AgentBackbone` inside a detector."""
    return model.backbone

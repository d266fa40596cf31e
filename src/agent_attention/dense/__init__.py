"""Dense prediction with agent backbones: the official detectors and segmenters.

* :func:`build_detector` — Mask R-CNN / Cascade Mask R-CNN / RetinaNet over an :class:`AgentBackbone`
  + FPN, computing what the official mmdet models compute (:mod:`~agent_attention.dense.detectors`);
* :func:`build_segmenter` — mmseg's Semantic FPN / UperNet over an :class:`AgentBackbone`
  (:mod:`~agent_attention.dense.seg_heads`);
* :mod:`~agent_attention.dense.releases` — the 20 released detection / segmentation checkpoints
  (weights: :mod:`~agent_attention.dense.pretrained`);
* :mod:`~agent_attention.dense.data` — the embedded shapes data set, COCO and ADE20K folders;
* :mod:`~agent_attention.dense.metrics` — COCO mAP (pycocotools) and mIoU;
* :mod:`~agent_attention.dense.recipe` — the yaml recipes of ``agent-attention train-det`` / ``train-seg``
  (:mod:`agent_attention.commands.train_det`, :mod:`agent_attention.commands.train_seg`).
"""
from __future__ import annotations

from .backbone import OFFICIAL_AGENT_SHAPES, AgentBackbone, parse_agent_shapes, set_agent_shapes
from .detectors import DETECTORS, Detector, build_detector
from .segmentation import SEGMENTERS, Segmenter, build_segmenter
from .releases import RELEASES, get_release
from .pretrained import pretrained_segmenter

__all__ = [
    "AgentBackbone", "OFFICIAL_AGENT_SHAPES", "parse_agent_shapes", "set_agent_shapes",
    "DETECTORS", "Detector", "build_detector", "SEGMENTERS", "Segmenter", "build_segmenter",
    "RELEASES", "get_release", "pretrained_segmenter",
]

"""Semantic segmentation over agent backbones: Semantic FPN and UperNet (spec §6.3).

* Semantic FPN (Kirillov et al., as mmseg's ``fpn_r50`` config): torchvision's
  ``FeaturePyramidNetwork`` (1×1 laterals, top-down sum, 3×3 output convs) and
  :class:`SemanticFPNHead` — per level ``max(1, log2(stride/4))`` conv3x3-BN-ReLU blocks, each
  followed by a 2× upsample, summed at 1/4 resolution;
* UperNet: segmentation-models-pytorch's ``UPerNetDecoder`` (PPM on the last stage + FPN fusion)
  plus mmseg's auxiliary FCN head on stage 3 (loss weight 0.4 in the official config).

Both are fed by an :class:`~agent_attention.dense.backbone.AgentBackbone`. :class:`Segmenter`
takes images in ``[0, 1]`` of any size (normalised inside, padded to a multiple of 32, logits
cropped back) and returns logits ``(B, num_classes, H, W)`` at the input size.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import AgentBackbone, AgentShapesSpec

SEGMENTERS = ("fpn", "upernet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["SEGMENTERS", "Segmenter", "SemanticFPNHead", "FCNAuxHead", "build_segmenter"]


class FCNAuxHead(nn.Module):
    """mmseg's ``FCNHead`` with one conv (the auxiliary head of UperNet): conv3x3-BN-ReLU, dropout, conv1x1."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(self.dropout(self.conv(x)))


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SemanticFPNHead(nn.Module):
    """FPN neck + mmseg's ``FPNHead``: every pyramid level is brought to 1/4 resolution and summed."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], pyramid_channels: int = 256,
                 channels: int = 128):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.fpn = FeaturePyramidNetwork(list(in_channels), pyramid_channels)
        self.scale_heads = nn.ModuleList()
        for s in strides:
            n = max(1, int(math.log2(s) - math.log2(strides[0])))
            layers: List[nn.Module] = []
            for k in range(n):
                layers.append(_conv_bn_relu(pyramid_channels if k == 0 else channels, channels))
                if s != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.out_channels = channels

    def forward(self, feats: List[Tensor]) -> Tensor:
        pyr = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
        out = self.scale_heads[0](pyr[0])
        for head, p in zip(self.scale_heads[1:], pyr[1:]):
            out = out + F.interpolate(head(p), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return out


class Segmenter(nn.Module):
    """Backbone + decoder + 1×1 classifier; see :func:`build_segmenter`."""

    def __init__(self, kind: str, backbone: AgentBackbone, num_classes: int, *, decoder_channels: int = 256,
                 segmentation_channels: int = 128, dropout: float = 0.1, aux_channels: Optional[int] = None,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if kind not in SEGMENTERS:
            raise ValueError(f"unknown segmentation head {kind!r}; choose one of {SEGMENTERS}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if len(backbone.out_channels) != 4 or backbone.strides != [4, 8, 16, 32]:
            raise ValueError(f"segmentation heads need 4 backbone maps at strides 4/8/16/32, got strides {backbone.strides}")
        self.kind, self.num_classes, self.backbone = kind, num_classes, backbone
        if kind == "fpn":
            self.decoder = SemanticFPNHead(backbone.out_channels, backbone.strides, decoder_channels, segmentation_channels)
        else:
            from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

            enc = [3, 0] + list(backbone.out_channels)  # smp's layout: input, (missing) stride 2, strides 4..32
            self.decoder = UPerNetDecoder(enc, encoder_depth=5, decoder_channels=decoder_channels)
        head_in = segmentation_channels if kind == "fpn" else decoder_channels
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_in, num_classes, 1)
        self.aux_head = FCNAuxHead(backbone.out_channels[2], num_classes, aux_channels) if aux_channels else None
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, with_aux: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Logits ``(B, K, H, W)`` for images ``(B, 3, H, W)`` in [0, 1]; ``with_aux`` also returns the aux logits."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Segmenter expects images (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
        H, W = images.shape[-2:]
        x = (images - self.image_mean) / self.image_std
        feats = self.backbone(x)  # padded to a multiple of 32 inside
        padded = (feats[0].shape[-2] * 4, feats[0].shape[-1] * 4)
        dec = self.decoder(feats) if self.kind == "fpn" else self.decoder([x, x[:, :0]] + feats)
        logits = self.classifier(self.dropout(dec))
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)[..., :H, :W]
        if not with_aux:
            return logits
        if self.aux_head is None:
            raise ValueError("this segmenter has no auxiliary head (build it with aux_channels)")
        aux = F.interpolate(self.aux_head(feats[2]), size=padded, mode="bilinear", align_corners=False)[..., :H, :W]
        return logits, aux


def build_segmenter(kind: str = "fpn", backbone: str = "agent_pvt_s", num_classes: int = 150, *,
                    pretrained_backbone=None, strict: bool = True, agent_shapes: AgentShapesSpec = "official",
                    decoder_channels: Optional[int] = None, segmentation_channels: int = 128,
                    aux_channels: Optional[int] = -1, dropout: float = 0.1,
                    backbone_kwargs: Optional[Dict] = None) -> Segmenter:
    """Semantic FPN (``"fpn"``) or UperNet (``"upernet"``) over an agent backbone.

    Args:
        decoder_channels: FPN pyramid width (256, mmseg's Semantic FPN) or UperNet width (512).
        segmentation_channels: Semantic FPN branch width (128).
        aux_channels: width of the auxiliary FCN head on stage 3; ``-1`` = official (256 for UperNet,
            none for FPN); ``None``/``0`` = no auxiliary head.
        Others as :func:`~agent_attention.dense.detection.build_detector`.
    """
    if kind not in SEGMENTERS:
        raise ValueError(f"unknown segmentation head {kind!r}; choose one of {SEGMENTERS}")
    if decoder_channels is None:
        decoder_channels = 256 if kind == "fpn" else 512
    if aux_channels == -1:
        aux_channels = 256 if kind == "upernet" else None
    body = AgentBackbone(backbone, agent_shapes=agent_shapes, checkpoint=pretrained_backbone, strict=strict,
                         **(backbone_kwargs or {}))
    return Segmenter(kind, body, num_classes, decoder_channels=decoder_channels,
                     segmentation_channels=segmentation_channels, dropout=dropout, aux_channels=aux_channels or None)

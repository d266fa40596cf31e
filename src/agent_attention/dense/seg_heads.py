"""The official segmentation heads (mmsegmentation 0.28, as the released Agent Attention models
use them), with mmseg's module names so that the released checkpoints load with ``strict=True``.

* :class:`ConvModule` — mmcv's ``ConvModule`` as these configs build it: conv (no bias) + BN + ReLU;
* :class:`FPNNeck` — mmseg's ``FPN`` neck (1×1 laterals, nearest top-down sum, 3×3 outputs), which
  is exactly torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` (used as is; only the
  key names differ, see :func:`fpn_neck_key`);
* :class:`FPNHead` — Semantic FPN's head: per level ``max(1, log2(stride / 4))`` ConvModules, each
  followed by a 2× bilinear upsample, summed at 1/4 resolution;
* :class:`UPerHead` — PPM on the last level (adaptive average pools 1, 2, 3, 6), FPN fusion with
  bilinear resizes, concatenation of the four levels and a 3×3 bottleneck;
* :class:`FCNHead` — the auxiliary head of UperNet (one ConvModule on stage 3).

Every head ends with mmseg's ``cls_seg``: ``Dropout2d`` then a 1×1 ``conv_seg``. Resizes use
``align_corners=False`` as every official config. Written here because no library head computes
exactly these (smp's UperNet adds norms and differs in fusion; torchvision has none of them).
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork

__all__ = ["ConvModule", "FPNNeck", "FPNHead", "UPerHead", "FCNHead", "fpn_neck_key"]


def resize(x: Tensor, size) -> Tensor:
    """mmseg's ``resize`` as the configs call it: bilinear, ``align_corners=False``."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Sequential):
    """``conv`` (bias-free, as mmcv's ``bias='auto'`` with a norm) → ``bn`` → ``activate`` (ReLU)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0):
        super().__init__(OrderedDict(conv=nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=False),
                                     bn=nn.BatchNorm2d(cout), activate=nn.ReLU(inplace=True)))


class _DecodeHead(nn.Module):
    """mmseg's ``BaseDecodeHead.cls_seg``: dropout, then the 1×1 classifier ``conv_seg``."""

    def _init_cls(self, channels: int, num_classes: int, dropout: float) -> None:
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.channels, self.num_classes = channels, num_classes

    def cls_seg(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(x))


class FPNNeck(FeaturePyramidNetwork):
    """mmseg's ``FPN(in_channels, out_channels, num_outs=len(in_channels))`` neck; lists in and out."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__(list(in_channels), out_channels)
        self.out_channels = out_channels

    def forward(self, feats: List[Tensor]) -> List[Tensor]:  # type: ignore[override]
        return list(super().forward(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())


def fpn_neck_key(key: str) -> str:
    """Our key of an mmseg / mmdet FPN neck entry (``lateral_convs.i.conv.weight`` →
    ``inner_blocks.i.0.weight``, ``fpn_convs.i.conv.*`` → ``layer_blocks.i.0.*``)."""
    m = re.fullmatch(r"(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)", key)
    if m is None:
        raise ValueError(f"not an FPN neck key: {key!r}")
    return f"{'inner_blocks' if m[1] == 'lateral_convs' else 'layer_blocks'}.{m[2]}.0.{m[3]}"


class _Upsample2x(nn.Module):
    """mmseg's ``Upsample(scale_factor=2)``: bilinear resize to twice the size."""

    def forward(self, x: Tensor) -> Tensor:
        return resize(x, (2 * x.shape[-2], 2 * x.shape[-1]))


class FPNHead(_DecodeHead):
    """Semantic FPN head (``scale_heads`` + ``conv_seg``)."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int] = (4, 8, 16, 32), channels: int = 128,
                 num_classes: int = 150, dropout: float = 0.1):
        super().__init__()
        if len(in_channels) != len(strides) or min(strides) != strides[0]:
            raise ValueError(f"FPNHead: one stride per input, finest first (got {list(strides)} for {len(in_channels)} inputs)")
        self.scale_heads = nn.ModuleList()
        for cin, s in zip(in_channels, strides):
            layers: List[nn.Module] = []
            for k in range(max(1, int(math.log2(s) - math.log2(strides[0])))):
                layers.append(ConvModule(cin if k == 0 else channels, channels, 3, padding=1))
                if s != strides[0]:
                    layers.append(_Upsample2x())
            self.scale_heads.append(nn.Sequential(*layers))
        self._init_cls(channels, num_classes, dropout)

    def forward(self, feats: List[Tensor]) -> Tensor:
        out = self.scale_heads[0](feats[0])
        for head, f in zip(self.scale_heads[1:], feats[1:]):
            out = out + resize(head(f), out.shape[2:])
        return self.cls_seg(out)


class UPerHead(_DecodeHead):
    """UperNet head: ``psp_modules`` + ``bottleneck`` on the last level, ``lateral_convs`` /
    ``fpn_convs`` on the others, ``fpn_bottleneck`` on the concatenation, ``conv_seg``."""

    def __init__(self, in_channels: Sequence[int], channels: int = 512, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 num_classes: int = 150, dropout: float = 0.1):
        super().__init__()
        in_channels = list(in_channels)
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1))
                                         for s in pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self._init_cls(channels, num_classes, dropout)

    def psp_forward(self, x: Tensor) -> Tensor:
        outs = [x] + [resize(ppm(x), x.shape[2:]) for ppm in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: List[Tensor]) -> Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.psp_forward(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_DecodeHead):
    """mmseg's ``FCNHead`` (``concat_input=False``): ``convs`` (``num_convs`` ConvModules), ``conv_seg``."""

    def __init__(self, in_channels: int, channels: int = 256, num_convs: int = 1, num_classes: int = 150,
                 dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(*(ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(num_convs)))
        self._init_cls(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls_seg(self.convs(x))

"""The official FPN (mmdet ``FPN``) as torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork`.

torchvision's FPN is the same computation (1×1 laterals, nearest top-down sum, 3×3 outputs); the
extra levels differ: Mask R-CNN's P6 is torchvision's ``LastLevelMaxPool`` (max-pool, kernel 1,
stride 2, as mmdet), RetinaNet's ``add_extra_convs='on_input'`` is P6 = conv(C5), P7 = conv(P6)
*without* the ReLU that torchvision's ``LastLevelP6P7`` puts before P7, hence :class:`ExtraConvs`.
Official keys map as ``lateral_convs.i.conv`` ↔ ``inner_blocks.i.0``, ``fpn_convs.i.conv`` ↔
``layer_blocks.i.0`` (``i`` < number of inputs) or ``extra_blocks.convs.j``.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Sequence

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

__all__ = ["FPN", "ExtraConvs"]


class ExtraConvs(ExtraFPNBlock):
    """mmdet's extra 3×3 stride-2 convs on the last backbone input (``on_input``), no ReLU between."""

    def __init__(self, in_channels: int, out_channels: int, num: int = 2):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, 2, 1)
                                    for i in range(num)])

    def forward(self, results: List[Tensor], x: List[Tensor], names: List[str]):
        out = x[-1]
        for i, conv in enumerate(self.convs):
            out = conv(out)
            results.append(out)
            names.append(f"p{len(names)}")
        return results, names


class FPN(nn.Module):
    """FPN over ``in_channels`` maps with ``num_outs`` outputs (extra levels: ``"pool"`` or ``"on_input"``)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 5, extra: str = "pool"):
        super().__init__()
        n_extra = num_outs - len(in_channels)
        if extra == "pool":
            if n_extra != 1:
                raise ValueError("extra='pool' adds exactly one level")
            block = LastLevelMaxPool()
        elif extra == "on_input":
            block = ExtraConvs(in_channels[-1], out_channels, n_extra)
        else:
            raise ValueError(f"unknown FPN extra levels {extra!r}")
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=block)
        for m in self.modules():  # mmdet's FPN init: xavier uniform, zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.num_inputs, self.out_channels, self.num_outs = len(in_channels), out_channels, num_outs

    def forward(self, feats: Sequence[Tensor]) -> List[Tensor]:
        return list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())

    def official_to_ours(self, key: str) -> str:
        """An official ``neck.*`` key (without ``neck.``) -> this module's key."""
        m = re.fullmatch(r"(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)", key)
        if not m:
            return key
        kind, i, leaf = m.group(1), int(m.group(2)), m.group(3)
        if kind == "lateral_convs":
            return f"fpn.inner_blocks.{i}.0.{leaf}"
        if i < self.num_inputs:
            return f"fpn.layer_blocks.{i}.0.{leaf}"
        return f"fpn.extra_blocks.convs.{i - self.num_inputs}.{leaf}"

    def map_official(self, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {self.official_to_ours(k): v for k, v in state.items()}

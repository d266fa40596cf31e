"""mmdet's anchor generator (``AnchorGenerator`` of mmdet 2.x, v2 anchors).

Written here rather than taken from torchvision because the computation differs: torchvision rounds
the base anchors to integers and orders the anchors of a location scale-major by aspect ratio in
another layout; mmdet keeps them fractional, centres them on ``stride · (x, y)`` (``center_offset``
0) and orders them ratio-major (``ratios × scales``), which is the order of the heads' output
channels in the released checkpoints.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["AnchorGenerator"]


class AnchorGenerator:
    """Anchors of every feature level, ``(H·W·A, 4)`` xyxy per level, location-major.

    Args:
        strides: stride of each level (also the base anchor size, as mmdet).
        ratios: aspect ratios h/w.
        scales: anchor scales (multiples of the base size); or give ``octave_base_scale`` and
            ``scales_per_octave`` (RetinaNet: ``4 · 2^{i/3}``).
    """

    def __init__(self, strides: Sequence[int], ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 scales: Optional[Sequence[float]] = None, octave_base_scale: Optional[float] = None,
                 scales_per_octave: Optional[int] = None):
        if scales is None:
            if octave_base_scale is None or scales_per_octave is None:
                raise ValueError("give scales, or octave_base_scale and scales_per_octave")
            scales = [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        self.strides = [int(s) for s in strides]
        self.ratios = torch.tensor([float(r) for r in ratios])
        self.scales = torch.tensor([float(s) for s in scales])
        self.base_anchors = [self._base(s) for s in self.strides]

    @property
    def num_anchors(self) -> int:
        """Anchors per location."""
        return len(self.ratios) * len(self.scales)

    def _base(self, size: int) -> Tensor:
        h_ratios = torch.sqrt(self.ratios)
        w_ratios = 1 / h_ratios
        ws = (size * w_ratios[:, None] * self.scales[None, :]).reshape(-1)
        hs = (size * h_ratios[:, None] * self.scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def grid_anchors(self, sizes: Sequence[Tuple[int, int]], device=None) -> List[Tensor]:
        """Anchors for feature maps of the given ``(H, W)`` sizes, one ``(H·W·A, 4)`` tensor per level."""
        if len(sizes) != len(self.strides):
            raise ValueError(f"{len(sizes)} feature maps for {len(self.strides)} anchor levels")
        out = []
        for (h, w), stride, base in zip(sizes, self.strides, self.base_anchors):
            sx = torch.arange(0, w, device=device) * stride
            sy = torch.arange(0, h, device=device) * stride
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).to(base.dtype)
            out.append((base.to(device)[None, :, :] + shifts[:, None, :]).reshape(-1, 4))
        return out

    def valid_flags(self, sizes: Sequence[Tuple[int, int]], pad_shape: Tuple[int, int], device=None) -> List[Tensor]:
        """mmdet's valid flags: anchors of locations inside the un-padded part of each map."""
        out = []
        for (h, w), stride in zip(sizes, self.strides):
            vh = min(int(-(-pad_shape[0] // stride)), h)
            vw = min(int(-(-pad_shape[1] // stride)), w)
            vx = torch.zeros(w, dtype=torch.bool, device=device)
            vy = torch.zeros(h, dtype=torch.bool, device=device)
            vx[:vw] = True
            vy[:vh] = True
            yy, xx = torch.meshgrid(vy, vx, indexing="ij")
            valid = (xx & yy).reshape(-1)
            out.append(valid[:, None].expand(valid.numel(), self.num_anchors).reshape(-1))
        return out

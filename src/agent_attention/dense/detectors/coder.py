"""mmdet's ``DeltaXYWHBBoxCoder`` (mmdet 2.x ``bbox2delta`` / ``delta2bbox``).

torchvision's ``BoxCoder`` has weights (the inverse of mmdet's stds) but no means, a different
clamp (``log(1000/16)`` on the scaled deltas only) and no clipping to the image, and it decodes with
``±0.5·w`` around the centre the same way; the differences in the clamp and clipping change the
boxes, so the official coder is written here.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["DeltaXYWHCoder"]


class DeltaXYWHCoder:
    """Encode/decode box deltas ``(dx, dy, dw, dh)`` normalised by ``means`` / ``stds``."""

    def __init__(self, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0), stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 wh_ratio_clip: float = 16 / 1000, clip_border: bool = True):
        self.means, self.stds = tuple(float(m) for m in means), tuple(float(s) for s in stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))
        self.clip_border = clip_border

    def encode(self, boxes: Tensor, gt: Tensor) -> Tensor:
        """Deltas that take ``boxes`` (N, 4) to ``gt`` (N, 4)."""
        boxes, gt = boxes.float(), gt.float()
        px, py = (boxes[..., 0] + boxes[..., 2]) * 0.5, (boxes[..., 1] + boxes[..., 3]) * 0.5
        pw, ph = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        gx, gy = (gt[..., 0] + gt[..., 2]) * 0.5, (gt[..., 1] + gt[..., 3]) * 0.5
        gw, gh = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, boxes: Tensor, deltas: Tensor, max_shape: Optional[Tuple[int, int]] = None) -> Tensor:
        """Boxes ``(N, 4·C)`` from ``boxes`` (N, 4) and ``deltas`` (N, 4·C), clipped to ``max_shape`` (H, W)."""
        n, c = deltas.shape[0], deltas.shape[1] // 4
        if n == 0:
            return deltas
        d = deltas.reshape(-1, 4) * deltas.new_tensor(self.stds).view(1, -1) + deltas.new_tensor(self.means).view(1, -1)
        rois = boxes.repeat(1, c).reshape(-1, 4)
        pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
        pwh = rois[:, 2:] - rois[:, :2]
        gxy = pxy + pwh * d[:, :2]
        gwh = pwh * d[:, 2:].clamp(min=-self.max_ratio, max=self.max_ratio).exp()
        out = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if self.clip_border and max_shape is not None:
            out = torch.stack([out[:, 0].clamp(0, max_shape[1]), out[:, 1].clamp(0, max_shape[0]),
                               out[:, 2].clamp(0, max_shape[1]), out[:, 3].clamp(0, max_shape[0])], dim=-1)
        return out.reshape(n, -1)

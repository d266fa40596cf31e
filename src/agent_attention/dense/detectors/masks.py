"""mmdet's mask pasting (``FCNMaskHead.get_seg_masks`` / ``_do_paste_mask``, CPU path).

Each 28×28 probability map is sampled with ``grid_sample`` (``align_corners=False``) at the pixel
centres of its box's region (the box grown by one pixel, clipped), then thresholded ``>= thr``.
torchvision's ``paste_masks_in_image`` instead pads the map by one cell, scales the box and
resizes with ``interpolate``: different pixels, so the official rule is written here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["paste_masks"]


def paste_masks(probs: Tensor, boxes: Tensor, img_h: int, img_w: int, threshold: float = 0.5) -> Tensor:
    """``probs`` (N, h, w) in [0, 1], ``boxes`` (N, 4) in image pixels -> bool ``(N, img_h, img_w)``
    (``threshold < 0``: the probabilities, float)."""
    n = probs.shape[0]
    binary = threshold >= 0
    out = torch.zeros(n, img_h, img_w, dtype=torch.bool if binary else torch.float32, device=probs.device)
    for i in range(n):
        b = boxes[i:i + 1].float()
        x0i, y0i = torch.clamp(b.min(dim=0).values.floor()[:2] - 1, min=0).to(torch.int32).tolist()
        x1i = int(torch.clamp(b[:, 2].max().ceil() + 1, max=img_w).to(torch.int32))
        y1i = int(torch.clamp(b[:, 3].max().ceil() + 1, max=img_h).to(torch.int32))
        if x1i <= x0i or y1i <= y0i:
            continue
        x0, y0, x1, y1 = torch.split(b, 1, dim=1)
        ys = torch.arange(y0i, y1i, device=probs.device).to(torch.float32) + 0.5
        xs = torch.arange(x0i, x1i, device=probs.device).to(torch.float32) + 0.5
        ys = (ys - y0) / (y1 - y0) * 2 - 1
        xs = (xs - x0) / (x1 - x0) * 2 - 1
        xs = torch.where(torch.isinf(xs), torch.zeros_like(xs), xs)
        ys = torch.where(torch.isinf(ys), torch.zeros_like(ys), ys)
        gx = xs[:, None, :].expand(1, ys.size(1), xs.size(1))
        gy = ys[:, :, None].expand(1, ys.size(1), xs.size(1))
        m = F.grid_sample(probs[i:i + 1, None].float(), torch.stack([gx, gy], dim=3), align_corners=False)[0, 0]
        out[i, y0i:y1i, x0i:x1i] = (m >= threshold) if binary else m
    return out

"""Resizing of learned grids: position embeddings, row/column agent biases and Swin's relative
position tables, at run time (another input size) and in ``checkpoint_filter_fn`` (another
construction size)."""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from timm.models import register_notrace_function
from torch import Tensor, nn

from .._grids import HW
from ..layers import resize_1d

__all__ = ["AGENT_BIAS_AXES", "resize_pos_embed", "infer_square_grid", "resize_agent_bias", "resize_agent_bias_tables",
           "resize_rel_pos_table"]

#: agent-bias parameters whose spatial axis follows the construction grid: name -> resized dim
AGENT_BIAS_AXES = {"ah_bias": 3, "aw_bias": 4, "ha_bias": 2, "wa_bias": 3}


@register_notrace_function  # FX: a leaf (branches on the grid sizes)
def resize_pos_embed(pos: Tensor, old_hw: HW, new_hw: HW, num_prefix: int = 0, mode: str = "bicubic") -> Tensor:
    """Resize a ``(1, P + H·W, C)`` position embedding from grid ``old_hw`` to ``new_hw``.

    Prefix tokens are kept. Identity (the same tensor) when the grids are equal. The dtype is kept
    (float64 models stay float64). ``mode``: ``"bicubic"`` (timm / official fine-tuning) or
    ``"bilinear"`` (the official PVT run-time resize).
    """
    old_hw, new_hw = tuple(old_hw), tuple(new_hw)
    if not torch.compiler.is_compiling() and old_hw == new_hw:
        return pos  # (exporting with a dynamic size: always resize, which is the identity at equal grids)
    if pos.shape[1] != num_prefix + old_hw[0] * old_hw[1]:
        raise ValueError(f"pos_embed has {pos.shape[1]} tokens, expected {num_prefix} + {old_hw[0]}x{old_hw[1]}")
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    C = grid.shape[-1]
    grid = grid.reshape(1, *old_hw, C).permute(0, 3, 1, 2)
    extra = dict(antialias=True) if mode == "bicubic" else {}
    grid = F.interpolate(grid, size=new_hw, mode=mode, align_corners=False, **extra)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], C)
    return torch.cat([prefix, grid], dim=1) if num_prefix else grid


def infer_square_grid(n: int, what: str) -> HW:
    s = math.isqrt(n)
    if s * s != n:
        raise ValueError(f"cannot infer the grid of {what}: {n} tokens is not a square; resize it yourself")
    return s, s


def resize_agent_bias(key: str, value: Tensor, target: Tensor, *, strict: bool = False) -> Tensor:
    """Resize a checkpoint's row/column agent bias (``ah/aw/ha/wa_bias``) to the model's grid.

    Linear interpolation along the spatial axis (as the official fine-tuning loader), computed in
    at least float32 and returned in ``value``'s dtype. Other entries are returned unchanged, and
    so are other shape mismatches (``load_state_dict`` reports them) unless ``strict``, which
    raises a ValueError for them.
    """
    leaf = key.rsplit(".", 1)[-1]
    dim = AGENT_BIAS_AXES.get(leaf)
    if dim is None or value.shape == target.shape or value.dim() != target.dim():
        return value
    if any(a != b for i, (a, b) in enumerate(zip(value.shape, target.shape)) if i != dim):
        if strict:
            raise ValueError(
                f"incompatible checkpoint: {key} has shape {tuple(value.shape)}, model {tuple(target.shape)}"
            )
        return value
    work = value.to(torch.promote_types(value.dtype, torch.float32))
    return resize_1d(work, target.shape[dim], dim=dim).to(value.dtype)


def resize_agent_bias_tables(state_dict: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Resize the row/column agent biases of ``state_dict`` (in place) to ``model``'s shapes with
    :func:`resize_agent_bias`; a mismatch along another axis raises a ValueError."""
    own = model.state_dict()
    for k, v in state_dict.items():
        if k in own:
            state_dict[k] = resize_agent_bias(k, v, own[k], strict=True)
    return state_dict


def resize_rel_pos_table(value: Tensor, target_shape: torch.Size) -> Tensor:
    """Bicubic resize of a Swin relative position bias table ``((2w-1)², h)`` to ``((2w'-1)², h)``."""
    if value.shape == target_shape or value.dim() != 2 or value.shape[1] != target_shape[1]:
        return value
    s0, s1 = math.isqrt(value.shape[0]), math.isqrt(target_shape[0])
    if s0 * s0 != value.shape[0] or s1 * s1 != target_shape[0]:
        return value
    t = value.float().t().reshape(1, -1, s0, s0)
    t = F.interpolate(t, size=(s1, s1), mode="bicubic", align_corners=False)
    return t.reshape(-1, s1 * s1).t().contiguous().to(value.dtype)

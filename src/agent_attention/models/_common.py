"""Helpers shared by the Agent-Swin and Agent-CSWin model files.

Config parsing (``agent_num``, ``attn_type``), window partition with padding, the official
LayerNorm, and the pieces of ``checkpoint_filter_fn`` that both families need.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import resize_1d

HW = Tuple[int, int]

#: agent-bias parameters whose spatial axis follows the construction grid: name -> resized dim
AGENT_BIAS_AXES = {"ah_bias": 3, "aw_bias": 4, "ha_bias": 2, "wa_bias": 3}


def resolve_norm_layer(norm_layer) -> Callable[..., nn.Module]:
    """``None`` / ``"LayerNorm"`` (as the manifests spell it) -> ``nn.LayerNorm`` with eps 1e-5."""
    if norm_layer is None or (isinstance(norm_layer, str) and norm_layer.lower() in ("layernorm", "ln")):
        return partial(nn.LayerNorm, eps=1e-5)
    if isinstance(norm_layer, str):
        raise ValueError(f"unknown norm_layer {norm_layer!r}; pass 'LayerNorm' or a callable")
    return norm_layer


def img_size_2d(img_size) -> HW:
    """``224`` or ``(224, 160)`` -> ``(H, W)``."""
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    try:
        H, W = (int(s) for s in img_size)
    except (TypeError, ValueError):
        raise ValueError(f"img_size must be an int or a pair (H, W), got {img_size!r}") from None
    if H <= 0 or W <= 0:
        raise ValueError(f"img_size must be positive, got {(H, W)}")
    return H, W


def parse_int_list(value, num: int, what: str) -> List[int]:
    """An int, a ``'a-b-c-d'`` string or a sequence of ints/strings -> ``num`` positive ints."""
    if isinstance(value, str):
        value = value.split("-")
    elif isinstance(value, int):
        value = [value] * num
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or {num} ints, got {value!r}") from None
    if len(out) != num or any(v <= 0 for v in out):
        raise ValueError(f"{what} must have {num} positive entries (one per stage), got {value!r}")
    return out


def parse_attn_type(attn_type: str, depths: Sequence[int]) -> List[List[bool]]:
    """Per stage, per block: ``True`` for agent attention.

    One letter per stage: ``'A'`` agent, ``'B'`` the family's own attention, ``'M'`` mixed, where the
    integer after the letters (``'AAMB2'``) is how many leading blocks of an ``'M'`` stage are agent
    blocks.
    """
    n = len(depths)
    if not isinstance(attn_type, str) or len(attn_type) < n:
        raise ValueError(f"attn_type must be a string with one letter per stage ({n}), got {attn_type!r}")
    letters, rest = attn_type[:n].upper(), attn_type[n:]
    if any(c not in "ABM" for c in letters):
        raise ValueError(f"attn_type letters must be A (agent), B (original) or M (mixed), got {attn_type!r}")
    mixed = 0
    if "M" in letters or rest:
        if not re.fullmatch(r"\d+", rest):
            raise ValueError(f"attn_type {attn_type!r}: an 'M' stage needs the agent block count after the letters, e.g. 'AAMB2'")
        mixed = int(rest)
    plan = []
    for c, d in zip(letters, depths):
        if c == "M" and mixed > d:
            raise ValueError(f"attn_type {attn_type!r}: {mixed} agent blocks requested in a stage of depth {d}")
        plan.append([c == "A" or (c == "M" and j < mixed) for j in range(d)])
    return plan


def pad_hw(x: Tensor, mult: HW) -> Tensor:
    """Zero-pad ``x (B, H, W, C)`` at the bottom/right to multiples of ``mult``."""
    H, W = x.shape[1:3]
    ph, pw = (-H) % mult[0], (-W) % mult[1]
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    return x


def window_partition(x: Tensor, window: HW) -> Tensor:
    """``(B, H, W, C)`` -> ``(B·nW, wh·ww, C)``; windows by (row-block, col-block), tokens row-major."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: Tensor, window: HW, hw: HW) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B·nW, wh·ww, C)`` -> ``(B, H, W, C)``."""
    wh, ww = window
    H, W = hw
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def padding_mask(hw: HW, padded: HW, window: HW, device=None) -> Optional[Tensor]:
    """Bool ``(nW, wh·ww)``: ``True`` on the padded tokens of each window, or ``None`` without padding."""
    if tuple(hw) == tuple(padded):
        return None
    m = torch.ones(1, *padded, 1, dtype=torch.bool, device=device)
    m[:, : hw[0], : hw[1]] = False
    return window_partition(m, window)[..., 0]


def unwrap_state_dict(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Take the weights out of a training checkpoint and strip DDP's ``module.`` prefix.

    Accepts the dicts written by the official scripts (``model``, ``model_ema``, ``state_dict_ema``,
    ``state_dict``) or a bare state dict.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"checkpoint must be a dict of tensors, got {type(state_dict).__name__}")
    for key in ("model", "model_ema", "state_dict_ema", "state_dict"):
        inner = state_dict.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            state_dict = inner
            break
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, Tensor):
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def resize_agent_bias(key: str, value: Tensor, target: Tensor) -> Tensor:
    """Resize a checkpoint's row/column agent bias (``ah/aw/ha/wa_bias``) to the model's grid.

    Linear interpolation along the spatial axis (as the official fine-tuning loader); other
    shape mismatches are returned unchanged so that ``load_state_dict`` reports them.
    """
    leaf = key.rsplit(".", 1)[-1]
    dim = AGENT_BIAS_AXES.get(leaf)
    if dim is None or value.shape == target.shape or value.dim() != target.dim():
        return value
    same_elsewhere = all(a == b for i, (a, b) in enumerate(zip(value.shape, target.shape)) if i != dim)
    if not same_elsewhere:
        return value
    return resize_1d(value.float(), target.shape[dim], dim=dim).to(value.dtype)


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


def take_indices(num: int, indices) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices`` with a ValueError instead of an assert."""
    from timm.models._features import feature_take_indices

    try:
        return feature_take_indices(num, indices)
    except (AssertionError, RuntimeError) as e:
        raise ValueError(f"invalid feature indices {indices!r} for {num} stages: {e}") from None


def to_nchw(x: Tensor, hw: HW) -> Tensor:
    """Tokens ``(B, H·W, C)`` -> ``(B, C, H, W)``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw).contiguous()


def check_image(x: Tensor, in_chans: int, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: input must be a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{name}: expected an image batch (B, {in_chans}, H, W), got {tuple(x.shape)}")


__all__ = [
    "AGENT_BIAS_AXES", "resolve_norm_layer", "img_size_2d", "parse_int_list", "parse_attn_type", "pad_hw",
    "window_partition", "window_reverse", "padding_mask", "unwrap_state_dict", "resize_agent_bias",
    "resize_rel_pos_table", "take_indices", "to_nchw", "check_image",
]

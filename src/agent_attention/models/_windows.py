"""Window geometry shared by Agent-Swin and Agent-CSWin, and Swin's window attention (W-MSA).

Partition / reverse of ``(B, H, W, C)`` maps into windows (with bottom/right zero padding), the
relative position index of a window, the shifted-window mask and the padded-token masks.

Every size test goes through :func:`same_size`, which is ``True`` only when the sizes are
provably equal: with symbolic sizes (``torch.export`` with a dynamic H×W) the general
branch runs (a zero-width pad, an all-zero mask), so the exported graph holds no size guard.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import register_notrace_function
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .._grids import HW, round_up

__all__ = ["known_true", "same_size", "pad_to", "pad_hw", "window_partition", "window_reverse", "relative_position_index", "shifted_window_mask",
           "window_padding_mask", "WindowAttention"]


def known_true(cond) -> bool:
    """``cond`` if it is a bool; for a symbolic condition, whether it holds for every value of the
    sizes; ``False`` for anything else (an FX proxy)."""
    if isinstance(cond, bool):
        return cond
    return isinstance(cond, torch.SymBool) and statically_known_true(cond)


def same_size(a, b) -> bool:
    """``a == b`` (ints or tuples of ints) when it holds for every value of symbolic sizes, else False."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(known_true(x == y) for x, y in zip(a, b))


@register_notrace_function  # FX: a leaf (the padding depends on the map size)
def pad_to(x: Tensor, size: HW) -> Tensor:
    """Zero-pad ``x (B, H, W, C)`` at the bottom/right to ``size`` (no smaller than ``H, W``)."""
    H, W = x.shape[1:3]
    if same_size(size, (H, W)):
        return x
    return F.pad(x, (0, 0, 0, size[1] - W, 0, size[0] - H))  # symbolic sizes: always (a zero-width pad is a copy)


def pad_hw(x: Tensor, mult: HW) -> Tensor:
    """Zero-pad ``x (B, H, W, C)`` at the bottom/right to multiples of ``mult``."""
    return pad_to(x, (round_up(x.shape[1], mult[0]), round_up(x.shape[2], mult[1])))


def window_partition(x: Tensor, window: HW) -> Tensor:
    """``(B, H, W, C)`` -> ``(B·nW, wh·ww, C)``; windows by (row-block, col-block), tokens row-major."""
    B, H, W, C = x.shape
    wh, ww = window
    nh, nw = H // wh, W // ww
    x = x.view(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5)
    # an explicit copy, then a view with no -1: under a dynamic export neither branches on nh/nw == 1
    return _packed(x).view(B * nh * nw, wh * ww, C)


def window_reverse(windows: Tensor, window: HW, hw: HW) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B·nW, wh·ww, C)`` -> ``(B, H, W, C)``."""
    wh, ww = window
    H, W = hw
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return _packed(x).view(-1, H, W, C)


def _packed(x: Tensor) -> Tensor:
    """A contiguous copy of a permuted view (``reshape`` would first test whether a view is possible)."""
    return x.clone(memory_format=torch.contiguous_format)


def relative_position_index(window: HW, table_window: int) -> Tensor:
    """Index ``(wh·ww, wh·ww)`` into a ``((2s-1)², h)`` relative position table (``s = table_window``)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (table_window - 1)
    return rel[..., 0] * (2 * table_window - 1) + rel[..., 1]


def _pad_flags(hw: HW, padded: HW, shift: HW, device, dtype) -> Tensor:
    """``(1, Hp, Wp, 1)``: 1 on the padding of an ``hw`` map, in the frame rolled by ``-shift``."""
    m = torch.ones(1, *padded, 1, dtype=dtype, device=device)
    m[:, : hw[0], : hw[1]] = 0
    return torch.roll(m, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else m


def shifted_window_mask(hw: HW, padded: HW, window: HW, shift: HW, device=None) -> Optional[Tensor]:
    """Additive mask ``(nW, N, N)`` (0 / -100) of the shifted-window scheme, or ``None`` if not needed.

    Tokens of different regions of the rolled map (standard Swin labelling) may not attend to each
    other, and no token attends to the padding added at the bottom/right of an ``hw`` map.
    """
    padding = not same_size(hw, padded)
    if not any(shift) and not padding:
        return None
    label = torch.zeros(1, *padded, 1, device=device)

    def slices(w, s):
        return (slice(0, -w), slice(-w, -s), slice(-s, None)) if s else (slice(None),)

    cnt = 0
    for hs in slices(window[0], shift[0]):
        for ws in slices(window[1], shift[1]):
            label[:, hs, ws, :] = cnt
            cnt += 1
    if padding:
        label = label * 2 + _pad_flags(hw, padded, shift, device, label.dtype)
    m = window_partition(label, window).squeeze(-1)
    m = m.unsqueeze(1) - m.unsqueeze(2)
    return m.masked_fill(m != 0, float(-100.0)).masked_fill(m == 0, float(0.0))


def window_padding_mask(hw: HW, padded: HW, window: HW, shift: HW = (0, 0), device=None) -> Optional[Tensor]:
    """Bool ``(nW, wh·ww)``: ``True`` on padded tokens of each window (rolled by ``-shift``), or ``None``."""
    if same_size(hw, padded):
        return None
    return window_partition(_pad_flags(hw, padded, shift, device, torch.bool), window)[..., 0]


class WindowAttention(nn.Module):
    """Swin W-MSA: softmax attention in windows with a learned relative position bias (SDPA)."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index((window_size,) * 2, window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._index_cache: Dict[tuple, Tensor] = {}

    def position_bias(self, window: HW) -> Tensor:
        """Relative position bias ``(h, N, N)`` for a ``window`` no larger than the table's."""
        idx = self.relative_position_index
        if not same_size(window, (self.window_size, self.window_size)):
            if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
                # no caching: inference tensors cannot be used by autograd later; sizes may be symbolic
                idx = relative_position_index(window, self.window_size).to(idx.device)
            else:
                key = (tuple(window), idx.device)
                if key not in self._index_cache:
                    self._index_cache[key] = relative_position_index(window, self.window_size).to(idx.device)
                idx = self._index_cache[key]
        N = window[0] * window[1]
        return self.relative_position_bias_table[idx.reshape(-1)].view(N, N, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, window: HW, mask: Optional[Tensor] = None, images: Optional[int] = None) -> Tensor:
        """``x (B·nW, N, C)`` windows of size ``window``; ``mask (nW, N, N)`` additive or ``None``;
        ``images`` = ``B`` when known (spares a symbolic division under ``torch.export``)."""
        B_, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.position_bias(window).unsqueeze(0)
        if mask is not None:  # windows of one image side by side as extra heads: the mask broadcasts
            nW = mask.shape[0]
            bias = (bias + mask.unsqueeze(1).to(bias.dtype)).reshape(1, nW * h, N, N)
            b = B_ // nW if images is None else images
            q, k, v = (t.reshape(b, nW * h, N, C // h) for t in (q, k, v))
            if images is not None:  # an explicit expand: SDPA's broadcast would guard images != 1 under export
                bias = bias.expand(images, -1, -1, -1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        out = out.reshape(B_, h, N, C // h).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(out))

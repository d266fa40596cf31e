"""Token-grid helpers of :class:`~agent_attention.layers.AgentAttention`: resizing the learned agent
biases to the actual grid, and pooling the agent tokens from the queries.

They are public through :mod:`agent_attention.layers` (the model zoo's checkpoint filters and the
downstream backbones resize official bias tables with them).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

HW = Tuple[int, int]


def to_2tuple_hw(hw, what: str = "hw") -> HW:
    """Validate a grid size ``(H, W)`` and return it as a tuple of two positive ints."""
    if isinstance(hw, int):
        hw = (hw, hw)
    try:
        H, W = (int(s) for s in hw)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a pair of ints (H, W), got {hw!r}") from None
    if H <= 0 or W <= 0:
        raise ValueError(f"{what} must be positive, got {(H, W)}")
    return H, W


def resize_1d(t: Tensor, size: int, dim: int) -> Tensor:
    """Linear resize (``align_corners=False``) of ``t`` along ``dim``; identity when the size matches."""
    if t.shape[dim] == size:
        return t
    t = t.movedim(dim, -1)
    lead = t.shape[:-1]
    out = F.interpolate(t.reshape(1, -1, t.shape[-1]), size=size, mode="linear", align_corners=False)
    return out.reshape(*lead, size).movedim(-1, dim)


def resize_1d_masked(t: Tensor, valid: Tensor) -> Tensor:
    """Linear resize of ``t (..., L0)`` onto the valid tokens of each sample.

    ``valid`` is bool ``(B, N)``; returns ``(B, ..., N)`` where the valid tokens of sample ``b``
    see ``t`` resized to their count (as :func:`resize_1d` would for an unpadded sequence) and
    padded tokens get an arbitrary finite value.
    """
    L0 = t.shape[-1]
    length = valid.sum(1, keepdim=True).clamp_min(1).to(t.dtype)
    rank = (valid.long().cumsum(1) - 1).clamp_min(0).to(t.dtype)
    src = ((rank + 0.5) * (L0 / length) - 0.5).clamp(0, L0 - 1)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp_max(L0 - 1)
    lam = src - i0.to(t.dtype)
    lead = (1,) * (t.dim() - 1)
    t = t[None]
    a = torch.take_along_dim(t, i0.view(i0.shape[0], *lead, -1), dim=-1)
    b = torch.take_along_dim(t, i1.view(i1.shape[0], *lead, -1), dim=-1)
    lam = lam.view(lam.shape[0], *lead, -1)
    return a * (1 - lam) + b * lam


def _resize_2d(t: Tensor, size: HW) -> Tensor:
    """Bilinear resize of the last two dims of a 4-D ``t``; identity when the size matches."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def resize_agents(t: Tensor, dim: int, grid_in: HW, grid_out: HW) -> Tensor:
    """Resize the agent axis ``dim`` (row-major ``grid_in``) of ``t`` to ``grid_out`` bilinearly.

    Used when a module built for ``p × p`` agents runs with another agent grid (dense backbones).
    """
    if tuple(grid_in) == tuple(grid_out):
        return t
    t = t.movedim(dim, -1)
    lead = t.shape[:-1]
    out = F.interpolate(t.reshape(-1, 1, *grid_in), size=tuple(grid_out), mode="bilinear", align_corners=False)
    return out.reshape(*lead, grid_out[0] * grid_out[1]).movedim(-1, dim)


def agent_bias_2d(an_bias: Tensor, ah_bias: Tensor, aw_bias: Tensor, key_hw: HW, agent_grid: HW) -> Tensor:
    """Agent → key bias ``(h, A', Hk·Wk)`` for a key grid ``key_hw``.

    ``an_bias (h, A, r, r)`` is resized bilinearly to the grid; the row/column terms
    ``ah_bias (1, h, A, R, 1)`` and ``aw_bias (1, h, A, 1, R)`` linearly along their axis (which is
    the same as a bilinear resize of their sum). The agent axis is resized to ``agent_grid`` when
    it differs from the ``p × p`` the parameters were built for.
    """
    h, A = an_bias.shape[:2]
    Hk, Wk = key_hw
    coarse = _resize_2d(an_bias, (Hk, Wk))
    rows = resize_1d(ah_bias[0], Hk, dim=2)
    cols = resize_1d(aw_bias[0], Wk, dim=3)
    bias = (coarse + (rows + cols)).reshape(h, A, Hk * Wk)
    p = math.isqrt(A)
    return resize_agents(bias, 1, (p, p), agent_grid)


def query_bias_2d(na_bias: Tensor, ha_bias: Tensor, wa_bias: Tensor, query_hw: HW, agent_grid: HW) -> Tensor:
    """Query → agent bias ``(h, Hq·Wq, A')`` for a query grid ``query_hw`` (see :func:`agent_bias_2d`)."""
    h, A = na_bias.shape[:2]
    Hq, Wq = query_hw
    coarse = _resize_2d(na_bias, (Hq, Wq)).reshape(h, A, Hq * Wq).transpose(1, 2)
    rows = resize_1d(ha_bias[0], Hq, dim=1)
    cols = resize_1d(wa_bias[0], Wq, dim=2)
    bias = coarse + (rows + cols).reshape(h, Hq * Wq, A)
    p = math.isqrt(A)
    return resize_agents(bias, 2, (p, p), agent_grid)


def _channels_last_grid(tokens: Tensor, hw: HW) -> Tensor:
    """``(B, H·W, C)`` tokens as a ``(B, C, H, W)`` image in channels-last memory format (a view when
    the tokens are contiguous rows, a single copy otherwise)."""
    B, _, C = tokens.shape
    H, W = hw
    return tokens.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _grid_tokens(image: Tensor) -> Tensor:
    """``(B, C, h, w)`` image back to ``(B, h·w, C)`` contiguous tokens (free for channels-last)."""
    return image.flatten(2).transpose(1, 2).contiguous()


def pool_agents(q: Tensor, hw: Optional[HW], agent_grid: Union[HW, int], valid: Optional[Tensor] = None) -> Tensor:
    """Agent tokens ``(B, A, C)`` by adaptive average pooling of the queries ``q (B, N, C)``.

    2-D (``hw`` given): ``q`` is a row-major ``H × W`` grid pooled to ``agent_grid``. 1-D
    (``hw=None``): pooled along the sequence to ``agent_grid`` (an int) agents. ``valid`` (bool
    ``(B, N)``) excludes padded tokens: each agent is the mean of the valid tokens of its bin, and
    in 1-D the bins are laid over each sample's valid tokens only.
    """
    B, N, C = q.shape
    if hw is not None:
        H, W = hw
        # A channels-last view of the tokens: the pooling reads it without a transposing copy, and
        # the agents come out (B, A, C)-contiguous, which SDPA's fused CPU kernels need (a strided
        # head dim sends them to the slow math backend).
        grid = _channels_last_grid(q, (H, W))
        if valid is None:
            return _grid_tokens(F.adaptive_avg_pool2d(grid, agent_grid))
        w = valid.to(q.dtype).reshape(B, 1, H, W)
        num = F.adaptive_avg_pool2d(grid * w, agent_grid)
        den = F.adaptive_avg_pool2d(w, agent_grid).clamp_min(torch.finfo(q.dtype).tiny)
        return _grid_tokens(num / den)
    n = int(agent_grid)
    if valid is None:
        return F.adaptive_avg_pool1d(q.transpose(1, 2), n).transpose(1, 2)
    # Bins of the PyTorch adaptive-pool rule laid over the valid tokens of each sample.
    lengths = valid.sum(1, keepdim=True)  # (B, 1)
    rank = valid.long().cumsum(1) - 1  # position of each token among the valid ones
    i = torch.arange(n, device=q.device)[None, :, None]
    start = torch.div(i * lengths[:, None], n, rounding_mode="floor")
    end = -torch.div(-(i + 1) * lengths[:, None], n, rounding_mode="floor")  # ceil
    r = rank[:, None, :]
    member = (r >= start) & (r < end) & valid[:, None, :]  # (B, n, N)
    weights = member.to(q.dtype)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)
    return weights @ q

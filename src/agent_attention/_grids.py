"""Token-grid helpers of :class:`~agent_attention.layers.AgentAttention`: resizing the learned agent
biases to the actual grid, and pooling the agent tokens from the queries.

They are public through :mod:`agent_attention.layers` (the model zoo's checkpoint filters and the
downstream backbones resize official bias tables with them).
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

HW = Tuple[int, int]


def round_up(n, m):
    """``n`` rounded up to a multiple of ``m`` (positive sizes; int or symbolic). Written without a
    negative floor division (``-(-n // m)``), which exported graphs (ONNX) may round toward zero."""
    return (n + m - 1) // m * m


def fx_tracing() -> bool:
    """Whether FX symbolic tracing (``torch.fx.symbolic_trace``, timm/torchvision feature extraction)
    is running: sizes are then graph values, not ints."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def tracing() -> bool:
    """Whether the code runs under a graph capture that needs shape-generic code: ``torch.export``
    (also behind ``torch.onnx.export(dynamo=True)``), the TorchScript/legacy-ONNX tracer, or FX
    symbolic tracing.  There the export-safe formulations are used (no branches on sizes, pooling
    as matmuls, attention as explicit matmuls and softmaxes); ``torch.compile`` is not included."""
    return bool(
        torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or fx_tracing()
    )


def _grid_side(s, what: str, hw):
    if isinstance(s, torch.SymInt):  # a symbolic size (torch.export): kept symbolic, never int()-ed
        return s
    if isinstance(s, bool) or not hasattr(s, "__index__"):
        raise ValueError(f"{what} must be ints, got {hw!r}")
    return operator.index(s)


def to_tuple_hw(hw, n: int, what: str = "hw") -> tuple:
    """Validate an ``n``-D grid size (``(H, W)``, ``(T, H, W)``) of positive ints and return it.

    Floats (``6.9``), strings (``"66"``) and bools are refused rather than truncated; an int means
    the same size on every axis. Symbolic sizes (``torch.export``) pass through unchanged, and under
    FX symbolic tracing the sizes are graph values that are passed on without checks."""
    if fx_tracing() and not isinstance(hw, (int, str, float)):
        return tuple(hw[i] for i in range(n))
    if isinstance(hw, (int, torch.SymInt)) and not isinstance(hw, bool):
        hw = (hw,) * n
    if isinstance(hw, (str, bytes)) or not hasattr(hw, "__len__") or len(hw) != n:
        raise ValueError(f"{what} must be {n} ints ({'T, ' if n == 3 else ''}H, W), got {hw!r}")
    sides = tuple(_grid_side(s, what, hw) for s in hw)
    for s in sides:
        if isinstance(s, int) and s <= 0:
            raise ValueError(f"{what} must be positive, got {sides}")
    return sides


def to_2tuple_hw(hw, what: str = "hw") -> HW:
    """Validate a grid size ``(H, W)`` and return it as a tuple of two positive ints (see
    :func:`to_tuple_hw`)."""
    return to_tuple_hw(hw, 2, what)


def _same_size(current: Sequence, size: Sequence) -> bool:
    """``current == size`` for the identity shortcuts of the resizes; always ``False`` when tracing
    (a size comparison would guard the symbolic size; resizing to the same size is exact anyway)."""
    if tracing():
        return False
    return tuple(current) == tuple(size)


def resize_1d(t: Tensor, size: int, dim: int) -> Tensor:
    """Linear resize (``align_corners=False``) of ``t`` along ``dim``; identity when the size matches."""
    if _same_size((t.shape[dim],), (size,)):
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
    if _same_size(t.shape[-2:], size):
        return t
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)


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
    bias = (rows + cols).reshape(h, Hq * Wq, A) + coarse  # contiguous result (coarse is a transposed view)
    p = math.isqrt(A)
    return resize_agents(bias, 2, (p, p), agent_grid)


def _channels_last_grid(tokens: Tensor, hw: HW) -> Tensor:
    """``(B, H·W, C)`` tokens as a ``(B, C, H, W)`` image in channels-last memory format (a view when
    the tokens are contiguous rows, a single copy otherwise)."""
    B, _, C = tokens.shape
    H, W = hw
    image = tokens.reshape(B, H, W, C).permute(0, 3, 1, 2)
    if torch.compiler.is_exporting():
        # contiguous NCHW under torch.export: a channels-last conv input makes the exporter guard on the
        # batch (batch 1 tensors are both layouts), which would fix the graph's batch at >= 2
        return image.contiguous()
    return image.contiguous(memory_format=torch.channels_last)


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
    if hw is not None and len(hw) == 3:
        return _pool_agents_3d(q, hw, agent_grid, valid)
    if hw is not None and tracing():
        return _pool_by_matmul(q, hw, agent_grid, valid)
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
    if valid is None and tracing():
        return _pool_by_matmul(q, (N,), (n,), None)
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


def pool_matrix(size, bins: int, dtype: torch.dtype, device) -> Tensor:
    """``(bins, size)`` averaging matrix of PyTorch's adaptive average pooling (bin ``i`` covers
    ``[floor(i·size/bins), ceil((i+1)·size/bins))``), built from ``arange`` so that ``size`` may be
    symbolic: adaptive pooling as a matmul exports to ONNX at any size (the ONNX pooling ops need
    output sizes that divide the input)."""
    i = torch.arange(bins, device=device)
    start = torch.div(i * size, bins, rounding_mode="floor")
    end = torch.div((i + 1) * size + bins - 1, bins, rounding_mode="floor")
    y = torch.arange(size, device=device)
    member = (y[None, :] >= start[:, None]) & (y[None, :] < end[:, None])
    return member.to(dtype) / (end - start).to(dtype)[:, None]


def _pool_grid(x: Tensor, grid: Sequence[int], agent_grid: Sequence[int]) -> Tensor:
    """Adaptive average pooling of ``x (B, *grid, C)`` to ``(B, *agent_grid, C)`` with one matmul per
    axis (:func:`pool_matrix`)."""
    nd = len(grid)
    for axis in range(nd):
        m = pool_matrix(grid[axis], agent_grid[axis], x.dtype, x.device)
        x = torch.matmul(m, x.movedim(1 + axis, -2)).movedim(-2, 1 + axis)
    return x


def _pool_by_matmul(q: Tensor, grid: Sequence, agent_grid: Sequence[int], valid: Optional[Tensor]) -> Tensor:
    """:func:`pool_agents` written as matmuls with pooling matrices (export path, any grid rank)."""
    B, C = q.shape[0], q.shape[-1]
    x = q.reshape(B, *grid, C)
    if valid is None:
        return _pool_grid(x, grid, agent_grid).reshape(B, -1, C)
    w = valid.to(q.dtype).reshape(B, *grid, 1)
    num = _pool_grid(x * w, grid, agent_grid)
    den = _pool_grid(w, grid, agent_grid).clamp_min(torch.finfo(q.dtype).tiny)
    return (num / den).reshape(B, -1, C)


def _pool_agents_3d(q: Tensor, thw: Sequence, agent_grid: Sequence[int], valid: Optional[Tensor]) -> Tensor:
    """3-D :func:`pool_agents`: ``q`` is a row-major ``T × H × W`` grid pooled to ``agent_grid (t, p, p')``."""
    if tracing():
        return _pool_by_matmul(q, thw, agent_grid, valid)
    B, N, C = q.shape
    T, H, W = thw
    grid = q.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)
    if valid is None:
        return F.adaptive_avg_pool3d(grid, tuple(agent_grid)).flatten(2).transpose(1, 2)
    w = valid.to(q.dtype).reshape(B, 1, T, H, W)
    num = F.adaptive_avg_pool3d(grid * w, tuple(agent_grid))
    den = F.adaptive_avg_pool3d(w, tuple(agent_grid)).clamp_min(torch.finfo(q.dtype).tiny)
    return (num / den).flatten(2).transpose(1, 2)


def resize_agents_nd(t: Tensor, dim: int, grid_in: Sequence[int], grid_out: Sequence[int]) -> Tensor:
    """:func:`resize_agents` for a 3-D agent grid (trilinear)."""
    if tuple(grid_in) == tuple(grid_out):
        return t
    t = t.movedim(dim, -1)
    lead = t.shape[:-1]
    out = F.interpolate(t.reshape(-1, 1, *grid_in), size=tuple(grid_out), mode="trilinear", align_corners=False)
    return out.reshape(*lead, math.prod(grid_out)).movedim(-1, dim)


def _resize_3d(t: Tensor, size: Sequence) -> Tensor:
    """Trilinear resize of the last three dims of a 5-D ``t``; identity when the size matches."""
    if _same_size(t.shape[-3:], size):
        return t
    return F.interpolate(t, size=tuple(size), mode="trilinear", align_corners=False)


def agent_bias_3d(an_bias: Tensor, key_thw: Sequence, agent_grid: Sequence[int], built_grid: Sequence[int]) -> Tensor:
    """Agent → key bias ``(h, A', T·H·W)``: the coarse ``an_bias (h, A, t0, r, r)`` table resized
    trilinearly to the key grid, the agent axis resized from ``built_grid`` to ``agent_grid``."""
    h, A = an_bias.shape[:2]
    bias = _resize_3d(an_bias, key_thw).reshape(h, A, -1)
    return resize_agents_nd(bias, 1, built_grid, agent_grid)


def query_bias_3d(na_bias: Tensor, query_thw: Sequence, agent_grid: Sequence[int], built_grid: Sequence[int]) -> Tensor:
    """Query → agent bias ``(h, T·H·W, A')`` (see :func:`agent_bias_3d`)."""
    return agent_bias_3d(na_bias, query_thw, agent_grid, built_grid).transpose(1, 2)


def channels_last_grid_3d(tokens: Tensor, thw: Sequence) -> Tensor:
    """``(B, T·H·W, C)`` tokens as a ``(B, C, T, H, W)`` volume in channels-last-3d memory format."""
    B, C = tokens.shape[0], tokens.shape[-1]
    T, H, W = thw
    return tokens.reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3).contiguous(memory_format=torch.channels_last_3d)

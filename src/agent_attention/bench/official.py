"""The official code's way of computing agent attention, as a baseline for ``bench models``.

:func:`official_style` is a context manager that makes every
:class:`~agent_attention.layers.AgentAttention` of a model compute its attention the way the
released implementation (LeapLabTHU/Agent-Attention, ``agent_transformer/models``) writes it, on
the model's own weights:

* the agents are pooled with ``adaptive_avg_pool2d`` from a permuted (non-contiguous) view of ``q``;
* the agent biases are recomposed on every call (bilinear ``interpolate`` of the 7 × 7 tables to
  the grid, plus the row/column terms) and ``repeat``-ed per sample of the batch;
* both attention maps are materialised: ``softmax((A·s) Kᵀ + bias) V`` then
  ``softmax((Q·s) Aᵀ + bias) V_A``, on head views made with ``reshape``/``permute``;
* the depthwise-conv branch runs on a ``(B, C, H, W)`` permuted view of ``V``.

The surrounding model (projections, MLPs, windows, stripes) is unchanged, so the two computations
are compared on exactly the same weights and inputs; the result equals the model's own to float
rounding (``tests/test_bench_official.py``). Padding masks, which the official models never
produce (they only accept grids divisible by their windows), are applied the straightforward way:
``-inf`` on padded keys, padded tokens left out of the pooled agents and zeroed before the DWC.

Only 2-D self-attention with ``p × p`` agents is covered (what the classification models use).
"""
from __future__ import annotations

import contextlib
import math
import types
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import AgentAttentionCore, to_2tuple_hw

__all__ = ["official_attend", "official_style"]


def _resize_table(t: Tensor, hw) -> Tensor:
    """Bilinear resize of a ``(h, A, r, r)`` table to ``hw``, as the official code does on every call."""
    return F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False)


def _row_col(term: Tensor, window, hw, agents_last: bool) -> Tensor:
    """``ah + aw`` (``(1, h, A, Hs, Ws)``) or, ``agents_last``, ``ha + wa`` (``(1, h, Hs, Ws, A)``) on ``hw``.

    The official code adds them at the construction window; another grid resizes the sum
    bilinearly (the models' own resize, which is the same map)."""
    if tuple(window) == tuple(hw):
        return term
    if not agents_last:
        return _resize_table(term[0], hw)[None]
    return _resize_table(term[0].permute(0, 3, 1, 2), hw).permute(0, 2, 3, 1)[None]


def official_attend(
    m: AgentAttentionCore,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hw: Optional[Sequence[int]],
    *,
    key_hw: Optional[Sequence[int]] = None,
    key_padding_mask: Optional[Tensor] = None,
    cross: bool = False,
) -> Tensor:
    """:meth:`AgentAttentionCore.attend` computed as in the official code (see the module docstring)."""
    if m.ndim != 2 or cross or hw is None:
        raise ValueError("official-style baseline: only 2-D self-attention is covered")
    p = math.isqrt(m.agent_num)
    if tuple(m.agent_shape) != (p, p):
        raise ValueError(f"official-style baseline: agents must be pooled to {(p, p)}, got {m.agent_shape}")
    H, W = to_2tuple_hw(hw)
    b, n, c = q.shape
    P = m.num_prefix_tokens
    if n != H * W + P:
        raise ValueError(f"official-style baseline: {n} tokens do not match hw={(H, W)} (+{P} prefix)")
    heads, hd, A = m.num_heads, m.head_dim, m.agent_num
    scale = m.scale
    valid = None if key_padding_mask is None else ~key_padding_mask[:, P:]

    image = q[:, P:].reshape(b, H, W, c).permute(0, 3, 1, 2)
    if valid is None:
        agent_tokens = F.adaptive_avg_pool2d(image, (p, p))
    else:
        w = valid.reshape(b, 1, H, W).to(q.dtype)
        agent_tokens = F.adaptive_avg_pool2d(image * w, (p, p)) / F.adaptive_avg_pool2d(w, (p, p)).clamp_min(
            torch.finfo(q.dtype).tiny)
    agent_tokens = agent_tokens.reshape(b, c, -1).permute(0, 2, 1)
    q = q.reshape(b, n, heads, hd).permute(0, 2, 1, 3)
    k = k.reshape(b, n, heads, hd).permute(0, 2, 1, 3)
    v = v.reshape(b, n, heads, hd).permute(0, 2, 1, 3)
    agent_tokens = agent_tokens.reshape(b, A, heads, hd).permute(0, 2, 1, 3)

    position_bias = agent_bias = None
    if m.has_agent_bias:
        position_bias1 = _resize_table(m.an_bias, (H, W)).reshape(1, heads, A, -1).repeat(b, 1, 1, 1)
        position_bias2 = _row_col(m.ah_bias + m.aw_bias, m.window, (H, W), False).reshape(1, heads, A, -1).repeat(b, 1, 1, 1)
        position_bias = position_bias1 + position_bias2
        agent_bias1 = _resize_table(m.na_bias, (H, W)).reshape(1, heads, A, -1).permute(0, 1, 3, 2).repeat(b, 1, 1, 1)
        agent_bias2 = _row_col(m.ha_bias + m.wa_bias, m.window, (H, W), True).reshape(1, heads, -1, A).repeat(b, 1, 1, 1)
        agent_bias = agent_bias1 + agent_bias2
        if P:
            position_bias = torch.cat([m.ac_bias.repeat(b, 1, 1, 1), position_bias], dim=-1)
            agent_bias = torch.cat([m.ca_bias.repeat(b, 1, 1, 1), agent_bias], dim=-2)

    drop = m.attn_drop if m.training else 0.0
    logits = (agent_tokens * scale) @ k.transpose(-2, -1)
    if position_bias is not None:
        logits = logits + position_bias
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    agent_attn = F.dropout(logits.softmax(dim=-1), drop)
    agent_v = agent_attn @ v

    logits = (q * scale) @ agent_tokens.transpose(-2, -1)
    if agent_bias is not None:
        logits = logits + agent_bias
    q_attn = F.dropout(logits.softmax(dim=-1), drop)
    x = (q_attn @ agent_v).transpose(1, 2).reshape(b, n, c)

    if m.dwc_name is not None:
        v_ = v[:, :, P:].transpose(1, 2).reshape(b, H, W, c)
        if valid is not None:
            v_ = v_ * valid.reshape(b, H, W, 1).to(v_.dtype)
        local = getattr(m, m.dwc_name)(v_.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, n - P, c)
        if P:
            x[:, P:] = x[:, P:] + local
        else:
            x = x + local
    return x


@contextlib.contextmanager
def official_style(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every :class:`AgentAttention` of ``model`` attends the official way.

    Sets an instance-level ``attend`` on each module and removes it on exit (the class method
    then applies again); the weights are not touched.
    """
    modules = [mod for mod in model.modules() if isinstance(mod, AgentAttentionCore)]
    if not modules:
        raise ValueError(f"official_style: {type(model).__name__} has no AgentAttention module")
    patched = []
    try:
        for mod in modules:
            if "attend" in mod.__dict__:
                continue  # already patched by an enclosing block
            mod.attend = types.MethodType(official_attend, mod)
            patched.append(mod)
        yield model
    finally:
        for mod in patched:
            del mod.attend

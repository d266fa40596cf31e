"""ToDo (token downsampling, Smith et al. 2024) for AgentSD's processor, and the fused projections
shared by every path.

ToDo keeps **all queries** and average-pools the **keys and values** on the 2-D token grid by a
factor ``f`` (``h × w → round(h/f) × round(w/f)``; an integer ``f`` dividing the grid is exactly
ToDo's ``f × f`` average pooling, other factors use adaptive average pooling, whose windows may
overlap).  Projections are affine and the pooling weights sum to one, so pooling the tokens before
``to_k``/``to_v`` equals pooling the keys and values, and is cheaper.

``todo+agents``: agent attention over the pooled keys/values, with all tokens as queries and the
agents pooled on a ``round(h/sy) × round(w/sx)`` grid (through ``to_q``, as AgentSD's agents):
``softmax(q aᵀ s^k_scale2) · softmax(a k̃ᵀ s) · ṽ + k_shortcut · v`` (``k̃, ṽ`` pooled, ``v`` the full
values: the shortcut stays local).  Linear in the token count, where ToDo alone stays quadratic.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pool_tokens", "pooled_size", "project", "todo_factor_for_ratio"]


def pooled_size(hw: Tuple[int, ...], fy: float, fx: float, ft: float = 1.0) -> Tuple[int, ...]:
    """The grid ``hw`` (``(h, w)`` or ``(t, h, w)``) pooled by ``fy``, ``fx`` (and ``ft`` in time)."""
    factors = (fy, fx) if len(hw) == 2 else (ft, fy, fx)
    return tuple(max(1, round(n / f)) for n, f in zip(hw, factors))


def todo_factor_for_ratio(ratio: float) -> float:
    """The ToDo factor that keeps ``1 - ratio`` of the keys/values (ToMe's token count at ``ratio``)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ToDo: ratio must be in [0, 1), got {ratio!r}")
    return (1.0 - ratio) ** -0.5


def pool_tokens(x: Tensor, hw: Tuple[int, ...], out_hw: Tuple[int, ...]) -> Tensor:
    """Average-pool the tokens ``x`` (B, N, C) of a row-major grid ``hw`` (``(h, w)`` or
    ``(t, h, w)``) to ``out_hw``: (B, prod(out_hw), C)."""
    B, N, C = x.shape
    hw, out_hw = tuple(hw), tuple(out_hw)
    if out_hw == hw:
        return x
    if len(hw) == 3 and out_hw[0] == hw[0]:  # frames kept: pool each frame in 2-D (the same windows; CPU 3-D
        t = hw[0]                             # adaptive pooling is ~15× slower at Wan's 81-frame grid)
        pooled = pool_tokens(x.reshape(B * t, N // t, C), hw[1:], out_hw[1:])
        return pooled.reshape(B, -1, C)
    grid = x.transpose(1, 2).reshape(B, C, *hw)  # a channels-last view: no copy
    if all(n % m == 0 for n, m in zip(hw, out_hw)):
        k = tuple(n // m for n, m in zip(hw, out_hw))
        pooled = (F.avg_pool2d if len(hw) == 2 else F.avg_pool3d)(grid, k, stride=k)
    else:
        pooled = (F.adaptive_avg_pool2d if len(hw) == 2 else F.adaptive_avg_pool3d)(grid, out_hw)
    return pooled.flatten(2).transpose(1, 2)


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear


def project(x: Tensor, modules: List[nn.Module]) -> List[Tensor]:
    """``[m(x) for m in modules]``, as one GEMM when they are all plain ``nn.Linear`` (the weights
    are concatenated at every call, which costs far less than the product and never goes stale)."""
    if len(modules) == 1 or not all(_plain_linear(m) and m.weight.dtype == modules[0].weight.dtype for m in modules):
        return [m(x) for m in modules]
    weight = torch.cat([m.weight for m in modules])
    bias: Optional[Tensor] = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])
    out = F.linear(x, weight, bias)
    return list(out.split([m.out_features for m in modules], dim=-1))

"""The learned agent biases of the paper: their parameters, composed for the actual grids, cached.

2-D grids (the released models): ``an_bias``/``na_bias`` (coarse ``bias_grid²`` maps, resized to the
grid) plus the row/column terms ``ah_bias``/``aw_bias``/``ha_bias``/``wa_bias`` (built for ``window``,
resized at run time), and DeiT's class-token biases ``ac_bias``/``ca_bias``. 3-D volumes and 1-D
sequences have the coarse maps only. :class:`AgentBiases` is a part of
:class:`~.core.AgentAttentionCore` (the parameters live on the attention module itself, under the
official names).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._grids import (
    HW,
    agent_bias_2d,
    agent_bias_3d,
    query_bias_2d,
    query_bias_3d,
    resize_1d,
    resize_1d_masked,
    resize_agents,
    to_2tuple_hw,
    to_tuple_hw,
    tracing,
)
from ..bias_factors import grid_biases
from ..functional import current_path

__all__ = ["AgentBiases"]

# FX symbolic tracing: the size-dependent bias helpers are leaves of the graph (see .core)
for _name in ("agent_bias_2d", "query_bias_2d", "agent_bias_3d", "query_bias_3d", "resize_1d", "resize_1d_masked",
              "resize_agents"):
    torch.fx.wrap(_name)


def _snapshot_matches(params: Sequence[Tensor], snapshot: Sequence[Tensor]) -> bool:
    """Whether the parameters hold exactly the values of ``snapshot`` (same dtype, device, shape)."""
    return all(
        p.dtype == s.dtype and p.device == s.device and p.shape == s.shape and torch.equal(p, s)
        for p, s in zip(params, snapshot)
    )


class AgentBiases:
    """The agent-bias part of :class:`~.core.AgentAttentionCore` (uses its ``num_heads``,
    ``agent_num``, ``ndim``, ``num_prefix_tokens``, ``agent_shape`` and ``has_agent_bias``)."""

    def _init_agent_biases(self, bias_grid: Union[int, Sequence[int]], window, seq_bias_len: int) -> Optional[HW]:
        """Create the bias parameters; returns the row/column bias grid (2-D) or ``None``."""
        h, A, ndim, P = self.num_heads, self.agent_num, self.ndim, self.num_prefix_tokens

        def param(*shape):
            t = nn.Parameter(torch.zeros(*shape))
            nn.init.trunc_normal_(t, std=0.02)
            return t

        if ndim == 2:
            Hs, Ws = window = to_2tuple_hw(bias_grid if window is None else window, "window")
            self.an_bias = param(h, A, bias_grid, bias_grid)
            self.na_bias = param(h, A, bias_grid, bias_grid)
            self.ah_bias = param(1, h, A, Hs, 1)
            self.aw_bias = param(1, h, A, 1, Ws)
            self.ha_bias = param(1, h, Hs, 1, A)
            self.wa_bias = param(1, h, 1, Ws, A)
            if P:
                self.ac_bias = param(1, h, A, P)
                self.ca_bias = param(1, h, P, A)
        elif ndim == 3:
            grid3 = (2, bias_grid, bias_grid) if isinstance(bias_grid, int) else bias_grid
            grid3 = to_tuple_hw(grid3, 3, "bias_grid")
            self.an_bias = param(h, A, *grid3)
            self.na_bias = param(h, A, *grid3)
        else:
            self.an_bias = param(h, A, seq_bias_len)
            self.na_bias = param(h, A, seq_bias_len)
        return window if ndim == 2 else None

    def _apply(self, fn, recurse: bool = True):
        """``Module._apply`` with the 5-D row/column biases of a 2-D module (``ah_bias (1, h, A, Hs, 1)``
        ...) converted as 4-D views (dims 0-1 merged) and shaped back: ``model.to(memory_format=
        torch.channels_last)`` (a 4-D-only format that ``Module.to`` applies to every 4-D and 5-D
        tensor) then works, and the parameters keep the official shapes."""
        if self.ndim != 2:
            return super()._apply(fn, recurse)

        def apply(t):
            return fn(t.flatten(0, 1)).reshape(t.shape) if t.dim() == 5 else fn(t)

        return super()._apply(apply, recurse)

    def _agent_grid(self) -> Union[tuple, int]:
        if self.ndim == 1:
            return self.agent_num
        if self.ndim == 3:
            return to_tuple_hw(self.agent_shape, 3, "agent_shape")
        return to_2tuple_hw(self.agent_shape, "agent_shape")

    def biases(
        self,
        query_hw: Optional[tuple],
        key_hw: Optional[tuple],
        n_q: int,
        n_k: int,
        q_valid: Optional[Tensor] = None,
        k_valid: Optional[Tensor] = None,
    ):
        """:meth:`compose_biases`, cached at inference.

        Composing the biases (bilinear resizes of the 7 × 7 tables, row/column sums) costs as much as
        a small attention; with autograd off the result depends only on the grids and on the
        parameter values, so it is kept for the last grid together with a copy of the bias
        parameters it was made from, and served only while the parameters still hold exactly those
        values (``torch.equal``; a few microseconds). Comparing values rather than version counters
        or storages means no kind of update can leave it stale: fused/foreach optimizers, ``.data``
        writes, EMA copies, ``load_state_dict``, in-place edits under ``no_grad``. Training
        (autograd on), export/FX tracing, ``torch.compile`` and per-sample (masked) biases always
        recompose.
        """
        if (self.ndim == 2 and self.has_agent_bias and current_path() == "flex" and not tracing()
                and not (self.training and self.attn_drop > 0)):
            return grid_biases(self, query_hw, key_hw)  # factored: FlexAttention evaluates them per logit
        if (not self.has_agent_bias or torch.is_grad_enabled() or q_valid is not None or k_valid is not None
                or torch.compiler.is_compiling() or tracing()):
            return self.compose_biases(query_hw, key_hw, n_q, n_k, q_valid, k_valid)
        params = tuple(self.parameters(recurse=False))
        key = (tuple(query_hw) if query_hw is not None else None, tuple(key_hw) if key_hw is not None else None,
               n_q, n_k, self._agent_grid(), torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_bias_cache")
        if cached is not None and cached[0] == key and _snapshot_matches(params, cached[1]):
            return cached[2]
        self.__dict__.pop("_bias_cache", None)
        result = self.compose_biases(query_hw, key_hw, n_q, n_k)
        self.__dict__["_bias_cache"] = (key, tuple(p.detach().clone() for p in params), result)
        return result

    def compose_biases(
        self,
        query_hw: Optional[tuple],
        key_hw: Optional[tuple],
        n_q: int,
        n_k: int,
        q_valid: Optional[Tensor] = None,
        k_valid: Optional[Tensor] = None,
    ):
        """``(agent_bias (1, h, A', Mk), query_bias (1, h, Nq, A'))`` for these grids, or ``None``s.

        ``query_hw``/``key_hw`` are the grids of the (non-prefix) query and key tokens; ``None``
        means the side has no grid (its spatial bias is skipped). In 1-D mode the sequence lengths
        ``n_q``/``n_k`` are used instead, or, with the bool masks ``q_valid``/``k_valid`` ``(B, ·)``,
        each sample's count of valid tokens (so padding does not change the result).
        """
        if not self.has_agent_bias:
            return None, None
        if self.ndim == 1:
            if k_valid is None:
                b1 = resize_1d(self.an_bias, n_k, dim=2)[None]
            else:
                b1 = resize_1d_masked(self.an_bias, k_valid)
            if q_valid is None:
                b2 = resize_1d(self.na_bias, n_q, dim=2)[None]
            else:
                b2 = resize_1d_masked(self.na_bias, q_valid)
            return b1, b2.transpose(-1, -2)
        grid = self._agent_grid()
        if self.ndim == 3:
            built = self._agent_grid_built
            b1 = None if key_hw is None else agent_bias_3d(self.an_bias, key_hw, grid, built)[None]
            b2 = None if query_hw is None else query_bias_3d(self.na_bias, query_hw, grid, built)[None]
            return b1, b2
        p = math.isqrt(self.agent_num)
        P = self.num_prefix_tokens
        b1 = b2 = None
        if key_hw is not None:
            b1 = agent_bias_2d(self.an_bias, self.ah_bias, self.aw_bias, key_hw, grid)
            if P:
                b1 = torch.cat([resize_agents(self.ac_bias[0], 1, (p, p), grid), b1], dim=-1)
            b1 = b1[None]
        if query_hw is not None:
            b2 = query_bias_2d(self.na_bias, self.ha_bias, self.wa_bias, query_hw, grid)
            if P:
                b2 = torch.cat([resize_agents(self.ca_bias[0], 2, (p, p), grid), b2], dim=1)
            b2 = b2[None]
        return b1, b2


"""Agent biases of a 2-D token grid kept in factored form.

The agent → key bias of a module on an ``H × W`` key grid is (see :func:`~agent_attention._grids.agent_bias_2d`)::

    bias[h, a, y·W + x] = bilinear(an_bias[h, a], y, x) + ah[h, a, y] + aw[h, a, x]

a coarse ``r × r`` table resized bilinearly plus a row term and a column term, and the query → agent
bias has the same form with the token and agent axes swapped.  Materialised, each is an
``n × N`` tensor; :class:`GridBias` instead keeps the parameters it is made from, so that a kernel
that evaluates the bias per logit (the FlexAttention path's ``score_mod``) reads only the
``r × r`` table, the ``H + W`` row/column terms and the ``H + W`` interpolation taps.

:class:`~agent_attention.layers.AgentAttention` hands these to the op when the FlexAttention path is
selected; every other path calls :meth:`GridBias.materialize`, which gives exactly the tensors
:meth:`~agent_attention.layers.AgentAttention.compose_biases` gives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._grids import agent_bias_2d, query_bias_2d, resize_1d, resize_agents

__all__ = ["GridBias", "BiasFactors", "bias_value", "grid_biases", "linear_taps"]


class BiasFactors(NamedTuple):
    """What :func:`bias_value` reads, all float32 on the bias device: the coarse table
    ``(h, A, r, r')``, the row and column terms ``(h, A, H)`` / ``(h, A, W)`` (already resized to the
    grid), the bilinear taps of the table along rows and columns (source indices ``i0, i1`` and
    weights ``w0, w1``, each of length ``H`` or ``W``), the prefix-token bias ``(h, A, P)`` or ``None``,
    the grid width ``W`` and the prefix length ``P``."""

    table: Tensor
    rows: Tensor
    cols: Tensor
    iy0: Tensor
    iy1: Tensor
    wy0: Tensor
    wy1: Tensor
    ix0: Tensor
    ix1: Tensor
    wx0: Tensor
    wx1: Tensor
    prefix: Optional[Tensor]
    width: int
    num_prefix: int


def linear_taps(out_size: int, in_size: int, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices and weights of a linear resize ``in_size → out_size`` with
    ``align_corners=False`` (the rule of :func:`torch.nn.functional.interpolate`): output ``i`` is
    ``w0[i] · x[i0[i]] + w1[i] · x[i1[i]]``."""
    dst = torch.arange(out_size, device=device, dtype=torch.float32)
    src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    w1 = src - i0.float()
    return i0, i1, 1.0 - w1, w1


@dataclass(frozen=True)
class GridBias:
    """A factored agent bias of a 2-D token grid (see the module docstring).

    ``kind`` is ``"agent"`` (agent → key, shape ``(1, h, A', P + H·W)``) or ``"query"`` (query →
    agent, ``(1, h, P + H·W, A')``). ``table`` is ``an_bias``/``na_bias`` ``(h, A, r, r)``; ``line_h``
    and ``line_w`` the row/column parameters in their official layouts (``ah_bias (1, h, A, R, 1)``,
    ``aw_bias (1, h, A, 1, R)`` or ``ha_bias (1, h, R, 1, A)``, ``wa_bias (1, h, 1, R, A)``);
    ``prefix`` DeiT's ``ac_bias (1, h, A, P)`` / ``ca_bias (1, h, P, A)`` or ``None``; ``agent_grid``
    the run-time agent grid (the parameters are built for ``p × p``, ``p² = A``)."""

    kind: str
    table: Tensor
    line_h: Tensor
    line_w: Tensor
    grid: Tuple[int, int]
    agent_grid: Tuple[int, int]
    prefix: Optional[Tensor] = None

    def __post_init__(self):
        if self.kind not in ("agent", "query"):
            raise ValueError(f"GridBias: kind must be 'agent' or 'query', got {self.kind!r}")

    # ------------------------------------------------------------------ tensor-like facts
    @property
    def num_prefix(self) -> int:
        if self.prefix is None:
            return 0
        return self.prefix.shape[-1] if self.kind == "agent" else self.prefix.shape[-2]

    @property
    def shape(self) -> torch.Size:
        h = self.table.shape[0]
        A, N = self.agent_grid[0] * self.agent_grid[1], self.num_prefix + self.grid[0] * self.grid[1]
        return torch.Size((1, h, A, N) if self.kind == "agent" else (1, h, N, A))

    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    @property
    def requires_grad(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.table, self.line_h, self.line_w, self.prefix))

    def is_floating_point(self) -> bool:
        return self.table.is_floating_point()

    # ------------------------------------------------------------------ forms
    def _built(self) -> Tuple[int, int]:
        p = math.isqrt(self.table.shape[1])
        return (p, p)

    def materialize(self) -> Tensor:
        """The dense bias, computed as :meth:`AgentAttention.compose_biases` computes it."""
        p = self._built()
        if self.kind == "agent":
            b = agent_bias_2d(self.table, self.line_h, self.line_w, self.grid, self.agent_grid)
            if self.prefix is not None:
                b = torch.cat([resize_agents(self.prefix[0], 1, p, self.agent_grid), b], dim=-1)
        else:
            b = query_bias_2d(self.table, self.line_h, self.line_w, self.grid, self.agent_grid)
            if self.prefix is not None:
                b = torch.cat([resize_agents(self.prefix[0], 2, p, self.agent_grid), b], dim=1)
        return b[None]

    def factors(self) -> BiasFactors:
        """The float32 pieces :func:`bias_value` reads (``O(A·(r² + H + W + P))`` numbers)."""
        H, W = self.grid
        p, grid_a = self._built(), tuple(self.agent_grid)
        f32 = torch.float32
        table = self.table.to(f32)
        if self.kind == "agent":  # ah (1, h, A, R, 1) → (h, A, H); aw (1, h, A, 1, R) → (h, A, W)
            rows = resize_1d(self.line_h[0, :, :, :, 0].to(f32), H, dim=2)
            cols = resize_1d(self.line_w[0, :, :, 0, :].to(f32), W, dim=2)
            prefix = None if self.prefix is None else self.prefix[0].to(f32)
        else:  # ha (1, h, R, 1, A) → (h, A, H); wa (1, h, 1, R, A) → (h, A, W)
            rows = resize_1d(self.line_h[0, :, :, 0, :].to(f32).transpose(1, 2), H, dim=2)
            cols = resize_1d(self.line_w[0, :, 0, :, :].to(f32).transpose(1, 2), W, dim=2)
            prefix = None if self.prefix is None else self.prefix[0].to(f32).transpose(1, 2)
        if grid_a != p:  # the agent axis is resized linearly: it commutes with the spatial resizes
            table, rows, cols = (resize_agents(t, 1, p, grid_a) for t in (table, rows, cols))
            prefix = None if prefix is None else resize_agents(prefix, 1, p, grid_a)
        r_h, r_w = table.shape[-2:]
        taps_y = linear_taps(H, r_h, table.device)
        taps_x = linear_taps(W, r_w, table.device)
        return BiasFactors(table.contiguous(), rows.contiguous(), cols.contiguous(), *taps_y, *taps_x,
                           None if prefix is None else prefix.contiguous(), W, self.num_prefix)


def bias_value(f: BiasFactors, head: Tensor, agent: Tensor, token: Tensor) -> Tensor:
    """The bias of (``head``, ``agent``, ``token``) from the factors: index tensors of any
    broadcastable shapes (0-d inside a FlexAttention ``score_mod``, ``arange`` grids for a dense
    evaluation). Tokens ``< P`` are prefix tokens, the rest the row-major grid."""
    P, W = f.num_prefix, f.width
    cell = (token - P).clamp_min(0) if P else token
    y, x = cell // W, cell % W
    t = f.table
    y0, y1, x0, x1 = f.iy0[y], f.iy1[y], f.ix0[x], f.ix1[x]
    coarse = (f.wy0[y] * (f.wx0[x] * t[head, agent, y0, x0] + f.wx1[x] * t[head, agent, y0, x1])
              + f.wy1[y] * (f.wx0[x] * t[head, agent, y1, x0] + f.wx1[x] * t[head, agent, y1, x1]))
    value = coarse + (f.rows[head, agent, y] + f.cols[head, agent, x])
    if P:
        value = torch.where(token < P, f.prefix[head, agent, token.clamp_max(P - 1)], value)
    return value


def grid_biases(module, query_hw, key_hw) -> Tuple[Optional[GridBias], Optional[GridBias]]:
    """``(agent_bias, query_bias)`` of a 2-D :class:`~agent_attention.layers.AgentAttention` in
    factored form (``None`` for a side without a grid), the counterpart of its ``compose_biases``."""
    grid = module._agent_grid()
    prefix = bool(module.num_prefix_tokens)
    b1 = b2 = None
    if key_hw is not None:
        b1 = GridBias("agent", module.an_bias, module.ah_bias, module.aw_bias, tuple(key_hw), tuple(grid),
                      module.ac_bias if prefix else None)
    if query_hw is not None:
        b2 = GridBias("query", module.na_bias, module.ha_bias, module.wa_bias, tuple(query_hw), tuple(grid),
                      module.ca_bias if prefix else None)
    return b1, b2

"""Token merging for AgentSD: bipartite soft matching on a 2-D token grid (ToMe for SD) that also
produces the agent tokens by a stronger merge of the same tokens.

The ``N = h·w`` tokens of a grid (``t·h·w`` for video, cells of ``st × sy × sx``) are split into *destinations* (one per ``sy × sx`` cell, at a random
or the top-left position of the cell) and *sources* (every other token, including the rows and
columns that do not fill a whole cell).  Each source is paired with its most cosine-similar
destination; the ``r = int(N·ratio)`` best-paired sources are averaged into their destination, the
others stay.  Agents are built the same way with ``agent_r = int(N·agent_ratio)`` merges, and only
when they are fewer than half the merged tokens: ``(N - agent_r)·2 < N - r``.

Both merges and the unmerge are expressed through one index map ``slot`` (B, N): the row of the
merged tensor that each original token belongs to.  Merging is a scatter-mean over ``slot``,
unmerging a gather by ``slot`` (every token receives the output of its row, so a merged source gets
a copy of its destination's output).

    >>> import torch
    >>> x = torch.randn(2, 8 * 8, 16)
    >>> merged, agents, unmerge = merge_tokens(x, (8, 8), sx=4, sy=4, ratio=0.4, agent_ratio=0.95)
    >>> merged.shape, agents.shape, unmerge(merged).shape
    (torch.Size([2, 39, 16]), torch.Size([2, 4, 16]), torch.Size([2, 64, 16]))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TokenMatch", "match_tokens", "merge_tokens", "merge_counts", "destination_partition"]


def _check_settings(hw, sx: int, sy: int, ratio: float, agent_ratio: float, st: int = 1) -> Tuple[int, ...]:
    """The grid as a tuple of 2 (h, w) or 3 (t, h, w) positive ints, after checking the settings."""
    try:
        grid = tuple(int(v) for v in hw)
    except (TypeError, ValueError):
        raise TypeError(f"token merging: hw must be (height, width) or (frames, height, width) ints, got {hw!r}") from None
    if len(grid) not in (2, 3):
        raise TypeError(f"token merging: hw must be (height, width) or (frames, height, width), got {hw!r}")
    if min(grid) < 1:
        raise ValueError(f"token merging: grid size must be positive, got {grid}")
    for name, s in (("sx", sx), ("sy", sy), ("st", st)):
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"token merging: {name} must be a positive int, got {s!r}")
    for name, value in (("ratio", ratio), ("agent_ratio", agent_ratio)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"token merging: {name} must be in [0, 1], got {value!r}")
    return grid


def _strides(grid: Tuple[int, ...], sx: int, sy: int, st: int) -> Tuple[int, ...]:
    return (sy, sx) if len(grid) == 2 else (st, sy, sx)


def merge_counts(hw, *, sx: int, sy: int, ratio: float, agent_ratio: float = 0.0, st: int = 1) -> Tuple[int, Optional[int]]:
    """Token counts without running anything: ``(merged tokens, agents or None)``.

    ``hw`` is ``(h, w)`` or, for video, ``(t, h, w)`` with one destination per ``st × sy × sx`` cell.

    >>> merge_counts((64, 64), sx=4, sy=4, ratio=0.4, agent_ratio=0.95)   # paper, steps 0-19
    (2458, 256)
    >>> merge_counts((64, 64), sx=2, sy=2, ratio=0.4, agent_ratio=0.5)    # steps >= 20: ToMe only
    (2458, None)
    """
    grid = _check_settings(hw, sx, sy, ratio, agent_ratio, st)
    n = math.prod(grid)
    num_dst = math.prod(g // s for g, s in zip(grid, _strides(grid, sx, sy, st)))
    num_src = n - num_dst
    r = min(int(n * ratio), num_src) if num_dst > 0 else 0
    if r <= 0:
        return n, None
    agent_r = min(int(n * agent_ratio), num_src)
    if (n - agent_r) * 2 < n - r:
        return n - r, n - agent_r
    return n - r, None


def destination_partition(
    hw, sx: int, sy: int, *, use_rand: bool = False,
    generator: Optional[torch.Generator] = None, device=None, st: int = 1,
) -> Tuple[Tensor, Tensor]:
    """Split the row-major ``h × w`` (or ``t × h × w``) grid into ``(dst, src)`` token indices.

    Every full ``sy × sx`` (``st × sy × sx``) cell contributes one destination: a uniformly random
    position of the cell (``use_rand=True``, drawn with ``generator``) or its first (top-left) token
    (``use_rand=False``).  Tokens of the last rows/columns/frames that do not fill a cell are always
    sources.  Both index tensors are in increasing (row-major) order.
    """
    grid = tuple(int(v) for v in hw)
    strides = _strides(grid, sx, sy, st)
    cells = tuple(g // s for g, s in zip(grid, strides))
    cell_size = math.prod(strides)
    if use_rand:
        gen_device = generator.device if generator is not None else device
        offset = torch.randint(cell_size, cells, generator=generator, device=gen_device).to(device)
    else:
        offset = torch.zeros(cells, dtype=torch.long, device=device)
    index = torch.zeros(cells, dtype=torch.long, device=device)
    inner = cell_size
    for axis, (size, stride) in enumerate(zip(grid, strides)):  # position along each axis, row-major
        inner //= stride
        shape = [1] * len(grid)
        shape[axis] = cells[axis]
        pos = torch.arange(cells[axis], device=device).view(shape) * stride + (offset // inner) % stride
        index = index * size + pos
    is_dst = torch.zeros(math.prod(grid), dtype=torch.bool, device=device)
    is_dst[index.reshape(-1)] = True
    return is_dst.nonzero().squeeze(1), (~is_dst).nonzero().squeeze(1)


def _flat_rows(slot: Tensor, rows: int) -> Tensor:
    """``slot`` (B, N) as indices into the batch-flattened ``(B·rows)`` merged rows."""
    offsets = torch.arange(slot.shape[0], device=slot.device)[:, None] * rows
    return (slot + offsets).reshape(-1)


def _bags(flat: Tensor, counts: Tensor) -> Tuple[Tensor, Tensor]:
    """``embedding_bag`` layout of a row map: token indices grouped by row, and row offsets."""
    order = flat.argsort(stable=True)
    offsets = counts.cumsum(0) - counts
    return order, offsets


def _bag_reduce(x2d: Tensor, bags: Tuple[Tensor, Tensor], weights: Optional[Tensor] = None) -> Tensor:
    """Row means (``weights=None``) or weighted row sums of the rows of ``x2d`` by ``bags``: one
    ``embedding_bag`` call, parallel over the output rows and contiguous in memory (far faster on
    CPU than ``scatter_reduce``/``index_add_``, which add row by row or column by column)."""
    order, offsets = bags
    if weights is None:
        return F.embedding_bag(order, x2d, offsets, mode="mean")
    return F.embedding_bag(order, x2d, offsets, mode="sum", per_sample_weights=weights.to(x2d.dtype))


@dataclass
class TokenMatch:
    """One matching on one batch of token grids; apply it to any ``(B, N, C)`` tensor.

    ``slot`` (B, N) maps each token to its row of the merged tensor (``None``: no merging),
    ``agent_slot`` (B, N) to its row of the agent tensor (``None``: no agents).
    """

    num_tokens: int
    num_merged: int
    slot: Optional[Tensor] = None
    num_agents: Optional[int] = None
    agent_slot: Optional[Tensor] = None

    def __post_init__(self) -> None:
        self._cache: dict = {}

    def _index(self, which: str) -> Tuple[Tensor, Tensor]:
        """Flattened row indices and row sizes of ``slot``/``agent_slot`` (computed once)."""
        if which not in self._cache:
            slot, rows = (self.slot, self.num_merged) if which == "slot" else (self.agent_slot, self.num_agents)
            flat = _flat_rows(slot, rows)
            counts = torch.bincount(flat, minlength=slot.shape[0] * rows)
            self._cache[which] = (flat, counts)
        return self._cache[which]

    def _bags(self, which: str) -> Tuple[Tensor, Tensor]:
        key = which + "/bags"
        if key not in self._cache:
            self._cache[key] = _bags(*self._index(which))
        return self._cache[key]

    def _agent_bags_over_rows(self) -> Tuple[Tuple[Tensor, Tensor], Tensor]:
        """Agents as weighted means of the *merged rows*: every merged row lies inside one agent
        group (the agent merge takes the same most-similar sources, and more of them), so an agent
        is the mean of its merged rows weighted by their sizes."""
        if "rows->agents" not in self._cache:
            B = self.slot.shape[0]
            row_agent = torch.empty(B, self.num_merged, dtype=torch.long, device=self.slot.device)
            row_agent.scatter_(1, self.slot, self.agent_slot)
            flat = _flat_rows(row_agent, self.num_agents)
            _, row_sizes = self._index("slot")
            _, agent_sizes = self._index("agent_slot")
            bags = _bags(flat, torch.bincount(flat, minlength=B * self.num_agents))
            weights = (row_sizes.double() / agent_sizes[flat].double())[bags[0]]
            self._cache["rows->agents"] = (bags, weights)
        return self._cache["rows->agents"]

    @property
    def has_agents(self) -> bool:
        return self.agent_slot is not None

    def _check(self, x: Tensor, n: int, what: str) -> None:
        if x.dim() != 3 or x.shape[1] != n:
            raise ValueError(f"TokenMatch.{what}: expected (batch, {n}, channels), got {tuple(x.shape)}")
        if self.slot is not None and x.shape[0] != self.slot.shape[0]:
            raise ValueError(f"TokenMatch.{what}: batch {x.shape[0]} does not match the matching's batch {self.slot.shape[0]}")

    def merge(self, x: Tensor) -> Tensor:
        """``(B, N, C) -> (B, N - r, C)``: merged sources averaged into their destination."""
        self._check(x, self.num_tokens, "merge")
        if self.slot is None:
            return x
        B, N, C = x.shape
        return _bag_reduce(x.reshape(B * N, C), self._bags("slot")).view(B, self.num_merged, C)

    def agents(self, x: Tensor) -> Optional[Tensor]:
        """``(B, N, C) -> (B, N - agent_r, C)`` agent tokens, or ``None`` when the matching has none."""
        self._check(x, self.num_tokens, "agents")
        if self.agent_slot is None:
            return None
        B, N, C = x.shape
        return _bag_reduce(x.reshape(B * N, C), self._bags("agent_slot")).view(B, self.num_agents, C)

    def agents_from_merged(self, merged: Tensor) -> Optional[Tensor]:
        """The agents of :meth:`agents`, computed from the output of :meth:`merge` (``N - r`` rows
        instead of ``N``): equal up to rounding, and cheaper."""
        self._check(merged, self.num_merged, "agents_from_merged")
        if self.agent_slot is None:
            return None
        B, n, C = merged.shape
        bags, weights = self._agent_bags_over_rows()
        return _bag_reduce(merged.reshape(B * n, C), bags, weights).view(B, self.num_agents, C)

    def unmerge(self, y: Tensor) -> Tensor:
        """``(B, N - r, C) -> (B, N, C)``: every token takes the output of the row it was merged into."""
        self._check(y, self.num_merged, "unmerge")
        if self.slot is None:
            return y
        B, _, C = y.shape
        flat, _ = self._index("slot")
        return y.reshape(B * self.num_merged, C).index_select(0, flat).view(B, self.num_tokens, C)


def _slots(order: Tensor, partner: Tensor, src: Tensor, dst: Tensor, r: int, n: int) -> Tensor:
    """Index map for a merge of the ``r`` best sources: rows ``[kept sources ; destinations]``."""
    B, num_src = order.shape
    num_kept = num_src - r
    slot = torch.empty(B, n, dtype=torch.long, device=order.device)
    slot[:, dst] = torch.arange(num_kept, num_kept + dst.numel(), device=order.device)
    kept, moved = order[:, r:], order[:, :r]
    src_b = src.expand(B, -1)
    slot.scatter_(1, src_b.gather(1, kept), torch.arange(num_kept, device=order.device).expand(B, -1))
    slot.scatter_(1, src_b.gather(1, moved), num_kept + partner.gather(1, moved))
    return slot


@torch.no_grad()
def match_tokens(
    metric: Tensor,
    hw,
    *,
    sx: int = 2,
    sy: int = 2,
    ratio: float = 0.5,
    agent_ratio: float = 0.0,
    use_rand: bool = False,
    generator: Optional[torch.Generator] = None,
    fp32: bool = False,
    st: int = 1,
) -> TokenMatch:
    """Bipartite soft matching of the tokens of ``metric`` (B, h·w, C) on the ``hw`` grid.

    Args:
        metric: the features whose cosine similarity decides the pairs (AgentSD: the input ``x`` of
            the transformer block, before ``norm1``, as the official ``compute_merge(x)``).
        hw: ``(h, w)`` of the token grid, row-major, or ``(t, h, w)`` for video; need not be
            divisible by the strides.
        sx, sy: destination stride: one destination per ``sy × sx`` cell.
        ratio: fraction of the tokens removed by merging (``r = int(N·ratio)``, clipped to the
            number of sources).  ``ratio = 0`` gives the identity and no agents.
        agent_ratio: the same for the agent set; agents exist only if ``(N - agent_r)·2 < N - r``.
        use_rand: random destination in each cell (drawn from ``generator``); otherwise top-left.
        generator: a ``torch.Generator`` for reproducible random destinations.
        st: temporal destination stride of a ``(t, h, w)`` grid.
        fp32: compute the similarities in float32 (the norms always are).
    """
    if not isinstance(metric, Tensor) or metric.dim() != 3:
        raise ValueError(f"match_tokens: metric must be a (batch, tokens, channels) tensor, got {getattr(metric, 'shape', type(metric))}")
    grid = _check_settings(hw, sx, sy, ratio, agent_ratio, st)
    B, n, _ = metric.shape
    if n != math.prod(grid):
        shape = "x".join(map(str, grid))
        raise ValueError(f"match_tokens: {n} tokens do not form the {shape} grid (expected {math.prod(grid)})")
    num_merged, num_agents = merge_counts(grid, sx=sx, sy=sy, ratio=ratio, agent_ratio=agent_ratio, st=st)
    if num_merged == n:
        return TokenMatch(num_tokens=n, num_merged=n)
    dst, src = destination_partition(grid, sx, sy, use_rand=use_rand, generator=generator, device=metric.device, st=st)
    # cosine similarity of each source with each destination; only the destinations are normalised
    # before the product, the sources after the max (a positive per-row factor keeps the argmax)
    tiny = torch.finfo(torch.float32).tiny
    # (in float32; a half-precision product is formed of unit vectors, whose scores round alike; on a
    # CPU the product is float32 too: CPUs without native bf16/fp16 kernels run a half-precision
    # batched product tens of times slower, which made the matching most of a bf16 forward)
    norms = metric.float().norm(dim=-1, keepdim=True).clamp_min(tiny)  # (B, N, 1), float32
    if fp32 or metric.dtype == torch.float32 or metric.device.type == "cpu":
        work = metric.float()
        dst_unit = work[:, dst] / norms[:, dst]
    else:
        work = (metric.float() / norms).to(metric.dtype)
        dst_unit, norms = work[:, dst], torch.ones_like(norms)
    best, partner = (work @ dst_unit.transpose(1, 2)).max(dim=-1)  # every token (no gather), (B, N)
    best = best[:, src].float() / norms[:, src, 0]
    partner = partner[:, src]
    order = best.argsort(dim=-1, descending=True, stable=True)  # most similar sources first
    slot = _slots(order, partner, src, dst, n - num_merged, n)
    match = TokenMatch(num_tokens=n, num_merged=num_merged, slot=slot)
    if num_agents is not None:
        match.num_agents = num_agents
        match.agent_slot = _slots(order, partner, src, dst, n - num_agents, n)
    return match


def merge_tokens(
    x: Tensor,
    hw: Tuple[int, int],
    *,
    metric: Optional[Tensor] = None,
    **settings,
) -> Tuple[Tensor, Optional[Tensor], Callable[[Tensor], Tensor]]:
    """Merge ``x`` (B, h·w, C) and build its agents: returns ``(merged, agents_or_None, unmerge)``.

    ``metric`` defaults to ``x``; ``settings`` are those of :func:`match_tokens`.
    """
    match = match_tokens(x if metric is None else metric, hw, **settings)
    return match.merge(x), match.agents(x), match.unmerge

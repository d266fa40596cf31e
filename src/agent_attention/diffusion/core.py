"""The model-independent AgentSD computation of one attention call (plain torch, no diffusers).

An attention call of a denoiser sees the ``N`` *image* tokens of a 2-D ``(h, w)`` or 3-D
``(t, h, w)`` token grid and, in joint (MMDiT) attention, ``T`` *text* tokens.  A :class:`Reduction`
says how the image tokens of one call are reduced under one :class:`~.settings.AgentSDSettings`:

* ``agentsd`` (the paper): tokens merged by bipartite matching (ToMe), queries, keys and values
  on the ``N - r`` merged rows, agents = the stronger merge of the same tokens, output unmerged by
  copy; plain softmax attention (ToMe) when the agents are not fewer than half the merged rows;
* ``todo``: all ``N`` queries, keys/values average-pooled on the grid (ToDo);
* ``todo+agents``: ToDo's pooled keys/values, agents pooled on ``st × sy × sx`` cells.

:func:`attention_call` then projects with the layer's own modules (a :class:`Stream` per token
stream), applies its norms and position encoding, and attends.  Text tokens stay exact: they are
keys/values of every query and agent, and their own queries use exact softmax attention over all
keys.  Image queries use agent attention
``softmax(q aᵀ s^k_scale2) · softmax(a kᵀ s) · v + k_shortcut · v_self`` when there are agents.

Without a position encoding the tokens are reduced *before* the projections (fewer rows to project;
equal up to rounding for the affine projections).  With one (RoPE: the encoding depends on the
position) every token is projected, normalised and rotated first, then the rows are reduced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import agent_attention
from .merge import TokenMatch, match_tokens
from .settings import AgentSDSettings
from .todo import pool_tokens, pooled_size, project

__all__ = ["Stream", "Reduction", "reduce_tokens", "attention_call", "sdpa", "grid_numel"]

SoftmaxAttention = Callable[[Tensor, Tensor, Tensor, float], Tensor]


def grid_numel(grid: Sequence[int]) -> int:
    return math.prod(int(g) for g in grid)


def sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Softmax attention on ``(B, heads, S, d)`` tensors (the default of :func:`attention_call`)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


@dataclass
class Stream:
    """How the features of one token stream become per-head queries, keys and values: the layer's
    own projections, its q/k norms (applied on ``(B, heads, S, d)``) and its position encoding
    (``rotary(t)`` on ``(B, heads, S, d)`` for every token of the stream, or ``None``)."""

    to_q: Callable[[Tensor], Tensor]
    to_k: Callable[[Tensor], Tensor]
    to_v: Callable[[Tensor], Tensor]
    heads: int
    norm_q: Optional[Callable[[Tensor], Tensor]] = None
    norm_k: Optional[Callable[[Tensor], Tensor]] = None
    rotary: Optional[Callable[[Tensor], Tensor]] = None

    def split(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Normalised, rotated ``(B, heads, S, d)`` queries, keys and values of every token of ``x``."""
        q, k, v = (self.split(t) for t in project(x, [self.to_q, self.to_k, self.to_v]))
        q, k = self.norm(q, self.norm_q), self.norm(k, self.norm_k)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        return q, k, v

    @staticmethod
    def norm(t: Tensor, norm) -> Tensor:
        return t if norm is None else norm(t)


class Reduction:
    """How the image tokens of one attention call are reduced (see the module docstring).

    ``queries(x)`` the rows that become queries, ``keys(x, xq)`` the rows that become keys/values,
    ``agents(x, xq)`` the agent rows (or ``None``), ``expand(y)`` the query rows back to every
    token; ``x`` holds all ``N`` tokens, ``xq`` the output of ``queries(x)``.
    """

    def __init__(self, method: str, grid: Tuple[int, ...], *, match: Optional[TokenMatch] = None,
                 kv_grid: Optional[Tuple[int, ...]] = None, agent_grid: Optional[Tuple[int, ...]] = None):
        self.method, self.grid, self.match = method, tuple(grid), match
        self.kv_grid, self.agent_grid = kv_grid, agent_grid

    @property
    def merges(self) -> bool:
        return self.match is not None

    @property
    def has_agents(self) -> bool:
        return self.match.has_agents if self.merges else self.agent_grid is not None

    @property
    def label(self) -> str:
        """The name of the path, as counted in ``AgentSDState.calls``."""
        if self.merges:
            return "agent" if self.has_agents else "tome"
        return "todo+agents" if self.has_agents else "todo"

    def queries(self, x: Tensor) -> Tensor:
        return self.match.merge(x) if self.merges else x

    def keys(self, x: Tensor, xq: Tensor) -> Tensor:
        return xq if self.merges else pool_tokens(x, self.grid, self.kv_grid)

    def agents(self, x: Tensor, xq: Tensor) -> Optional[Tensor]:
        if self.merges:  # the agents' mean of the merged rows (cheaper than of all tokens)
            return self.match.agents_from_merged(xq) if self.match.has_agents else None
        return None if self.agent_grid is None else pool_tokens(x, self.grid, self.agent_grid)

    def expand(self, y: Tensor) -> Tensor:
        return self.match.unmerge(y) if self.merges else y


def reduce_tokens(settings: AgentSDSettings, grid: Sequence[int], metric: Tensor, *,
                  generator: Optional[torch.Generator] = None, fp32: bool = False) -> Reduction:
    """The :class:`Reduction` of ``settings`` for tokens on ``grid``; ``metric`` (B, N, C) decides
    the merge pairs (AgentSD matches on the block input), ``generator`` draws random destinations
    (``None``: top-left destinations)."""
    grid = tuple(int(g) for g in grid)
    if settings.method == "agentsd":
        match = match_tokens(
            metric, grid, sx=settings.sx, sy=settings.sy, st=settings.st, ratio=settings.ratio,
            agent_ratio=settings.agent_ratio, use_rand=generator is not None, generator=generator, fp32=fp32,
        )
        return Reduction("agentsd", grid, match=match)
    f = float(settings.todo_factor)
    kv_grid = pooled_size(grid, f, f)
    agent_grid = None
    if settings.method == "todo+agents":
        candidate = pooled_size(grid, settings.sy, settings.sx, settings.st)
        if 2 * grid_numel(candidate) < grid_numel(kv_grid):
            agent_grid = candidate
    return Reduction(settings.method, grid, kv_grid=kv_grid, agent_grid=agent_grid)


def _merge_heads(t: Tensor) -> Tensor:
    return t.transpose(1, 2).flatten(2)


def _image_qkv(x: Tensor, red: Reduction, s: Stream):
    """``(q, k, v, agents, shortcut)`` of the image tokens, ``(B, heads, S, d)``."""
    if s.rotary is not None:  # position-dependent: project, normalise and rotate every token, then reduce
        q, k, v = (_merge_heads(t) for t in s.qkv(x))
        qr = red.queries(q)
        kr, vr = (red.keys(t, red.queries(t) if red.merges else t) for t in (k, v))
        a = red.agents(q, qr)
        shortcut = vr if red.merges else v
        return s.split(qr), s.split(kr), s.split(vr), None if a is None else s.split(a), s.split(shortcut)
    xq = red.queries(x)
    a_in = red.agents(x, xq)
    if red.merges:
        q, k, v = project(xq, [s.to_q, s.to_k, s.to_v])
        shortcut = v
    elif a_in is None:
        q = s.to_q(x)
        k, v = project(red.keys(x, xq), [s.to_k, s.to_v])
        shortcut = v
    else:  # full values for the shortcut; pooled values = the pooled full values (an affine map)
        q, shortcut = project(x, [s.to_q, s.to_v])
        k = s.to_k(red.keys(x, xq))
        v = red.keys(shortcut, shortcut)
    q, k, v, shortcut = (s.split(t) for t in (q, k, v, shortcut))
    a = None if a_in is None else s.norm(s.split(s.to_q(a_in)), s.norm_q)
    return s.norm(q, s.norm_q), s.norm(k, s.norm_k), v, a, shortcut


def attention_call(
    x: Tensor,
    red: Reduction,
    image: Stream,
    settings: AgentSDSettings,
    *,
    scale: float,
    text: Optional[Tensor] = None,
    text_stream: Optional[Stream] = None,
    fp32: bool = False,
    softmax: SoftmaxAttention = sdpa,
) -> Tuple[Tensor, Optional[Tensor]]:
    """One attention call: ``(image rows, text rows or None)``, each ``(B, S, heads·d)`` before
    the layer's output projections; the image rows are the reduced query rows (apply the output
    projection, then ``red.expand``).

    Args:
        x: the image tokens ``(B, N, C)`` (the layer's input, after the block's norm).
        red: their :class:`Reduction` (:func:`reduce_tokens`).
        image, text_stream: the :class:`Stream` of the image and text tokens.
        text: the text tokens ``(B, T, C')`` of joint attention, or ``None``.
        fp32: both softmax steps in float32 (cast back to the query's dtype).
        softmax: the plain softmax attention on ``(B, heads, S, d)`` (e.g. diffusers' dispatch).
    """
    q, k, v, a, shortcut = _image_qkv(x, red, image)
    n_img = q.shape[2]
    if text is not None:
        qt, kt, vt = text_stream.qkv(text)
        q, k, v = torch.cat([q, qt], 2), torch.cat([k, kt], 2), torch.cat([v, vt], 2)
    dtype = q.dtype
    if fp32 and dtype != torch.float32:
        with torch.autocast(device_type=q.device.type, enabled=False):
            up = lambda t: None if t is None else t.float()  # noqa: E731
            out = _attend(up(q), up(k), up(v), up(a), up(shortcut), n_img, scale, settings, softmax).to(dtype)
    else:
        out = _attend(q, k, v, a, shortcut, n_img, scale, settings, softmax)
    out = _merge_heads(out)
    if text is None:
        return out, None
    return out[:, :n_img], out[:, n_img:]


def _attend(q, k, v, agents, shortcut, n_img: int, scale: float, settings: AgentSDSettings, softmax) -> Tensor:
    if agents is None:
        return softmax(q, k, v, scale)
    out = agent_attention(q[:, :, :n_img], k, v, agents, scale=scale, query_scale=scale ** settings.k_scale2)
    if out.requires_grad:  # SDPA's backward needs its output
        out = out + settings.k_shortcut * shortcut
    else:
        out = out.add_(shortcut, alpha=settings.k_shortcut)  # in place: a fresh tensor of SDPA
    if q.shape[2] == n_img:
        return out
    return torch.cat([out, softmax(q[:, :, n_img:], k, v, scale)], 2)  # text queries: exact

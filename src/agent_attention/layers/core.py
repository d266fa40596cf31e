"""The agent attention core: projected ``q, k, v`` on a token grid in, attention out.

:class:`AgentAttentionCore` owns everything between the projections: the agent tokens pooled from
the queries, the learned agent biases of the paper (resized to the actual grid at run time, cached
at inference), the call of the op :func:`agent_attention.functional.agent_attention` and the
depthwise-convolution branch on ``V``. It has no projections: :class:`~.attention.AgentAttention`
adds them (the drop-in module), CSWin's agent branch uses the core as it is.

The parameter names are those of the official models (``an_bias``, ``na_bias``, ``ah_bias``,
``aw_bias``, ``ha_bias``, ``wa_bias``, DeiT's ``ac_bias``/``ca_bias``, ``dwc`` or CSWin's ``get_v``).
"""
from __future__ import annotations

import collections
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._grids import HW, _channels_last_grid, _grid_tokens, channels_last_grid_3d, fx_tracing, pool_agents, to_tuple_hw
from ..functional import agent_attention
from .biases import AgentBiases

# FX symbolic tracing (torch.fx, timm's feature extraction, torchvision's create_feature_extractor):
# the size-dependent helpers are leaves of the graph, so a model built on AgentAttention traces
# (the bias helpers: in .biases).
for _name in ("agent_attention", "pool_agents", "_channels_last_grid", "channels_last_grid_3d", "_grid_tokens"):
    torch.fx.wrap(_name)


__all__ = ["AgentAttentionCore", "AgentInputs"]


class AgentInputs(NamedTuple):
    """What :meth:`AgentAttentionCore.attention_inputs` prepares for the op: per-head ``q, k, v`` and
    ``agents`` ``(B, h, ·, d)``, the biases for these grids (or ``None``), the key padding mask, the
    token grids and the bool validity of the (non-prefix) query tokens (``None`` = all valid)."""

    q: Tensor
    k: Tensor
    v: Tensor
    agents: Tensor
    agent_bias: Optional[Tensor]
    query_bias: Optional[Tensor]
    key_padding_mask: Optional[Tensor]
    query_hw: Optional[tuple]
    key_hw: Optional[tuple]
    valid: Optional[Tensor]


def _check_attend_inputs(m: "AgentAttentionCore", q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> None:
    """Shape checks of :meth:`AgentAttentionCore.attention_inputs` (one FX leaf: no branches on proxies)."""
    B, C = q.shape[0], q.shape[-1]
    if C != m.dim or k.shape[-1] != C or v.shape[-1] != C:
        raise ValueError(f"AgentAttention: q/k/v must have {m.dim} channels, got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if k.shape[:2] != v.shape[:2] or k.shape[0] != B:
        raise ValueError(f"AgentAttention: k {tuple(k.shape)} and v {tuple(v.shape)} must match each other and batch {B}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, k.shape[1]):
            raise ValueError(
                f"AgentAttention: key_padding_mask must be bool of shape (batch, keys) = {(B, k.shape[1])}, "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )


class AgentAttentionCore(AgentBiases, nn.Module):
    """Agent attention on projected tokens: ``agent_attention(Q, K, V, pool(Q)) + DWC(V)``.

    Args:
        dim: channels ``C`` of the tokens.
        num_heads: attention heads (``C`` must be divisible by it).
        agent_num: number of agent tokens. For 2-D grids a perfect square ``p²`` (agents are
            pooled to a ``p × p`` grid); set :attr:`agent_shape` to pool to another grid at run
            time (the biases follow). For 3-D grids the agents form a ``t × p × p'`` grid
            (``agent_grid``; default ``c × c × c`` for a perfect cube, else ``1 × p × p``).
        window: the grid ``(Hs, Ws)`` the row/column bias terms are built for (the official models
            use the stage resolution). Any other run-time grid is handled by resizing. Defaults to
            ``bias_grid``.
        ndim: 2 for token grids, 1 for sequences, 3 for ``T × H × W`` volumes (video).
        agent_bias: learn the agent biases. dwc: add the depthwise-conv branch on ``V`` (see
            :meth:`add_dwc`). dwc_kernel: its (odd) kernel size. dwc_name: its attribute name
            (``"dwc"``; CSWin: ``"get_v"``).
        num_prefix_tokens: leading non-grid tokens (DeiT's class token); they get their own biases
            ``ac_bias``/``ca_bias``, are not pooled into agents and get no DWC term.
        bias_grid: side of the coarse ``an_bias``/``na_bias`` maps (7 in the paper); for ``ndim=3``
            an int or ``(t0, r, r')`` (default ``(2, 7, 7)`` when 7).
        seq_bias_len: length of the 1-D bias maps when ``ndim=1``.
        attn_drop: dropout on the attention weights (training only).
        scale: logit scale, default ``head_dim ** -0.5``.
        agent_grid: ``ndim=3`` only: the ``(t, p, p')`` agent grid (``t·p·p' = agent_num``).

    :meth:`attend` ``(q, k, v, hw)`` is the computation; ``forward`` is the same call.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        agent_num: int = 49,
        *,
        window: Optional[Union[int, Sequence[int]]] = None,
        ndim: int = 2,
        agent_bias: bool = True,
        dwc: bool = True,
        dwc_kernel: int = 3,
        dwc_name: str = "dwc",
        num_prefix_tokens: int = 0,
        bias_grid: Union[int, Sequence[int]] = 7,
        seq_bias_len: int = 16,
        attn_drop: float = 0.0,
        scale: Optional[float] = None,
        agent_grid: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"AgentAttention: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if isinstance(ndim, bool) or ndim not in (1, 2, 3):
            raise ValueError(f"AgentAttention: ndim must be 1 (sequences), 2 (grids) or 3 (volumes), got {ndim}")
        for name, flag in (("agent_bias", agent_bias), ("dwc", dwc)):
            if not isinstance(flag, bool):
                raise TypeError(f"AgentAttention: {name} must be True or False, got {flag!r}")
        if isinstance(agent_num, bool) or not isinstance(agent_num, int) or agent_num <= 0:
            raise ValueError(f"AgentAttention: agent_num must be a positive int, got {agent_num!r}")
        p = math.isqrt(agent_num)
        if ndim == 2 and p * p != agent_num:
            raise ValueError(
                f"AgentAttention: agent_num must be a perfect square for 2-D pooling (p x p agents), got {agent_num}"
            )
        if num_prefix_tokens and ndim != 2:
            raise ValueError("AgentAttention: num_prefix_tokens is only supported for 2-D grids")
        if agent_grid is not None and ndim != 3:
            raise ValueError("AgentAttention: agent_grid is for ndim=3; for 2-D grids set agent_shape")
        self.dim, self.num_heads, self.agent_num, self.ndim = dim, num_heads, agent_num, ndim
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5 if scale is None else scale
        self.num_prefix_tokens = num_prefix_tokens
        self.dwc_name: Optional[str] = None
        self.attn_drop = attn_drop
        self._attend_hooks: "collections.OrderedDict[int, object]" = collections.OrderedDict()
        self.agent_shape: tuple = (p, p) if ndim != 3 else _default_agent_grid_3d(agent_num, agent_grid)
        self.window: Optional[HW] = None

        self.has_agent_bias = agent_bias
        if agent_bias:
            self.window = self._init_agent_biases(bias_grid, window, seq_bias_len)
        self._agent_grid_built = self.agent_shape

        if dwc:
            self.add_dwc(dwc_kernel, dwc_name)

    def add_dwc(self, kernel: int = 3, name: str = "dwc") -> None:
        """Add the depthwise-conv branch on ``V`` (``kernel`` odd: keeps the grid size) as attribute
        ``name``. Modules with projections call it after creating them (the official parameter order)."""
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel <= 0 or kernel % 2 == 0:
            raise ValueError(f"AgentAttention: dwc_kernel must be a positive odd int (keeps the grid size), got {kernel!r}")
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self.ndim]
        setattr(self, name, conv(self.dim, self.dim, kernel, padding=kernel // 2, groups=self.dim))
        self.dwc_name = name

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, ndim={self.ndim}, "
            f"agent_shape={self.agent_shape}, window={self.window}, agent_bias={self.has_agent_bias}, "
            f"dwc={self.dwc_name is not None}, prefix={self.num_prefix_tokens}"
        )

    def _check_tokens(self, x: Tensor, hw, name: str) -> Optional[tuple]:
        if fx_tracing():  # sizes are graph values: checked at run time of the graph only
            return None if hw is None else to_tuple_hw(hw, self.ndim)
        if not isinstance(x, Tensor):
            raise TypeError(f"AgentAttention: {name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"AgentAttention: {name} must have shape (batch, tokens, channels), got {tuple(x.shape)}")
        if hw is None:
            if self.ndim >= 2 and name == "x":
                grid = "hw=(H, W)" if self.ndim == 2 else "hw=(T, H, W)"
                raise ValueError(f"AgentAttention: {self.ndim}-D module needs the token grid {grid}; build with ndim=1 for sequences")
            return None
        if self.ndim == 1:
            raise ValueError(f"AgentAttention: module was built for sequences (ndim=1) but {name}_hw was given")
        grid = to_tuple_hw(hw, self.ndim, "hw" if name == "x" else f"{name}_hw")
        P = self.num_prefix_tokens if name == "x" else 0
        if x.shape[1] != math.prod(grid) + P:
            need = "*".join("TWH"[-i] for i in range(self.ndim, 0, -1)) if self.ndim == 3 else "H*W"
            raise ValueError(
                f"AgentAttention: {name} has {x.shape[1]} tokens but hw={grid} needs {need}{' + prefix' if P else ''} = {math.prod(grid) + P}"
            )
        return grid

    def _check_dtype_device(self, t: Tensor, name: str) -> None:
        if fx_tracing():
            return
        w = next(self.parameters(), None)
        if w is None:
            return
        if t.device != w.device:
            raise ValueError(f"AgentAttention: {name} is on {t.device} but the module's parameters are on {w.device}")
        if t.dtype != w.dtype and not torch.is_autocast_enabled(t.device.type):
            raise TypeError(
                f"AgentAttention: {name} has dtype {t.dtype} but the module's parameters are {w.dtype} "
                "(cast one of them, or run under torch.autocast)"
            )

    # ------------------------------------------------------------------ attention
    def forward(self, q: Tensor, k: Tensor, v: Tensor, hw: Optional[Sequence[int]], **kwargs) -> Tensor:
        """:meth:`attend`."""
        return self.attend(q, k, v, hw, **kwargs)

    def register_attend_hook(self, hook) -> "torch.utils.hooks.RemovableHandle":
        """Call ``hook(module, q, k, v, hw, kwargs)`` at every :meth:`attend` (projected inputs, before
        the agents are pooled); returns a handle whose ``remove()`` unregisters it. Used by the
        visualisation to capture what a block receives."""
        handle = torch.utils.hooks.RemovableHandle(self._attend_hooks)
        self._attend_hooks[handle.id] = hook
        return handle

    def attention_inputs(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        hw: Optional[Sequence[int]],
        *,
        key_hw: Optional[Sequence[int]] = None,
        key_padding_mask: Optional[Tensor] = None,
        cross: bool = False,
    ) -> AgentInputs:
        """Everything :meth:`attend` passes to the op, from projected ``q (B, N, C)``, ``k, v (B, M, C)``:
        the heads, the agents pooled from the queries and the biases for these grids.

        The one place that prepares the op's inputs: :meth:`attend` and the visualisation
        (:mod:`agent_attention.viz`) both use it.
        """
        qhw = self._check_tokens(q, hw, "x")
        khw = self._check_tokens(k, key_hw, "context") if cross else qhw
        if not fx_tracing():
            _check_attend_inputs(self, q, k, v, key_padding_mask)
        N, M = q.shape[1], k.shape[1]
        P = self.num_prefix_tokens
        valid = k_valid = None
        if key_padding_mask is not None:
            k_valid = ~key_padding_mask
            if not cross:
                valid = k_valid[:, P:]
        agents = pool_agents(q[:, P:], qhw, self._agent_grid(), valid)
        seq = self.ndim == 1
        b1, b2 = self.biases(qhw, khw, N, M, valid if seq else None, k_valid if seq else None)
        h, d = self.num_heads, self.head_dim

        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (h, d)).transpose(1, 2)

        return AgentInputs(heads(q), heads(k), heads(v), heads(agents), b1, b2, key_padding_mask, qhw, khw, valid)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        hw: Optional[Sequence[int]],
        *,
        key_hw: Optional[Sequence[int]] = None,
        key_padding_mask: Optional[Tensor] = None,
        cross: bool = False,
    ) -> Tensor:
        """Agent attention on projected ``q (B, N, C)``, ``k, v (B, M, C)``; returns ``(B, N, C)``.

        Adds the DWC branch for self-attention (``cross=False``); no output projection.
        """
        if self._attend_hooks:
            for hook in tuple(self._attend_hooks.values()):
                hook(self, q, k, v, hw, dict(key_hw=key_hw, key_padding_mask=key_padding_mask, cross=cross))
        t = self.attention_inputs(q, k, v, hw, key_hw=key_hw, key_padding_mask=key_padding_mask, cross=cross)
        B, N, C = q.shape
        P = self.num_prefix_tokens
        out = agent_attention(
            t.q, t.k, t.v, t.agents,
            agent_bias=t.agent_bias, query_bias=t.query_bias, scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0,
            key_padding_mask=t.key_padding_mask,
        )
        out = out.transpose(1, 2).reshape(B, N, C)
        if self.dwc_name is not None and not cross:
            vp = v[:, P:]
            if t.valid is not None:
                vp = vp * t.valid[..., None].to(vp.dtype)
            conv = getattr(self, self.dwc_name)
            qhw = t.query_hw
            if qhw is None:
                local = conv(vp.transpose(1, 2)).transpose(1, 2)
            elif self.ndim == 3:
                local = _grid_tokens(conv(channels_last_grid_3d(vp, qhw)))
            else:  # channels-last in and out: no transposing copies around the conv
                local = _grid_tokens(conv(_channels_last_grid(vp, qhw)))
            out = out + local if P == 0 else torch.cat([out[:, :P], out[:, P:] + local], dim=1)
        return out


def _default_agent_grid_3d(agent_num: int, agent_grid: Optional[Sequence[int]]) -> tuple:
    if agent_grid is not None:
        grid = to_tuple_hw(agent_grid, 3, "agent_grid")
        if math.prod(grid) != agent_num:
            raise ValueError(f"AgentAttention: agent_grid {grid} must have agent_num = {agent_num} cells")
        return grid
    c = round(agent_num ** (1 / 3))
    if c ** 3 == agent_num:
        return (c, c, c)
    p = math.isqrt(agent_num)
    if p * p == agent_num:
        return (1, p, p)
    raise ValueError(f"AgentAttention: give agent_grid=(t, p, q) with t*p*q = {agent_num} for ndim=3")

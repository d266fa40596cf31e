"""Agent attention modules.

:class:`AgentAttention` is the drop-in module: projections, agent tokens pooled from the queries,
the learned agent biases of the paper (resized to the actual grid at run time), the depthwise
convolution branch on ``V`` and the output projection.  It works on

* 2-D token grids: ``forward(x, hw=(H, W))`` with ``x`` of shape ``(B, H·W, C)``, any ``H × W``;
* 1-D sequences (``ndim=1``): agents pooled along the sequence, optional key padding mask;
* cross-attention: ``forward(x, hw, context=ctx, context_hw=...)``.

The parameter names are those of the official models (``an_bias``, ``na_bias``, ``ah_bias``,
``aw_bias``, ``ha_bias``, ``wa_bias``, DeiT's ``ac_bias``/``ca_bias``, ``qkv`` or ``q``/``kv``,
``proj``, ``dwc`` or CSWin's ``get_v``), so the model zoo builds on it and loads the released
checkpoints.  The attention itself is :func:`agent_attention.functional.agent_attention`.
"""
from __future__ import annotations

import collections
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._grids import (
    HW,
    _channels_last_grid,
    _grid_tokens,
    agent_bias_2d,
    agent_bias_3d,
    channels_last_grid_3d,
    fx_tracing,
    pool_agents,
    query_bias_2d,
    query_bias_3d,
    resize_1d,
    resize_1d_masked,
    resize_agents,
    to_2tuple_hw,
    to_tuple_hw,
    tracing,
)
from .functional import agent_attention

# FX symbolic tracing (torch.fx, timm's feature extraction, torchvision's create_feature_extractor):
# the size-dependent helpers are leaves of the graph, so a model built on AgentAttention traces.
for _name in ("agent_attention", "pool_agents", "agent_bias_2d", "query_bias_2d", "agent_bias_3d", "query_bias_3d",
              "resize_1d", "resize_1d_masked", "resize_agents", "_channels_last_grid", "channels_last_grid_3d",
              "_grid_tokens"):
    torch.fx.wrap(_name)

__all__ = [
    "AgentAttention",
    "AgentInputs",
    "agent_bias_2d",
    "query_bias_2d",
    "resize_1d",
    "resize_1d_masked",
    "resize_agents",
    "pool_agents",
    "to_2tuple_hw",
]

class AgentInputs(NamedTuple):
    """What :meth:`AgentAttention.attention_inputs` prepares for the op: per-head ``q, k, v`` and
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


def _check_attend_inputs(m: "AgentAttention", q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> None:
    """Shape checks of :meth:`AgentAttention.attention_inputs` (one FX leaf: no branches on proxies)."""
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


def _snapshot_matches(params: Sequence[Tensor], snapshot: Sequence[Tensor]) -> bool:
    """Whether the parameters hold exactly the values of ``snapshot`` (same dtype, device, shape)."""
    return all(
        p.dtype == s.dtype and p.device == s.device and p.shape == s.shape and torch.equal(p, s)
        for p, s in zip(params, snapshot)
    )


class AgentAttention(nn.Module):
    """Agent attention block: ``proj(agent_attention(Q, K, V, pool(Q)) + DWC(V))``.

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
        qkv_layout: ``"fused"`` (one ``qkv`` Linear, as DeiT/Swin), ``"split"`` (``q`` and ``kv``, as
            PVT) or ``"none"`` (no projections; call :meth:`attend` with projected q/k/v, as CSWin).
        proj: add the output projection ``proj`` (with ``proj_drop``).
        agent_bias: learn the agent biases. dwc: add the depthwise-conv branch on ``V``.
        dwc_kernel: its (odd) kernel size. dwc_name: its attribute name (``"dwc"``; CSWin: ``"get_v"``).
        num_prefix_tokens: leading non-grid tokens (DeiT's class token); they get their own biases
            ``ac_bias``/``ca_bias``, are not pooled into agents and get no DWC term.
        bias_grid: side of the coarse ``an_bias``/``na_bias`` maps (7 in the paper); for ``ndim=3``
            an int or ``(t0, r, r')`` (default ``(2, 7, 7)`` when 7).
        seq_bias_len: length of the 1-D bias maps when ``ndim=1``.
        scale: logit scale, default ``head_dim ** -0.5``.
        agent_grid: ``ndim=3`` only: the ``(t, p, p')`` agent grid (``t·p·p' = agent_num``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        agent_num: int = 49,
        *,
        window: Optional[Union[int, Sequence[int]]] = None,
        ndim: int = 2,
        qkv_bias: bool = True,
        qkv_layout: str = "fused",
        proj: bool = True,
        agent_bias: bool = True,
        dwc: bool = True,
        dwc_kernel: int = 3,
        dwc_name: str = "dwc",
        num_prefix_tokens: int = 0,
        bias_grid: Union[int, Sequence[int]] = 7,
        seq_bias_len: int = 16,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        scale: Optional[float] = None,
        agent_grid: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"AgentAttention: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if isinstance(ndim, bool) or ndim not in (1, 2, 3):
            raise ValueError(f"AgentAttention: ndim must be 1 (sequences), 2 (grids) or 3 (volumes), got {ndim}")
        if qkv_layout not in ("fused", "split", "none"):
            raise ValueError(f"AgentAttention: qkv_layout must be 'fused', 'split' or 'none', got {qkv_layout!r}")
        for name, flag in (("agent_bias", agent_bias), ("dwc", dwc), ("proj", proj), ("qkv_bias", qkv_bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"AgentAttention: {name} must be True or False, got {flag!r}")
        if isinstance(dwc_kernel, bool) or not isinstance(dwc_kernel, int) or dwc_kernel <= 0 or dwc_kernel % 2 == 0:
            raise ValueError(f"AgentAttention: dwc_kernel must be a positive odd int (keeps the grid size), got {dwc_kernel!r}")
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
        self.qkv_layout = qkv_layout
        self.num_prefix_tokens = num_prefix_tokens
        self.dwc_name = dwc_name if dwc else None
        self.agent_shape: tuple = (p, p) if ndim != 3 else _default_agent_grid_3d(agent_num, agent_grid)
        self.window: Optional[HW] = None
        h, A = num_heads, agent_num

        def param(*shape):
            t = nn.Parameter(torch.zeros(*shape))
            nn.init.trunc_normal_(t, std=0.02)
            return t

        self.has_agent_bias = agent_bias
        if agent_bias and ndim == 2:
            Hs, Ws = to_2tuple_hw(bias_grid if window is None else window, "window")
            self.window = (Hs, Ws)
            self.an_bias = param(h, A, bias_grid, bias_grid)
            self.na_bias = param(h, A, bias_grid, bias_grid)
            self.ah_bias = param(1, h, A, Hs, 1)
            self.aw_bias = param(1, h, A, 1, Ws)
            self.ha_bias = param(1, h, Hs, 1, A)
            self.wa_bias = param(1, h, 1, Ws, A)
            if num_prefix_tokens:
                self.ac_bias = param(1, h, A, num_prefix_tokens)
                self.ca_bias = param(1, h, num_prefix_tokens, A)
        elif agent_bias and ndim == 3:
            grid3 = (2, bias_grid, bias_grid) if isinstance(bias_grid, int) else bias_grid
            grid3 = to_tuple_hw(grid3, 3, "bias_grid")
            self.an_bias = param(h, A, *grid3)
            self.na_bias = param(h, A, *grid3)
        elif agent_bias:
            self.an_bias = param(h, A, seq_bias_len)
            self.na_bias = param(h, A, seq_bias_len)
        self._agent_grid_built = self.agent_shape

        if qkv_layout == "fused":
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        elif qkv_layout == "split":
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        if proj:
            self.proj = nn.Linear(dim, dim)
            self.proj_drop = nn.Dropout(proj_drop)
        else:
            self.proj = None
        if dwc:
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim]
            setattr(self, dwc_name, conv(dim, dim, dwc_kernel, padding=dwc_kernel // 2, groups=dim))

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

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, ndim={self.ndim}, "
            f"agent_shape={self.agent_shape}, window={self.window}, agent_bias={self.has_agent_bias}, "
            f"dwc={self.dwc_name is not None}, prefix={self.num_prefix_tokens}"
        )

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

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        hw: Optional[Sequence[int]] = None,
        *,
        context: Optional[Tensor] = None,
        context_hw: Optional[Sequence[int]] = None,
        key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Self-attention over ``x (B, N, C)`` on the grid ``hw``, or cross-attention to ``context``.

        ``key_padding_mask`` (bool ``(B, M)``, ``True`` = padding) masks keys; in self-attention it
        also keeps padded tokens out of the agents. A sample whose keys are all padded gets a zero
        attention term (only the DWC branch and the projection biases remain).
        """
        if self.qkv_layout == "none":
            raise RuntimeError("AgentAttention(qkv_layout='none') has no projections: call attend(q, k, v, hw)")
        if not fx_tracing() and (x.dim() != 3 or x.shape[-1] != self.dim):
            raise ValueError(f"AgentAttention: x must have shape (batch, tokens, {self.dim}), got {tuple(x.shape)}")
        self._check_dtype_device(x, "x")
        if context is not None:
            self._check_dtype_device(context, "context")
        C = self.dim
        if context is None:
            if self.qkv_layout == "fused":
                q, k, v = self.qkv(x).unflatten(-1, (3, C)).unbind(-2)
            else:
                q = self.q(x)
                k, v = self.kv(x).unflatten(-1, (2, C)).unbind(-2)
            out = self.attend(q, k, v, hw, key_padding_mask=key_padding_mask)
        else:
            if not fx_tracing() and (
                    context.dim() != 3 or context.shape[-1] != C or context.shape[0] != x.shape[0]):
                raise ValueError(
                    f"AgentAttention: context must have shape ({x.shape[0]}, tokens, {C}), got {tuple(context.shape)}"
                )
            if self.qkv_layout == "fused":
                w, b = self.qkv.weight, self.qkv.bias
                q = F.linear(x, w[:C], None if b is None else b[:C])
                kv = F.linear(context, w[C:], None if b is None else b[C:])
            else:
                q, kv = self.q(x), self.kv(context)
            k, v = kv.unflatten(-1, (2, C)).unbind(-2)
            out = self.attend(q, k, v, hw, key_hw=context_hw, key_padding_mask=key_padding_mask, cross=True)
        if self.proj is not None:
            out = self.proj_drop(self.proj(out))
        return out

    def register_attend_hook(self, hook) -> "torch.utils.hooks.RemovableHandle":
        """Call ``hook(module, q, k, v, hw, kwargs)`` at every :meth:`attend` (projected inputs, before
        the agents are pooled); returns a handle whose ``remove()`` unregisters it. Used by the
        visualisation to capture what a block receives."""
        hooks = self.__dict__.setdefault("_attend_hooks", collections.OrderedDict())
        handle = torch.utils.hooks.RemovableHandle(hooks)
        hooks[handle.id] = hook
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
        hooks = self.__dict__.get("_attend_hooks")
        if hooks:
            for hook in tuple(hooks.values()):
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

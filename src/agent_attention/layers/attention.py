"""The drop-in module: :class:`AgentAttention` = projections around :class:`~.core.AgentAttentionCore`.

``qkv`` (one fused Linear, as DeiT/Swin) or ``q`` + ``kv`` (as PVT) make ``q, k, v`` from the tokens
(``k, v`` from ``context`` for cross-attention), the core attends, ``proj`` projects. It works on

* 2-D token grids: ``forward(x, hw=(H, W))`` with ``x`` of shape ``(B, H·W, C)``, any ``H × W``;
* 1-D sequences (``ndim=1``) and 3-D volumes (``ndim=3``, ``hw=(T, H, W)``);
* cross-attention: ``forward(x, hw, context=ctx, context_hw=...)``.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .._grids import fx_tracing
from .core import AgentAttentionCore

__all__ = ["AgentAttention"]


class AgentAttention(AgentAttentionCore):
    """Agent attention block: ``proj(agent_attention(Q, K, V, pool(Q)) + DWC(V))``.

    Args (the others are :class:`~.core.AgentAttentionCore`'s):
        qkv_layout: ``"fused"`` (one ``qkv`` Linear, as DeiT/Swin) or ``"split"`` (``q`` and ``kv``,
            as PVT). ``"none"`` (no projections) is the core itself: use
            :class:`~.core.AgentAttentionCore` (kept for compatibility, with a DeprecationWarning).
        qkv_bias: biases of the q/k/v projections.
        proj: add the output projection ``proj`` (with ``proj_drop``).

    Parameters are created in the official order: agent biases, projections, DWC.
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
        if qkv_layout not in ("fused", "split", "none"):
            raise ValueError(f"AgentAttention: qkv_layout must be 'fused' or 'split', got {qkv_layout!r}")
        if qkv_layout == "none":
            warnings.warn("AgentAttention(qkv_layout='none') is AgentAttentionCore (no projections; call attend)",
                          DeprecationWarning, stacklevel=2)
        for name, flag in (("proj", proj), ("qkv_bias", qkv_bias), ("dwc", dwc)):
            if not isinstance(flag, bool):
                raise TypeError(f"AgentAttention: {name} must be True or False, got {flag!r}")
        super().__init__(dim, num_heads, agent_num, window=window, ndim=ndim, agent_bias=agent_bias, dwc=False,
                         num_prefix_tokens=num_prefix_tokens, bias_grid=bias_grid, seq_bias_len=seq_bias_len,
                         attn_drop=attn_drop, scale=scale, agent_grid=agent_grid)
        self.qkv_layout = qkv_layout
        if qkv_layout == "fused":
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        elif qkv_layout == "split":
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        if proj:
            self.proj = nn.Linear(dim, dim)
            self.proj_drop = nn.Dropout(proj_drop)
        else:
            self.proj = None
        if dwc:
            self.add_dwc(dwc_kernel, dwc_name)

    def _project(self, x: Tensor, context: Optional[Tensor]):
        """``q`` from ``x``; ``k, v`` from ``context`` (cross-attention) or ``x``."""
        C = self.dim
        if context is None:
            if self.qkv_layout == "fused":
                return self.qkv(x).unflatten(-1, (3, C)).unbind(-2)
            k, v = self.kv(x).unflatten(-1, (2, C)).unbind(-2)
            return self.q(x), k, v
        if self.qkv_layout == "fused":
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:C], None if b is None else b[:C])
            kv = F.linear(context, w[C:], None if b is None else b[C:])
        else:
            q, kv = self.q(x), self.kv(context)
        k, v = kv.unflatten(-1, (2, C)).unbind(-2)
        return q, k, v

    def forward(  # type: ignore[override]
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
            if not fx_tracing() and (
                    context.dim() != 3 or context.shape[-1] != self.dim or context.shape[0] != x.shape[0]):
                raise ValueError(
                    f"AgentAttention: context must have shape ({x.shape[0]}, tokens, {self.dim}), "
                    f"got {tuple(context.shape)}"
                )
        q, k, v = self._project(x, context)
        if context is None:
            out = self.attend(q, k, v, hw, key_padding_mask=key_padding_mask)
        else:
            out = self.attend(q, k, v, hw, key_hw=context_hw, key_padding_mask=key_padding_mask, cross=True)
        if self.proj is not None:
            out = self.proj_drop(self.proj(out))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qkv_layout={self.qkv_layout!r}"

"""The agent attention operator.

Agent attention (Han et al., ECCV 2024) lets a small set of ``n`` agent tokens ``A`` stand between
the ``N`` queries and the ``M`` keys/values::

    V_A = softmax(A Kᵀ · s  + agent_bias) V          # agents gather   (B, h, n, d)
    O   = softmax(Q Aᵀ · s2 + query_bias) V_A        # agents broadcast (B, h, N, d)

Both steps are ordinary softmax attentions with ``n`` on one side, so the cost is
``O((N + M) · n · d)``: linear in the number of tokens.  :func:`agent_attention` runs them as two
calls of :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels on CPU and CUDA,
biases broadcast over the batch, never copied per sample).  :func:`agent_attention_math` is the
plain reference used by the tests, and :func:`agent_feature_maps` exposes the generalized linear
attention view ``O = φq(Q) · φk(K)ᵀ · V``. ``path("flex")`` runs both steps through FlexAttention
instead (:mod:`agent_attention._flex`), with factored biases evaluated per logit.

This module is the only place in the package where agent attention is computed.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._grids import tracing
from .bias_factors import GridBias

__all__ = ["agent_attention", "agent_attention_math", "agent_feature_maps", "fused", "fused_enabled", "path",
           "current_path"]

_state = threading.local()


def fused_enabled() -> bool:
    """Whether :func:`agent_attention` uses the fused SDPA path (default) in this thread."""
    return getattr(_state, "fused", True)


@contextlib.contextmanager
def fused(enabled: bool = True) -> Iterator[None]:
    """Context manager: ``with fused(False):`` routes :func:`agent_attention` through the plain
    math path (explicit attention maps). Used by benchmarks (the straightforward baseline) and by
    FLOP counters, which do not see inside fused kernels."""
    previous = fused_enabled()
    _state.fused = bool(enabled)
    try:
        yield
    finally:
        _state.fused = previous


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias, query_bias, key_padding_mask):
    names = ("q", "k", "v", "agents")
    tensors = (q, k, v, agents)
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"agent_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"agent_attention: {name} must have 4 dims (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"agent_attention: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"agent_attention: dtype mismatch: q is {q.dtype} but {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"agent_attention: device mismatch: q is on {q.device} but {name} is on {t.device}")
    B, h, N, d = q.shape
    M = k.shape[2]
    n = agents.shape[2]
    if k.shape[:2] != (B, h) or v.shape[:2] != (B, h) or agents.shape[:2] != (B, h):
        raise ValueError(
            "agent_attention: batch and head dims must agree: "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, agents {tuple(agents.shape)}"
        )
    if k.shape[3] != d or agents.shape[3] != d:
        raise ValueError(
            f"agent_attention: q, k and agents must share head_dim {d}: k {tuple(k.shape)}, agents {tuple(agents.shape)}"
        )
    if v.shape[2] != M:
        raise ValueError(f"agent_attention: k and v must have the same number of tokens: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if n == 0 or M == 0:
        raise ValueError(f"agent_attention: need at least one agent and one key, got agents {tuple(agents.shape)}, k {tuple(k.shape)}")
    for name, bias, target in (("agent_bias", agent_bias, (B, h, n, M)), ("query_bias", query_bias, (B, h, N, n))):
        if bias is None:
            continue
        if isinstance(bias, GridBias):
            if bias.kind != name.split("_")[0]:
                raise ValueError(f"agent_attention: {name} got a GridBias of kind {bias.kind!r}")
        elif not isinstance(bias, Tensor):
            raise TypeError(f"agent_attention: {name} must be a tensor, a GridBias or None, got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(
                f"agent_attention: {name} must be a floating-point additive bias, got {bias.dtype} "
                "(for padding pass key_padding_mask)"
            )
        if bias.device != q.device:
            raise ValueError(f"agent_attention: device mismatch: q is on {q.device} but {name} is on {bias.device}")
        try:
            shape = torch.broadcast_shapes(bias.shape, target)
        except RuntimeError:
            shape = None
        if shape != target:
            raise ValueError(f"agent_attention: {name} of shape {tuple(bias.shape)} does not broadcast to {target}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"agent_attention: key_padding_mask must be bool (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, M):
            raise ValueError(
                f"agent_attention: key_padding_mask must have shape (batch, keys) = {(B, M)}, got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(
                f"agent_attention: device mismatch: q is on {q.device} but key_padding_mask is on {key_padding_mask.device}"
            )


def _agent_mask(agent_bias: Optional[Tensor], key_padding_mask: Optional[Tensor], dtype) -> Optional[Tensor]:
    """Additive mask for the agent → key softmax: the bias plus -inf on padded keys.

    A sample whose keys are all padded gets no -inf (its softmax stays finite, so no NaN reaches
    values or gradients); :func:`_no_keys` then zeroes what its agents gathered."""
    if key_padding_mask is None:
        return None if agent_bias is None else agent_bias.to(dtype)
    padded = key_padding_mask & ~key_padding_mask.all(-1, keepdim=True)
    pad = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
    pad = pad.masked_fill(padded, float("-inf"))[:, None, None, :]  # (B, 1, 1, M)
    return pad if agent_bias is None else agent_bias.to(dtype) + pad


def _no_keys(t: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """``t (B, ...)`` with the samples whose keys are all padded set to zero (the defined answer for
    a fully padded sample: its agents gather nothing, so its attention output is zero)."""
    if key_padding_mask is None:
        return t
    empty = key_padding_mask.all(-1).view(-1, *([1] * (t.dim() - 1)))
    return t.masked_fill(empty, 0.0)


def agent_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    *,
    agent_bias: Optional[Tensor] = None,
    query_bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
    query_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Agent attention with fused softmax-attention kernels.

    Args:
        q: queries ``(B, h, N, d)``.
        k, v: keys and values ``(B, h, M, d)``; ``M`` may differ from ``N`` (cross-attention).
        agents: agent tokens ``(B, h, n, d)``.
        agent_bias: additive bias of the agent → key logits, broadcastable to ``(B, h, n, M)``
            (e.g. ``(1, h, n, M)``: one bias for the whole batch).
        query_bias: additive bias of the query → agent logits, broadcastable to ``(B, h, N, n)``.
            Either bias may also be a factored :class:`~agent_attention.bias_factors.GridBias`
            (evaluated per logit on the ``flex`` path, materialised on the others).
        scale: logit scale ``s`` of the first softmax; default ``d ** -0.5``.
        query_scale: logit scale of the second softmax; default ``scale``. AgentSD uses
            ``s ** k_scale2``.
        dropout_p: dropout on both attention maps (pass 0 at evaluation).
        key_padding_mask: bool ``(B, M)``, ``True`` marks padded keys that no agent may attend to
            (the convention of :class:`torch.nn.MultiheadAttention`).

    Returns:
        ``(B, h, N, d)`` tensor of the same dtype as ``q``.
    """
    _check_dropout(dropout_p)
    if not fused_enabled() or tracing():  # export/ONNX/FX: explicit matmuls and softmaxes
        return agent_attention_math(
            q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias, scale=scale,
            query_scale=query_scale, dropout_p=dropout_p, key_padding_mask=key_padding_mask,
        )
    _check_inputs(q, k, v, agents, agent_bias, query_bias, key_padding_mask)
    d = q.shape[-1]
    s = d ** -0.5 if scale is None else float(scale)
    s2 = s if query_scale is None else float(query_scale)
    if current_path() == "flex" and dropout_p == 0:  # FlexAttention has no dropout: the other paths keep it
        from ._flex import flex_agent_attention, flex_runs

        if flex_runs(q, k, v, agents, agent_bias, query_bias):
            return flex_agent_attention(q, k, v, agents, agent_bias, query_bias, key_padding_mask, s, s2)
    agent_bias, query_bias = _dense(agent_bias), _dense(query_bias)
    mask1 = _agent_mask(agent_bias, key_padding_mask, q.dtype)
    mask2 = None if query_bias is None else query_bias.to(q.dtype)
    if agents.stride(-1) != 1:  # the fused kernels need a unit-stride head dim (a small n × d copy)
        agents = agents.contiguous()
    gather, broadcast = _choose_paths(q, mask1, mask2)
    if gather == "gemm":
        agent_v = _gemm_attention(agents, k, v, mask1, s, dropout_p)
    else:
        agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=mask1, dropout_p=dropout_p, scale=s)
    agent_v = _no_keys(agent_v, key_padding_mask)
    if broadcast == "gemm":
        return _gemm_attention(q, agents, agent_v, mask2, s2, dropout_p, scale_right=True)
    return F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=mask2, dropout_p=dropout_p, scale=s2)


_PATHS = ("auto", "sdpa", "gemm", "flex")


def _dense(bias):
    """A factored :class:`~agent_attention.bias_factors.GridBias` as its dense tensor (other biases as they are)."""
    return bias.materialize() if isinstance(bias, GridBias) else bias


def current_path() -> str:
    """The kernel choice of :func:`agent_attention` in this thread (see :func:`path`)."""
    return getattr(_state, "path", "auto")


def _check_dropout(p) -> None:
    """``dropout_p`` must be a number in [0, 1) (1 would drop every weight: an all-zero output)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {p!r}")


@contextlib.contextmanager
def path(name: str = "auto") -> Iterator[None]:
    """Force the kernels of :func:`agent_attention` in this thread (benchmarks and tests):
    ``"sdpa"`` (two fused SDPA calls), ``"gemm"`` (matmul + bias + softmax + matmul, in place at
    inference), ``"flex"`` (two FlexAttention calls with the biases computed per logit from their
    factors, see :mod:`agent_attention._flex`; opt-in: no measurement has shown it faster yet) or
    ``"auto"`` (the default choice per step, see :func:`_choose_paths`). Export and FX tracing always
    use the math path, and ``flex`` falls back to the automatic choice when ``dropout_p > 0``."""
    if name not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {name!r}")
    if name == "flex":
        from ._flex import flex_available

        if not flex_available():
            raise RuntimeError(f"path('flex') needs torch.nn.attention.flex_attention (torch {torch.__version__} has none)")
    previous = getattr(_state, "path", "auto")
    _state.path = name
    try:
        yield
    finally:
        _state.path = previous


def _choose_paths(q: Tensor, mask1: Optional[Tensor], mask2: Optional[Tensor]) -> Tuple[str, str]:
    """Kernels for the two softmax attentions (agents ← keys, queries ← agents).

    One side of each is the ``n`` agents, so the ``n × M`` and ``N × n`` logits are small. Measured
    on CPU (``bench op`` and the profile in docs/benchmarks.md): at inference SDPA's fused kernel is
    fastest with or without a bias; when autograd records a step, one matmul, an in-place bias add,
    a softmax and a second matmul win (with a bias, SDPA's CPU kernels fall back to its math
    backend, which expands the bias per sample; without one, its flash backward is 1.1-1.5x slower
    than the matmuls at 28²-192² tokens, ``bench op --backward``), the bias gradient being summed
    over the batch by autograd. On accelerators SDPA always (its kernels take the bias).
    """
    forced = current_path()
    if forced not in ("auto", "flex"):  # flex with dropout: the automatic choice
        return forced, forced
    if q.device.type != "cpu" or not torch.is_grad_enabled():
        return "sdpa", "sdpa"
    return "gemm", "gemm"  # CPU backward: SDPA's flash backward loses to matmuls at n agents, bias or not


def _softmax_(x: Tensor) -> Tensor:
    """Softmax over the last dim, in place when autograd does not need the logits."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x.softmax(-1)
    return torch.ops.aten._softmax.out(x, -1, False, out=x)


def _gemm_attention(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], scale: float,
                    dropout_p: float, scale_right: bool = False) -> Tensor:
    """``softmax(query keyᵀ · scale + mask) value`` as two matmuls: the logits are the small map
    (one side is the agents), the bias is added in place (broadcast over the batch, its gradient
    summed over it by autograd) and the scale goes on the smaller operand."""
    if scale_right:  # the N queries side: scale the n agents instead of the N queries
        logits = torch.matmul(query, (key * scale).transpose(-2, -1))
    else:
        logits = torch.matmul(query * scale, key.transpose(-2, -1))
    if mask is not None:
        logits = logits.add_(mask)
    p = _softmax_(logits)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, value)


def agent_feature_maps(
    q: Tensor,
    k: Tensor,
    agents: Tensor,
    *,
    agent_bias: Optional[Tensor] = None,
    query_bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
    query_scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The generalized-linear-attention view of agent attention.

    Returns ``(phi_q, phi_k)`` with ``phi_q = softmax(Q Aᵀ s2 + query_bias)`` of shape
    ``(B, h, N, n)`` and ``phi_k = softmax(A Kᵀ s + agent_bias)ᵀ`` of shape ``(B, h, M, n)``, so that
    ``agent_attention(q, k, v, agents) == phi_q @ (phi_k.transpose(-1, -2) @ v)``.
    Also the maps to visualise: ``phi_k[..., a]`` is where agent ``a`` looks.
    """
    _check_inputs(q, k, k, agents, agent_bias, query_bias, key_padding_mask)
    agent_bias, query_bias = _dense(agent_bias), _dense(query_bias)
    d = q.shape[-1]
    s = d ** -0.5 if scale is None else float(scale)
    s2 = s if query_scale is None else float(query_scale)
    logits1 = (agents * s) @ k.transpose(-2, -1)
    mask1 = _agent_mask(agent_bias, key_padding_mask, q.dtype)
    if mask1 is not None:
        logits1 = logits1 + mask1
    logits2 = (q * s2) @ agents.transpose(-2, -1)
    if query_bias is not None:
        logits2 = logits2 + query_bias.to(q.dtype)
    return logits2.softmax(dim=-1), _no_keys(logits1.softmax(dim=-1), key_padding_mask).transpose(-2, -1)


def agent_attention_math(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    *,
    agent_bias: Optional[Tensor] = None,
    query_bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
    query_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Reference implementation of :func:`agent_attention` with explicit matmuls and softmaxes.

    Same arguments and result; materialises both attention maps (the official code's order of
    operations: the left operand is scaled before the product).
    """
    _check_dropout(dropout_p)
    phi_q, phi_k = agent_feature_maps(
        q, k, agents, agent_bias=agent_bias, query_bias=query_bias, scale=scale,
        query_scale=query_scale, key_padding_mask=key_padding_mask,
    )
    _check_inputs(q, k, v, agents, None, None, None)
    p1 = phi_k.transpose(-2, -1)
    p1 = F.dropout(p1, dropout_p) if dropout_p > 0 else p1
    p2 = F.dropout(phi_q, dropout_p) if dropout_p > 0 else phi_q
    return p2 @ (p1 @ v)

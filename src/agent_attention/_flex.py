"""The FlexAttention path of :func:`agent_attention.functional.agent_attention` (``path("flex")``).

Both softmax steps run through :func:`torch.nn.attention.flex_attention.flex_attention`; the agent
biases are added inside ``score_mod``:

* a factored :class:`~agent_attention.bias_factors.GridBias` (what ``AgentAttention`` passes on 2-D
  grids while this path is selected) is evaluated per logit from the coarse table, the row/column
  terms and the interpolation taps, so the ``n × N`` and ``N × n`` bias tensors are never
  materialised by a compiled kernel;
* a dense bias tensor (1-D and 3-D modules, AgentSD, direct calls) is indexed per logit.

The agent → key step has only ``n`` queries: on CUDA it asks for FlexAttention's split-KV decoding
kernel (``BACKEND="TRITON_DECODE"``) when ``n < 128``, the kernel's limit.

Compilation (torch 2.14): each step is compiled with ``torch.compile(dynamic=False)`` (one graph
per shape; the decoding kernel needs a static batch and head count). On the CPU FlexAttention has
no backward (``NotImplementedError`` in torch, eager or compiled), so when autograd records a step the CPU
keeps the op's other paths (:func:`flex_runs`; with the biases materialised). Inside an outer ``torch.compile`` the steps are traced into the caller's
graph. Dropout is not supported by FlexAttention: the op keeps its other paths when ``dropout_p > 0``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .bias_factors import BiasFactors, GridBias, bias_value

__all__ = ["flex_agent_attention", "flex_available", "flex_runs"]

DECODE_MAX_QUERIES = 128  # flex decoding handles fewer than this many queries
RECOMPILE_LIMIT = 128
EAGER = False  # tests: run FlexAttention eagerly (torch's unfused reference) instead of compiled
_compiled = None


def flex_available() -> bool:
    """Whether this torch has FlexAttention."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _bias_terms(bias):
    """What :func:`_step` needs of a bias, as plain tensors and ints (graph inputs and constants)."""
    if bias is None:
        return None
    if isinstance(bias, GridBias):
        return ("grid", bias.factors())
    return ("dense", bias[(None,) * (4 - bias.dim())])


def _score_mod(terms, pad: Optional[Tensor], transposed: bool):
    """``score_mod(score, b, h, q_idx, kv_idx)`` adding the bias (and ``-inf`` on padded keys).

    ``transposed``: the queries are the tokens and the keys the agents (the second step). One
    closure per case (a compiled ``score_mod`` may not read a cell that was never set)."""
    kind = None if terms is None else terms[0]
    if kind == "grid":
        f: BiasFactors = terms[1]

        def bias(b, h, q_idx, kv_idx):
            agent, token = (kv_idx, q_idx) if transposed else (q_idx, kv_idx)
            return bias_value(f, h, agent, token)
    elif kind == "dense":
        dense = terms[1]
        ones = tuple(s == 1 for s in dense.shape)

        def bias(b, h, q_idx, kv_idx):
            index = tuple(0 if one else i for one, i in zip(ones, (b, h, q_idx, kv_idx)))
            return dense[index]
    else:
        bias = None
    if pad is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias(b, h, q_idx, kv_idx).to(score.dtype)
    elif bias is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + pad[b, kv_idx].to(score.dtype)
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + (bias(b, h, q_idx, kv_idx) + pad[b, kv_idx]).to(score.dtype)
    return score_mod


def _step(query: Tensor, key: Tensor, value: Tensor, terms, pad: Optional[Tensor], scale: float,
          transposed: bool, kernel_options: Optional[dict]) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = _score_mod(terms, pad, transposed) if terms is not None or pad is not None else None
    return flex_attention(query, key, value, score_mod=score_mod, scale=scale, kernel_options=kernel_options)


def _compiled_step():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_step, dynamic=False, fullgraph=True)
    return _compiled


def flex_runs(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias, query_bias) -> bool:
    """Whether the flex path can run these inputs: torch 2.14 has no FlexAttention backward on the CPU
    (eager or compiled), so a CPU step that autograd records keeps the op's other paths; on CUDA its
    kernels need a head dim of at least 16."""
    if q.device.type == "cuda":
        return q.shape[-1] >= 16  # the Triton kernels need head_dim >= 16
    if any(t.requires_grad for t in (q, k, v, agents)):
        return False
    return not (torch.is_grad_enabled() and any(
        b is not None and b.requires_grad for b in (agent_bias, query_bias)))


def _run(query, key, value, bias, pad, scale, transposed, kernel_options, eager: bool) -> Tensor:
    terms = _bias_terms(bias)
    if torch.compiler.is_compiling():  # inside the caller's graph: traced with it
        return _step(query, key, value, terms, pad, scale, transposed, kernel_options)
    if eager:
        with warnings.catch_warnings():  # torch warns that the eager form is unfused: chosen knowingly here
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return _step(query, key, value, terms, pad, scale, transposed, kernel_options)
    # one graph per shape and bias kind: a model (and the benchmarks) need more than dynamo's default
    # of 8 recompilations of one function, past which it would run the unfused eager form
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(recompile_limit=limit):
        return _compiled_step()(query, key, value, terms, pad, scale, transposed, kernel_options)


def _padding(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """``(B, M)`` float32 additive mask: ``-inf`` on padded keys, none for a sample with no key
    (its softmax stays finite; the op zeroes what its agents gathered, as on the other paths)."""
    if key_padding_mask is None:
        return None
    padded = key_padding_mask & ~key_padding_mask.all(-1, keepdim=True)
    return torch.zeros(padded.shape, dtype=torch.float32, device=padded.device).masked_fill(padded, float("-inf"))


def flex_agent_attention(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias, query_bias,
                         key_padding_mask: Optional[Tensor], scale: float, query_scale: float) -> Tensor:
    """Agent attention as two FlexAttention calls (arguments already checked by the op)."""
    eager = EAGER
    n = agents.shape[2]
    decode = None
    if q.device.type == "cuda" and n < DECODE_MAX_QUERIES and not eager:
        decode = {"BACKEND": "TRITON_DECODE"}
    pad = _padding(key_padding_mask)
    agent_v = _run(agents, k, v, agent_bias, pad, scale, False, decode, eager)
    if key_padding_mask is not None:
        agent_v = agent_v.masked_fill(key_padding_mask.all(-1).view(-1, 1, 1, 1), 0.0)
    return _run(q, agents, agent_v, query_bias, None, query_scale, True, None, eager)

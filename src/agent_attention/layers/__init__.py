"""Agent attention modules.

* :class:`AgentAttention` (:mod:`.attention`): the drop-in module, projections included;
* :class:`AgentAttentionCore` (:mod:`.core`): the attention on projected ``q, k, v`` (agents pooled
  from the queries, the learned agent biases of :mod:`.biases`, the op, the DWC branch);
* the token-grid helpers they use (from :mod:`agent_attention._grids`).

The attention itself is :func:`agent_attention.functional.agent_attention`.
"""
from __future__ import annotations

from .._grids import (
    agent_bias_2d,
    pool_agents,
    query_bias_2d,
    resize_1d,
    resize_1d_masked,
    resize_agents,
    to_2tuple_hw,
)
from .attention import AgentAttention
from .core import AgentAttentionCore, AgentInputs

__all__ = [
    "AgentAttention",
    "AgentAttentionCore",
    "AgentInputs",
    "agent_bias_2d",
    "query_bias_2d",
    "resize_1d",
    "resize_1d_masked",
    "resize_agents",
    "pool_agents",
    "to_2tuple_hw",
]

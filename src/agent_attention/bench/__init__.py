"""Benchmarks: ``agent-attention bench op | models | sd``.

* ``op``: the agent attention op against softmax attention (SDPA) and a straightforward agent
  attention, over growing token grids (:mod:`agent_attention.bench.op`);
* ``models``: images/s and peak memory of the agent models against their timm softmax
  counterparts and their own math path (:mod:`agent_attention.bench.models`);
* ``sd``: AgentSD step time and memory (:mod:`agent_attention.bench.sd`).

The command line (``agent-attention bench ...``) lives in :mod:`agent_attention.commands.bench`.
Each writes a markdown table, the raw numbers (JSON) and a plot under ``--out``.
"""
from __future__ import annotations

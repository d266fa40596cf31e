"""Benchmarks: ``agent-attention bench op | models | sd``.

* ``op``: the agent attention op against softmax attention (SDPA) and a straightforward agent
  attention, over growing token grids (:mod:`agent_attention.bench.op`);
* ``models``: images/s and peak memory of the agent models against their timm softmax
  counterparts and their own math path (:mod:`agent_attention.bench.models`);
* ``sd``: AgentSD step time and memory (:mod:`agent_attention.bench.sd`).

Each writes a markdown table, the raw numbers (JSON) and a plot under ``--out``.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from ..cli import dispatch

SUBCOMMANDS = {
    "op": ("agent_attention.bench.op", "main", "agent attention op vs SDPA softmax vs straightforward, over token counts"),
    "models": ("agent_attention.bench.models", "main",
               "agent models vs timm softmax models and their math path: images/s, memory"),
    "sd": ("agent_attention.bench.sd", "main", "AgentSD step time and memory on a local diffusers pipeline"),
}


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``bench <name> [options]`` to the benchmark module (imported only when used)."""
    return dispatch("agent-attention bench", SUBCOMMANDS, list(sys.argv[1:] if argv is None else argv), "benchmark")

"""``agent-attention bench op | models | sd | gpu``: dispatch to the benchmark modules of
:mod:`agent_attention.bench` (each one's ``main(argv)`` holds its options), imported only when used."""
from __future__ import annotations

import sys
from typing import List, Optional

from ._dispatch import dispatch

__all__ = ["SUBCOMMANDS", "main"]

SUBCOMMANDS = {
    "op": ("agent_attention.bench.op", "main", "agent attention op vs SDPA softmax vs straightforward, over token counts"),
    "models": ("agent_attention.bench.models", "main",
               "agent models vs timm softmax models and their math path: images/s, memory"),
    "sd": ("agent_attention.bench.sd", "main", "AgentSD step time and memory on a local diffusers pipeline"),
    "gpu": ("agent_attention.bench.gpu", "main",
            "device check: the device tests, then short bench op/models/sd runs (<= 8 min on one H100)"),
}


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``bench <name> [options]`` to the benchmark module."""
    return dispatch("agent-attention bench", SUBCOMMANDS, list(sys.argv[1:] if argv is None else argv), "benchmark")

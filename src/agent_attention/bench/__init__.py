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
from importlib import import_module
from typing import List, Optional

SUBCOMMANDS = {
    "op": ("agent_attention.bench.op", "agent attention op vs SDPA softmax vs straightforward, over token counts"),
    "models": ("agent_attention.bench.models", "agent models vs timm softmax models and their math path: images/s, memory"),
    "sd": ("agent_attention.bench.sd", "AgentSD step time and memory on a local diffusers pipeline"),
}


def _usage() -> str:
    lines = ["usage: agent-attention bench {op,models,sd} [options]", "", "benchmarks:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `agent-attention bench <name> --help` for the options of a benchmark."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``bench <name> [options]`` to the benchmark module (imported only when used)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"agent-attention bench: unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    result = import_module(SUBCOMMANDS[name][0]).main(rest)
    return int(result or 0)

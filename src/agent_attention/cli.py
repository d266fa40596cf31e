"""``agent-attention`` command line: one sub-command per job, each implemented next to its code.

Sub-commands are imported only when used, so ``agent-attention --help`` is fast and an optional
extra (diffusers, dense) is only needed by the commands that use it.
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import List, Optional

# name -> (module, function taking argv, one-line help)
COMMANDS = {
    "train": ("agent_attention.train.main", "train_main", "train a model (default: a small agent model on the embedded digits set)"),
    "eval": ("agent_attention.train.main", "eval_main", "evaluate a checkpoint: top-1/top-5 and throughput"),
    "models": ("agent_attention.models.report", "main", "list every model with params, GFLOPs and the paper's top-1"),
    "convert": ("agent_attention.models.checkpoints", "main", "convert an official .pth checkpoint to safetensors (safe loading)"),
    "train-det": ("agent_attention.dense.main", "train_det_main", "train/evaluate a detector with an agent backbone"),
    "train-seg": ("agent_attention.dense.main", "train_seg_main", "train/evaluate a segmenter with an agent backbone"),
    "sd": ("agent_attention.diffusion.cli", "main", "generate images with a local diffusers model, with and without AgentSD"),
    "bench": ("agent_attention.bench", "main", "benchmarks: `bench op`, `bench models`, `bench sd`"),
    "show": ("agent_attention.viz", "main", "draw what the agents of a block look at over an image"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: agent-attention <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `agent-attention <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"agent-attention: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

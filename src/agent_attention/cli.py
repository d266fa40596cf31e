"""``agent-attention`` command line: one sub-command per job, each implemented next to its code.

Sub-commands are imported only when used, so ``agent-attention --help`` is fast and an optional
extra (diffusers, dense) is only needed by the commands that use it.
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import Dict, List, Optional, Tuple

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
    "export": ("agent_attention.commands.export", "main", "export a model to ONNX or torch.export (dynamic batch and HxW)"),
}


def _usage(prog: str, commands: Dict[str, Tuple[str, str, str]], what: str) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} <{what}> [options]", "", f"{what}s:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in commands.items()]
    lines += ["", f"Run `{prog} <{what}> --help` for the options of a {what}."]
    return "\n".join(lines)


def dispatch(prog: str, commands: Dict[str, Tuple[str, str, str]], argv: List[str], what: str = "command") -> int:
    """Run ``argv[0]``'s entry of ``commands`` (name -> (module, function, help)) on ``argv[1:]``;
    the module is imported only now."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(prog, commands, what))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown {what} {name!r}\n\n{_usage(prog, commands, what)}", file=sys.stderr)
        return 2
    module, func, _ = commands[name]
    result = getattr(import_module(module), func)(rest)
    return int(result or 0)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    return dispatch("agent-attention", COMMANDS, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

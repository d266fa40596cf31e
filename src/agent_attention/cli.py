"""``agent-attention`` command line: one sub-command per job, each in ``commands/<name>.py``.

Sub-commands are imported only when used, so ``agent-attention --help`` is fast and an optional
extra (diffusers, dense) is only needed by the commands that use it. Every failure ends with one
line on stderr and exit code 2 (usage) or 1 (runtime); ``--debug`` (before the command) shows the
traceback instead (:mod:`agent_attention.commands._dispatch`).
"""
from __future__ import annotations

import signal
import sys
from typing import List, Optional

from .commands._dispatch import dispatch, set_debug

__all__ = ["COMMANDS", "main", "dispatch"]

# name -> (module, function taking argv, one-line help)
COMMANDS = {
    "train": ("agent_attention.commands.train", "main", "train a model (default: a small agent model on the embedded digits set)"),
    "eval": ("agent_attention.commands.eval", "main", "evaluate a checkpoint: top-1/top-5 and throughput"),
    "models": ("agent_attention.commands.models", "main", "list every model with params, GFLOPs and the paper's top-1"),
    "convert": ("agent_attention.commands.convert", "main", "convert an official .pth checkpoint to safetensors (safe loading)"),
    "export": ("agent_attention.commands.export", "main", "export a model to ONNX or a torch.export program (.pt2)"),
    "train-det": ("agent_attention.commands.train_det", "main", "train/evaluate a detector with an agent backbone"),
    "train-seg": ("agent_attention.commands.train_seg", "main", "train/evaluate a segmenter with an agent backbone"),
    "eval-seg": ("agent_attention.commands.eval_seg", "main", "mIoU of a released segmenter on an ADE20K-layout folder"),
    "eval-det": ("agent_attention.commands.eval_det", "main", "COCO mAP of a released detector on a COCO-format folder"),
    "sd": ("agent_attention.commands.sd", "main", "generate images with a local diffusers model, with and without AgentSD"),
    "sd-eval": ("agent_attention.commands.sd_eval", "main",
                "AgentSD vs the unpatched model on a prompt list: s/image, memory/image, FID, CLIP score"),
    "bench": ("agent_attention.commands.bench", "main", "benchmarks: 'bench op', 'bench models', 'bench sd'"),
    "show": ("agent_attention.commands.show", "main", "draw what the agents of a block look at over an image"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]:
        argv.remove("--debug")
        set_debug(True)
    if argv and argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit, fail the write (EFBIG) instead of dying silently
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    return dispatch("agent-attention", COMMANDS, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

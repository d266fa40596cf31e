"""Which device a command runs on: ``--device auto | cpu | cuda | cuda:N | mps`` -> ``torch.device``
(the one copy, used by training, evaluation and the benchmarks)."""
from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the local rank's GPU if CUDA is available, else the CPU; ``cuda``: the local rank's GPU.

    A device string torch does not know, or a CUDA device without CUDA, is a one-line ValueError.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):  # torch.device("gpu"): "Expected one of cpu, cuda, ... device type"
        raise ValueError(f"unknown device {spec!r}: use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: this machine has no CUDA GPU")
    return device

"""Does a compute dtype have fast kernels here? One check for every command that takes a dtype
(``train``/``eval --amp``, ``bench ... --amp/--dtype``, ``sd --dtype``): a reduced precision without
hardware support on a CPU is emulated and runs several times slower than float32, so say so (a
warning, not a refusal) and what to use instead.

bfloat16 is native on x86 CPUs with AVX-512 BF16 or AMX (Intel Cooper Lake, Sapphire Rapids and
later; AMD Zen 4 and later) and on Arm CPUs with the BF16 extension; float16 on x86 CPUs with
AVX-512 FP16 or AMX-FP16 and on Arm CPUs with FP16 arithmetic. GPUs are not checked here.
"""
from __future__ import annotations

import functools
import sys
from typing import FrozenSet, Optional

__all__ = ["cpu_flags", "slow_dtype_reason", "warn_slow_dtype"]

_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 (Linux names) and aarch64 ("bf16")
_FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "fphp", "asimdhp"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> Optional[FrozenSet[str]]:
    """The CPU feature flags of ``/proc/cpuinfo`` (None where they cannot be read: not Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags) if flags else None


def _name(dtype) -> str:
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
    if isinstance(dtype, str):
        return {"bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(dtype, dtype)
    return names.get(dtype, str(dtype).replace("torch.", ""))


def slow_dtype_reason(dtype, device="cpu", flags: Optional[FrozenSet[str]] = None) -> Optional[str]:
    """Why ``dtype`` (a torch dtype or ``"bf16"``/``"fp16"``) has no fast kernels on ``device``, or
    None when it has (or when it cannot be told: a GPU, an unreadable CPU description).
    ``flags``: the CPU flags to judge by (default: this machine's, :func:`cpu_flags`)."""
    name = _name(dtype)
    if name not in ("bf16", "fp16") or str(device).split(":")[0] != "cpu":
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    if name == "bf16" and not flags & _BF16_FLAGS:
        return ("bf16 has no native support on this CPU (no AVX-512 BF16 or AMX): it is emulated and runs slower "
                "than fp32; use fp32 here (bf16 is for CPUs with AVX-512 BF16/AMX, e.g. Intel Sapphire Rapids, "
                "AMD Zen 4, and for GPUs)")
    if name == "fp16" and not flags & _FP16_FLAGS:
        better = "bf16" if flags & _BF16_FLAGS else "fp32"
        return (f"fp16 has no fast kernels on this CPU (no AVX-512 FP16 or AMX-FP16): it runs several times "
                f"slower than fp32; use {better} here (fp16 is for GPUs)")
    return None


def warn_slow_dtype(dtype, device="cpu", what: str = "", prog: str = "") -> Optional[str]:
    """Print ``<prog>: warning: <what>: <reason>`` on stderr when :func:`slow_dtype_reason` has one
    (``what``: the flag, e.g. ``"--amp bf16"``); returns the message (None: nothing printed)."""
    reason = slow_dtype_reason(dtype, device)
    if reason is None:
        return None
    message = f"{what}: {reason}" if what else reason
    print(f"{prog + ': ' if prog else ''}warning: {message}", file=sys.stderr)
    return message

"""Test helpers for the official parity data in ``tests/data/reference`` (copied from the project's
shared reference; see its README): the deterministic parameter fill, the input recipe, manifests
and golden outputs."""
from __future__ import annotations

import json
import math
import zlib
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

REF = Path(__file__).parent / "data" / "reference"
MANIFESTS = REF / "manifests"
TINY = REF / "tiny"


def fill_tensor(name: str, shape) -> torch.Tensor:
    """Recipe 1: the float32 value of parameter ``name`` with ``shape``."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    z = torch.randn(tuple(shape), generator=g, dtype=torch.float32).double()
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) >= 2:
        v = z / math.sqrt(math.prod(shape[1:]))
    elif leaf == "weight":
        v = 1.0 + 0.1 * z
    elif leaf == "bias":
        v = 0.1 * z
    else:
        v = z
    return v.float()


@torch.no_grad()
def fill_(model: torch.nn.Module) -> torch.nn.Module:
    for name, p in model.named_parameters():
        p.copy_(fill_tensor(name, p.shape).to(p.dtype))
    return model


def make_input(shape, seed: int = 0) -> torch.Tensor:
    """Recipe 2: standard normal float32 images from a CPU generator."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@lru_cache(maxsize=None)
def manifest(name: str) -> dict:
    """A full-size manifest (``agent_swin_tiny``) or a tiny one (``tiny_swin_a``)."""
    path = (TINY if name.startswith("tiny_") else MANIFESTS) / f"{name}.json"
    return json.loads(path.read_text())


def golden(name: str) -> dict:
    """Tensors of a tiny config: input, logits(_f64), features(_f64), tap/<module>."""
    return load_file(str(TINY / f"{name}.safetensors"))


FULL_VARIANTS = sorted(p.stem for p in MANIFESTS.glob("*.json"))
TINY_CONFIGS = sorted(p.stem for p in TINY.glob("tiny_*.json"))

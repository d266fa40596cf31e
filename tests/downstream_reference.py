"""Test helpers for the official detection / segmentation references in
``tests/data/reference/downstream`` (copied from the project's shared reference; see its README).

* :func:`manifest` / :func:`outputs` — a case's manifest and stored taps;
* :func:`filled_state` — the filled official-layout state dict of a case, complete like a released
  checkpoint's: the parameters by the fill recipe, BatchNorm ``running_mean = 0.1 z`` /
  ``running_var = 1 + 0.1 z``, ``num_batches_tracked = 0`` and Swin's ``relative_position_index``
  as the official model builds it;
* :func:`prefixed` — the entries under one prefix (``backbone.``), prefix removed;
* :func:`check_tap` — compare one of our tensors with a stored tap (full, or the sampled values at
  the stored indices plus the whole-tensor statistics);
* :func:`case_input` — the input image tensor of a case.
"""
from __future__ import annotations

import json
import math
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file

from reference_utils import fill_tensor, make_input

DOWNSTREAM = Path(__file__).parent / "data" / "reference" / "downstream"
CASES = ("mrcnn_agent_pvt_t", "mrcnn_agent_swin_t", "cmrcnn_agent_swin_t", "retinanet_agent_pvt_t",
         "fpn_agent_pvt_t", "upernet_agent_swin_t")
#: the backbone each case builds (our name) and its out_indices
CASE_BACKBONE = {c: ("agent_swin_tiny" if "swin" in c else "agent_pvt_tiny") for c in CASES}


@lru_cache(maxsize=None)
def manifest(case: str) -> dict:
    return json.loads((DOWNSTREAM / f"{case}.json").read_text())


@lru_cache(maxsize=None)
def outputs(case: str) -> Dict[str, torch.Tensor]:
    return load_file(str(DOWNSTREAM / f"{case}.safetensors"))


def case_input(case: str) -> torch.Tensor:
    return make_input(manifest(case)["input"]["shape"], seed=0)


def fill_buffer_tensor(name: str, shape) -> torch.Tensor:
    """BatchNorm statistics of the downstream references: ``running_mean = 0.1 z``,
    ``running_var = 1 + 0.1 z`` (z drawn like a parameter's)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    z = torch.randn(tuple(shape), generator=g, dtype=torch.float32).double()
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_mean":
        return (0.1 * z).float()
    if leaf == "running_var":
        return (1.0 + 0.1 * z).float()
    raise KeyError(f"{name}: only running_mean / running_var are filled")


@lru_cache(maxsize=None)
def _filled(case: str) -> Dict[str, torch.Tensor]:
    out = {}
    for e in manifest(case)["state_dict"]:
        leaf = e["key"].rsplit(".", 1)[-1]
        if e["kind"] == "param":
            out[e["key"]] = fill_tensor(e["key"], e["shape"])
        elif leaf in ("running_mean", "running_var"):
            out[e["key"]] = fill_buffer_tensor(e["key"], e["shape"])
        elif leaf == "num_batches_tracked":
            out[e["key"]] = torch.tensor(0, dtype=torch.int64)
        elif leaf == "relative_position_index":  # as the official model builds it (Swin's formula)
            out[e["key"]] = _relative_position_index(math.isqrt(e["shape"][0]))
        else:
            raise KeyError(f"{case}: no rule for buffer {e['key']}")
    return out


def _relative_position_index(w: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def filled_state(case: str) -> Dict[str, torch.Tensor]:
    """The filled official state dict (a fresh dict; tensors shared between calls, do not modify)."""
    return dict(_filled(case))


def layout(case: str) -> Dict[str, tuple]:
    """Every official state-dict key of the case with its shape (parameters and buffers)."""
    return {e["key"]: tuple(e["shape"]) for e in manifest(case)["state_dict"]}


def prefixed(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _sample_idx(name: str, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randperm(numel, generator=g)[:4096].sort().values


def check_tap(case: str, name: str, ours: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-4) -> float:
    """Assert ``ours`` equals the stored tap ``name`` of ``case``; returns the max abs difference.

    Sampled taps: the values at the stored indices, and the whole tensor's mean / std / min / max."""
    info = manifest(case)["stored_outputs"][name]
    assert tuple(ours.shape) == tuple(info["shape"]), f"{name}: shape {tuple(ours.shape)} != {tuple(info['shape'])}"
    ref = outputs(case)
    ours = ours.detach().float()
    if name in ref:
        want, got = ref[name], ours
    else:
        idx = ref[f"{name}::idx"].long()
        assert torch.equal(idx, _sample_idx(name, ours.numel())), f"{name}: sample indices differ from the recipe"
        want, got = ref[f"{name}::sample"], ours.flatten()[idx]
        o = ours.double()
        scale = max(abs(info["max"]), abs(info["min"]), 1.0)
        for stat, v in (("mean", o.mean()), ("std", o.std()), ("min", o.min()), ("max", o.max())):
            assert abs(float(v) - info[stat]) <= atol * scale + rtol * abs(info[stat]), f"{name}: {stat} {float(v)} != {info[stat]}"
    want = want.to(got.dtype) if want.is_floating_point() else want
    if not want.is_floating_point():
        assert torch.equal(got.to(want.dtype), want), f"{name}: values differ"
        return 0.0
    diff = (got - want).abs()
    scale = want.abs().max().clamp_min(1.0)
    assert bool((diff <= atol * scale + rtol * want.abs()).all()), \
        f"{name}: max abs diff {float(diff.max()):.3g} (max |ref| {float(want.abs().max()):.3g})"
    return float(diff.max())

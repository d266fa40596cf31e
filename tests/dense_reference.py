"""Test helpers for the official downstream references in ``tests/data/reference/downstream`` (copied
from the project's shared reference, see its README): the filled weights of a case (parameters
and BatchNorm statistics from its manifest), the input, the stored taps and how to compare them."""
from __future__ import annotations

import json
import zlib
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from reference_utils import fill_tensor, make_input

DOWNSTREAM = Path(__file__).parent / "data" / "reference" / "downstream"


@lru_cache(maxsize=None)
def case_manifest(case: str) -> dict:
    return json.loads((DOWNSTREAM / f"{case}.json").read_text())


def case_outputs(case: str) -> dict:
    return load_file(str(DOWNSTREAM / f"{case}.safetensors"))


def case_input(case: str) -> torch.Tensor:
    return make_input(case_manifest(case)["input"]["shape"], seed=0)


def _fill_stat(name: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    z = torch.randn(tuple(shape), generator=g, dtype=torch.float32).double()
    return (0.1 * z if name.endswith("running_mean") else 1.0 + 0.1 * z).float()


def filled_state(case: str, model_state: dict, to_ours=lambda k: k) -> dict:
    """The case's state dict in the official layout: filled parameters and BatchNorm statistics; the
    other buffers (``num_batches_tracked``, Swin's ``relative_position_index``) as the model built them
    (``model_state`` under ``to_ours(key)``), as the references did."""
    out = {}
    for e in case_manifest(case)["state_dict"]:
        k, leaf = e["key"], e["key"].rsplit(".", 1)[-1]
        if e["kind"] == "param":
            out[k] = fill_tensor(k, e["shape"])
        elif leaf in ("running_mean", "running_var"):
            out[k] = _fill_stat(k, e["shape"])
        else:
            out[k] = model_state[to_ours(k)]
    return out


def stored(case: str, name: str, outputs: dict):
    """``(values, index)`` of a stored tap: the full tensor (index None) or the 4096-value sample
    with its flat indices."""
    if name + "::sample" in outputs:
        return outputs[name + "::sample"], outputs[name + "::idx"]
    return outputs[name], None


def assert_tap(case: str, name: str, ours: torch.Tensor, outputs: dict, rel: float) -> None:
    """``ours`` equals the stored tap within ``rel`` × the tensor's standard deviation (float32 sums
    in another order), with the stored shape."""
    info = case_manifest(case)["stored_outputs"][name]
    assert list(ours.shape) == list(info["shape"]), (name, tuple(ours.shape), info["shape"])
    ref, idx = stored(case, name, outputs)
    got = ours.reshape(-1)[idx] if idx is not None else ours
    scale = float(info["std"]) if "std" in info else float(ref.double().std()) if ref.numel() > 1 else 1.0
    err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= rel * max(scale, 1e-3), f"{case} {name}: max |diff| {err:.3g} > {rel} x scale {scale:.3g}"


def match_rows(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """The rows of ``ours`` and ``ref`` are the same set (any order): each row's nearest reference row
    is within ``tol`` and the pairing is one-to-one (tied scores make the order kernel-dependent)."""
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    if ours.numel() == 0:
        return
    d = torch.cdist(ours.double(), ref.double())
    nearest = d.argmin(dim=1)
    assert len(set(nearest.tolist())) == len(ref), "rows do not pair one-to-one"
    assert d.min(dim=1).values.max().item() <= tol

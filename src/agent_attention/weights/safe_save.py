"""Writing checkpoints without losing anything: atomic ``torch.save`` and safetensors export.

Both write a temp file in the target folder, fsync it and ``os.replace`` it onto the target, so a
crash mid-write leaves any previous file intact. Re-exported by :mod:`agent_attention.weights.checkpoints`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .._atomic import atomic_path

__all__ = ["save_checkpoint_atomic", "export_safetensors"]


def save_checkpoint_atomic(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``.

    A crash or error mid-write leaves any previous file at ``path`` intact and no partial file.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # through a Python file: a failed write raises OSError (errno: ENOSPC, EFBIG...)
    return Path(path)


def _tensors_for_safetensors(state: Mapping[str, Any]) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = {}
    seen = set()
    for k, v in state.items():
        if not isinstance(k, str):
            raise TypeError(f"safetensors keys must be strings, got {k!r}")
        if not isinstance(v, Tensor):
            raise TypeError(f"safetensors can only store tensors; entry {k!r} is a {type(v).__name__}")
        if v.is_meta:
            raise ValueError(f"entry {k!r} is on the meta device (it has no data to save)")
        t = v.detach().to("cpu")
        storage = t.untyped_storage()
        whole = storage.nbytes() == t.numel() * t.element_size() and t.is_contiguous()
        if storage.data_ptr() in seen or not whole:  # shared or a view: give it its own storage
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def export_safetensors(
    model_or_state_dict: Union[nn.Module, Mapping[str, Tensor]],
    path: Union[str, os.PathLike],
    metadata: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a model's ``state_dict()`` (or a state dict) to ``path`` as safetensors, atomically.

    Tensors are moved to CPU and made contiguous; tensors sharing memory (tied weights, views) are
    stored as separate copies. ``metadata`` values must be str/int/float/bool (stored as strings);
    ``format: pt`` is added so timm / transformers recognise the file.
    """
    import safetensors.torch as st

    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    if not isinstance(state, Mapping):
        raise TypeError(f"export_safetensors needs an nn.Module or a state dict, got {type(state).__name__}")
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
            raise TypeError(f"metadata must map str to str/int/float/bool, got {k!r}: {type(v).__name__}")
        meta[k] = str(v)
    tensors = _tensors_for_safetensors(state)
    with atomic_path(path) as tmp:
        st.save_file(tensors, os.fspath(tmp), metadata=meta)
    return Path(path)

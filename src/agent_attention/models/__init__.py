"""The Agent Attention model zoo, registered with timm.

Importing this package registers every model (official names such as ``agent_swin_tiny`` and short
aliases such as ``agent_swin_t``) so that ``timm.create_model(name)`` works.
"""
from __future__ import annotations

from typing import List

import timm

from . import agent_cswin, agent_deit, agent_pvt, agent_swin  # noqa: F401  (registration)
from .checkpoints import export_safetensors, load_checkpoint_state, load_official_checkpoint, save_checkpoint_atomic

FAMILIES = ("agent_deit", "agent_pvt", "agent_swin", "agent_cswin")


def list_models(pattern: str = "agent_*", aliases: bool = True) -> List[str]:
    """Names of the registered agent models (``aliases=False``: only the official names)."""
    names = [n for n in timm.list_models(pattern) if n.startswith(FAMILIES)]
    if not aliases:
        from .registry import ALIASES

        names = [n for n in names if n not in ALIASES]
    return names


def create_model(name: str, pretrained: bool = False, checkpoint_path: str = "", **kwargs):
    """Build an agent model by name (``timm.create_model`` with a helpful error for unknown names).

    ``checkpoint_path`` loads a local checkpoint (ours, an official ``.pth`` or a ``.safetensors``)
    safely and strictly with :func:`load_official_checkpoint` (its ``model`` weights; for the EMA
    weights call ``load_official_checkpoint(model, path, use_ema=True)`` yourself).
    """
    known = list_models()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (see `agent-attention models` for the list)")
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint_path:
        load_official_checkpoint(model, checkpoint_path)
    return model


__all__ = [
    "create_model", "list_models", "load_official_checkpoint", "load_checkpoint_state", "export_safetensors",
    "save_checkpoint_atomic", "FAMILIES",
]

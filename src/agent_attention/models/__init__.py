"""The Agent Attention model zoo, registered with timm.

Importing this package registers every model (official names such as ``agent_swin_tiny`` and short
aliases such as ``agent_swin_t``) so that ``timm.create_model(name)`` works; ``import agent_attention``
does it too (on first use of timm). Each family lives in one file ``agent_<family>.py`` that declares
its models, cfgs, aliases and downstream settings (:func:`.registry.register_family`).
"""
from __future__ import annotations

from typing import List

import timm

from . import agent_deit, agent_pvt, agent_swin, agent_cswin  # noqa: F401  (registration, in this order)
from ..weights import export_safetensors, load_checkpoint_state, load_official_checkpoint, save_checkpoint_atomic
from .registry import ALIASES, FAMILIES as _FAMILY_CLASSES, check_model_name

FAMILIES = tuple(_FAMILY_CLASSES)  # ("agent_deit", "agent_pvt", "agent_swin", "agent_cswin")


def list_models(pattern: str = "agent_*", aliases: bool = True) -> List[str]:
    """Names of the registered agent models (``aliases=False``: only the official names)."""
    names = [n for n in timm.list_models(pattern) if n.startswith(tuple(_FAMILY_CLASSES))]
    return names if aliases else [n for n in names if n not in ALIASES]


def create_model(name: str, pretrained: bool = False, checkpoint_path: str = "", **kwargs):
    """Build an agent model by name (``timm.create_model`` with a helpful error for unknown names).

    ``checkpoint_path`` loads a local checkpoint (ours, an official ``.pth`` or a ``.safetensors``)
    safely and strictly with :func:`load_official_checkpoint` (its ``model`` weights; for the EMA
    weights call ``load_official_checkpoint(model, path, use_ema=True)`` yourself).
    """
    check_model_name(name, list_models())
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint_path:
        load_official_checkpoint(model, checkpoint_path)
    return model


__all__ = [
    "create_model", "list_models", "load_official_checkpoint", "load_checkpoint_state", "export_safetensors",
    "save_checkpoint_atomic", "FAMILIES",
]

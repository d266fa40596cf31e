"""One adapter per denoiser family; :func:`find_adapter` picks the one for a model.

Registering a family is one file here (a subclass of :class:`~.base.Adapter`) plus one line in
``ADAPTERS``; see ``docs/agentsd.md`` ("Adding a model family").
"""
from __future__ import annotations

from typing import Any, List

from .base import Adapter, Call, LayerSpec
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .wan import WanAdapter

__all__ = ["Adapter", "Call", "LayerSpec", "ADAPTERS", "find_adapter", "register_adapter", "supported_classes"]

ADAPTERS: List[Adapter] = [UNetAdapter(), PixArtAdapter(), SD3Adapter(), FluxAdapter(), WanAdapter()]


def register_adapter(adapter: Adapter) -> Adapter:
    """Add ``adapter`` (first match wins, so a more specific class may come before a general one)."""
    if not isinstance(adapter, Adapter) or not adapter.classes:
        raise TypeError(f"AgentSD: an adapter must be an Adapter with classes, got {adapter!r}")
    ADAPTERS[:] = [a for a in ADAPTERS if a.name != adapter.name] + [adapter]
    return adapter


def supported_classes() -> List[str]:
    return [cls for adapter in ADAPTERS for cls in adapter.classes]


def find_adapter(model: Any) -> Adapter:
    """The adapter of a denoiser module; a one-line error naming the supported classes otherwise."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(f"AgentSD does not support {type(model).__name__}; supported denoisers: {', '.join(supported_classes())}")

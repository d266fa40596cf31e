"""Model names: official names and short aliases, plus the helpers the family files share."""
from __future__ import annotations

import sys

# short alias -> official name (DESIGN.md: official names of the manifests plus short aliases)
ALIASES = {
    "agent_deit_t": "agent_deit_tiny",
    "agent_deit_s": "agent_deit_small",
    "agent_deit_s_448": "agent_deit_small_448",
    "agent_deit_b": "agent_deit_base",
    "agent_pvt_t": "agent_pvt_tiny",
    "agent_pvt_s": "agent_pvt_small",
    "agent_pvt_m": "agent_pvt_medium",
    "agent_pvt_m_256": "agent_pvt_medium_256",
    "agent_pvt_l": "agent_pvt_large",
    "agent_swin_t": "agent_swin_tiny",
    "agent_swin_s": "agent_swin_small",
    "agent_swin_s_288": "agent_swin_small_288",
    "agent_swin_b": "agent_swin_base",
    "agent_swin_b_384": "agent_swin_base_384",
    "agent_cswin_t": "agent_cswin_tiny",
    "agent_cswin_s": "agent_cswin_small",
    "agent_cswin_b": "agent_cswin_base",
    "agent_cswin_b_384": "agent_cswin_base_384",
}

# ImageNet top-1 reported in the paper / official README, by official name
PAPER_TOP1 = {
    "agent_deit_tiny": 74.9, "agent_deit_small": 80.5, "agent_deit_small_448": 83.1, "agent_deit_base": 82.0,
    "agent_pvt_tiny": 78.4, "agent_pvt_small": 82.2, "agent_pvt_medium": 83.4, "agent_pvt_medium_256": 83.8,
    "agent_pvt_large": 83.7,
    "agent_swin_tiny": 82.6, "agent_swin_small": 83.7, "agent_swin_small_288": 84.1, "agent_swin_base": 84.0,
    "agent_swin_base_384": 84.9,
    "agent_cswin_tiny": 83.1, "agent_cswin_small": 83.9, "agent_cswin_base": 84.7, "agent_cswin_base_384": 85.8,
}


def register_alias(alias: str, fn):
    """Register ``alias`` with timm as a second entry point of the model function ``fn``."""
    from timm.models import register_model

    def _alias(pretrained: bool = False, **kwargs):
        return fn(pretrained=pretrained, **kwargs)

    _alias.__name__ = alias
    _alias.__qualname__ = alias
    _alias.__module__ = fn.__module__
    _alias.__doc__ = f"Alias of ``{fn.__name__}``."
    registered = register_model(_alias)  # timm lists the name in the module's __all__ ...
    setattr(sys.modules[fn.__module__], alias, registered)  # ... so the module must define it
    return registered

"""Released weights for ``pretrained=True``: official download URLs, the local cache, safe loading.

Interface used by the model builders (``build`` in the shared model helpers):

* ``official_url(name) -> str``: the official download URL of a released model ('' if none);
* ``prepare_pretrained(variant, pretrained, kwargs) -> kwargs``: called right before
  ``timm.models.build_model_with_cfg``; when ``pretrained`` it makes sure timm will load a safe
  local file (download + cache + safetensors conversion) and returns the kwargs to build with.

(Stub: the download machinery lands with the "reach" issue.)
"""
from __future__ import annotations

from typing import Any, Dict

__all__ = ["official_url", "prepare_pretrained"]


def official_url(name: str) -> str:
    return ""


def prepare_pretrained(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return kwargs

"""Hugging Face Hub mirrors of the weights, in timm's format.

:func:`save_for_hub` writes a folder that timm loads by name: ``model.safetensors`` (the model's
``state_dict()``) and ``config.json`` (timm's layout: ``architecture``, ``num_classes``,
``pretrained_cfg``, ``model_args``), both atomically. Upload the folder with ``huggingface_hub``
(``HfApi().upload_folder(repo_id=..., folder_path=...)``) or use ``timm.models.push_to_hub``; then::

    timm.create_model("hf-hub:USER/agent_swin_tiny", pretrained=True)
    timm.create_model("agent_swin_tiny", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id="USER/agent_swin_tiny"))
    timm.create_model("local-dir:/path/to/folder", pretrained=True)   # the folder itself, offline

None of these paths unpickles anything: timm reads ``model.safetensors``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from .._atomic import atomic_path
from .safe_save import export_safetensors

__all__ = ["HF_CONFIG_NAME", "HF_WEIGHTS_NAME", "save_for_hub"]

HF_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"


def save_for_hub(model: nn.Module, folder: str | os.PathLike, *, model_args: dict[str, Any] | None = None,
                 model_config: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` for ``model`` (a timm-built Agent model) to ``folder``.

    ``model_args``: constructor kwargs to record for models built with non-default arguments
    (timm stores those it knows about itself); ``model_config``: extra ``config.json`` entries
    (e.g. ``label_names``), as in timm's ``save_config_for_hf``. Returns the folder.
    """
    from timm.models._hub import save_config_for_hf

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_for_hub needs an nn.Module, got {type(model).__name__}")
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not cfg.get("architecture"):
        raise ValueError("save_for_hub needs a model built by timm.create_model (it has no pretrained_cfg['architecture'])")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    export_safetensors(model, out / HF_WEIGHTS_NAME)
    with atomic_path(out / HF_CONFIG_NAME) as tmp:
        save_config_for_hf(model, tmp, model_config=model_config, model_args=model_args)
    return out

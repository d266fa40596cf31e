"""Weights: safe loading, conversion, download, cache and Hub files, for every model kind.

Nothing here knows a model family (it imports nothing from :mod:`agent_attention.models` or
:mod:`agent_attention.dense`): a model class declares its checkpoint filter with
:func:`register_checkpoint_filter`, and a registered model's download URL is the one of its timm
pretrained cfg. The modules, by role:

* :mod:`.safe_load` (+ :mod:`.pickle_scan`): read ``.pth`` / ``.safetensors`` files without running
  code, pick the weights inside;
* :mod:`.safe_save`: atomic ``torch.save`` and safetensors export;
* :mod:`.checkpoints`: load a checkpoint into a model (filter, key and shape checks);
* :mod:`.download`, :mod:`.pretrained`: ``pretrained=True`` (download, cache, conversion);
* :mod:`.hub`: folders that timm loads from the Hugging Face Hub.
"""
from __future__ import annotations

from .checkpoints import (
    IncompatibleCheckpointError,
    check_state_dict,
    checkpoint_filter,
    load_official_checkpoint,
    prepare_state_dict,
    register_checkpoint_filter,
)
from .download import WeightsDownloadError
from .hub import save_for_hub
from .pretrained import cache_dir, cached_weights_path, convert_local_file, fetch_pretrained, official_url, prepare_pretrained
from .safe_load import (
    UnsafeCheckpointError,
    check_safetensors,
    has_ema_weights,
    load_checkpoint,
    load_checkpoint_state,
    official_safe_globals,
    select_state_dict,
    strip_wrapper_prefixes,
    unwrap_state_dict,
)
from .safe_save import export_safetensors, save_checkpoint_atomic

__all__ = [
    "IncompatibleCheckpointError", "UnsafeCheckpointError", "WeightsDownloadError", "cache_dir", "cached_weights_path",
    "check_safetensors", "check_state_dict", "checkpoint_filter", "has_ema_weights", "convert_local_file", "export_safetensors", "fetch_pretrained",
    "load_checkpoint", "load_checkpoint_state", "load_official_checkpoint", "official_safe_globals", "official_url",
    "prepare_pretrained", "prepare_state_dict", "register_checkpoint_filter", "save_checkpoint_atomic", "save_for_hub",
    "select_state_dict", "strip_wrapper_prefixes", "unwrap_state_dict",
]

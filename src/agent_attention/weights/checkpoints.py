"""Safe loading of official Agent-Attention checkpoints, safetensors export, atomic saving.

The released ``.pth`` files are ``torch.save`` dicts ``{'model', 'optimizer', 'lr_scheduler',
'max_accuracy', 'epoch', 'config'}`` (CSWin EMA runs add ``'state_dict_ema'``, ``'max_accuracy_e'``)
whose ``'config'`` is a pickled ``yacs.config.CfgNode``. ``torch.load(weights_only=True)`` refuses
that class, and a full unpickle would run whatever code the file names. Here the file is read by
torch's restricted ``weights_only`` unpickler with a few extra, harmless stand-ins:

* ``yacs.config.CfgNode`` -> ``collections.OrderedDict`` (a dict subclass; its attributes are
  data only), converted to nested plain ``dict``s after loading;
* numpy scalars / dtypes -> numeric numpy scalars, rebuilt from their raw bytes (numeric kinds only).

Anything else outside torch's allowlist (``os.system``, ``builtins.eval``, arbitrary classes...)
is refused with :class:`UnsafeCheckpointError`. Nothing in this module imports the model families.

Reading and picking the weights live in :mod:`.safe_load`, writing in :mod:`.safe_save`; every
public name is importable from here.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

from torch import Tensor, nn

from .safe_load import (EMA_KEYS, STATE_KEYS, WRAPPER_PREFIXES, PathOrBytes, UnsafeCheckpointError, _describe,
                         load_checkpoint, load_checkpoint_state, official_safe_globals, select_state_dict,
                         strip_wrapper_prefixes, unwrap_state_dict)
from .safe_save import export_safetensors, save_checkpoint_atomic

__all__ = [
    "IncompatibleCheckpointError", "UnsafeCheckpointError", "official_safe_globals", "load_checkpoint",
    "load_checkpoint_state", "select_state_dict", "check_state_dict", "prepare_state_dict", "load_official_checkpoint",
    "export_safetensors", "save_checkpoint_atomic", "unwrap_state_dict", "strip_wrapper_prefixes",
    "STATE_KEYS", "EMA_KEYS", "WRAPPER_PREFIXES", "register_checkpoint_filter", "checkpoint_filter",
]

#: buffers that are pure functions of the geometry; a checkpoint may lack them (official issue #37)
DERIVED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


class IncompatibleCheckpointError(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


# --------------------------------------------------------------------------- loading into a model
def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    return f"{type(model).__name__} ({arch!r})" if arch else type(model).__name__


def _listing(title: str, items: list, limit: int = 10) -> str:
    shown = ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
    return f"\n  {len(items)} {title}: {shown}"


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> Tuple[list, list, list]:
    """``(missing, unexpected, mismatched)`` of ``state`` against ``model.state_dict()``.

    ``mismatched`` holds ``"name: checkpoint (a, b) vs model (c, d)"`` strings. Missing derived
    buffers (Swin's ``relative_position_index`` / ``attn_mask``) are not reported: the model keeps
    its own.
    """
    own = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    missing = [k for k in own if k not in state and not (k in buffers and k.rsplit(".", 1)[-1] in DERIVED_BUFFERS)]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, mismatched


#: model class -> its ``checkpoint_filter_fn(state_dict, model)``, declared by the class's family
_FILTERS: Dict[type, Callable] = {}


def register_checkpoint_filter(model_cls: type, filter_fn: Callable) -> None:
    """Declare the ``checkpoint_filter_fn(state_dict, model)`` that adapts released checkpoints to
    ``model_cls`` (and its subclasses); the model families (and dense models) call it once."""
    if not isinstance(model_cls, type) or not callable(filter_fn):
        raise TypeError("register_checkpoint_filter(model_cls, filter_fn) needs a class and a callable")
    _FILTERS[model_cls] = filter_fn


def checkpoint_filter(model: Union[nn.Module, type]) -> Optional[Callable]:
    """The checkpoint filter registered for ``model``'s class (or its nearest base class), or ``None``."""
    cls = model if isinstance(model, type) else type(model)
    return next((_FILTERS[c] for c in cls.__mro__ if c in _FILTERS), None)


def prepare_state_dict(
    model: nn.Module,
    path: Union[PathOrBytes, Mapping[str, Tensor]],
    *,
    strict: bool = True,
    key: Optional[str] = None,
    use_ema: bool = False,
) -> Dict[str, Tensor]:
    """The state dict that :func:`load_official_checkpoint` would load into ``model``.

    Reads ``path`` safely, picks the weights, applies the registered checkpoint filter, drops
    entries for the model's non-persistent buffers and checks keys and shapes (see
    :func:`load_official_checkpoint` for ``strict``).
    """
    if isinstance(path, Mapping):
        state, used = select_state_dict(path, key=key, use_ema=use_ema)
    else:
        state, used = select_state_dict(load_checkpoint(path), key=key, use_ema=use_ema)
    filter_fn = checkpoint_filter(model)
    if filter_fn is not None:
        state = dict(filter_fn(state, model))
    own_keys = set(model.state_dict())
    transient = {n for n, _ in model.named_buffers()} - own_keys  # non-persistent buffers
    state = {k: v for k, v in state.items() if k not in transient}
    missing, unexpected, mismatched = check_state_dict(model, state)
    if missing or unexpected or mismatched:
        src = "state dict" if isinstance(path, Mapping) else f"checkpoint {_describe(path)}"
        msg = (
            f"{src}{f' (entry {used!r})' if used else ''} does not fit model {_model_name(model)}:"
            + (_listing("missing keys (in the model, not in the checkpoint)", missing) if missing else "")
            + (_listing("unexpected keys (in the checkpoint, not in the model)", unexpected) if unexpected else "")
            + (_listing("shape mismatches", mismatched) if mismatched else "")
        )
        if strict:
            raise IncompatibleCheckpointError(msg + "\nPass strict=False to load only the matching entries.")
        warnings.warn(msg + "\nLoading the matching entries only (strict=False).", stacklevel=3)
        bad = {m.split(":", 1)[0] for m in mismatched}
        state = {k: v for k, v in state.items() if k in own_keys and k not in bad}
    return state


def load_official_checkpoint(
    model: nn.Module,
    path: Union[PathOrBytes, Mapping[str, Tensor]],
    *,
    strict: bool = True,
    key: Optional[str] = None,
    use_ema: bool = False,
) -> nn.Module:
    """Load an official (or our own) checkpoint into ``model`` safely and return ``model``.

    ``path`` is a file (``.pth`` or ``.safetensors``), bytes, or an already loaded checkpoint
    dict. The weights are ``key`` if given, else the EMA entry with ``use_ema=True``, else
    ``model`` / ``state_dict`` / the raw dict (:func:`select_state_dict`). The checkpoint filter
    registered for the model's class (:func:`register_checkpoint_filter`) adapts the official layout. With
    ``strict=True`` any missing / unexpected key or shape mismatch raises
    :class:`IncompatibleCheckpointError` listing them; with ``strict=False`` the matching entries
    are loaded and the rest reported in a warning. Entries for non-persistent buffers (e.g. Swin's
    ``attn_mask``) are ignored, and missing derived buffers keep the model's own values.
    Meta-device models get the checkpoint tensors assigned.
    """
    state = prepare_state_dict(model, path, strict=strict, key=key, use_ema=use_ema)
    assign = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(state, strict=False, assign=assign)
    return model

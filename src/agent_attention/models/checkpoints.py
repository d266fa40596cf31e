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
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import pickle
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = [
    "IncompatibleCheckpointError", "UnsafeCheckpointError", "official_safe_globals", "load_checkpoint",
    "load_checkpoint_state", "select_state_dict", "check_state_dict", "prepare_state_dict", "load_official_checkpoint",
    "export_safetensors", "save_checkpoint_atomic", "main",
]

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, io.IOBase]
#: keys tried, in order, when no ``key`` is given (``use_ema=True`` tries the EMA ones first)
STATE_KEYS = ("model", "model_ema", "state_dict_ema", "state_dict")
EMA_KEYS = ("state_dict_ema", "model_ema")
#: prefixes added by DDP / torch.compile wrappers
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: buffers that are pure functions of the geometry; a checkpoint may lack them (official issue #37)
DERIVED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


class UnsafeCheckpointError(ValueError):
    """The file asks the unpickler for something that is not plain data (code, unknown classes)."""


class IncompatibleCheckpointError(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


# --------------------------------------------------------------------------- safe unpickling
class _NumpyDTypeSpec:
    """Stand-in for a pickled ``numpy.dtype``: remembers the type code and byte order only."""

    def __init__(self, spec: str = "", *args) -> None:
        self.spec, self.byteorder = str(spec), "="

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]


def _numpy_scalar(dtype: _NumpyDTypeSpec, data: bytes = b""):
    """Rebuild a numeric numpy scalar from its raw bytes; refuse object / structured dtypes."""
    import numpy as np

    if not isinstance(dtype, _NumpyDTypeSpec) or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("numpy scalar refused: only numeric scalars stored as raw bytes are accepted")
    try:
        dt = np.dtype(dtype.spec)
        if dt.kind not in "biufc":
            raise TypeError("not numeric")
        if dtype.byteorder in "<>":
            dt = dt.newbyteorder(dtype.byteorder)
        return np.frombuffer(bytes(data), dtype=dt, count=1)[0]
    except (TypeError, ValueError) as e:
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype.spec!r} refused (numeric dtypes only): {e}") from None


#: extra (stand-in, full pickle name) pairs for torch's weights-only unpickler
_EXTRA_GLOBALS = [
    (collections.OrderedDict, "yacs.config.CfgNode"),
    (_NumpyDTypeSpec, "numpy.dtype"),
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    (argparse.Namespace, "argparse.Namespace"),  # timm training scripts store their args
]


@contextlib.contextmanager
def official_safe_globals() -> Iterator[None]:
    """Let ``torch.load(..., weights_only=True)`` (and so timm's loaders) read official files.

    Inside the context the restricted unpickler also accepts a yacs ``CfgNode`` (as an
    ``OrderedDict``) and numeric numpy scalars; it still refuses everything else. Example::

        with official_safe_globals():
            model = timm.create_model("agent_swin_tiny", pretrained=True,
                                      pretrained_cfg_overlay=dict(file="agent_swin_t.pth"))
    """
    with torch.serialization.safe_globals(_EXTRA_GLOBALS):
        yield


def _plain(obj: Any) -> Any:
    """Stand-in CfgNodes (OrderedDicts carrying yacs attributes) -> nested plain dicts.

    Containers without a CfgNode inside are returned as they are (state dicts keep ``_metadata``).
    """
    if isinstance(obj, collections.OrderedDict) and "__immutable__" in getattr(obj, "__dict__", {}):
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) in (dict, collections.OrderedDict):
        new = {k: _plain(v) for k, v in obj.items()}
        if any(new[k] is not v for k, v in obj.items()):
            out = type(obj)(new)
            if hasattr(obj, "__dict__"):
                out.__dict__.update(obj.__dict__)
            return out
    elif type(obj) in (list, tuple):
        new_items = [_plain(v) for v in obj]
        if any(a is not b for a, b in zip(new_items, obj)):
            return type(obj)(new_items)
    return obj


def _unpickler_reason(err: BaseException) -> str:
    """The informative part of torch's weights-only error message (not its advice)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    skip = ("Weights only load failed", "(1)", "(2)", "Check the documentation")
    line = next((ln for ln in lines if not ln.startswith(skip)), lines[0] if lines else repr(err))
    return line.split(" Please use `torch.serialization", 1)[0]


def _describe(src: Any) -> str:
    return f"'{os.fspath(src)}'" if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>"


def _is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header size, then a JSON object
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def load_checkpoint(src: PathOrBytes, map_location: Union[str, torch.device] = "cpu") -> Any:
    """Read a whole ``.pth/.pt/.bin`` or ``.safetensors`` file safely (no code execution).

    Returns what was saved: for official files the full dict (``'config'`` as nested plain dicts).
    Raises :class:`UnsafeCheckpointError` if the file references code or unknown classes, and
    ``ValueError`` if it is not a readable checkpoint.
    """
    name = _describe(src)
    if isinstance(src, (bytes, bytearray)):
        data: Optional[bytes] = bytes(src)
        head = data[:16]
    elif isinstance(src, io.IOBase):
        data = src.read()
        head = data[:16]
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {name} does not exist")
        data = None
        with open(path, "rb") as f:
            head = f.read(16)
    if _is_safetensors(head):
        import safetensors.torch as st

        try:
            out = st.load(data) if data is not None else st.load_file(os.fspath(src))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"checkpoint {name} is not a readable safetensors file: {e}") from e
        device = torch.device(map_location)
        return {k: v.to(device) for k, v in out.items()} if device.type != "cpu" else out
    source: Any = io.BytesIO(data) if data is not None else os.fspath(src)
    mmap = data is None and head[:2] == b"PK"  # zip format: map storages instead of reading them
    try:
        with official_safe_globals():
            obj = torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(e)
        if not any(w in reason for w in ("GLOBAL", "global", "reduce", "Can only", "persistent", "refused")):
            raise ValueError(f"checkpoint {name} is not a readable torch or safetensors file: {reason}") from e
        bad = ""
        if data is None:
            with contextlib.suppress(Exception):
                allowed = {n for _, n in _EXTRA_GLOBALS}
                found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(src)) if g not in allowed]
                bad = f" It references: {', '.join(found)}." if found else ""
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {name}: it needs pickled code or classes outside the safe "
            f"allowlist (tensors, containers, numbers, strings, yacs CfgNode, numpy scalars).{bad} "
            f"Nothing from it was executed. Unpickler: {reason}"
        ) from e
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"checkpoint {name} is not a readable torch or safetensors file: {e!r}") from e
    return _plain(obj)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def select_state_dict(ckpt: Any, *, key: Optional[str] = None, use_ema: bool = False) -> Tuple[Dict[str, Tensor], str]:
    """Pick the weights inside a loaded checkpoint; returns ``(state_dict, key_used)``.

    ``key`` if given, else (``use_ema``: ``state_dict_ema`` / ``model_ema`` first) ``model`` ->
    ``model_ema`` -> ``state_dict_ema`` -> ``state_dict`` -> the dict itself if it maps names to
    tensors. ``module.`` / ``_orig_mod.`` prefixes are stripped.
    """
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint holds a {type(ckpt).__name__}, expected a dict of weights")
    if key is not None:
        if key not in ckpt:
            raise ValueError(f"checkpoint has no entry {key!r}; top-level keys: {sorted(map(str, ckpt))}")
        used, state = key, ckpt[key]
    else:
        order = EMA_KEYS + STATE_KEYS if use_ema else STATE_KEYS
        used = next((k for k in order if isinstance(ckpt.get(k), Mapping)), "")
        state = ckpt[used] if used else ckpt
    if not _is_state_dict(state):
        where = f"entry {used!r}" if used else "checkpoint"
        raise ValueError(
            f"{where} is not a state dict (name -> tensor); top-level keys: {sorted(map(str, ckpt))[:20]}"
        )
    out: Dict[str, Tensor] = {}
    for k, v in state.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out, used


def load_checkpoint_state(src: PathOrBytes, *, key: Optional[str] = None, use_ema: bool = False) -> Dict[str, Tensor]:
    """The weights of a checkpoint file (or bytes) as a ``{name: tensor}`` dict, loaded safely.

    See :func:`load_checkpoint` (safety) and :func:`select_state_dict` (which entry is used).
    """
    return select_state_dict(load_checkpoint(src), key=key, use_ema=use_ema)[0]


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


def _family_filter(model: nn.Module):
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def prepare_state_dict(
    model: nn.Module,
    path: Union[PathOrBytes, Mapping[str, Tensor]],
    *,
    strict: bool = True,
    key: Optional[str] = None,
    use_ema: bool = False,
) -> Dict[str, Tensor]:
    """The state dict that :func:`load_official_checkpoint` would load into ``model``.

    Reads ``path`` safely, picks the weights, applies the family's ``checkpoint_filter_fn``, drops
    entries for the model's non-persistent buffers and checks keys and shapes (see
    :func:`load_official_checkpoint` for ``strict``).
    """
    if isinstance(path, Mapping):
        state, used = select_state_dict(path, key=key, use_ema=use_ema)
    else:
        state, used = select_state_dict(load_checkpoint(path), key=key, use_ema=use_ema)
    filter_fn = _family_filter(model)
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
    ``model`` / ``state_dict`` / the raw dict (:func:`select_state_dict`). The family's
    ``checkpoint_filter_fn`` (if the model's module defines one) adapts the official layout. With
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


# --------------------------------------------------------------------------- writing
def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_mode(path: Path) -> int:
    """The mode a normally created file would get (or the existing file's mode)."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _atomic_target(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and ``os.replace`` it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _file_mode(path))  # mkstemp makes 0600 files
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def save_checkpoint_atomic(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``.

    A crash or error mid-write leaves any previous file at ``path`` intact and no partial file.
    """
    with _atomic_target(path) as tmp:
        torch.save(obj, tmp)
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
    with _atomic_target(path) as tmp:
        st.save_file(tensors, os.fspath(tmp), metadata=meta)
    return Path(path)


# --------------------------------------------------------------------------- CLI
def main(argv: Optional[list] = None) -> int:
    """``agent-attention convert IN.pth OUT.safetensors [--key K] [--ema] [--model NAME]``."""
    p = argparse.ArgumentParser(
        prog="agent-attention convert",
        description="Convert an official .pth checkpoint to .safetensors (read safely, written atomically).",
    )
    p.add_argument("src", help="input checkpoint (.pth/.pt/.bin/.safetensors)")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--key", default=None, help="entry holding the weights (default: model, model_ema, state_dict_ema, state_dict, raw)")
    p.add_argument("--ema", action="store_true", help="prefer the EMA weights (state_dict_ema / model_ema)")
    p.add_argument("--model", default=None, help="validate against this model (strict load) and store its filtered layout")
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.src)
        state, used = select_state_dict(ckpt, key=args.key, use_ema=args.ema)
        meta: Dict[str, Any] = {"source": Path(args.src).name, "key": used or "(raw)"}
        if isinstance(ckpt, Mapping):
            meta.update({k: ckpt[k] for k in ("epoch", "max_accuracy", "max_accuracy_e") if isinstance(ckpt.get(k), (int, float))})
        if args.model:
            from . import create_model  # imports the model families

            model = create_model(args.model)  # real buffers: the filter may copy them into the state
            state = prepare_state_dict(model, state, strict=True)
            meta["model"] = args.model
        export_safetensors(state, args.dst, metadata=meta)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"agent-attention convert: error: {e}", file=sys.stderr)
        return 1
    n = sum(t.numel() for t in state.values())
    print(f"wrote {args.dst}: {len(state)} tensors, {n / 1e6:.2f}M values (entry {meta['key']!r})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

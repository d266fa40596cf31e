"""Safe reading of checkpoint files and picking the weights inside them.

Official ``.pth`` files are read by torch's restricted ``weights_only`` unpickler with a few extra,
harmless stand-ins (yacs ``CfgNode`` -> ``OrderedDict``, numeric numpy scalars, ``argparse.Namespace``);
anything else that names code is refused with :class:`UnsafeCheckpointError`. Before torch reads a
file, :mod:`.pickle_scan` checks every tensor against its storage and every storage against the
file (a 1 KB file cannot make the loader allocate terabytes), and the result is checked for cycles
and absurd nesting (a ``ValueError``, never a ``RecursionError``). ``.safetensors`` files are
recognised by their header. The public names are re-exported by
:mod:`agent_attention.weights.checkpoints`.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from .._errors import one_line
from .pickle_scan import check_storages

__all__ = [
    "UnsafeCheckpointError", "official_safe_globals", "load_checkpoint", "select_state_dict", "unwrap_state_dict",
    "strip_wrapper_prefixes", "load_checkpoint_state", "has_ema_weights", "check_safetensors", "damaged_zip_member",
    "STATE_KEYS", "EMA_KEYS", "WRAPPER_PREFIXES",
]

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, io.IOBase]
#: keys tried, in order, when no ``key`` is given (``use_ema=True`` tries only the EMA ones)
STATE_KEYS = ("model", "model_ema", "state_dict_ema", "state_dict")
EMA_KEYS = ("state_dict_ema", "model_ema")
#: prefixes added by DDP / torch.compile wrappers
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class UnsafeCheckpointError(ValueError):
    """The file asks the unpickler for something that is not plain data (code, unknown classes)."""


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


#: deepest container nesting accepted in a checkpoint (real ones have < 10 levels)
MAX_DEPTH = 100


def _plain(obj: Any, _path: Optional[set] = None) -> Any:
    """Stand-in CfgNodes (OrderedDicts carrying yacs attributes) -> nested plain dicts.

    Containers without a CfgNode inside are returned as they are (state dicts keep ``_metadata``).
    A container that contains itself, or nesting deeper than :data:`MAX_DEPTH`, is a ``ValueError``.
    """
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    path = set() if _path is None else _path
    if id(obj) in path:
        raise ValueError("the checkpoint holds a container that contains itself (a cyclic reference)")
    if len(path) >= MAX_DEPTH:
        raise ValueError(f"the checkpoint nests containers more than {MAX_DEPTH} levels deep")
    path.add(id(obj))
    try:
        return _plain_one(obj, path)
    finally:
        path.discard(id(obj))


def _plain_one(obj: Any, path: set) -> Any:
    if isinstance(obj, collections.OrderedDict) and "__immutable__" in getattr(obj, "__dict__", {}):
        return {k: _plain(v, path) for k, v in obj.items()}
    if type(obj) in (dict, collections.OrderedDict):
        new = {k: _plain(v, path) for k, v in obj.items()}
        if any(new[k] is not v for k, v in obj.items()):
            out = type(obj)(new)
            if hasattr(obj, "__dict__"):
                out.__dict__.update(obj.__dict__)
            return out
    elif type(obj) in (list, tuple):
        new_items = [_plain(v, path) for v in obj]
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


#: the largest safetensors header accepted (the format's own limit)
MAX_SAFETENSORS_HEADER = 100_000_000


def _is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header size, then a JSON object
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < MAX_SAFETENSORS_HEADER


def _safetensors_problem(head: bytes, size: int) -> Optional[str]:
    """Why a file that starts like safetensors (a size, then ``{``) cannot be one, or ``None``."""
    declared = int.from_bytes(head[:8], "little")
    if declared >= MAX_SAFETENSORS_HEADER or declared > size - 8:
        return f"its header claims {declared} bytes but the file holds {size}"
    return None


def check_safetensors(path: Union[str, os.PathLike]) -> None:
    """A one-line ValueError unless ``path`` is a readable safetensors file (its header is parsed and
    checked against the file size; no tensor is read)."""
    from safetensors import safe_open

    with open(path, "rb") as f:
        head = f.read(16)
    problem = _safetensors_problem(head, Path(path).stat().st_size) if head[8:9] == b"{" else "no safetensors header"
    if problem is None:
        try:
            with safe_open(os.fspath(path), framework="pt"):
                pass
        except Exception as e:  # safetensors raises its own error types
            problem = one_line(e)
    if problem:
        raise ValueError(f"checkpoint {_describe(path)} is not a readable safetensors file: {problem}")


def damaged_zip_member(src: Union[bytes, Path]) -> Optional[str]:
    """The first member of a zip checkpoint whose bytes do not match their CRC-32, or ``None``.

    torch does not check the checksums it writes, so flipped bytes in a tensor would load silently.
    Members stored with a CRC of 0 (``torch.serialization.set_crc32_options(False)``) cannot be checked.
    """
    with (zipfile.ZipFile(io.BytesIO(src)) if isinstance(src, (bytes, bytearray)) else zipfile.ZipFile(src)) as z:
        for info in z.infolist():
            if info.CRC == 0 or info.is_dir():
                continue
            try:
                with z.open(info) as member:  # zipfile checks the CRC-32 once the member is read
                    while member.read(1 << 22):
                        pass
            except zipfile.BadZipFile:
                return info.filename
    return None


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
    if head[8:9] == b"{":  # safetensors: an 8-byte header size, then a JSON object
        problem = _safetensors_problem(head, len(data) if data is not None else Path(src).stat().st_size)
        if problem:
            raise ValueError(f"checkpoint {name} is not a readable safetensors file: {problem}")
        import safetensors.torch as st

        try:
            out = st.load(data) if data is not None else st.load_file(os.fspath(src))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"checkpoint {name} is not a readable safetensors file: {one_line(e)}") from None
        device = torch.device(map_location)
        return {k: v.to(device) for k, v in out.items()} if device.type != "cpu" else out
    source: Any = io.BytesIO(data) if data is not None else os.fspath(src)
    mmap = data is None and head[:2] == b"PK"  # zip format: map storages instead of reading them
    problem = check_storages(data if data is not None else Path(src))
    if problem:
        raise ValueError(f"refusing to load checkpoint {name}: {problem}")
    if head[:2] == b"PK":
        try:
            damaged = damaged_zip_member(data if data is not None else Path(src))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise ValueError(f"checkpoint {name} is not a readable torch or safetensors file: {e}") from None
        if damaged:
            raise ValueError(f"checkpoint {name} is damaged: the bytes of {damaged!r} do not match their CRC-32 "
                             "checksum (a corrupted download or copy?)")
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
    except RecursionError as e:
        raise ValueError(f"checkpoint {name} nests containers too deeply to be read") from e
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"checkpoint {name} is not a readable torch or safetensors file: {e!r}") from e
    try:
        return _plain(obj)
    except ValueError as e:
        raise ValueError(f"refusing checkpoint {name}: {e}") from None


# --------------------------------------------------------------------------- picking the weights
def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> Dict[str, Any]:
    """``state`` with the DDP / torch.compile prefixes (``module.``, ``_orig_mod.``) removed from its keys."""
    out: Dict[str, Any] = {}
    for k, v in state.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def has_ema_weights(ckpt: Any) -> bool:
    """Whether a loaded checkpoint holds EMA weights (a ``state_dict_ema`` / ``model_ema`` entry)."""
    return isinstance(ckpt, Mapping) and any(isinstance(ckpt.get(k), Mapping) for k in EMA_KEYS)


def select_state_dict(ckpt: Any, *, key: Optional[str] = None, use_ema: bool = False) -> Tuple[Dict[str, Tensor], str]:
    """Pick the weights inside a loaded checkpoint; returns ``(state_dict, key_used)``.

    ``key`` if given; else with ``use_ema`` ``state_dict_ema`` / ``model_ema`` (a checkpoint without
    them is a ValueError, never a silent fallback to ``model``); else ``model`` -> ``model_ema`` ->
    ``state_dict_ema`` -> ``state_dict`` -> the dict itself if it maps names to tensors.
    ``module.`` / ``_orig_mod.`` prefixes are stripped.
    """
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint holds a {type(ckpt).__name__}, expected a dict of weights")
    if key is not None:
        if key not in ckpt:
            raise ValueError(f"checkpoint has no entry {key!r}; top-level keys: {sorted(map(str, ckpt))}")
        used, state = key, ckpt[key]
    else:
        if use_ema and not has_ema_weights(ckpt):
            raise ValueError(f"checkpoint has no EMA weights ({' / '.join(EMA_KEYS)}); top-level keys: "
                             f"{sorted(map(str, ckpt))[:20]}; ask for its 'model' weights instead (use_ema=False, no --ema)")
        order = EMA_KEYS if use_ema else STATE_KEYS
        used = next((k for k in order if isinstance(ckpt.get(k), Mapping)), "")
        state = ckpt[used] if used else ckpt
    if not _is_state_dict(state):
        where = f"entry {used!r}" if used else "checkpoint"
        raise ValueError(
            f"{where} is not a state dict (name -> tensor); top-level keys: {sorted(map(str, ckpt))[:20]}"
        )
    return strip_wrapper_prefixes(state), used


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Tensor]:
    """The weights of a training checkpoint, leniently (what the families' ``checkpoint_filter_fn`` use).

    The first of ``model`` / ``model_ema`` / ``state_dict_ema`` / ``state_dict`` that is a state dict
    (name -> tensor), else the dict itself; entries that are not tensors are dropped and wrapper
    prefixes stripped (:func:`strip_wrapper_prefixes`). See :func:`select_state_dict` for the strict
    selection with an explicit key or the EMA weights.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"checkpoint must be a dict of tensors, got {type(state_dict).__name__}")
    inner = next((state_dict[k] for k in STATE_KEYS if _is_state_dict(state_dict.get(k))), state_dict)
    return strip_wrapper_prefixes({k: v for k, v in inner.items() if isinstance(v, Tensor)})


def load_checkpoint_state(src: PathOrBytes, *, key: Optional[str] = None, use_ema: bool = False) -> Dict[str, Tensor]:
    """The weights of a checkpoint file (or bytes) as a ``{name: tensor}`` dict, loaded safely.

    See :func:`load_checkpoint` (safety) and :func:`select_state_dict` (which entry is used).
    """
    return select_state_dict(load_checkpoint(src), key=key, use_ema=use_ema)[0]

"""Size checks of a torch checkpoint's tensors, before torch reads (and allocates) anything.

:func:`check_storages` replays the file's pickle with an unpickler that builds inert records only
(no class is ever looked up, no function called) and checks what torch would then build:

- every storage may declare at most the bytes the file holds for it (the zip record, or the whole
  file for the legacy format), so a 1 KB file cannot make the loader allocate terabytes;
- every tensor (``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor``) must fit in its
  storage (``offset + Σ (size-1)·stride < storage elements``, no negative size/stride/offset);
- tensors with more elements than their storage (expanded or overlapping views, e.g.
  ``torch.zeros(1).expand(10**6, 10**6)``) materialise all their elements when copied (``convert``,
  ``.contiguous()``): together they may need at most :data:`MAX_EXPANDED_BYTES`.

It returns a one-line description of the first problem, or ``None``; files it cannot parse are left
to torch's own loader (which reports them).
"""
from __future__ import annotations

import functools
import io
import math
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

__all__ = ["check_storages", "MAX_EXPANDED_BYTES"]

#: the most bytes the expanded views of one checkpoint may take once copied (2 GiB)
MAX_EXPANDED_BYTES = 2 << 30

_TENSOR_REBUILDS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
                    ("torch._utils", "_rebuild_tensor")}


class _Record:
    """What the scanning unpickler builds for any global, call or object: the name and the arguments."""

    key: Tuple[str, str] = ("", "")

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.parts = args, []
        return obj

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.parts.append(state)

    def append(self, item) -> None:
        self.parts.append(item)

    def extend(self, items) -> None:
        self.parts.extend(items)

    def __setitem__(self, key, value) -> None:
        self.parts.append((key, value))


class _Storage:
    def __init__(self, key: str, type_name: str, numel: int):
        self.key, self.type_name, self.numel = key, type_name, numel


@functools.lru_cache(maxsize=None)
def _element_size(type_name: str) -> int:
    cls = getattr(torch, type_name, None) if type_name.endswith("Storage") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(cls.dtype.itemsize)  # legacy typed storage classes, e.g. torch.FloatStorage
    except Exception:
        return 1


class _ScanUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: List[_Storage]):
        super().__init__(file)
        self.storages, self._classes = storages, {}

    def find_class(self, module: str, name: str):
        key = (str(module), str(name))
        if key not in self._classes:
            self._classes[key] = type("Rec", (_Record,), {"key": key})
        return self._classes[key]

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            type_name = getattr(pid[1], "key", ("", ""))[1]
            numel = pid[4]
            if len(pid) > 5 and isinstance(pid[5], tuple) and len(pid[5]) == 3:  # legacy view (key, offset, size)
                numel = pid[5][2]
            if not isinstance(numel, int):
                raise pickle.UnpicklingError("storage size is not an integer")
            st = _Storage(str(pid[2]), type_name, numel)
            self.storages.append(st)
            return st
        return _Record(pid)


def _children(obj: Any):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield v
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    elif isinstance(obj, _Record):
        yield from obj.args
        yield from obj.parts


def _tensor_problem(rec: _Record) -> Tuple[Optional[str], int]:
    """(the tensor's problem or None, the bytes it would take once copied if it is an expanded view)"""
    if len(rec.args) < 4 or not isinstance(rec.args[0], _Storage):
        return None, 0
    st, offset, size, stride = rec.args[:4]
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(isinstance(v, int) for v in size + stride) and len(size) == len(stride)):
        return None, 0  # not the layout torch writes: torch's loader will judge it
    shape = "x".join(map(str, size)) or "scalar"
    if offset < 0 or any(v < 0 for v in size + stride):
        return f"a tensor of shape {shape} has a negative size, stride or offset", 0
    numel = math.prod(size)
    if numel == 0:
        return None, 0
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if needed > st.numel:
        return (f"a tensor of shape {shape} (offset {offset}, stride {stride}) needs {needed} elements but its storage "
                f"holds {st.numel}"), 0
    if numel > st.numel:
        expanded = numel * _element_size(st.type_name)
        if expanded > MAX_EXPANDED_BYTES:
            return (f"a tensor of shape {shape} has {numel} elements but its storage holds only {st.numel} "
                    f"(an expanded or overlapping view that would take {expanded / 2**30:.3g} GiB once copied)"), 0
        return None, expanded
    return None, 0


def _scan(pickle_bytes: bytes, record_bytes: Dict[str, int], file_bytes: int, prefix: str = "") -> Optional[str]:
    storages: List[_Storage] = []
    root = _ScanUnpickler(io.BytesIO(pickle_bytes), storages).load()
    for st in storages:
        declared = st.numel * _element_size(st.type_name)
        have = record_bytes.get(prefix + st.key, file_bytes)
        if st.numel < 0 or declared > have:
            return f"storage {st.key!r} declares {declared} bytes but the file holds {have} for it"
    stack, seen, expanded = [root], set(), 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or not isinstance(obj, (dict, list, tuple, set, frozenset, _Record)):
            continue
        seen.add(id(obj))
        if isinstance(obj, _Record) and type(obj).key in _TENSOR_REBUILDS:
            problem, nbytes = _tensor_problem(obj)
            if problem:
                return problem
            expanded += nbytes
            if expanded > MAX_EXPANDED_BYTES:
                return (f"its expanded or overlapping views would take more than {MAX_EXPANDED_BYTES / 2**30:.3g} GiB "
                        "once copied")
        stack.extend(_children(obj))
    return None


def check_storages(src: Union[bytes, Path]) -> Optional[str]:
    """The first size problem of a torch checkpoint (bytes or a path), or ``None``; see the module doc."""
    try:
        if isinstance(src, (bytes, bytearray)):
            fobj: Any = io.BytesIO(src)
            size = len(src)
        else:
            fobj = open(src, "rb")
            size = Path(src).stat().st_size
        with fobj:
            if zipfile.is_zipfile(fobj):
                with zipfile.ZipFile(fobj) as z:
                    pkl = next((n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1), None)
                    if pkl is None:
                        return None
                    prefix = pkl[: -len("data.pkl")] + "data/"
                    records = {i.filename: i.file_size for i in z.infolist()}
                    return _scan(z.read(pkl), records, size, prefix)
            fobj.seek(0)
            return _scan_legacy(fobj, size)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError, RecursionError, zipfile.BadZipFile, OSError):
        return None  # not parseable here: torch's loader reports it


def _scan_legacy(fobj, size: int) -> Optional[str]:
    """The legacy (non-zip) format: magic number, protocol, sys info, then the data pickle."""
    for _ in range(3):
        _ScanUnpickler(fobj, []).load()
    rest = fobj.read()
    return _scan(rest, {}, size)

"""Hostile checkpoint files: sizes that would make the loader allocate terabytes, cycles, deep nesting.

Every case must end in a one-line ValueError before torch allocates anything, never a MemoryError,
a RecursionError or a multi-terabyte allocation.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile

import pytest
import torch

from agent_attention.weights import load_checkpoint


def _saved(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def _with_pickle(pkl: bytes, records=None) -> bytes:
    """A torch zip checkpoint whose ``data.pkl`` is ``pkl`` (plus raw storage records)."""
    src = zipfile.ZipFile(io.BytesIO(_saved({})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info, pkl if info.filename.endswith("data.pkl") else src.read(info))
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return out.getvalue()


class _Marker:
    pass


class _TensorPickler(pickle.Pickler):
    """Pickles ``_Marker`` as a storage declaring ``numel`` floats, the way torch.save writes one."""

    def __init__(self, f, numel, legacy=False):
        super().__init__(f, protocol=2)
        self.numel, self.legacy = numel, legacy

    def persistent_id(self, obj):
        if isinstance(obj, _Marker):
            return ("storage", torch.FloatStorage, "0", "cpu", self.numel) + ((None,) if self.legacy else ())
        return None


class _Tensor:
    def __init__(self, offset, size, stride):
        self.args = (offset, size, stride)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (_Marker(), *self.args, False, collections.OrderedDict())


def _tensor_file(numel, offset, size, stride, record_bytes) -> bytes:
    buf = io.BytesIO()
    _TensorPickler(buf, numel).dump({"w": _Tensor(offset, size, stride)})
    return _with_pickle(buf.getvalue(), {"0": b"\0" * record_bytes})


def test_expanded_tensor_is_refused_before_allocation(tmp_path):
    data = _saved({"w": torch.zeros(1).expand(10**6, 10**6)})  # 4 TB once materialised
    assert len(data) < 4096
    with pytest.raises(ValueError, match=r"1000000x1000000 has 1000000000000 elements but its storage holds only 1"):
        load_checkpoint(data)
    path = tmp_path / "expanded.pth"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="expanded or overlapping"):
        load_checkpoint(path)  # the mmap path too
    legacy = _saved({"w": torch.zeros(1).expand(10**5, 10**5)}, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="expanded or overlapping"):
        load_checkpoint(legacy)


def test_expanded_views_are_limited_in_total():
    from agent_attention.weights.pickle_scan import MAX_EXPANDED_BYTES

    small = torch.full((), 0.5).expand(1000, 1000)  # 4 MB once copied: a harmless stride-0 view
    assert torch.equal(load_checkpoint(_saved({"w": small}))["w"], small)
    side = int((MAX_EXPANDED_BYTES // 4 // 3) ** 0.5) + 1  # three views, each under the limit, together over it
    many = {f"w{i}": torch.zeros(1).expand(side, side) for i in range(3)}
    with pytest.raises(ValueError, match="expanded or overlapping views would take more than 2 GiB"):
        load_checkpoint(_saved(many))


def _legacy_tensor_file(numel) -> bytes:
    """The pre-1.6 (non-zip) layout: magic, protocol, sys info, data pickle, storage keys, raw storages."""
    import struct

    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    f = io.BytesIO()
    for obj in (MAGIC_NUMBER, PROTOCOL_VERSION,
                {"protocol_version": PROTOCOL_VERSION, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, f, protocol=2)
    _TensorPickler(f, numel, legacy=True).dump({"w": _Tensor(0, (4,), (1,))})
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", 4) + b"\0" * 16)
    return f.getvalue()


def test_storage_larger_than_the_file_is_refused():
    data = _tensor_file(10**12, 0, (10**12,), (1,), record_bytes=16)
    with pytest.raises(ValueError, match="storage '0' declares 4000000000000 bytes but the file holds 16"):
        load_checkpoint(data)
    assert load_checkpoint(_legacy_tensor_file(4))["w"].shape == (4,)  # the hand-made legacy file is valid
    with pytest.raises(ValueError, match="storage '0' declares 4000000000000 bytes but the file holds"):
        load_checkpoint(_legacy_tensor_file(10**12))  # torch would allocate the declared 4 TB first


@pytest.mark.parametrize("offset, size, stride, match", [
    (0, (8, 8), (8, 1), "needs 64 elements but its storage holds 4"),
    (3, (2,), (1,), "needs 5 elements"),
    (0, (2, 2), (-1, 1), "negative size, stride or offset"),
])
def test_tensor_outside_its_storage_is_refused(offset, size, stride, match):
    with pytest.raises(ValueError, match=match):
        load_checkpoint(_tensor_file(4, offset, size, stride, record_bytes=16))


def test_plain_tensors_and_views_still_load():
    obj = {"slice": torch.arange(6.0).view(2, 3)[:, 1:], "t": torch.ones(3, 4).t(), "scalar": torch.tensor(3.0),
           "empty": torch.zeros(0, 5), "half": torch.ones(4, dtype=torch.float16), "tied": None}
    obj["tied"] = obj["slice"]
    out = load_checkpoint(_saved(obj))
    for k, v in obj.items():
        torch.testing.assert_close(out[k], v)
    assert load_checkpoint(_tensor_file(4, 0, (2, 2), (2, 1), record_bytes=16))["w"].shape == (2, 2)


def test_cyclic_pickle_is_a_value_error():
    cyc = []
    cyc.append(cyc)
    with pytest.raises(ValueError, match="contains itself"):
        load_checkpoint(_saved({"x": cyc}))
    d = {}
    d["self"] = d
    with pytest.raises(ValueError, match="contains itself"):
        load_checkpoint(_with_pickle(pickle.dumps(d, protocol=2)))
    shared = [1]
    assert load_checkpoint(_saved({"a": shared, "b": shared})) == {"a": [1], "b": [1]}  # shared is not cyclic


def test_deeply_nested_pickle_is_a_value_error():
    n = 5000  # torch.save itself cannot write this: a hand-made pickle of 5000 nested lists
    pkl = b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."
    with pytest.raises(ValueError, match="more than 100 levels deep"):
        load_checkpoint(_with_pickle(pkl))

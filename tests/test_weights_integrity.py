"""Damaged weight files and explicit EMA requests: one-line errors, never a silent load."""
from __future__ import annotations

import io
import json
import struct

import pytest
import timm
import torch
from torch import nn

import agent_attention.models  # noqa: F401  (registers the models)
from agent_attention.weights import load_checkpoint, load_checkpoint_state, load_official_checkpoint
from agent_attention.weights.pretrained import convert_local_file


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _flipped(data: bytes, tensor: torch.Tensor) -> bytes:
    raw = tensor.numpy().tobytes()
    at = data.find(raw)
    assert at > 0, "the tensor's bytes are stored as they are"
    out = bytearray(data)
    out[at + len(raw) // 2] ^= 0x10  # one bit of one value
    return bytes(out)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_flipped_tensor_bytes_are_refused(tmp_path):
    w = torch.arange(4096, dtype=torch.float32)
    good = _saved({"model": {"w": w}})
    assert torch.equal(load_checkpoint(good)["model"]["w"], w)
    bad = _flipped(good, w)
    assert not torch.equal(torch.load(io.BytesIO(bad), weights_only=True)["model"]["w"], w)  # torch loads it silently
    path = tmp_path / "bad.pth"
    path.write_bytes(bad)
    for src in (bad, path):
        with pytest.raises(ValueError) as err:
            load_checkpoint(src)
        assert "damaged" in _one_line(err) and "CRC-32" in str(err.value) and "data/0" in str(err.value)


def test_checkpoint_saved_without_checksums_still_loads():
    w = torch.arange(64, dtype=torch.float32)
    torch.serialization.set_crc32_options(False)
    try:
        data = _saved({"w": w})
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(load_checkpoint(data)["w"], w)


def _safetensors(header: dict, declared: int | None = None, body: bytes = b"\0" * 16) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if declared is None else declared) + h + body


@pytest.mark.parametrize("case", ["header size", "tensor size"])
def test_safetensors_claiming_a_terabyte_is_a_one_line_error(case, tmp_path, monkeypatch):
    if case == "header size":
        data = _safetensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, declared=10**12)
    else:
        data = _safetensors({"w": {"dtype": "F32", "shape": [250_000_000_000], "data_offsets": [0, 10**12]}})
    path = tmp_path / "big.safetensors"
    path.write_bytes(data)
    for src in (data, path):
        with pytest.raises(ValueError) as err:
            load_checkpoint(src)
        assert type(err.value) is ValueError and "not a readable safetensors file" in _one_line(err)
    monkeypatch.setenv("AGENT_ATTENTION_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError) as err:  # the file timm would read
        convert_local_file(path)
    assert type(err.value) is ValueError and "not a readable safetensors file" in _one_line(err)
    with pytest.raises(ValueError) as err:
        timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert type(err.value) is ValueError and str(path) in _one_line(err)


def test_use_ema_on_a_file_without_ema_is_an_error(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    plain = _saved({"model": model.state_dict(), "epoch": 3})
    for call in (lambda: load_official_checkpoint(nn.Linear(3, 2), plain, use_ema=True),
                 lambda: load_checkpoint_state(plain, use_ema=True)):
        with pytest.raises(ValueError) as err:
            call()
        assert "no EMA weights" in _one_line(err) and "'model'" in str(err.value)
    load_official_checkpoint(nn.Linear(3, 2), plain)  # the 'model' weights, asked for
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    with_ema = _saved({"model": model.state_dict(), "model_ema": ema})
    got = load_official_checkpoint(nn.Linear(3, 2), with_ema, use_ema=True)
    assert torch.equal(got.weight, ema["weight"])
    # pretrained_cfg_overlay=dict(file=...) prefers the EMA weights as timm does, and takes 'model' without them
    monkeypatch.setenv("AGENT_ATTENTION_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "plain.pth"
    path.write_bytes(plain)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(convert_local_file(path)))["weight"], model.weight.detach())

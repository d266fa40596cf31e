"""Safe checkpoint loading, official checkpoint layout, safetensors export, atomic writes, convert CLI."""
from __future__ import annotations

import io
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from reference_utils import manifest

from agent_attention.commands.convert import main as convert_main
from agent_attention.weights import checkpoints as ck
from agent_attention.weights import (
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
    export_safetensors,
    load_checkpoint,
    load_checkpoint_state,
    load_official_checkpoint,
    save_checkpoint_atomic,
)


class Tiny(nn.Module):
    def __init__(self, out: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, out)
        self.register_buffer("scale", torch.arange(3.0))

    def forward(self, x):
        return self.head(self.norm(self.fc(x)))


def _fake_yacs_cfgnode():
    """A class that pickles as ``yacs.config.CfgNode`` (structured like yacs': a dict subclass with
    attributes in ``__dict__``), so the test needs no yacs install."""

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {}
            self.__dict__["__new_allowed__"] = False

        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

        def __setattr__(self, name, value):
            self[name] = value

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    return CfgNode


def save_official(path: Path, monkeypatch, model_state, *, ema_state=None, optimizer=None) -> Path:
    """``torch.save`` a dict structured like the released files (config = a yacs CfgNode). Afterwards
    ``yacs`` cannot be imported at all (None in sys.modules -> ImportError)."""
    yacs, yacs_config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    CfgNode = _fake_yacs_cfgnode()
    yacs_config.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", yacs_config)
    cfg = CfgNode({"MODEL": CfgNode({"TYPE": "agent_swin", "AGENT": CfgNode({"NUM": [9, 16, 49, 49]})}),
                   "TRAIN": CfgNode({"EPOCHS": 300, "BASE_LR": 1e-3, "BETAS": (0.9, 0.999)})})
    cfg.__dict__["__immutable__"] = True
    ckpt = {
        "model": model_state, "optimizer": optimizer or {"state": {}, "param_groups": []},
        "lr_scheduler": {"t_initial": 300, "base_values": [1e-3], "noise_range_t": None},
        "max_accuracy": 82.6, "epoch": 299, "config": cfg,
    }
    if ema_state is not None:
        ckpt.update(state_dict_ema=ema_state, max_accuracy_e=82.7)
    torch.save(ckpt, path)
    monkeypatch.setitem(sys.modules, "yacs", None)
    monkeypatch.setitem(sys.modules, "yacs.config", None)
    return path


@pytest.fixture
def official_ckpt(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, ema = Tiny(), Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ema_state = OrderedDict(("module." + k, v) for k, v in ema.state_dict().items())
    path = save_official(tmp_path / "max_acc.pth", monkeypatch, model.state_dict(), ema_state=ema_state,
                         optimizer=opt.state_dict())
    return path, model, ema


def _assert_same(model: nn.Module, reference: nn.Module) -> None:
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_plain_weights_only_refuses_official_file(official_ckpt):
    path, _, _ = official_ckpt
    with pytest.raises(pickle.UnpicklingError, match="yacs.config.CfgNode"):
        torch.load(path, weights_only=True)


def test_official_checkpoint_loads_safely_strict(official_ckpt):
    path, model, _ = official_ckpt
    target = Tiny()
    assert load_official_checkpoint(target, path, strict=True) is target
    _assert_same(target, model)

    full = load_checkpoint(path)
    assert full["epoch"] == 299 and full["max_accuracy"] == pytest.approx(82.6)
    assert type(full["config"]) is dict and full["config"]["MODEL"]["AGENT"]["NUM"] == [9, 16, 49, 49]
    assert full["config"]["TRAIN"]["BETAS"] == (0.9, 0.999)
    assert set(full["optimizer"]) == {"state", "param_groups"}
    assert torch.is_tensor(full["optimizer"]["state"][0]["exp_avg"])


def test_bytes_and_file_objects(official_ckpt):
    path, model, _ = official_ckpt
    data = path.read_bytes()
    for src in (data, io.BytesIO(data)):
        state = load_checkpoint_state(src)
        torch.testing.assert_close(state["fc.weight"], model.fc.weight.detach())


def test_ema_selection_and_module_prefix(official_ckpt):
    path, model, ema = official_ckpt
    default = load_checkpoint_state(path)
    assert set(default) == set(model.state_dict())
    torch.testing.assert_close(default["head.bias"], model.head.bias.detach())
    for state in (load_checkpoint_state(path, key="state_dict_ema"), load_checkpoint_state(path, use_ema=True)):
        assert set(state) == set(ema.state_dict())  # "module." stripped
        torch.testing.assert_close(state["head.bias"], ema.head.bias)
    target = load_official_checkpoint(Tiny(), path, use_ema=True)
    _assert_same(target, ema)
    with pytest.raises(ValueError, match="no entry 'nope'.*max_accuracy"):
        load_checkpoint_state(path, key="nope")


def test_raw_and_nested_prefixes(tmp_path):
    model = Tiny()
    raw = {"_orig_mod.module." + k: v for k, v in model.state_dict().items()}
    torch.save(raw, tmp_path / "raw.pt")
    _assert_same(load_official_checkpoint(Tiny(), tmp_path / "raw.pt"), model)
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, tmp_path / "noweights.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_checkpoint_state(tmp_path / "noweights.pt")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    def __init__(self) -> None:
        self.x = 1


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": Tiny().state_dict(), "payload": _Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load") as info:
        load_checkpoint_state(path)
    assert "system" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        load_official_checkpoint(Tiny(), path.read_bytes())
    torch.save({"model": Tiny().state_dict(), "obj": _Custom()}, tmp_path / "custom.pth")
    with pytest.raises(UnsafeCheckpointError, match="_Custom"):
        load_checkpoint(tmp_path / "custom.pth")
    assert not marker.exists()
    # the extra allowlist is only active while loading
    assert not any(isinstance(g, tuple) and g[1] == "yacs.config.CfgNode" for g in torch.serialization.get_safe_globals())


def test_numpy_scalars_are_accepted(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "np.pth"
    torch.save({"model": Tiny().state_dict(), "acc": np.float64(81.25), "step": np.int64(7), "f32": np.float32(0.5)}, path)
    out = load_checkpoint(path)
    assert out["acc"] == 81.25 and out["step"] == 7 and out["f32"] == 0.5
    torch.save({"model": Tiny().state_dict(), "s": np.str_("x")}, tmp_path / "str.pth")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(tmp_path / "str.pth")


def test_garbage_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not a readable") as info:
        load_checkpoint(bad)
    assert not isinstance(info.value, UnsafeCheckpointError)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pth")


def test_mismatch_error_lists_everything(tmp_path):
    state = Tiny().state_dict()
    state.pop("norm.bias")
    state["extra.weight"] = torch.zeros(2)
    state["head.weight"] = torch.zeros(7, 5)
    state["head.bias"] = torch.zeros(7)
    torch.save({"model": state}, tmp_path / "m.pth")
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_official_checkpoint(Tiny(), tmp_path / "m.pth")
    msg = str(info.value)
    assert "m.pth" in msg and "Tiny" in msg and "'model'" in msg
    assert "1 missing keys" in msg and "norm.bias" in msg
    assert "1 unexpected keys" in msg and "extra.weight" in msg
    assert "2 shape mismatches" in msg and "head.weight: checkpoint (7, 5) vs model (3, 5)" in msg
    assert isinstance(info.value, ValueError)
    target = Tiny()
    with pytest.warns(UserWarning, match="matching entries only"):
        load_official_checkpoint(target, tmp_path / "m.pth", strict=False)
    torch.testing.assert_close(target.fc.weight, state["fc.weight"])


def test_mismatch_listing_is_truncated():
    big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    with pytest.raises(IncompatibleCheckpointError, match=r"60 missing keys .*: 0.weight, .*\.\.\. and 50 more") as info:
        load_official_checkpoint(big, {"model": {"other": torch.zeros(1)}})
    assert len(str(info.value)) < 2000


def test_safetensors_round_trip_shared_and_views(tmp_path):
    model = Tiny()
    state = dict(model.state_dict())
    state["tied"] = state["fc.weight"]  # shares storage
    state["view"] = state["fc.weight"][:, 1]  # non-contiguous view
    path = export_safetensors(state, tmp_path / "w.safetensors", metadata={"epoch": 3, "note": "x"})
    back = load_checkpoint_state(path)
    assert set(back) == set(state)
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=0, atol=0)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "epoch": "3", "note": "x"}
    path2 = export_safetensors(model, tmp_path / "sub" / "m.safetensors")
    _assert_same(load_official_checkpoint(Tiny(), path2), model)


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_export_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "w.safetensors"
    export_safetensors(Tiny(), target)
    before = target.read_bytes()
    with pytest.raises(TypeError, match="'bad' is a str"):
        export_safetensors({"a": torch.zeros(2), "bad": "x"}, target)
    with pytest.raises(ValueError, match="'m' is on the meta device"):
        export_safetensors({"m": torch.empty(2, device="meta")}, target)
    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_safetensors(Tiny(), target)
    assert target.read_bytes() == before and _leftovers(tmp_path) == []


def test_save_checkpoint_atomic(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint_atomic({"model": Tiny().state_dict(), "epoch": 1}, path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint_atomic({"model": Tiny().state_dict(), "fn": lambda: 0}, path)  # unpicklable
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
    assert load_checkpoint(path)["epoch"] == 1


def test_convert_cli(official_ckpt, tmp_path, capsys):
    path, model, ema = official_ckpt
    out = tmp_path / "out.safetensors"
    assert convert_main([str(path), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    _assert_same(load_official_checkpoint(Tiny(), out), model)
    assert convert_main([str(path), str(out), "--key", "state_dict_ema"]) == 0
    _assert_same(load_official_checkpoint(Tiny(), out), ema)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["key"] == "state_dict_ema" and meta["epoch"] == "299" and meta["source"] == "max_acc.pth"

    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _Evil(tmp_path / "pwned")}, evil)
    assert convert_main([str(evil), str(tmp_path / "e.safetensors")]) == 1
    assert "refusing" in capsys.readouterr().err
    assert not (tmp_path / "e.safetensors").exists() and not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- the real model families
def _official_state(name: str, drop_buffers: bool = False):
    """A state dict with exactly the official keys / shapes / dtypes of a released model."""
    state = {}
    for i, e in enumerate(manifest(name)["state_dict"]):
        if e["kind"] == "buffer" and drop_buffers:
            continue
        dtype = getattr(torch, e["dtype"].replace("torch.", ""))
        state[e["key"]] = torch.full(e["shape"], i % 97, dtype=dtype)
    return state


@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_tiny", "agent_cswin_tiny"])
def test_official_layouts_load_strict(name):
    from agent_attention.models import create_model

    state = _official_state(name)
    with torch.device("meta"):
        model = create_model(name)
    load_official_checkpoint(model, {"model": state, "epoch": 1}, strict=True)
    own = model.state_dict()
    for k, v in state.items():
        if k in own and not own[k].is_meta:
            assert torch.equal(own[k], v), k
    assert sum(p.numel() for p in model.parameters()) == manifest(name)["num_params"]


def test_swin_checkpoint_without_geometry_buffers():
    from agent_attention.models import create_model

    state = _official_state("agent_swin_tiny", drop_buffers=True)  # as the official fine-tuning loader leaves it
    with torch.device("meta"):
        model = create_model("agent_swin_tiny")
    load_official_checkpoint(model, state, strict=True)
    state.pop("head.bias")
    with pytest.raises(IncompatibleCheckpointError, match="1 missing keys .*head.bias"):
        load_official_checkpoint(model, state)


@pytest.fixture(scope="module")
def deit_file(tmp_path_factory):
    from agent_attention.models import create_model

    torch.manual_seed(0)
    model = create_model("agent_deit_tiny")
    ema_state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with pytest.MonkeyPatch.context() as mp:
        path = save_official(tmp_path_factory.mktemp("deit") / "agent_deit_t.pth", mp, model.state_dict(), ema_state=ema_state)
    return path, model


def test_create_model_checkpoint_path_and_timm(deit_file, tmp_path):
    import timm

    from agent_attention.models import create_model

    path, model = deit_file
    _assert_same(create_model("agent_deit_t", checkpoint_path=str(path)), model)
    with pytest.raises(RuntimeError, match="weights_only"):  # timm's own loader refuses the CfgNode
        timm.models.load_state_dict(str(path))
    with ck.official_safe_globals():  # timm prefers state_dict_ema when present
        loaded = timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(loaded.head.bias, model.head.bias + 1)
    overlay = dict(state_dict=load_checkpoint_state(path))  # fine-tuning: timm drops the mismatched head
    ten = timm.create_model("agent_deit_tiny", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay)
    torch.testing.assert_close(ten.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert ten.head.weight.shape == (10, model.head.weight.shape[1])
    st_path = export_safetensors(model, tmp_path / "deit.safetensors")
    _assert_same(timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(st_path))), model)


def test_convert_cli_with_model(deit_file, tmp_path, capsys):
    from safetensors.torch import load_file

    path, model = deit_file
    out = tmp_path / "deit.safetensors"
    assert convert_main([str(path), str(out), "--model", "agent_deit_tiny"]) == 0
    written, own = load_file(str(out)), model.state_dict()
    assert set(written) == set(own)  # strict-loadable
    for k, v in own.items():
        assert torch.equal(written[k], v), k
    assert convert_main([str(path), str(tmp_path / "x.safetensors"), "--model", "agent_pvt_tiny"]) == 1
    err = capsys.readouterr().err
    assert "does not fit model" in err and "missing keys" in err and not (tmp_path / "x.safetensors").exists()

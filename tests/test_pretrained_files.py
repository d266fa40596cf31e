"""``pretrained_cfg_overlay=dict(file=...)`` with official ``.pth`` files, and the Hugging Face Hub
paths (``hf_hub_id``, ``hf-hub:`` and ``local-dir:`` names) — offline, with local folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from pretrained_support import save_official

import agent_attention.models  # noqa: F401
from agent_attention.weights import pretrained as P
from agent_attention.weights import UnsafeCheckpointError
from agent_attention.weights.hub import save_for_hub

SMALL = dict(depth=2, num_classes=5)  # a small agent_deit_tiny: quick to build (5 classes: the cfg overlays say so too)
X = torch.randn(1, 3, 64, 64)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(P.ENV_CACHE, str(d))
    return d


@pytest.fixture
def source():
    torch.manual_seed(0)
    return timm.create_model("agent_deit_tiny", **SMALL).eval()


def same(a, b) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(X), b.eval()(X))


def test_official_pth_file_loads_directly(cache, source, tmp_path, monkeypatch, one_thread):
    model_state = {k: v * 2 for k, v in source.state_dict().items()}
    pth = save_official(tmp_path / "agent_deit_t_max_acc.pth", monkeypatch, model_state, ema_state=source.state_dict())
    m = timm.create_model("agent_deit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(pth), num_classes=5), **SMALL)
    assert same(m, source)  # read safely (no official_safe_globals needed); EMA weights first, as timm's file loader
    converted = Path(m.pretrained_cfg["file"])
    assert converted.parent == cache / "local" and converted.suffix == ".safetensors"

    monkeypatch.setattr(P, "load_checkpoint", lambda *a, **k: pytest.fail("converted once, read from the cache"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("no unpickling on the second load"))
    again = timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=pth, num_classes=5), **SMALL)
    assert same(again, source) and again.pretrained_cfg["file"] == str(converted)
    monkeypatch.undo()

    # a new version of the same file replaces the old conversion
    monkeypatch.setenv(P.ENV_CACHE, str(cache))
    save_official(pth, monkeypatch, model_state)
    os.utime(pth, ns=(1, 1))
    newer = timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=pth, num_classes=5), **SMALL)
    assert not same(newer, source) and sorted(p.name for p in (cache / "local").iterdir()) == [Path(newer.pretrained_cfg["file"]).name]


def test_safetensors_file_is_used_in_place(cache, source, tmp_path):
    from agent_attention.weights import export_safetensors

    f = export_safetensors(source, tmp_path / "w.safetensors")
    m = timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(f), num_classes=5), **SMALL)
    assert same(m, source) and m.pretrained_cfg["file"] == str(f) and not cache.exists()


def test_bad_local_files(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained file '.*nope.pth' does not exist"):
        timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.pth")))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"pretrained file '.*junk.pth' \(\d+ bytes\) is not a usable checkpoint"):
        timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(junk)))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, evil)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load checkpoint"):
        timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    assert not (cache / "local").exists() or not any((cache / "local").iterdir())


def test_state_dict_overlay_is_left_to_timm(source):
    kwargs = {"pretrained_cfg_overlay": {"state_dict": source.state_dict()}}
    assert P.prepare_pretrained("agent_deit_tiny", True, kwargs) is kwargs


# ------------------------------------------------------------------------------ Hugging Face Hub
@pytest.fixture
def hub_folder(source, tmp_path):
    folder = save_for_hub(source, tmp_path / "mirror")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    return folder


def test_save_for_hub_writes_timm_format(hub_folder):
    import json

    cfg = json.loads((hub_folder / "config.json").read_text())
    assert cfg["architecture"] == "agent_deit_tiny" and cfg["num_classes"] == 5
    assert cfg["model_args"]["depth"] == 2 and cfg["pretrained_cfg"]["first_conv"] == "patch_embed.proj"
    assert "file" not in cfg["pretrained_cfg"] and "url" not in cfg["pretrained_cfg"]
    with pytest.raises(TypeError, match="needs an nn.Module"):
        save_for_hub({"w": torch.zeros(1)}, hub_folder)


def test_local_dir_name(hub_folder, source, cache):
    m = timm.create_model(f"local-dir:{hub_folder}", pretrained=True)
    assert same(m, source) and not cache.exists()


@pytest.fixture
def fake_hub(hub_folder, monkeypatch):
    """``hf_hub_download`` answered from the local folder (no network); records the requests."""
    import timm.models._hub as th

    calls = []

    def download(repo_id, filename, revision=None, cache_dir=None, **kw):
        calls.append((repo_id, filename))
        path = hub_folder / filename
        if not path.is_file():
            from huggingface_hub.utils import EntryNotFoundError

            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(th, "hf_hub_download", download)
    return calls


def test_hf_hub_name(fake_hub, source, cache):
    m = timm.create_model("hf-hub:someone/agent_deit_tiny", pretrained=True)
    assert same(m, source) and ("someone/agent_deit_tiny", "model.safetensors") in fake_hub
    assert not cache.exists()


def test_hf_hub_id_overlay(fake_hub, source, cache):
    m = timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id="someone/mirror", num_classes=5),
                          **SMALL)
    assert same(m, source) and fake_hub and all(repo == "someone/mirror" for repo, _ in fake_hub)
    assert not cache.exists()

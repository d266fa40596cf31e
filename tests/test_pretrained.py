"""``pretrained=True``: the official URL table, download into the cache (loopback server only),
safe loading, verification, safetensors conversion and the one-line errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from pretrained_support import (
    LoopbackServer,
    closed_port,
    official_layout,
    save_official,
)
from reference_utils import MANIFESTS, manifest

import agent_attention.models  # noqa: F401  (registers the models)
from agent_attention.weights import pretrained as P
from agent_attention.models.registry import ALIASES, PAPER_TOP1

NAMES = sorted(PAPER_TOP1)
#: official name -> file id of its released weights, from the URLs of the registered cfgs
RELEASE_IDS = {n: P.release_id(timm.models.get_pretrained_cfg(n).url) for n in NAMES}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(P.ENV_CACHE, str(d))
    monkeypatch.setenv(P.ENV_PROGRESS, "0")
    return d


@pytest.fixture
def server(monkeypatch):
    """A loopback server standing in for the Tsinghua cloud: official_url() points at it."""
    with LoopbackServer() as srv:
        monkeypatch.setenv(P.ENV_URL, srv.url("/f/{id}/?dl=1"))
        yield srv


def route(name: str) -> str:
    return f"/f/{RELEASE_IDS[name]}/?dl=1"


def leftovers(cache):
    return sorted(p.name for p in cache.rglob("*")) if cache.exists() else []


# ------------------------------------------------------------------------------ the URL table
def test_url_table_covers_every_released_model_and_alias(monkeypatch):
    monkeypatch.delenv(P.ENV_URL, raising=False)
    assert {p.stem for p in MANIFESTS.glob("*.json")} == set(NAMES) and all(RELEASE_IDS.values())
    urls = {n: P.official_url(n) for n in NAMES}
    assert len(set(urls.values())) == 18
    for name, url in urls.items():
        assert re.fullmatch(r"https://cloud\.tsinghua\.edu\.cn/f/[0-9a-f]{20}/\?dl=1", url), url
        assert P.official_url(name + ".in1k") == url
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and cfg.url == url  # the family file's cfg carries the URL
    for alias, name in ALIASES.items():
        assert P.official_url(alias) == urls[name]
    assert P.official_url("agent_foo") == "" and P.release_id("https://host/w.pth") == ""
    with pytest.raises(TypeError, match="model name must be a string"):
        P.official_url(3)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(P.ENV_CACHE, raising=False)
    monkeypatch.delenv(P.ENV_URL, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    path = P.cached_weights_path("agent_swin_t")
    assert path == tmp_path / "th" / "hub" / "checkpoints" / "agent_attention" / "agent_swin_tiny-a2ddc119.safetensors"
    assert P.cached_weights_path("agent_swin_tiny", cache=tmp_path / "c").parent == tmp_path / "c"
    monkeypatch.setenv(P.ENV_CACHE, str(tmp_path / "env"))
    assert P.cached_weights_path("agent_swin_tiny").parent == tmp_path / "env"
    assert P.cached_weights_path("agent_swin_tiny", cache=tmp_path / "c").parent == tmp_path / "c"  # create_model(cache_dir=)
    other = P.cached_weights_path("agent_swin_tiny", "http://127.0.0.1:1/mine.pth")
    assert other.name.startswith("agent_swin_tiny-") and other.name != path.name  # another URL, another file


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("name,alias", [("agent_deit_tiny", "agent_deit_t"), ("agent_pvt_tiny", "agent_pvt_t")])
def test_pretrained_end_to_end_matches_direct_load(name, alias, cache, server, tmp_path, monkeypatch, one_thread):
    torch.manual_seed(0)
    src = timm.create_model(name).eval()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in src.state_dict().items()}
    server.routes[route(name)] = save_official(tmp_path / "official.pth", monkeypatch, src.state_dict(),
                                               ema_state=ema, name=name)
    model = timm.create_model(alias, pretrained=True).eval()
    assert server.requests == [route(name)]
    cached = cache / f"{name}-{RELEASE_IDS[name][:8]}.safetensors"
    assert model.pretrained_cfg["file"] == str(cached) and leftovers(cache) == [cached.name]  # the .pth is gone
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))  # the 'model' entry, not the EMA one

    # second load: the safetensors file only; no download, no unpickling
    def refuse(*a, **k):
        raise AssertionError("the second load must not download or unpickle")

    monkeypatch.setattr(P, "download_file", refuse)
    monkeypatch.setattr(P, "load_checkpoint", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    again = timm.create_model(name, pretrained=True, num_classes=7).eval()
    assert server.requests == [route(name)]
    body = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(again.state_dict()[k], v) for k, v in body.items())
    assert again.get_classifier().out_features == 7  # timm's own head reset still applies


@pytest.mark.parametrize("name", NAMES)
def test_every_release_downloads_verifies_and_caches(name, cache, server, tmp_path, monkeypatch):
    """All 18: the request for the right id, the safe load of an official-structure file with the
    official layout, verification against the released architecture, the cache path. (The
    safetensors writer is stubbed: the full-size files are in the slow test below.)"""
    server.routes[route(name)] = save_official(tmp_path / "w.pth", monkeypatch, official_layout(name), name=name)
    written = {}

    def fake_export(state, path, metadata=None):
        written.update(keys=set(state), metadata=metadata)
        path.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(path))
        return path

    monkeypatch.setattr(P, "export_safetensors", fake_export)
    alias = next(a for a, n in ALIASES.items() if n == name)
    kwargs = P.prepare_pretrained(name, True, {"pretrained_cfg_overlay": None, "cache_dir": None})
    assert server.requests == [route(name)]
    target = cache / f"{name}-{RELEASE_IDS[name][:8]}.safetensors"
    assert kwargs["pretrained_cfg_overlay"] == {"file": str(target)} and P.cached_weights_path(alias) == target
    assert written["keys"] == {e["key"] for e in manifest(name)["state_dict"]}
    assert written["metadata"]["model"] == name and written["metadata"]["entry"] == "model"
    assert leftovers(cache) == [target.name]
    assert P.prepare_pretrained(alias, True, {})["pretrained_cfg_overlay"]["file"] == str(target)  # cached
    assert len(server.requests) == 1


@pytest.mark.parametrize("name", NAMES)
def test_wrong_model_file_names_expected_model(name, cache, server, tmp_path, monkeypatch):
    other = "agent_pvt_tiny" if name.startswith("agent_deit") else "agent_deit_tiny"
    server.routes[route(name)] = save_official(tmp_path / "w.pth", monkeypatch, official_layout(other), name=other)
    with pytest.raises(ValueError, match=rf"does not hold the {name} weights: it has \d+ tensors") as err:
        timm.create_model(name, pretrained=True)
    assert "\n" not in str(err.value) and "mismatched keys" in str(err.value)
    assert leftovers(cache) == []


# ------------------------------------------------------------------------------ errors
def test_offline_is_one_clear_line(cache, monkeypatch):
    monkeypatch.setenv(P.ENV_URL, f"http://127.0.0.1:{closed_port()}/f/{{id}}/?dl=1")
    with pytest.raises(P.WeightsDownloadError, match=r"cannot download the agent_swin_tiny weights from http://127\.0\.0\.1:\d+/f/a2ddc1190c224f768a41/\?dl=1: .*refused.*offline\?") as err:
        timm.create_model("agent_swin_t", pretrained=True)
    assert "\n" not in str(err.value) and isinstance(err.value, OSError)
    assert leftovers(cache) == []


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_names_the_status(status, cache, server):
    server.routes[route("agent_cswin_tiny")] = status
    with pytest.raises(P.WeightsDownloadError, match=rf"cannot download the agent_cswin_tiny weights from .*: HTTP {status} ") as err:
        timm.create_model("agent_cswin_tiny", pretrained=True)
    assert "\n" not in str(err.value) and leftovers(cache) == []


def test_transfer_cut_short(cache, server, tmp_path, monkeypatch):
    f = save_official(tmp_path / "w.pth", monkeypatch, official_layout("agent_deit_tiny"))
    server.routes[route("agent_deit_tiny")] = ("truncate", f)
    n = f.stat().st_size
    with pytest.raises(P.WeightsDownloadError, match=rf"agent_deit_tiny weights from .* was cut short.*{n}.* {2 * n} bytes") as err:
        timm.create_model("agent_deit_tiny", pretrained=True)
    assert "\n" not in str(err.value) and leftovers(cache) == []


def test_truncated_file(cache, server, tmp_path, monkeypatch):
    f = save_official(tmp_path / "w.pth", monkeypatch, official_layout("agent_deit_tiny"))
    half = tmp_path / "half.pth"
    half.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    server.routes[route("agent_deit_tiny")] = half
    with pytest.raises(ValueError, match=r"the file downloaded from .* \(\d+ bytes\) is not a usable checkpoint \(truncated") as err:
        timm.create_model("agent_deit_tiny", pretrained=True)
    assert "\n" not in str(err.value) and leftovers(cache) == []


def test_damaged_cache_file_is_fetched_again(cache, server, tmp_path, monkeypatch):
    server.routes[route("agent_deit_tiny")] = save_official(tmp_path / "w.pth", monkeypatch, official_layout("agent_deit_tiny"))
    target = P.cached_weights_path("agent_deit_tiny")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not safetensors")
    assert P.fetch_pretrained("agent_deit_tiny") == target and server.requests == [route("agent_deit_tiny")]
    from safetensors.torch import load_file

    assert len(load_file(str(target))) == len(official_layout("agent_deit_tiny"))


def test_unknown_model_without_source_raises():
    with pytest.raises(ValueError, match="agent_foo: no released weights are known"):
        P.prepare_pretrained("agent_foo", True, {})
    assert P.prepare_pretrained("agent_foo", False, {"a": 1}) == {"a": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_release_full_size_create_model(name, cache, server, tmp_path, monkeypatch, one_thread):
    """``timm.create_model(name, pretrained=True)`` for all 18 at full size: an official-structure file
    with the official layout (stride-0 tensors: a few KB served, the full safetensors written)."""
    layout = official_layout(name, value=0.25)
    server.routes[route(name)] = save_official(tmp_path / "w.pth", monkeypatch, layout, name=name)
    model = timm.create_model(name, pretrained=True)
    params = dict(model.named_parameters())  # (buffers such as Swin's attn_mask are the model's own)
    assert set(params) <= set(layout) and all(bool((p == 0.25).all()) for p in params.values())
    assert server.requests == [route(name)]
    Path(model.pretrained_cfg["file"]).unlink()  # several hundred MB: do not keep it in pytest's tmp dirs

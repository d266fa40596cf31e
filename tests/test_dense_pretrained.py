"""Released segmenters by name: download from a loopback server, safe loading of the mmseg file
(no code unpickled), layout check, the cache; the official layouts load with strict=True."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from agent_attention.dense.pretrained import fetch_release, pretrained_segmenter, release_cache_path
from agent_attention.dense.releases import get_release
from downstream_reference import layout
from pretrained_support import LoopbackServer

CASE_OF = {"upernet_agent_swin_t_160k": "upernet_agent_swin_t", "fpn_agent_pvt_t_40k": "fpn_agent_pvt_t"}


def mmseg_file(path, case: str):
    """A file structured like a released mmseg checkpoint (meta, state_dict, optimizer), every
    tensor a stride-0 view of one number (a few KB)."""
    state = {}
    for i, (k, shape) in enumerate(layout(case).items()):
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(1000, dtype=torch.int64)
        elif k.endswith("relative_position_index"):
            state[k] = torch.zeros((), dtype=torch.int64).expand(shape)
        else:
            state[k] = torch.full((), 0.01 * (i % 13)).expand(shape)
    meta = {"mmseg_version": "0.28.0", "config": "model = dict(type='EncoderDecoder')", "CLASSES": ("wall", "building"),
            "PALETTE": [[120, 120, 120], [180, 120, 120]], "iter": 160000, "hook_msgs": {}}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


@pytest.fixture
def server(monkeypatch):
    with LoopbackServer() as s:
        monkeypatch.setenv("AGENT_ATTENTION_WEIGHTS_URL", s.url("/f/{id}/?dl=1"))
        yield s


@pytest.mark.parametrize("name", list(CASE_OF))
def test_released_segmenter_downloads_once_and_loads(name, server, tmp_path, one_thread):
    r = get_release(name)
    server.routes[f"/f/{r.file_id}/?dl=1"] = mmseg_file(tmp_path / "release.pth", CASE_OF[name])
    model = pretrained_segmenter(name, cache=tmp_path / "cache", progress=False)
    assert not model.training and len(server.requests) == 1
    cached = release_cache_path(name, r.url, tmp_path / "cache")
    assert cached.is_file() and cached.suffix == ".safetensors"
    assert set(load_file(str(cached))) == set(layout(CASE_OF[name]))  # weights only, official keys
    first = next(k for k in layout(CASE_OF[name]) if k.endswith("conv_seg.weight"))
    assert torch.equal(model.state_dict()[model.official_key(first)], load_file(str(cached))[first])
    pretrained_segmenter(name, cache=tmp_path / "cache", progress=False)
    assert len(server.requests) == 1  # second time from the cache
    # a local official file gives the same model
    local = pretrained_segmenter(name, checkpoint=tmp_path / "release.pth")
    for k, v in local.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_wrong_file_names_the_model(server, tmp_path):
    r = get_release("upernet_agent_swin_t_160k")
    server.routes[f"/f/{r.file_id}/?dl=1"] = mmseg_file(tmp_path / "fpn.pth", "fpn_agent_pvt_t")
    with pytest.raises(ValueError, match=r"does not hold the upernet_agent_swin_t_160k weights: .* keys differ"):
        pretrained_segmenter("upernet_agent_swin_t_160k", cache=tmp_path, progress=False)
    assert not list(tmp_path.glob("dense/*"))  # nothing cached


def test_code_in_the_file_is_refused(server, tmp_path):
    r = get_release("fpn_agent_pvt_t_40k")
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"hook": print}}, path)
    server.routes[f"/f/{r.file_id}/?dl=1"] = path
    with pytest.raises(ValueError, match="the file downloaded from"):
        fetch_release("fpn_agent_pvt_t_40k", cache=tmp_path, progress=False)


def test_unreleased_and_offline_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="has no released file"):
        fetch_release("upernet_agent_swin_s_160k", cache=tmp_path)
    with pytest.raises(OSError, match="cannot download the fpn_agent_pvt_l_40k weights"):
        fetch_release("fpn_agent_pvt_l_40k", cache=tmp_path, progress=False)

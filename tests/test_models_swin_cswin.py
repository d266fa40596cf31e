"""Agent-Swin and Agent-CSWin: official layout, parity with the official outputs, any input size,
timm integration (names, aliases, features_only), checkpoint filtering."""
from __future__ import annotations

import hashlib

import pytest
import torch
import timm

from agent_attention.models import agent_cswin, agent_swin
from agent_attention.models.registry import ALIASES
from reference_utils import fill_, golden, manifest

SWIN_FULL = ["agent_swin_tiny", "agent_swin_small", "agent_swin_small_288", "agent_swin_base", "agent_swin_base_384"]
CSWIN_FULL = ["agent_cswin_tiny", "agent_cswin_small", "agent_cswin_base", "agent_cswin_base_384"]
TINY = {"tiny_swin_a": agent_swin.AgentSwinTransformer, "tiny_swin_b": agent_swin.AgentSwinTransformer,
        "tiny_cswin_a": agent_cswin.AgentCSWinTransformer, "tiny_cswin_b": agent_cswin.AgentCSWinTransformer}
FAMILY_ALIASES = {a: n for a, n in ALIASES.items() if n.startswith(("agent_swin_", "agent_cswin_"))}

# small custom configs for any-size / training tests
SMALL_SWIN = dict(img_size=64, patch_size=2, embed_dim=16, depths=(1, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=32,
                  agent_num=(4, 4, 9, 9), attn_type="AMBB1", num_classes=7)  # shifted + padded window blocks
SMALL_CSWIN = dict(img_size=64, embed_dim=16, depth=(1, 2, 2, 1), num_heads=(2, 2, 4, 4), split_size=(1, 2, 3, 3),
                   agent_num=(4, 9, 4, 4), attn_type="AAMB1", num_classes=7)


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def layout(sd) -> list:
    return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()]


def manifest_layout(m) -> list:
    return [(e["key"], tuple(e["shape"]), e["dtype"]) for e in m["state_dict"]]


def build_tiny(name: str) -> torch.nn.Module:
    return TINY[name](**manifest(name)["constructor_kwargs"])


def taps_of(model, names):
    out, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)))
    return out, hooks


# ---------------------------------------------------------------- parity with the official models
@pytest.mark.parametrize("name", list(TINY))
def test_tiny_layout_and_buffers(name):
    m = manifest(name)
    model = build_tiny(name)
    sd = model.state_dict()
    assert layout(sd) == manifest_layout(m)
    assert sum(p.numel() for p in model.parameters()) == m["num_params"]
    for e in m["state_dict"]:
        if e["kind"] == "buffer":
            assert sha256(sd[e["key"]]) == e["sha256"], e["key"]
            assert float(sd[e["key"]].double().sum()) == e["sum"]
        else:
            assert e["key"] in dict(model.named_parameters())


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_parity(name):
    g = golden(name)
    model = fill_(build_tiny(name)).eval()
    tap_names = [k[4:] for k in g if k.startswith("tap/")]
    taps, hooks = taps_of(model, tap_names)
    with torch.no_grad():  # model(x) is forward_head(forward_features(x)); one pass gives both
        feats = model.forward_head(model.forward_features(g["input"]), pre_logits=True)
        logits = model.forward_head(feats[:, None, None, :])
    for h in hooks:
        h.remove()
    torch.testing.assert_close(logits, g["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats, g["features"], atol=1e-4, rtol=1e-4)
    for n in tap_names:
        torch.testing.assert_close(taps[n], g[f"tap/{n}"], atol=1e-4, rtol=1e-4, msg=lambda s: f"tap {n}: {s}")
    model.double()  # float64: much sharper
    with torch.no_grad():
        logits64 = model(g["input"].double())
    torch.testing.assert_close(logits64, g["logits_f64"], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", SWIN_FULL + CSWIN_FULL)
def test_full_size_layout(name):
    m = manifest(name)
    with torch.device("meta"):
        model = timm.create_model(name)
    assert layout(model.state_dict()) == manifest_layout(m)
    assert sum(p.numel() for p in model.parameters()) == m["num_params"]
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, m["img_size"], m["img_size"]) and cfg["num_classes"] == 1000
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == (0.485, 0.456, 0.406)
    assert cfg["crop_pct"] == (1.0 if name in ("agent_swin_small_288", "agent_swin_base_384") else 0.875)
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    for blk in m["arch"]["blocks"]:
        mod = model.get_submodule(blk["module"])
        if name.startswith("agent_swin"):
            assert (mod.window_size, mod.shift_size) == (blk["window_size"], blk["shift_size"])
            assert (blk["attn"] == "agent") == isinstance(mod.attn, agent_swin.AgentAttention)
            assert (mod.attn_mask is not None) == blk["has_attn_mask_buffer"]
            if blk["attn"] == "agent":
                assert mod.attn.agent_num == blk["agent_num"] and mod.global_attn
        else:
            assert mod.branch_num == blk["branch_num"]
            for attn, br in zip(mod.attns, blk["branches"]):
                assert tuple(attn.window) == (br["H_sp"], br["W_sp"]) and attn.num_heads == br["num_heads"]
                assert isinstance(attn, agent_cswin.CSWinAgentAttention) == (br["attn"] == "agent")


@pytest.mark.parametrize("name", SWIN_FULL)
def test_swin_geometry_buffers(name):
    """Every relative_position_index / attn_mask of every released Swin equals the official bytes."""
    m = manifest(name)
    expected = {e["key"]: e["sha256"] for e in m["state_dict"] if e["kind"] == "buffer"}
    for blk in m["arch"]["blocks"]:
        if blk["attn"] == "agent":
            continue
        ws, s, res = blk["window_size"], blk["shift_size"], tuple(blk["input_resolution"])
        idx = agent_swin.relative_position_index((ws, ws), ws)
        assert sha256(idx) == expected[f"{blk['module']}.attn.relative_position_index"]
        if s:
            mask = agent_swin.shifted_window_mask(res, res, (ws, ws), (s, s))
            assert sha256(mask) == expected[f"{blk['module']}.attn_mask"]


def test_swin_tiny_cpu_buffers():
    model = timm.create_model("agent_swin_tiny")
    sd = model.state_dict()
    for e in manifest("agent_swin_tiny")["state_dict"]:
        if e["kind"] == "buffer":
            assert sha256(sd[e["key"]]) == e["sha256"]


# ---------------------------------------------------------------- timm integration
@pytest.mark.parametrize("alias", sorted(FAMILY_ALIASES))
def test_alias_is_same_model(alias):
    name = FAMILY_ALIASES[alias]
    with torch.device("meta"):
        a = timm.create_model(alias)
    assert layout(a.state_dict()) == manifest_layout(manifest(name))
    assert a.pretrained_cfg == timm.models.get_pretrained_cfg(name).to_dict()


@pytest.mark.parametrize("alias,name,small", [("agent_swin_t", "agent_swin_tiny", SMALL_SWIN),
                                              ("agent_cswin_b_384", "agent_cswin_base_384", SMALL_CSWIN)])
def test_alias_same_outputs(alias, name, small):
    x = torch.randn(1, 3, 40, 56)
    a = fill_(timm.create_model(alias, **small)).eval()
    b = fill_(timm.create_model(name, **small)).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["agent_swin_tiny", "agent_cswin_tiny"])
def test_features_only_full_size_any_shape(name):
    with torch.device("meta"):
        fm = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3))
        outs = fm(torch.empty(1, 3, 200, 296))
    C = 96 if name == "agent_swin_tiny" else 64
    assert fm.feature_info.channels() == [C, 2 * C, 4 * C, 8 * C]
    assert fm.feature_info.reduction() == [4, 8, 16, 32]
    assert [o.shape[:2] for o in outs] == [(1, C * 2 ** i) for i in range(4)]
    hw = [tuple(o.shape[2:]) for o in outs]
    assert hw == [(50, 74), (25, 37), (13, 19), (7, 10)]


@pytest.mark.parametrize("name,small", [("agent_swin_tiny", SMALL_SWIN), ("agent_cswin_tiny", SMALL_CSWIN)])
def test_features_only_small(name, small):
    fm = timm.create_model(name, features_only=True, out_indices=(1, 3), **small)
    model = fill_(timm.create_model(name, **small)).eval()
    fill_(fm.model).eval()
    x = torch.randn(2, 3, 45, 71)
    with torch.no_grad():
        outs = fm(x)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    assert [o.shape[1] for o in outs] == [32, 128]
    torch.testing.assert_close(outs[0], inter[1])
    torch.testing.assert_close(outs[1], inter[3])
    torch.testing.assert_close(normed.permute(0, 2, 3, 1), final)
    with torch.no_grad():  # stop_early ends at the last requested stage output (before any merge)
        last, _ = model.forward_intermediates(x, indices=[1], stop_early=True)
    torch.testing.assert_close(last.permute(0, 3, 1, 2), inter[1])
    kept = model.prune_intermediate_layers((0, 1))
    assert kept == [0, 1] and model.num_features == 32
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[1], inter[1])


# ---------------------------------------------------------------- any input size, training
@pytest.mark.parametrize("cls,small", [(agent_swin.AgentSwinTransformer, SMALL_SWIN),
                                       (agent_swin.AgentSwinTransformer, dict(SMALL_SWIN, window_size=8)),
                                       (agent_cswin.AgentCSWinTransformer, SMALL_CSWIN)])
def test_non_square_forward_backward(cls, small):
    model = cls(**small, drop_path_rate=0.1)
    x = torch.randn(2, 3, 38, 50)  # not a multiple of the patch, window or stripe
    out = model(x)
    assert out.shape == (2, 7)
    out.square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_window_padding_is_masked():
    """A padded window gives the same output as the unpadded sub-map (padding never leaks in)."""
    blk = agent_swin.AgentSwinBlock(dim=8, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=0).eval()
    x = torch.randn(2, 7, 10, 8)
    with torch.no_grad():
        full = blk(x.reshape(2, 70, 8), (7, 10)).view(2, 7, 10, 8)
        right = blk(x[:, :, 7:].reshape(2, 21, 8), (7, 3)).view(2, 7, 3, 8)
    torch.testing.assert_close(full[:, :, 7:], right)
    shifted = agent_swin.AgentSwinBlock(dim=8, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3).eval()
    with torch.no_grad():  # the on-the-fly mask at the construction size equals the buffer
        y = torch.randn(1, 196, 8)
        ref = shifted(y, (14, 14))
        shifted.attn_mask = None
        torch.testing.assert_close(shifted(y, (14, 14)), ref, atol=0, rtol=0)


def test_stripe_padding_is_masked():
    attn = agent_cswin.LePEAttention(dim=12, resolution=(5, 7), idx=0, split_size=3, num_heads=2).eval()
    q, k, v = torch.randn(3, 2, 35, 12).unbind(0)

    def cols(t):
        return t.view(2, 5, 7, 12)[:, :, 6:].reshape(2, 5, 12)

    with torch.no_grad():
        full = attn(q, k, v, (5, 7)).view(2, 5, 7, 12)
        last = attn(cols(q), cols(k), cols(v), (5, 1)).view(2, 5, 1, 12)
    torch.testing.assert_close(full[:, :, 6:], last)


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", list(TINY))
def test_checkpoint_filter_official_layout(name):
    model = fill_(build_tiny(name))
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    fresh = build_tiny(name)
    family = agent_swin if "swin_" in name and "cswin" not in name else agent_cswin
    for ckpt in ({"model": sd, "epoch": 3}, {"state_dict_ema": sd},
                 {k: v for k, v in sd.items() if not k.endswith(("attn_mask", "relative_position_index"))}):
        fresh.load_state_dict(family.checkpoint_filter_fn(ckpt, fresh), strict=True)
        for (k, a), (k2, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
            assert k == k2 and torch.equal(a, b), k


@pytest.mark.parametrize("name,bigger", [("tiny_swin_a", dict(img_size=160, window_size=80)),
                                         ("tiny_cswin_b", dict(img_size=160, la_split_size=None))])
def test_checkpoint_filter_resizes(name, bigger):
    small = fill_(build_tiny(name))
    kwargs = dict(manifest(name)["constructor_kwargs"], **bigger)
    big = TINY[name](**kwargs)
    family = agent_cswin if "cswin" in name else agent_swin
    sd = family.checkpoint_filter_fn({"model": small.state_dict()}, big)
    big.load_state_dict(sd, strict=True)
    own = dict(big.named_parameters())
    resized = [k for k, v in small.named_parameters() if v.shape != own[k].shape]
    assert resized and all(k.endswith(("ah_bias", "aw_bias", "ha_bias", "wa_bias", "relative_position_bias_table"))
                           for k in resized)
    with torch.no_grad():
        assert torch.isfinite(big(torch.randn(1, 3, 96, 80))).all()


# ---------------------------------------------------------------- API and errors
def test_api_and_errors():
    model = agent_swin.AgentSwinTransformer(**SMALL_SWIN)
    assert model.no_weight_decay() == {"absolute_pos_embed"}
    assert model.no_weight_decay_keywords() == {"relative_position_bias_table"}
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 128)
    cs = agent_cswin.AgentCSWinTransformer(**SMALL_CSWIN)
    assert cs.forward_head(cs.forward_features(torch.randn(1, 3, 32, 40)), pre_logits=True).shape == (1, 128)
    for bad in (dict(attn_type="AAXB"), dict(attn_type="AAMB"), dict(agent_num=(4, 4)), dict(agent_num=5)):
        with pytest.raises(ValueError):
            agent_swin.AgentSwinTransformer(**dict(SMALL_SWIN, **bad))
    with pytest.raises(ValueError):
        agent_cswin.AgentCSWinTransformer(**dict(SMALL_CSWIN, attn_type="ABC"))
    with pytest.raises(ValueError, match="image batch"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="image batch"):
        cs(torch.randn(3, 32, 32))

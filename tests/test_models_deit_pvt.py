"""Agent-DeiT and Agent-PVT: official parity (tiny configs), official layouts (full sizes, on the meta
device), timm registration/aliases, any-resolution forward/backward, features_only, checkpoint filter."""
from __future__ import annotations

import pytest
import timm
import torch

from agent_attention.models import agent_deit, agent_pvt
from agent_attention.models.agent_deit import AgentVisionTransformer
from agent_attention.models.agent_pvt import AgentPyramidVisionTransformer
from agent_attention.models.registry import ALIASES
from reference_utils import FULL_VARIANTS, fill_, golden, manifest

DEIT_KEYS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
             "qkv_bias", "drop_rate", "attn_drop_rate", "drop_path_rate", "agent_num", "agent_layer")
PVT_KEYS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dims", "num_heads", "mlp_ratios", "qkv_bias",
            "qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate", "depths", "sr_ratios", "agent_sr_ratios",
            "num_stages", "agent_num", "attn_type")
TINY = ["tiny_deit_a", "tiny_deit_b", "tiny_pvt_a", "tiny_pvt_b"]
FULL = [n for n in FULL_VARIANTS if n.startswith(("agent_deit_", "agent_pvt_"))]


def build_from_manifest(name: str):
    """Our model from the official constructor arguments of a manifest."""
    m = manifest(name)
    ck = m["constructor_kwargs"]
    if m["family"] == "deit":
        assert ck["norm_layer"] is None and not ck["distilled"] and ck["representation_size"] is None
        return AgentVisionTransformer(**{k: ck[k] for k in DEIT_KEYS})
    assert ck["norm_layer"] == "LayerNorm(eps=1e-06)"
    return AgentPyramidVisionTransformer(**{k: ck[k] for k in PVT_KEYS})


def layout(model) -> list:
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]


def manifest_layout(name: str) -> list:
    return [(e["key"], e["shape"], e["dtype"]) for e in manifest(name)["state_dict"]]


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    name = request.param
    model = fill_(build_from_manifest(name)).eval()
    return name, model, golden(name)


# ------------------------------------------------------------------------------------ official parity
def test_tiny_layout(tiny):
    name, model, _ = tiny
    assert layout(model) == manifest_layout(name)
    assert sum(p.numel() for p in model.parameters()) == manifest(name)["num_params"]


def test_tiny_arch(tiny):
    name, model, _ = tiny
    arch = manifest(name)["arch"]
    mods = dict(model.named_modules())
    for blk in arch["blocks"]:
        mod = mods[blk["module"]]
        assert mod.mlp.fc1.out_features == blk["mlp_hidden"] and mod.attn.num_heads == blk["num_heads"]
        assert mod.norm1.eps == pytest.approx(blk.get("norm_eps", arch.get("norm_eps")))
        if blk["attn"] == "agent":
            window = blk.get("window_size") or [blk["window"]] * 2
            assert mod.attn.agent_num == blk["agent_num"] and list(mod.attn.window) == list(window)
        else:
            assert not hasattr(mod.attn, "agent_num")
    if "patch_embed_norm_eps" in arch:
        assert model.patch_embed1.norm.eps == pytest.approx(arch["patch_embed_norm_eps"])


def _taps(model, g):
    taps = {}
    for n, mod in model.named_modules():
        if f"tap/{n}" in g:
            mod.register_forward_hook(lambda _m, _i, out, n=n: taps.__setitem__(n, out))
    return taps


def test_tiny_parity_fp32(tiny):
    name, model, g = tiny
    taps = _taps(model, g)
    with torch.no_grad():
        logits = model(g["input"])
        feats = model.forward_head(model.forward_features(g["input"]), pre_logits=True)
    torch.testing.assert_close(logits, g["logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats, g["features"], atol=1e-4, rtol=1e-4)
    expected = {k[4:] for k in g if k.startswith("tap/")}
    assert set(taps) == expected and expected  # the last DeiT block tap included
    for k, v in taps.items():
        torch.testing.assert_close(v, g[f"tap/{k}"], atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"tap {k}: {m}")


def test_tiny_parity_fp64(tiny):
    name, model32, g = tiny
    model = build_from_manifest(name)
    model.load_state_dict(model32.state_dict())
    model = model.double().eval()
    taps = _taps(model, g)
    with torch.no_grad():
        logits = model(g["input"].double())
        feats = model.forward_head(model.forward_features(g["input"].double()), pre_logits=True)
    torch.testing.assert_close(logits, g["logits_f64"], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(feats, g["features_f64"], atol=1e-9, rtol=1e-9)
    last = sorted(taps, key=lambda k: [int(s) if s.isdigit() else s for s in k.replace(".", " ").split()])[-1]
    assert (taps[last] - g[f"tap/{last}"].double()).abs().max() < 1e-4  # only fp32 taps are stored


def test_native_size_resizes_are_identities(tiny):
    name, model, _ = tiny
    if isinstance(model, AgentVisionTransformer):
        assert agent_deit.resize_pos_embed(model.pos_embed, model.grid, model.grid, 1) is model.pos_embed
    else:
        for i, grid in enumerate(model.grids):
            pos = getattr(model, f"pos_embed{i + 1}")
            assert agent_deit.resize_pos_embed(pos, grid, grid, 0, "bilinear") is pos


def test_official_state_dict_loads_strict_through_filter(tiny):
    name, model, g = tiny
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    fresh = build_from_manifest(name)
    family = agent_deit if isinstance(model, AgentVisionTransformer) else agent_pvt
    filt = family.checkpoint_filter_fn
    for wrapper in ("model", "model_ema", "state_dict_ema", "state_dict"):
        fresh.load_state_dict(filt({wrapper: sd, "epoch": 3}, fresh), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(g["input"]), g["logits"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ full-size layouts
@pytest.mark.parametrize("name", FULL)
def test_full_size_layout(name):
    m = manifest(name)
    with torch.device("meta"):
        model = timm.create_model(name)
        alias = timm.create_model({v: k for k, v in ALIASES.items()}[name])
    assert layout(model) == manifest_layout(name) == layout(alias)
    assert sum(p.numel() for p in model.parameters()) == m["num_params"]
    assert model.num_classes == m["num_classes"] == 1000 and model.img_size == (m["img_size"],) * 2
    assert model.pretrained_cfg["input_size"] == (3, m["img_size"], m["img_size"])
    agents = [b.get("agent_num", 0) for b in m["arch"]["blocks"]]
    if m["family"] == "deit":
        assert model.agent_nums == agents and model.norm.eps == 1e-6
        assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    else:
        assert [n for n, d in zip(model.agent_nums, model_depths(model)) for _ in range(d)] == agents
        assert model.no_weight_decay() == {"cls_token"}


def model_depths(model) -> list:
    return [len(getattr(model, f"block{i + 1}")) for i in range(model.num_stages)]


def test_registry_names_and_aliases():
    names = set(timm.list_models("agent_deit_*")) | set(timm.list_models("agent_pvt_*"))
    official = {"agent_deit_tiny", "agent_deit_small", "agent_deit_small_448", "agent_deit_base", "agent_pvt_tiny",
                "agent_pvt_small", "agent_pvt_medium", "agent_pvt_medium_256", "agent_pvt_large"}
    aliases = {a for a, n in ALIASES.items() if n in official}
    assert official | aliases <= names and len(aliases) == len(official)
    for bad in ("agent_deit_huge", "agent_pvt_xl"):
        with pytest.raises(RuntimeError, match="Unknown model"):
            timm.create_model(bad)
    from agent_attention.weights import official_url  # pretrained=True: tests/test_pretrained.py

    assert official_url("agent_pvt_t") == official_url("agent_pvt_tiny") != ""


def test_alias_builds_identical_model():
    small = dict(depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], num_classes=3)
    torch.manual_seed(0)
    a = timm.create_model("agent_pvt_tiny", **small)
    torch.manual_seed(0)
    b = timm.create_model("agent_pvt_t", **small)
    assert layout(a) == layout(b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=0, rtol=0)


# ------------------------------------------------------------------------------- any resolution
def small_deit(**kw):
    args = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5,
                agent_num=["4", "9", "4", "9"])
    return AgentVisionTransformer(**{**args, **kw})


def small_pvt(**kw):
    args = dict(img_size=64, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1], num_classes=5,
                agent_num=[4, 9, 4, 4])
    return AgentPyramidVisionTransformer(**{**args, **kw})


@pytest.mark.parametrize("family,size", [("deit", (56, 40)), ("deit", (96, 72)), ("pvt", (96, 64)), ("pvt", (44, 70))])
def test_forward_backward_non_square(family, size):
    model = small_deit(drop_path_rate=0.1) if family == "deit" else small_pvt(drop_path_rate=0.1)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [n for n, gr in grads.items() if gr is None or not torch.isfinite(gr).all()]
    assert not missing, missing


def test_deit_bad_sizes_raise():
    model = small_deit()
    for size in [(60, 64), (64, 4)]:
        with pytest.raises(ValueError, match="multiple of the patch size"):
            model(torch.randn(1, 3, *size))
    with pytest.raises(ValueError, match="img_size"):
        small_deit(img_size=60)


def test_pvt_bad_sizes_and_args_raise():
    with pytest.raises(ValueError, match="too small"):
        small_pvt()(torch.randn(1, 3, 64, 24))
    with pytest.raises(NotImplementedError, match="spatial reduction"):
        small_pvt(agent_sr_ratios="2111")
    with pytest.raises(ValueError, match="attn_type"):
        small_pvt(attn_type="AAMC")


def test_pvt_spatial_reduction_stages():
    model = small_pvt(attn_type="ABAB", sr_ratios=[8, 4, 2, 1])
    keys = model.state_dict().keys()
    assert "block2.0.attn.sr.weight" in keys and "block2.0.attn.norm.weight" in keys
    assert "block4.0.attn.sr.weight" not in keys  # sr_ratio 1: no reduction
    assert "block1.0.attn.an_bias" in keys and "block2.0.attn.an_bias" not in keys
    out = model(torch.randn(2, 3, 96, 64))
    out.sum().backward()
    assert out.shape == (2, 5)


def test_deit_agent_layer_zero_is_plain_vit():
    """agent_layer=0: no agent parameters; loads into timm's VisionTransformer and matches it."""
    from timm.models.vision_transformer import VisionTransformer

    ours = small_deit(agent_layer=0).double().eval()
    assert not any("_bias" in k.rsplit(".", 1)[-1] or ".dwc." in k for k in ours.state_dict())
    ref = VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5,
                            dynamic_img_size=True).double().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    for size in [(64, 64), (48, 80)]:
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # native size: no resize on either side, so equal to rounding
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-12, rtol=1e-12)


def test_deit_agent_num_rule():
    assert [agent_deit.deit_agent_num("1-4-9-16", i) for i in range(12)] == [1, 1, 4, 4, 9, 9, 9, 9, 9, 9, 16, 16]
    assert agent_deit.deit_agent_num(25, 7) == 25 and agent_deit.deit_agent_num([36], 11) == 36
    with pytest.raises(ValueError):
        agent_deit.deit_agent_num([4, 9], 4)


# ------------------------------------------------------------------------------ features / timm API
def test_pvt_features_only_non_square():
    small = dict(depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], num_heads=[1, 2, 3, 4])
    with torch.device("meta"):  # the default feature channels of the real model
        assert timm.create_model("agent_pvt_t", features_only=True).feature_info.channels() == [64, 128, 320, 512]
    model = timm.create_model("agent_pvt_t", features_only=True, out_indices=(0, 1, 2, 3), **small)
    assert model.feature_info.reduction() == [4, 8, 16, 32] and model.feature_info.channels() == [8, 16, 24, 32]
    feats = model(torch.randn(1, 3, 256, 192))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 64, 48), (1, 16, 32, 24), (1, 24, 16, 12), (1, 32, 8, 6)]
    two = timm.create_model("agent_pvt_t", features_only=True, out_indices=(1, 2), **small)
    assert not hasattr(two.model, "block4")  # pruned
    assert [f.shape[1] for f in two(torch.randn(1, 3, 64, 96))] == [16, 24]


def test_forward_intermediates_match_forward():
    pvt = fill_(small_pvt()).eval()
    deit = fill_(small_deit()).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, maps = pvt.forward_intermediates(x)
        torch.testing.assert_close(pvt.forward_head(final), pvt(x))
        assert [m.shape[-2:] for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
        final, maps = deit.forward_intermediates(x, indices=2)
        torch.testing.assert_close(deit.forward_head(final), deit(x))
        assert len(maps) == 2 and maps[-1].shape == (2, 32, 8, 12)
        tokens = deit.forward_intermediates(x, indices=[3], output_fmt="NLC", intermediates_only=True)[0]
        torch.testing.assert_close(deit.norm(tokens), final[:, 1:])


def test_reset_classifier_and_heads():
    for model in (small_deit(), small_pvt()):
        model.reset_classifier(7)
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
        model.reset_classifier(0)
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)
    assert small_deit(global_pool="avg")(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_in_chans_and_dropout_in_train_mode():
    drops = dict(in_chans=1, drop_rate=0.1, attn_drop_rate=0.1)
    for model in (small_deit(**drops), small_pvt(**drops)):
        x = torch.randn(2, 1, 64, 64)
        assert model.train()(x).shape == (2, 5)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), model(x))  # eval is deterministic


def test_checkpoint_filter_resizes_to_new_grid():
    """A checkpoint made at 64 loaded into a model built at 96 == the 64 model run at 96 (same resizes)."""
    for small, filt in ((small_deit, agent_deit.checkpoint_filter_fn), (small_pvt, agent_pvt.checkpoint_filter_fn)):
        src = fill_(small()).double().eval()
        dst = small(img_size=96).double().eval()
        dst.load_state_dict(filt({"model": src.state_dict()}, dst), strict=True)
        x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(dst(x), src(x), atol=1e-10, rtol=1e-10)
    bad = small_deit().state_dict()
    bad["pos_embed"] = bad["pos_embed"][:, :-3]
    with pytest.raises(ValueError, match="not a square"):
        agent_deit.checkpoint_filter_fn(bad, small_deit())

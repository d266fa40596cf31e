"""AgentAttention module: grids of any size, sequences, cross-attention, biases, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from agent_attention import AgentAttention
from agent_attention.layers import AgentAttentionCore, agent_bias_2d, pool_agents, query_bias_2d, resize_1d


def _randomize(m: torch.nn.Module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)
    return m


def naive_agent_block(m: AgentAttention, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Written straight from the paper/spec (§1.2-1.3): explicit softmaxes, biases repeated per batch."""
    b, n, c = x.shape
    h, d, A = m.num_heads, c // m.num_heads, m.agent_num
    p = int(A ** 0.5)
    q, k, v = m.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    agents = F.adaptive_avg_pool2d(q.reshape(b, H, W, c).permute(0, 3, 1, 2), (p, p)).reshape(b, c, -1).permute(0, 2, 1)
    split = lambda t: t.reshape(b, t.shape[1], h, d).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v, agents = map(split, (q, k, v, agents))
    s = d ** -0.5
    pb1 = F.interpolate(m.an_bias, size=(H, W), mode="bilinear").reshape(1, h, A, -1).repeat(b, 1, 1, 1)
    pb2 = (m.ah_bias + m.aw_bias).reshape(1, h, A, -1).repeat(b, 1, 1, 1)
    attn = torch.softmax((agents * s) @ k.transpose(-2, -1) + pb1 + pb2, dim=-1)
    agent_v = attn @ v
    ab1 = F.interpolate(m.na_bias, size=(H, W), mode="bilinear").reshape(1, h, A, -1).permute(0, 1, 3, 2).repeat(b, 1, 1, 1)
    ab2 = (m.ha_bias + m.wa_bias).reshape(1, h, -1, A).repeat(b, 1, 1, 1)
    attn = torch.softmax((q * s) @ agents.transpose(-2, -1) + ab1 + ab2, dim=-1)
    out = (attn @ agent_v).transpose(1, 2).reshape(b, n, c)
    vv = v.transpose(1, 2).reshape(b, H, W, c).permute(0, 3, 1, 2)
    out = out + m.dwc(vv).permute(0, 2, 3, 1).reshape(b, n, c)
    return m.proj(out)


@pytest.mark.parametrize("hw,agents", [((7, 7), 9), ((14, 14), 49), ((12, 12), 16)])
def test_matches_naive_official_math_at_native_size(hw, agents):
    torch.manual_seed(0)
    m = _randomize(AgentAttention(48, num_heads=3, agent_num=agents, window=hw)).double().eval()
    x = torch.randn(2, hw[0] * hw[1], 48, dtype=torch.float64)
    torch.testing.assert_close(m(x, hw), naive_agent_block(m, x, *hw), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("hw", [(7, 9), (14, 14), (56, 56), (1, 1), (3, 17)])
def test_any_grid(hw):
    m = AgentAttention(32, num_heads=4, agent_num=9, window=(14, 14))
    x = torch.randn(2, hw[0] * hw[1], 32, requires_grad=True)
    y = m(x, hw)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_one_d_sequences_and_padding():
    m = _randomize(AgentAttention(32, num_heads=2, agent_num=8, ndim=1)).eval()
    x = torch.randn(3, 41, 32)
    assert m(x).shape == (3, 41, 32)
    kpm = torch.zeros(3, 41, dtype=torch.bool)
    kpm[1, 25:] = True  # right padding
    kpm[2, :10] = True  # left padding
    y = m(x, key_padding_mask=kpm)
    torch.testing.assert_close(y[1, :25], m(x[1:2, :25])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[2, 10:], m(x[2:3, 10:])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[0], m(x[:1])[0], atol=1e-5, rtol=1e-5)


def test_cross_attention():
    m = _randomize(AgentAttention(32, num_heads=4, agent_num=4)).eval()
    x, ctx = torch.randn(2, 6 * 5, 32), torch.randn(2, 11, 32)
    y = m(x, (6, 5), context=ctx)
    assert y.shape == (2, 30, 32)
    y2 = m(x, (6, 5), context=torch.randn(2, 4 * 3, 32), context_hw=(4, 3))
    assert y2.shape == (2, 30, 32)
    # fused qkv used for cross-attention equals separate projections
    C = 32
    q = F.linear(x, m.qkv.weight[:C], m.qkv.bias[:C])
    k, v = F.linear(ctx, m.qkv.weight[C:], m.qkv.bias[C:]).chunk(2, -1)
    torch.testing.assert_close(y, m.proj(m.attend(q, k, v, (6, 5), cross=True)))
    # context padding: padded context tokens do not matter
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[:, 8:] = True
    y3 = m(x, (6, 5), context=ctx, key_padding_mask=kpm)
    torch.testing.assert_close(y3, m(x, (6, 5), context=ctx[:, :8]), atol=1e-5, rtol=1e-5)


def test_bias_and_dwc_change_the_output():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 32)
    outs = {}
    for bias in (False, True):
        for dwc in (False, True):
            torch.manual_seed(1)
            m = AgentAttention(32, 4, 4, agent_bias=bias, dwc=dwc).eval()
            if bias:
                _randomize(m, seed=2)
            outs[bias, dwc] = m(x, (8, 8))
    keys = list(outs)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not torch.allclose(outs[keys[i]], outs[keys[j]], atol=1e-4), (keys[i], keys[j])
    m = AgentAttention(32, 4, 4, agent_bias=False, dwc=False)
    assert not any("bias" in n and n.endswith("_bias") for n, _ in m.named_parameters())
    assert not hasattr(m, "dwc")


def test_official_parameter_names_and_order():
    m = AgentAttention(64, 2, 9, window=(14, 14), num_prefix_tokens=1)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert list(shapes)[:8] == ["an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "ac_bias", "ca_bias"]
    assert shapes["ah_bias"] == (1, 2, 9, 14, 1) and shapes["wa_bias"] == (1, 2, 1, 14, 9)
    assert shapes["ac_bias"] == (1, 2, 9, 1) and shapes["ca_bias"] == (1, 2, 1, 9)
    split = AgentAttention(64, 2, 9, qkv_layout="split", window=(7, 7))
    assert {"q.weight", "kv.weight", "proj.weight", "dwc.weight"} <= set(split.state_dict())
    cs = AgentAttentionCore(64, 2, 9, dwc_name="get_v")  # CSWin's agent branch: the core, no projections
    assert set(cs.state_dict()) == {"an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "get_v.weight", "get_v.bias"}
    with pytest.warns(DeprecationWarning, match="AgentAttentionCore"):
        legacy = AgentAttention(64, 2, 9, qkv_layout="none", proj=False, dwc_name="get_v")
    assert list(legacy.state_dict()) == list(cs.state_dict())


def test_prefix_token_gets_no_dwc_and_is_not_pooled():
    m = _randomize(AgentAttention(32, 2, 4, window=(4, 4), num_prefix_tokens=1)).eval()
    x = torch.randn(2, 17, 32)
    y = m(x, (4, 4))
    m.dwc.bias.data += 10.0  # a DWC change moves patch tokens only
    y2 = m(x, (4, 4))
    torch.testing.assert_close(y[:, 0], y2[:, 0])
    assert not torch.allclose(y[:, 1:], y2[:, 1:])


def test_downstream_agent_shape_remap_matches_spatial_first_order():
    """Resizing the agent axis before the spatial axes (ours) equals the official downstream order."""
    g = torch.Generator().manual_seed(0)
    h, A, R = 2, 9, 14
    an, ah, aw = torch.randn(h, A, 7, 7, generator=g), torch.randn(1, h, A, R, 1, generator=g), torch.randn(1, h, A, 1, R, generator=g)
    H, W, grid = 25, 38, (5, 6)
    ours = agent_bias_2d(an, ah, aw, (H, W), grid)
    # official downstream: spatial resize of the 7x7 map and of the summed row/col map, then agent resize
    sp = F.interpolate(an, (H, W), mode="bilinear") + F.interpolate((ah + aw)[0], (H, W), mode="bilinear")
    sp = sp.reshape(h, 3, 3, H * W).permute(0, 3, 1, 2)
    ref = F.interpolate(sp, grid, mode="bilinear").reshape(h, H * W, -1).transpose(1, 2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    na, ha, wa = torch.randn(h, A, 7, 7, generator=g), torch.randn(1, h, R, 1, A, generator=g), torch.randn(1, h, 1, R, A, generator=g)
    ours = query_bias_2d(na, ha, wa, (H, W), grid)
    sp = F.interpolate(na, (H, W), mode="bilinear") + F.interpolate((ha + wa)[0].permute(0, 3, 1, 2), (H, W), mode="bilinear")
    sp = sp.reshape(h, 3, 3, H * W).permute(0, 3, 1, 2)
    ref = F.interpolate(sp, grid, mode="bilinear").reshape(h, H * W, -1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    m = AgentAttention(32, 2, 9, window=(R, R))
    m.agent_shape = grid
    assert m(torch.randn(1, H * W, 32), (H, W)).shape == (1, H * W, 32)


def test_pooling_helpers():
    q = torch.randn(2, 56 * 56, 8)
    ref = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(2, 8, 56, 56), 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_agents(q, (56, 56), (3, 3)), ref)
    valid = torch.ones(2, 56 * 56, dtype=torch.bool)
    torch.testing.assert_close(pool_agents(q, (56, 56), (3, 3), valid), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pool_agents(q, None, 7, valid), pool_agents(q, None, 7), atol=1e-6, rtol=1e-5)
    t = torch.randn(3, 5, 14)
    assert resize_1d(t, 14, 2) is t
    assert resize_1d(t, 20, 2).shape == (3, 5, 20)


@pytest.mark.parametrize(
    "build,call,err,match",
    [
        (dict(dim=30, num_heads=4), None, ValueError, "multiple of num_heads"),
        (dict(dim=32, num_heads=4, agent_num=10), None, ValueError, "perfect square"),
        (dict(dim=32, num_heads=4, ndim=4), None, ValueError, "ndim"),
        (dict(dim=32, num_heads=4, qkv_layout="bad"), None, ValueError, "qkv_layout"),
        (dict(dim=32, num_heads=4), lambda m: m(torch.randn(2, 63, 32), (8, 8)), ValueError, "needs H\\*W"),
        (dict(dim=32, num_heads=4), lambda m: m(torch.randn(2, 64, 32)), ValueError, "hw=\\(H, W\\)"),
        (dict(dim=32, num_heads=4), lambda m: m(torch.randn(64, 32), (8, 8)), ValueError, "batch, tokens"),
        (dict(dim=32, num_heads=4), lambda m: m(torch.randn(2, 64, 16), (8, 8)), ValueError, "32"),
        (dict(dim=32, num_heads=4), lambda m: m(torch.randn(2, 64, 32), (8, -8)), ValueError, "positive"),
        (dict(dim=32, num_heads=4, ndim=1), lambda m: m(torch.randn(2, 64, 32), (8, 8)), ValueError, "sequences"),
        (dict(dim=32, num_heads=4, ndim=1), lambda m: m(torch.randn(2, 9, 32), key_padding_mask=torch.zeros(2, 8, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (dict(dim=32, num_heads=4), lambda m: m(torch.randn(2, 64, 32), (8, 8), context=torch.randn(3, 5, 32)), ValueError, "context"),
        (dict(dim=32, num_heads=4), lambda m: m(torch.randn(2, 64, 32, dtype=torch.float64), (8, 8)), TypeError, "dtype torch.float64"),
    ],
)
def test_errors(build, call, err, match):
    with pytest.raises(err, match=match):
        m = AgentAttention(**build)
        call(m)


def test_autocast_bf16():
    m = AgentAttention(32, 4, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(2, 49, 32).bfloat16(), (7, 7))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_agent_num_resolution_independent_of_window():
    m = AgentAttention(16, 1, 49, window=(56, 56))
    for hw in [(56, 56), (28, 40), (100, 7)]:
        assert m(torch.randn(1, math.prod(hw), 16), hw).shape == (1, math.prod(hw), 16)


def _randomize_biases(m):
    with torch.no_grad():
        for name, p in m.named_parameters(recurse=False):
            p.normal_(0, 0.5)


def test_inference_bias_cache_is_exact_and_follows_parameter_changes():
    torch.manual_seed(0)
    m = AgentAttention(32, num_heads=4, agent_num=9, window=(6, 6)).eval()
    _randomize_biases(m)
    x = torch.randn(2, 36, 32)
    with torch.no_grad():
        first = m(x, (6, 6))
        assert m.__dict__.get("_bias_cache") is not None  # the cache is used in eval/no-grad
        second = m(x, (6, 6))
        fresh = m.compose_biases((6, 6), (6, 6), 36, 36)
        cached = m.biases((6, 6), (6, 6), 36, 36)
        for a, b in zip(fresh, cached):
            assert torch.equal(a, b)
        assert torch.equal(first, second)
        m.an_bias.add_(1.0)  # in-place update (an optimizer step, load_state_dict): recomposed
        changed = m(x, (6, 6))
        assert not torch.allclose(changed, first)
        m.an_bias.sub_(1.0)
        torch.testing.assert_close(m(x, (6, 6)), first)
        other_grid = m(torch.randn(2, 20, 32), (4, 5))  # a new grid replaces the entry
        assert other_grid.shape == (2, 20, 32) and m._bias_cache[0][0] == (4, 5)
    md = m.double()  # new storages and dtype: no stale float32 biases
    with torch.no_grad():
        torch.testing.assert_close(md(x.double(), (6, 6)).float(), first, atol=1e-5, rtol=1e-5)
    m.float()


def test_training_does_not_use_the_bias_cache():
    torch.manual_seed(0)
    m = AgentAttention(32, num_heads=4, agent_num=9, window=(6, 6))
    m(torch.randn(2, 36, 32), (6, 6)).sum().backward()
    assert "_bias_cache" not in m.__dict__
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if n.endswith("_bias"))


def test_cswin_agent_branch_is_the_core_without_projections():
    from agent_attention.models.agent_cswin import CSWinAgentAttention

    m = CSWinAgentAttention(dim=16, resolution=(8, 8), idx=-1, split_size=7, num_heads=2, agent_num=4)
    assert isinstance(m, AgentAttentionCore) and not isinstance(m, AgentAttention)
    assert not any(hasattr(m, name) for name in ("qkv", "q", "kv", "proj", "qkv_layout"))
    q, k, v = torch.randn(3, 2, 64, 16).unbind(0)
    torch.testing.assert_close(m(q, k, v, (8, 8)), m.attend(q, k, v, (8, 8)))

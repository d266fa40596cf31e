"""No silent wrong answers from the op and the module (reliability issue items 1, 4, 5)."""
import copy

import pytest
import torch

from agent_attention import AgentAttention, agent_attention, agent_attention_math
from agent_attention.functional import fused


def _block(seed=0):
    torch.manual_seed(seed)
    m = AgentAttention(32, num_heads=4, agent_num=9, window=(6, 6), num_prefix_tokens=1)
    with torch.no_grad():
        for p in m.parameters(recurse=False):
            p.normal_(0, 0.5)
    return m


def _fresh(m, x, hw):
    """Output with freshly composed biases (no cache)."""
    m.__dict__.pop("_bias_cache", None)
    with torch.no_grad():
        return m(x, hw)


def _train_step(m, opt, x, hw):
    m.train()
    opt.zero_grad()
    m(x, hw).square().mean().backward()
    opt.step()
    m.eval()


def _update_fused_adamw(m, x, hw):
    _train_step(m, torch.optim.AdamW(m.parameters(), lr=0.1, fused=True), x, hw)


def _update_foreach_adamw(m, x, hw):
    _train_step(m, torch.optim.AdamW(m.parameters(), lr=0.1, foreach=True), x, hw)


def _update_data_write(m, x, hw):
    m.an_bias.data.copy_(torch.randn_like(m.an_bias))
    m.ha_bias.data += 0.3


def _update_load_state_dict(m, x, hw):
    other = _block(seed=5)
    m.load_state_dict(other.state_dict())


def _update_no_grad_inplace(m, x, hw):
    with torch.no_grad():
        m.aw_bias.mul_(-2.0)
        m.ca_bias.add_(1.0)


def _update_swap_param_data(m, x, hw):
    m.na_bias.data = torch.randn_like(m.na_bias)


UPDATES = [_update_fused_adamw, _update_foreach_adamw, _update_data_write, _update_load_state_dict,
           _update_no_grad_inplace, _update_swap_param_data]


@pytest.mark.parametrize("update", UPDATES, ids=lambda f: f.__name__[len("_update_"):])
def test_bias_cache_never_stale(update):
    m = _block().eval()
    x, hw = torch.randn(2, 37, 32), (6, 6)
    with torch.no_grad():
        before = m(x, hw)  # fills the cache
        assert m.__dict__.get("_bias_cache") is not None
    update(m, x, hw)
    with torch.no_grad():
        after = m(x, hw)
    assert not torch.allclose(after, before, atol=1e-4), "the update should change the output"
    assert torch.equal(after, _fresh(m, x, hw))
    with torch.no_grad():  # the cached entry now equals a fresh composition
        for cached, fresh in zip(m.biases(hw, hw, 37, 37), m.compose_biases(hw, hw, 37, 37)):
            assert torch.equal(cached, fresh)


def test_bias_cache_with_timm_model_ema():
    from timm.utils import ModelEmaV3

    m = _block()
    ema = ModelEmaV3(m, decay=0.5)
    x, hw = torch.randn(2, 37, 32), (6, 6)
    ema.module.eval()
    with torch.no_grad():
        before = ema.module(x, hw)
    _update_fused_adamw(m, x, hw)
    ema.update(m)
    with torch.no_grad():
        after = ema.module(x, hw)
    assert not torch.allclose(after, before, atol=1e-4)
    assert torch.equal(after, _fresh(ema.module, x, hw))
    clone = copy.deepcopy(ema.module)  # a deep copy carries the cache; it stays exact
    with torch.no_grad():
        clone.an_bias.data.zero_()
        assert torch.equal(clone(x, hw), _fresh(clone, x, hw))


def test_bias_cache_across_dtype_and_inference_mode():
    m = _block().eval()
    x, hw = torch.randn(2, 37, 32), (6, 6)
    with torch.inference_mode():
        a = m(x, hw)
    with torch.no_grad():
        b = m(x, hw)
    assert torch.equal(a, b)
    m.double()
    with torch.no_grad():
        torch.testing.assert_close(m(x.double(), hw), _fresh(m, x.double(), hw), rtol=0, atol=0)


# ---------------------------------------------------------------- fully padded samples
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("use_fused", [True, False])
def test_fully_padded_sample_gives_zero_on_both_paths(bias, use_fused):
    g = torch.Generator().manual_seed(0)
    B, h, N, n, d = 3, 2, 10, 4, 8
    q, k, v = (torch.randn(B, h, N, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a = torch.randn(B, h, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    kw = {}
    if bias:
        kw = dict(agent_bias=torch.randn(1, h, n, N, generator=g, dtype=torch.float64),
                  query_bias=torch.randn(1, h, N, n, generator=g, dtype=torch.float64))
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[1] = True  # sample 1: every key is padding
    kpm[2, 6:] = True
    with fused(use_fused):
        out = agent_attention(q, k, v, a, key_padding_mask=kpm, **kw)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = agent_attention_math(q, k, v, a, key_padding_mask=kpm, **kw)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out[2:], agent_attention(q[2:], k[2:, :, :6], v[2:, :, :6], a[2:],
                                                        **({} if not bias else dict(agent_bias=kw["agent_bias"][..., :6], query_bias=kw["query_bias"]))))
    out.sum().backward()
    for t in (q, k, v, a):
        assert torch.isfinite(t.grad).all()


def test_fully_padded_sample_in_the_module():
    m = AgentAttention(16, 2, 4, ndim=1).eval()
    x = torch.randn(2, 12, 16)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[0] = True
    y = m(x, key_padding_mask=kpm)
    assert torch.isfinite(y).all()
    with fused(False):
        torch.testing.assert_close(m(x, key_padding_mask=kpm), y, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- validation at the boundary
@pytest.mark.parametrize("hw", [(6.9, 6.2), "66", (6.0, 6.0), (True, 6), (6,), (6, 6, 1)])
def test_bad_hw_is_refused(hw):
    m = AgentAttention(16, 2, 4)
    with pytest.raises(ValueError, match="hw"):
        m(torch.randn(1, 36, 16), hw)


def test_int_like_hw_accepted():
    import numpy as np

    m = AgentAttention(16, 2, 4).eval()
    x = torch.randn(1, 36, 16)
    ref = m(x, (6, 6))
    for hw in [6, (np.int64(6), np.int64(6)), torch.Size([6, 6]), [6, 6]]:
        torch.testing.assert_close(m(x, hw), ref)


def test_bool_bias_is_refused():
    q = torch.randn(1, 1, 5, 4)
    a = torch.randn(1, 1, 2, 4)
    with pytest.raises(TypeError, match="agent_bias must be a floating-point"):
        agent_attention(q, q, q, a, agent_bias=torch.ones(1, 1, 2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="query_bias must be a floating-point"):
        agent_attention(q, q, q, a, query_bias=torch.ones(1, 1, 5, 2, dtype=torch.int64))


@pytest.mark.parametrize("kw,match", [
    (dict(dwc_kernel=4), "dwc_kernel"), (dict(dwc_kernel=0), "dwc_kernel"), (dict(dwc_kernel=3.0), "dwc_kernel"),
    (dict(agent_bias=1), "agent_bias"), (dict(agent_num=4.0), "agent_num"),
])
def test_bad_constructor_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AgentAttention(16, 2, **{"agent_num": 4, **kw})

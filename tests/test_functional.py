"""The agent attention op: fused path vs math path, linear-attention form, gradients, errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_attention import agent_attention, agent_attention_math, agent_feature_maps
from agent_attention.functional import fused, fused_enabled, path


def _inputs(B, h, N, M, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, h, N, d), mk(B, h, M, d), mk(B, h, M, d), mk(B, h, n, d), mk(1, h, n, M), mk(1, h, N, n)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3), h=st.integers(1, 4), N=st.integers(1, 70), M=st.integers(1, 70),
    n=st.integers(1, 20), d=st.sampled_from([1, 4, 8, 16, 32]), bias=st.booleans(), cross=st.booleans(),
)
def test_fused_matches_math(B, h, N, M, n, d, bias, cross):
    q, k, v, a, b1, b2 = _inputs(B, h, N, M if cross else N, n, d)
    kw = dict(agent_bias=b1, query_bias=b2) if bias else {}
    out = agent_attention(q, k, v, a, **kw)
    ref = agent_attention_math(q, k, v, a, **kw)
    assert out.shape == (B, h, N, d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale,query_scale", [(0.1, None), (0.3, 0.05), (None, 2.0)])
def test_scales_and_padding(scale, query_scale):
    q, k, v, a, b1, b2 = _inputs(2, 3, 20, 30, 6, 8, seed=1)
    kpm = torch.zeros(2, 30, dtype=torch.bool)
    kpm[0, 17:] = True
    kw = dict(agent_bias=b1, query_bias=b2, scale=scale, query_scale=query_scale, key_padding_mask=kpm)
    out = agent_attention(q, k, v, a, **kw)
    torch.testing.assert_close(out, agent_attention_math(q, k, v, a, **kw), atol=1e-5, rtol=1e-5)
    # padded keys are invisible: dropping them gives the same result for sample 0
    kw0 = dict(agent_bias=b1[..., :17], query_bias=b2, scale=scale, query_scale=query_scale)
    out0 = agent_attention(q[:1], k[:1, :, :17], v[:1, :, :17], a[:1], **kw0)
    torch.testing.assert_close(out[:1], out0, atol=1e-5, rtol=1e-5)
    # the second scale really is used
    if query_scale is not None:
        assert not torch.allclose(out, agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2, scale=scale))


def test_linear_attention_form():
    """O = φq(Q) · φk(K)ᵀ · V: agent attention is a generalized linear attention."""
    q, k, v, a, b1, b2 = _inputs(2, 2, 33, 33, 9, 16, dtype=torch.float64, seed=2)
    phi_q, phi_k = agent_feature_maps(q, k, a, agent_bias=b1, query_bias=b2)
    assert phi_q.shape == (2, 2, 33, 9) and phi_k.shape == (2, 2, 33, 9)
    torch.testing.assert_close(phi_q.sum(-1), torch.ones(2, 2, 33, dtype=torch.float64))
    torch.testing.assert_close(phi_k.sum(-2), torch.ones(2, 2, 9, dtype=torch.float64))
    linear = phi_q @ (phi_k.transpose(-1, -2) @ v)
    torch.testing.assert_close(agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2), linear, atol=1e-10, rtol=1e-10)
    # and it is not plain softmax attention
    assert not torch.allclose(linear, torch.softmax(q @ k.transpose(-1, -2) * 16 ** -0.5, -1) @ v, atol=1e-3)


def test_agents_equal_keys_with_identity_bias_is_two_hop_softmax():
    """With a single agent the output is the agent's softmax average of V for every query."""
    q, k, v, a, _, _ = _inputs(1, 1, 5, 7, 1, 4, dtype=torch.float64, seed=3)
    out = agent_attention(q, k, v, a)
    p = torch.softmax(a @ k.transpose(-1, -2) * 0.5, -1)
    torch.testing.assert_close(out, (p @ v).expand_as(out))


@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck(with_bias):
    q, k, v, a, b1, b2 = _inputs(1, 2, 6, 5, 3, 4, dtype=torch.float64, seed=4)
    tensors = [t.requires_grad_() for t in (q, k, v, a, b1, b2)]

    def fn(q, k, v, a, b1, b2):
        if with_bias:
            return agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2)
        return agent_attention(q, k, v, a) + 0 * (b1.sum() + b2.sum())

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)
    with fused(False):
        assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6)


def test_dtypes_and_fused_switch():
    q, k, v, a, b1, b2 = _inputs(2, 2, 16, 16, 4, 8)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        out = agent_attention(q.to(dtype), k.to(dtype), v.to(dtype), a.to(dtype), agent_bias=b1, query_bias=b2)
        assert out.dtype == dtype and torch.isfinite(out).all()
        tol = 1e-5 if dtype == torch.float64 else 3e-2
        torch.testing.assert_close(out.float(), agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2), atol=tol, rtol=tol)
    assert fused_enabled()
    with fused(False):
        assert not fused_enabled()
        out = agent_attention(q, k, v, a)
    assert fused_enabled()
    torch.testing.assert_close(out, agent_attention(q, k, v, a), atol=1e-6, rtol=1e-6)


def test_dropout_train_only_changes_output():
    q, k, v, a, _, _ = _inputs(2, 2, 16, 16, 4, 8)
    torch.manual_seed(0)
    out = agent_attention(q, k, v, a, dropout_p=0.5)
    assert not torch.allclose(out, agent_attention(q, k, v, a))


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda t: t.update(q=t["q"][0]), ValueError, "q must have 4 dims"),
        (lambda t: t.update(k=t["k"].double()), TypeError, "dtype mismatch"),
        (lambda t: t.update(v=t["v"][:, :, :3]), ValueError, "same number of tokens"),
        (lambda t: t.update(agents=t["agents"][..., :4]), ValueError, "head_dim"),
        (lambda t: t.update(agents=t["agents"][:1]), ValueError, "batch and head dims"),
        (lambda t: t.update(agent_bias=torch.zeros(1, 2, 5, 9)), ValueError, "agent_bias of shape"),
        (lambda t: t.update(query_bias=torch.zeros(3, 2, 16, 4)), ValueError, "query_bias of shape"),
        (lambda t: t.update(key_padding_mask=torch.zeros(2, 16)), TypeError, "key_padding_mask must be bool"),
        (lambda t: t.update(key_padding_mask=torch.zeros(2, 15, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
        (lambda t: t.update(q=t["q"].long()), TypeError, "floating-point"),
        (lambda t: t.update(agents=t["agents"][:, :, :0]), ValueError, "at least one agent"),
    ],
)
def test_bad_inputs(mutate, err, match):
    q, k, v, a, _, _ = _inputs(2, 2, 16, 16, 4, 8)
    t = dict(q=q, k=k, v=v, agents=a)
    mutate(t)
    kw = {key: t.pop(key) for key in ("agent_bias", "query_bias", "key_padding_mask") if key in t}
    with pytest.raises(err, match=match):
        agent_attention(t["q"], t["k"], t["v"], t["agents"], **kw)


# ---------------------------------------------------------------- every kernel path against the math


@pytest.mark.parametrize("kernels", ["sdpa", "gemm", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias,mask", [(False, False), (True, False), (True, True), (False, True)])
def test_every_path_matches_math_fwd_and_grad(kernels, dtype, bias, mask):
    q, k, v, a, b1, b2 = _inputs(2, 3, 17, 23, 5, 8, dtype=dtype, seed=3)
    kw = dict(agent_bias=b1, query_bias=b2) if bias else {}
    if mask:
        kpm = torch.zeros(2, 23, dtype=torch.bool)
        kpm[0, 15:] = True
        kw["key_padding_mask"] = kpm
    leaves = [t.requires_grad_() for t in (q, k, v, a, b1, b2)]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    with path(kernels):
        out = agent_attention(q, k, v, a, **kw)
        with torch.no_grad():
            out_ng = agent_attention(q, k, v, a, **kw)
    ref = agent_attention_math(q, k, v, a, **kw)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out_ng, ref.detach(), **tol)
    go = torch.randn_like(out)
    g = torch.autograd.grad(out, leaves, go, allow_unused=True)
    gr = torch.autograd.grad(ref, leaves, go, allow_unused=True)
    for x, y in zip(g, gr):
        if y is None:
            assert x is None or x.abs().max() == 0
        else:
            torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("kernels", ["sdpa", "gemm"])
def test_gradcheck_paths(kernels):
    q, k, v, a, b1, b2 = (t.requires_grad_() for t in _inputs(1, 2, 6, 7, 3, 4, dtype=torch.float64, seed=4))
    with path(kernels):
        assert torch.autograd.gradcheck(
            lambda *t: agent_attention(*t[:4], agent_bias=t[4], query_bias=t[5]), (q, k, v, a, b1, b2))


@pytest.mark.parametrize("kernels", ["sdpa", "gemm"])
def test_dropout_semantics_on_every_path(kernels):
    q, k, v, a, b1, b2 = _inputs(2, 2, 40, 40, 6, 8, seed=5)
    with path(kernels):
        torch.manual_seed(0)
        y1 = agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2, dropout_p=0.5)
        torch.manual_seed(1)
        y2 = agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2, dropout_p=0.5)
        y0 = agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2, dropout_p=0.0)
    assert torch.isfinite(y1).all() and not torch.allclose(y1, y2)
    torch.testing.assert_close(y0, agent_attention_math(q, k, v, a, agent_bias=b1, query_bias=b2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="path"):
        with path("fast"):
            pass

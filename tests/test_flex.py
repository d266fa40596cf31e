"""The FlexAttention path of the op (``path("flex")``) and the factored agent biases it reads, on the
CPU: FlexAttention runs eagerly here (torch's reference form; the compiled CPU kernel is the slow
test in test_device_op.py and the CUDA kernels are the device tests)."""
import pytest
import torch

from agent_attention import AgentAttention, _flex
from agent_attention.bias_factors import GridBias, bias_value, grid_biases, linear_taps
from agent_attention.functional import agent_attention, agent_attention_math, agent_feature_maps, path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setattr(_flex, "EAGER", True)


def _module(prefix=0, agents=16, seed=0):
    torch.manual_seed(seed)
    m = AgentAttention(32, 2, agents, window=7, num_prefix_tokens=prefix)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 3:
                p.normal_()  # biases of order one: a wrong term shows
    return m


@pytest.mark.parametrize("size", [7, 3, 10, 40])
def test_linear_taps_match_interpolate(size):
    x = torch.randn(7, dtype=torch.float64)
    i0, i1, w0, w1 = linear_taps(size, 7, "cpu")
    ref = torch.nn.functional.interpolate(x[None, None], size=size, mode="linear", align_corners=False)[0, 0]
    torch.testing.assert_close(w0.double() * x[i0] + w1.double() * x[i1], ref, rtol=1e-6, atol=1e-6)  # float32 taps


@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("grid,agent_grid", [((9, 11), (4, 4)), ((3, 5), (4, 4)), ((14, 14), (3, 5)), ((7, 7), (4, 4))])
def test_factors_evaluate_to_the_composed_biases(prefix, grid, agent_grid):
    m = _module(prefix)
    m.agent_shape = agent_grid
    ref1, ref2 = m.compose_biases(grid, grid, 0, 0)
    b1, b2 = grid_biases(m, grid, grid)
    assert b1.shape == ref1.shape and b2.shape == ref2.shape
    torch.testing.assert_close(b1.materialize(), ref1, rtol=0, atol=0)  # the other paths: the very same tensors
    torch.testing.assert_close(b2.materialize(), ref2, rtol=0, atol=0)
    A, N = ref1.shape[2], ref1.shape[3]
    h, a, t = torch.arange(2)[:, None, None], torch.arange(A)[None, :, None], torch.arange(N)[None, None, :]
    with torch.no_grad():
        torch.testing.assert_close(bias_value(b1.factors(), h, a, t)[None], ref1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bias_value(b2.factors(), h, a, t).transpose(1, 2)[None], ref2, rtol=1e-5, atol=1e-5)


def _inputs(B=2, h=3, N=40, M=50, n=6, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return mk(B, h, N, d), mk(B, h, M, d), mk(B, h, M, d), mk(B, h, n, d), mk(1, h, n, M), mk(h, N, n)


@pytest.mark.parametrize("kw", [{}, {"bias": True}, {"bias": True, "scale": 0.3, "query_scale": 0.1}, {"pad": True}])
def test_flex_op_matches_math(kw):
    q, k, v, a, b1, b2 = _inputs()
    args = dict(scale=kw.get("scale"), query_scale=kw.get("query_scale"))
    if kw.get("bias"):
        args.update(agent_bias=b1, query_bias=b2)
    if kw.get("pad"):
        kpm = torch.zeros(2, 50, dtype=torch.bool)
        kpm[0, 31:] = True
        kpm[1] = True  # no key at all: zero attention term
        args.update(key_padding_mask=kpm, agent_bias=b1)
    with path("flex"):
        out = agent_attention(q, k, v, a, **args)
    torch.testing.assert_close(out, agent_attention_math(q, k, v, a, **args), rtol=1e-5, atol=1e-5)


def test_flex_module_never_materialises_the_biases(monkeypatch):
    """At inference the module hands factored biases to the flex path, which reads only the factors."""
    m = _module(prefix=1).eval()
    x = torch.randn(2, 1 + 9 * 11, 32)
    with torch.no_grad():
        ref = m(x, (9, 11))

        def refuse(self):
            raise AssertionError("materialised")

        monkeypatch.setattr(GridBias, "materialize", refuse)
        with path("flex"):
            out = m(x, (9, 11))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flex_falls_back_for_cpu_training_and_dropout():
    """No FlexAttention backward on the CPU and no dropout in FlexAttention: the other paths run."""
    m = _module().train()
    x = torch.randn(2, 81, 32)
    ref = m(x, (9, 9))
    ref.sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with path("flex"):
        out = m(x, (9, 9))
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(p.grad, g)
    q, k, v, a, b1, b2 = _inputs()
    torch.manual_seed(0)
    ref = agent_attention(q, k, v, a, agent_bias=b1, dropout_p=0.5)
    torch.manual_seed(0)
    with path("flex"):
        out = agent_attention(q, k, v, a, agent_bias=b1, dropout_p=0.5)
    torch.testing.assert_close(out, ref)


def test_grid_bias_elsewhere_and_errors():
    m = _module()
    b1, b2 = grid_biases(m, (5, 6), (5, 6))
    q, k, v, a, _, _ = _inputs(h=2, N=30, M=30, n=16)
    d1, d2 = b1.materialize().detach(), b2.materialize().detach()
    with torch.no_grad():
        out = agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2)  # the automatic path materialises
        torch.testing.assert_close(out, agent_attention(q, k, v, a, agent_bias=d1, query_bias=d2))
        phi_q, _ = agent_feature_maps(q, k, a, agent_bias=b1, query_bias=b2)
        torch.testing.assert_close(phi_q, agent_feature_maps(q, k, a, agent_bias=d1, query_bias=d2)[0])
    with pytest.raises(ValueError, match="kind 'query'"):
        agent_attention(q, k, v, a, agent_bias=b2)
    with pytest.raises(ValueError, match="does not broadcast"):
        agent_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], a, agent_bias=b1)
    with pytest.raises(ValueError, match="kind must be"):
        GridBias("keys", m.an_bias, m.ah_bias, m.aw_bias, (5, 6), (4, 4))
    with pytest.raises(ValueError, match="path must be one of"):
        with path("flash"):
            pass

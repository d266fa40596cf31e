"""AgentAttention(ndim=3): tokens on a T×H×W grid (video, volumes)."""
import math

import pytest
import torch
import torch.nn.functional as F

from agent_attention import AgentAttention
from agent_attention.functional import fused


def _block(**kw):
    torch.manual_seed(0)
    m = AgentAttention(16, num_heads=2, agent_num=8, ndim=3, **kw).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def _naive_pool(x, thw, grid):
    """Adaptive average pooling written as explicit bin means (independent of torch's pooling)."""
    B, _, C = x.shape
    T, H, W = thw
    x = x.reshape(B, T, H, W, C)
    bins = lambda L, n: [(math.floor(i * L / n), math.ceil((i + 1) * L / n)) for i in range(n)]  # noqa: E731
    out = [x[:, t0:t1, h0:h1, w0:w1].mean((1, 2, 3))
           for t0, t1 in bins(T, grid[0]) for h0, h1 in bins(H, grid[1]) for w0, w1 in bins(W, grid[2])]
    return torch.stack(out, 1)


def naive_3d(m, x, thw):
    B, N, C = x.shape
    h, d = m.num_heads, C // m.num_heads
    q, k, v = m.qkv(x).chunk(3, -1)
    a = _naive_pool(q, thw, m.agent_shape)
    sp = lambda t: t.reshape(B, -1, h, d).transpose(1, 2)  # noqa: E731
    q, k, v, a = map(sp, (q, k, v, a))
    b1 = F.interpolate(m.an_bias, size=thw, mode="trilinear").reshape(1, h, m.agent_num, N)
    b2 = F.interpolate(m.na_bias, size=thw, mode="trilinear").reshape(1, h, m.agent_num, N).transpose(-1, -2)
    s = d ** -0.5
    av = torch.softmax((a * s) @ k.transpose(-1, -2) + b1, -1) @ v
    out = (torch.softmax((q * s) @ a.transpose(-1, -2) + b2, -1) @ av).transpose(1, 2).reshape(B, N, C)
    vv = v.transpose(1, 2).reshape(B, *thw, C).permute(0, 4, 1, 2, 3)
    out = out + m.dwc(vv).flatten(2).transpose(1, 2)
    return m.proj(out)


@pytest.mark.parametrize("thw", [(4, 6, 6), (3, 7, 5), (2, 2, 2)])
def test_matches_naive_and_math(thw):
    m = _block()
    assert m.agent_shape == (2, 2, 2) and isinstance(m.dwc, torch.nn.Conv3d)
    x = torch.randn(2, math.prod(thw), 16, dtype=torch.float64)
    y = m(x, thw)
    torch.testing.assert_close(y, naive_3d(m, x, thw), atol=1e-10, rtol=1e-10)
    with fused(False):
        torch.testing.assert_close(m(x, thw), y, atol=1e-10, rtol=1e-10)


def test_agent_grid_padding_and_errors():
    m = AgentAttention(16, 2, 12, ndim=3, agent_grid=(1, 3, 4)).eval()
    x = torch.randn(2, 4 * 6 * 8, 16)
    assert m(x, (4, 6, 8)).shape == x.shape
    kpm = torch.zeros(2, 4 * 6 * 8, dtype=torch.bool)
    kpm[1, 3 * 48:] = True  # sample 1: its last frame is padding
    y = m(x, (4, 6, 8), key_padding_mask=kpm)
    assert torch.isfinite(y).all()
    x2 = x.clone()
    x2[1, 3 * 48:] = 100.0  # padded tokens do not reach the other frames' attention term
    y2 = m(x2, (4, 6, 8), key_padding_mask=kpm)
    torch.testing.assert_close(y2[1, :3 * 48], y[1, :3 * 48])
    torch.testing.assert_close(y2[0], y[0])
    with pytest.raises(ValueError, match="agent_grid"):
        AgentAttention(16, 2, 12, ndim=3, agent_grid=(2, 3, 3))
    with pytest.raises(ValueError, match="agent_grid"):
        AgentAttention(16, 2, 12, ndim=3)
    with pytest.raises(ValueError, match="hw"):
        m(x, (4, 48))


def test_training_grads():
    m = AgentAttention(16, 2, 8, ndim=3)
    x = torch.randn(2, 3 * 5 * 5, 16, requires_grad=True)
    m(x, (3, 5, 5)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())

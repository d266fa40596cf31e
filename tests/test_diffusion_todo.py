"""ToDo (token downsampling) and ToDo + agents in AgentSD's processor, against plain references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import Attention  # noqa: E402

from agent_attention.diffusion import AgentSDSettings  # noqa: E402
from agent_attention.diffusion.processor import AgentSDProcessor, AgentSDState  # noqa: E402
from agent_attention.diffusion.todo import todo_factor_for_ratio  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def pool(x, hw, out_hw):
    B, N, C = x.shape
    grid = x.transpose(1, 2).reshape(B, C, *hw)
    return F.adaptive_avg_pool2d(grid, out_hw).reshape(B, C, -1).transpose(1, 2)


def softmax_attn(q, k, v, scale):
    return torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * scale, -1) @ v


def reference(attn, x, hw, kv_hw, agent_hw=None, k_scale2=0.3, k_shortcut=0.075):
    B, N, C = x.shape
    heads = attn.heads
    split = lambda t: t.reshape(B, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    pooled = pool(x, hw, kv_hw)
    q, k, v = split(attn.to_q(x)), split(attn.to_k(pooled)), split(attn.to_v(pooled))
    s = q.shape[-1] ** -0.5
    if agent_hw is None:
        out = softmax_attn(q, k, v, s)
    else:
        a = split(attn.to_q(pool(x, hw, agent_hw)))
        out = softmax_attn(q, a, softmax_attn(a, k, v, s), s ** k_scale2) + k_shortcut * split(attn.to_v(x))
    return attn.to_out[0](out.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("method,factor,hw,kv_hw,agent_hw", [
    ("todo", 2.0, (16, 12), (8, 6), None),            # ToDo's 2×2 average pooling
    ("todo", 1.5, (13, 10), (9, 7), None),            # adaptive pooling, grid not divisible
    ("todo+agents", 1.3, (16, 16), (12, 12), (4, 4)),  # agents on a 4×4-cell grid over pooled K/V
    ("todo+agents", 4.0, (8, 8), (2, 2), None),       # 4 agents are not < half of 4 K/V: ToDo alone
])
def test_todo_matches_reference(method, factor, hw, kv_hw, agent_hw):
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8, out_bias=True).eval()
    state = AgentSDState(settings=AgentSDSettings(method=method, todo_factor=factor), max_downsample=1, latent_hw=hw)
    attn.set_processor(AgentSDProcessor(state, attn.processor))
    x = torch.randn(2, hw[0] * hw[1], 32)
    with torch.no_grad():
        out = attn(x)
        ref = reference(attn, x, hw, kv_hw, agent_hw)
    assert dict(state.calls) == {("todo+agents" if agent_hw else "todo"): 1}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_todo_factor_for_ratio_and_validation():
    assert todo_factor_for_ratio(0.75) == 2.0 and todo_factor_for_ratio(0.0) == 1.0
    with pytest.raises(ValueError, match="todo_factor"):
        AgentSDSettings(method="todo", todo_factor=0.5)
    with pytest.raises(ValueError, match="method"):
        AgentSDSettings(method="tome")


@pytest.mark.parametrize("out", [(3, 5, 7), (3, 4, 5), (2, 4, 5), (1, 3, 3)])
def test_3d_pooling_equals_adaptive_pool3d(out):
    """Video grids: frames kept are pooled per frame in 2-D (a faster path); the same windows as 3-D pooling."""
    import torch.nn.functional as F

    from agent_attention.diffusion.todo import pool_tokens

    hw = (3, 8, 10)
    x = torch.randn(2, 240, 6, generator=torch.Generator().manual_seed(0))
    ref = F.adaptive_avg_pool3d(x.transpose(1, 2).reshape(2, 6, *hw), out).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_tokens(x, hw, out), ref, rtol=1e-6, atol=1e-6)

"""The model-independent AgentSD core: 3-D (video) token grids, position-dependent (rotary) streams,
joint text + image attention, against plain references written here (no diffusers needed)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from agent_attention.diffusion.core import Stream, attention_call, reduce_tokens
from agent_attention.diffusion.merge import destination_partition, match_tokens, merge_counts
from agent_attention.diffusion.settings import AgentSDSettings
from agent_attention.diffusion.todo import pool_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def test_3d_partition_one_destination_per_cell():
    t, h, w = 4, 5, 6  # h, w not divisible by the strides: leftover rows/columns are sources
    dst, src = destination_partition((t, h, w), 2, 2, st=2, use_rand=True, generator=torch.Generator().manual_seed(0))
    assert dst.numel() == 2 * 2 * 3 and dst.numel() + src.numel() == t * h * w
    tt, yy, xx = dst // (h * w), (dst // w) % h, dst % w
    assert (yy < 4).all()
    cells = sorted(((tt // 2) * 6 + (yy // 2) * 3 + xx // 2).tolist())
    assert cells == list(range(12))
    assert destination_partition((2, 4, 4), 2, 2, st=2)[0].tolist() == [0, 2, 8, 10]  # first token of each cell
    assert merge_counts((4, 8, 8), sx=2, sy=2, st=2, ratio=0.5, agent_ratio=0.9) == (128, 32)  # agents: one per cell (agent_r clipped to the sources)


def test_3d_merge_is_group_mean():
    x = torch.randn(2, 3 * 4 * 6, 5)
    m = match_tokens(x, (3, 4, 6), sx=2, sy=2, st=1, ratio=0.5, agent_ratio=0.9)
    merged = m.merge(x)
    for b in range(2):
        for row in range(m.num_merged):
            torch.testing.assert_close(merged[b, row], x[b, m.slot[b] == row].mean(0))


def test_3d_pooling():
    x = torch.randn(2, 4 * 6 * 8, 3)
    grid = x.reshape(2, 4, 6, 8, 3)
    ref = grid.reshape(2, 4, 3, 2, 4, 2, 3).mean((3, 5)).reshape(2, -1, 3)  # 2x2 spatial cells, all frames
    torch.testing.assert_close(pool_tokens(x, (4, 6, 8), (4, 3, 4)), ref)


def rope(t, theta):
    """A rotation by position-dependent angles (a toy RoPE): pairs of channels rotated by theta[n]."""
    a, b = t[..., 0::2], t[..., 1::2]
    cos, sin = theta.cos()[:, None], theta.sin()[:, None]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def rms(t, eps=1e-6):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)


def heads(t, h):
    return t.unflatten(-1, (h, -1)).transpose(1, 2)


def softmax_attention(q, k, v, scale):
    return torch.einsum("bhij,bhjd->bhid", (torch.einsum("bhid,bhjd->bhij", q, k) * scale).softmax(-1), v)


def group_mean(t, slot, rows):
    """(B, N, C) -> (B, rows, C): mean of the tokens of each row of the index map ``slot``."""
    out = torch.zeros(t.shape[0], rows, t.shape[2], dtype=t.dtype)
    count = torch.zeros(t.shape[0], rows, 1, dtype=t.dtype)
    for b in range(t.shape[0]):
        out[b].index_add_(0, slot[b], t[b])
        count[b].index_add_(0, slot[b], torch.ones(t.shape[1], 1))
    return out / count


@pytest.mark.parametrize("with_text", [False, True])
def test_rotary_stream_rotates_every_token_before_merging(with_text):
    """With a position encoding, queries/keys/values are projected, normalised and rotated per token,
    then merged (queries, keys, values by the merge, agents by the stronger merge of the rotated
    queries); text tokens are exact keys/values and exact queries."""
    torch.manual_seed(0)
    B, grid, C, H = 2, (2, 4, 6), 32, 4
    N = 48
    to_q, to_k, to_v, add_q, add_k, add_v = (nn.Linear(C, C) for _ in range(6))
    theta_img, theta_txt = torch.rand(N) * 6, torch.rand(5) * 6
    image = Stream(to_q, to_k, to_v, H, norm_q=rms, norm_k=rms, rotary=lambda t: rope(t, theta_img))
    text_stream = Stream(add_q, add_k, add_v, H, norm_q=rms, norm_k=rms, rotary=lambda t: rope(t, theta_txt))
    x, text = torch.randn(B, N, C), torch.randn(B, 5, C) if with_text else None
    settings = AgentSDSettings(sx=2, sy=2, st=1, ratio=0.4, agent_ratio=0.9)
    with torch.no_grad():
        red = reduce_tokens(settings, grid, x)
        out_img, out_txt = attention_call(x, red, image, settings, scale=8 ** -0.5, text=text, text_stream=text_stream)
        m = red.match
        q, k, v = (heads(f(x), H) for f in (to_q, to_k, to_v))
        q, k = rope(rms(q), theta_img), rope(rms(k), theta_img)
        flat = lambda t: t.transpose(1, 2).flatten(2)  # noqa: E731
        qm, km, vm = (heads(group_mean(flat(t), m.slot, m.num_merged), H) for t in (q, k, v))
        a = heads(group_mean(flat(q), m.agent_slot, m.num_agents), H)
        keys, values = km, vm
        if with_text:
            qt, kt, vt = heads(add_q(text), H), heads(add_k(text), H), heads(add_v(text), H)
            qt, kt = rope(rms(qt), theta_txt), rope(rms(kt), theta_txt)
            keys, values = torch.cat([km, kt], 2), torch.cat([vm, vt], 2)
        s = 8 ** -0.5
        ref = softmax_attention(qm, a, softmax_attention(a, keys, values, s), s ** 0.3) + 0.075 * vm
    assert red.label == "agent"
    torch.testing.assert_close(out_img, flat(ref), rtol=1e-5, atol=1e-5)
    if with_text:
        torch.testing.assert_close(out_txt, flat(softmax_attention(qt, keys, values, s)), rtol=1e-5, atol=1e-5)
    else:
        assert out_txt is None


def test_todo_agents_on_a_video_grid_with_text():
    """ToDo + agents on a (t, h, w) grid: every image query, pooled keys/values, pooled agents
    (st × sy × sx cells), the full values as shortcut; text tokens exact."""
    torch.manual_seed(0)
    B, grid, C, H = 2, (4, 8, 8), 16, 2
    N = 256
    lins = [nn.Linear(C, C) for _ in range(6)]
    image, text_stream = Stream(*lins[:3], H), Stream(*lins[3:], H)
    x, text = torch.randn(B, N, C), torch.randn(B, 3, C)
    settings = AgentSDSettings(method="todo+agents", todo_factor=2, sx=4, sy=4, st=2)
    with torch.no_grad():
        red = reduce_tokens(settings, grid, x)
        out_img, out_txt = attention_call(x, red, image, settings, scale=8 ** -0.5, text=text, text_stream=text_stream)
        cells = x.reshape(B, 4, 8, 8, C)
        kv_in = cells.reshape(B, 4, 4, 2, 4, 2, C).mean((3, 5)).reshape(B, -1, C)
        ag_in = cells.reshape(B, 2, 2, 2, 4, 2, 4, C).mean((2, 4, 6)).reshape(B, -1, C)
        q, v_full = heads(lins[0](x), H), heads(lins[2](x), H)
        k, v = heads(lins[1](kv_in), H), heads(lins[2](kv_in), H)
        a = heads(lins[0](ag_in), H)
        qt, kt, vt = (heads(f(text), H) for f in lins[3:])
        keys, values = torch.cat([k, kt], 2), torch.cat([v, vt], 2)
        s = 8 ** -0.5
        ref = softmax_attention(q, a, softmax_attention(a, keys, values, s), s ** 0.3) + 0.075 * v_full
    assert red.label == "todo+agents" and red.agent_grid == (2, 2, 2)
    flat = lambda t: t.transpose(1, 2).flatten(2)  # noqa: E731
    torch.testing.assert_close(out_img, flat(ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_txt, flat(softmax_attention(qt, keys, values, s)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matching_on_cpu_is_the_float32_matching(dtype):
    """On a CPU the similarities of a half-precision metric are float32 products (fast on every CPU):
    the match is the float32 match of the same (rounded) values."""
    x = torch.randn(2, 12 * 16, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    half = match_tokens(x, (12, 16), sx=4, sy=4, ratio=0.4, agent_ratio=0.95)
    full = match_tokens(x.float(), (12, 16), sx=4, sy=4, ratio=0.4, agent_ratio=0.95)
    assert torch.equal(half.slot, full.slot) and torch.equal(half.agent_slot, full.agent_slot)

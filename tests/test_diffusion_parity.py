"""AgentSD parity: a patched diffusers ``BasicTransformerBlock`` against a plain, independent
re-implementation of the official block computation (OFFICIAL_SPEC §5.3-5.5):

* bipartite matching on the block **input** ``x`` (before ``norm1``): one destination per ``sy × sx``
  cell (random with the generator, or top-left), cosine similarity source → destination, the
  ``r`` most similar sources merged;
* mean merge *with the destination included* (``scatter_reduce(mean, include_self=True)``) of
  ``norm1(x)``; the agents are the stronger merge (``agent_r``), used only if
  ``(N - agent_r)·2 < N - r``;
* ``softmax(q aᵀ s^k_scale2) · softmax(a kᵀ s) · v + k_shortcut · v`` with ``a = to_q(agents)``
  (or plain softmax attention without agents), ``to_out``, unmerge by copy;
* cross-attention and feed-forward on all tokens, unmerged.

The reference below is written with explicit gathers/scatters and einsums; it shares no code
with the library.  Weights are randomised (norm scales and biases too) so that nothing is an
identity by accident.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402

from agent_attention.diffusion import apply_agentsd, remove_agentsd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CTX_DIM = 32


# ----------------------------------------------------------------------------- reference
def ref_match(metric, h, w, sx, sy, r, agent_r, use_rand, generator):
    """Official bipartite matching on ``metric`` (B, N, C): the index sets of the merge(s)."""
    B, N, _ = metric.shape
    hsy, wsx = h // sy, w // sx
    if use_rand:
        offsets = torch.randint(sy * sx, (hsy, wsx), generator=generator)
    else:
        offsets = torch.zeros(hsy, wsx, dtype=torch.long)
    is_dst = torch.zeros(h, w, dtype=torch.bool)
    for i in range(hsy):
        for j in range(wsx):
            o = int(offsets[i, j])
            is_dst[i * sy + o // sx, j * sx + o % sx] = True
    is_dst = is_dst.reshape(-1)
    dst_pos = torch.tensor([p for p in range(N) if is_dst[p]])
    src_pos = torch.tensor([p for p in range(N) if not is_dst[p]])
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = torch.einsum("bic,bjc->bij", unit[:, src_pos], unit[:, dst_pos])
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    num_src = src_pos.numel()
    r = min(r, num_src)
    sets = {"r": r, "src_pos": src_pos, "dst_pos": dst_pos, "edge": edge_idx, "partner": node_idx}
    agent_r = min(agent_r, num_src)
    sets["agent_r"] = agent_r if (N - agent_r) * 2 < N - r else None
    return sets


def ref_merge(x, sets, r):
    """``[unmerged sources ; destinations]`` with each destination the mean of itself and its sources."""
    C = x.shape[-1]
    src, dst = x[:, sets["src_pos"]], x[:, sets["dst_pos"]]
    unm_idx, src_idx = sets["edge"][:, r:], sets["edge"][:, :r]
    dst_idx = sets["partner"].gather(1, src_idx)
    unm = src.gather(1, unm_idx[..., None].expand(-1, -1, C))
    moved = src.gather(1, src_idx[..., None].expand(-1, -1, C))
    dst = dst.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, C), moved, reduce="mean", include_self=True)
    return torch.cat([unm, dst], dim=1)


def ref_unmerge(y, sets):
    r = sets["r"]
    B, _, C = y.shape
    N = sets["src_pos"].numel() + sets["dst_pos"].numel()
    num_unm = sets["src_pos"].numel() - r
    unm, dst = y[:, :num_unm], y[:, num_unm:]
    unm_idx, src_idx = sets["edge"][:, r:], sets["edge"][:, :r]
    dst_idx = sets["partner"].gather(1, src_idx)
    out = torch.zeros(B, N, C, dtype=y.dtype)
    for b in range(B):
        out[b, sets["dst_pos"]] = dst[b]
        out[b, sets["src_pos"][unm_idx[b]]] = unm[b]
        out[b, sets["src_pos"][src_idx[b]]] = dst[b, dst_idx[b]]
    return out


def ref_softmax_attention(q, k, v, scale):
    return torch.einsum("bij,bjd->bid", (torch.einsum("bid,bjd->bij", q, k) * scale).softmax(-1), v)


def ref_attention(attn, x, context=None, agent=None, k_scale2=0.3, k_shortcut=0.075):
    heads = attn.heads
    ctx = x if context is None else context
    q, k, v = (x @ attn.to_q.weight.T), (ctx @ attn.to_k.weight.T), (ctx @ attn.to_v.weight.T)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3).reshape(t.shape[0] * heads, t.shape[1], -1)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scale = (q.shape[-1]) ** -0.5
    if agent is not None and agent.shape[1] * 2 < x.shape[1]:
        a = split(agent @ attn.to_q.weight.T)
        agent_v = ref_softmax_attention(a, k, v, scale)
        out = ref_softmax_attention(q, a, agent_v, scale ** k_scale2) + k_shortcut * v
    else:
        out = ref_softmax_attention(q, k, v, scale)
    B = x.shape[0]
    out = out.reshape(B, heads, x.shape[1], -1).permute(0, 2, 1, 3).reshape(B, x.shape[1], -1)
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


def ref_layer_norm(norm, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_feed_forward(ff, x):
    proj = ff.net[0].proj
    hidden, gate = (x @ proj.weight.T + proj.bias).chunk(2, dim=-1)
    hidden = hidden * (0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))))
    out = ff.net[2]
    return hidden @ out.weight.T + out.bias


def ref_block(block, x, context, *, hw, sx, sy, ratio, agent_ratio, use_rand, seed, downsample_ok=True):
    """The official ``ToMeBlock._forward(x, context)`` on a diffusers block's weights."""
    N = x.shape[1]
    use_rand = use_rand and x.shape[0] % 2 == 0
    y = ref_layer_norm(block.norm1, x)
    if downsample_ok:
        sets = ref_match(x, *hw, sx, sy, int(N * ratio), int(N * agent_ratio), use_rand,
                         torch.Generator().manual_seed(seed))
        feat = ref_merge(y, sets, sets["r"])
        agent = None if sets["agent_r"] is None else ref_merge(y, sets, sets["agent_r"])
        x = ref_unmerge(ref_attention(block.attn1, feat, agent=agent), sets) + x
    else:
        x = ref_attention(block.attn1, y) + x
    x = ref_attention(block.attn2, ref_layer_norm(block.norm2, x), context=context) + x
    return ref_feed_forward(block.ff, ref_layer_norm(block.norm3, x)) + x


# ----------------------------------------------------------------------------- fixtures
def randomized(unet):
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() == 1:  # norm scales/biases, linear biases: far from 1/0
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(1.5)
    return unet.eval()


def sd_unet():
    torch.manual_seed(0)
    return randomized(UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CTX_DIM, attention_head_dim=8, norm_num_groups=8,
    ))


def sdxl_unet():
    torch.manual_seed(0)
    return randomized(UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CTX_DIM, attention_head_dim=8, norm_num_groups=8, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=CTX_DIM + 6 * 8,
    ))


def first_block(unet, sdxl=False):
    blocks = unet.down_blocks[1 if sdxl else 0].attentions[0].transformer_blocks
    return blocks[0]


CASES = {
    # name: (unet, grid hw, batch, settings)
    "agents on (paper phase 1)": ("sd", (8, 12), 2, dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, use_rand=True)),
    "agents off (ToMe, phase 2)": ("sd", (8, 12), 2, dict(sx=2, sy=2, ratio=0.4, agent_ratio=0.5, use_rand=True)),
    "sx does not divide w": ("sd", (8, 13), 2, dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, use_rand=True)),
    "sy does not divide h": ("sd", (10, 12), 2, dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, use_rand=True)),
    "batch 1 (random off)": ("sd", (8, 12), 1, dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, use_rand=True)),
    "top-left destinations": ("sd", (9, 11), 2, dict(sx=3, sy=2, ratio=0.3, agent_ratio=0.9, use_rand=False)),
    "SDXL block (level 2)": ("sdxl", (8, 12), 2, dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, use_rand=True)),
}


def run_case(name):
    kind, hw, batch, settings = CASES[name]
    unet = sd_unet() if kind == "sd" else sdxl_unet()
    block = first_block(unet, sdxl=kind == "sdxl")
    level = 2 if kind == "sdxl" else 1
    g = torch.Generator().manual_seed(7)
    x = 2 * torch.randn(batch, hw[0] * hw[1], block.norm1.normalized_shape[0], generator=g) + 0.5
    context = torch.randn(batch, 7, CTX_DIM, generator=g)
    state = apply_agentsd(unet, seed=11, **settings)
    state.latent_hw = (hw[0] * level, hw[1] * level)
    with torch.no_grad():
        out = block(x, encoder_hidden_states=context)
        ref = ref_block(block, x, context, hw=hw, seed=11, **settings)
    return out, ref, state


def parity_numbers(out, ref):
    err = (out - ref).abs()
    return float(err.max()), float(err.max() / ref.abs().max())


@pytest.mark.parametrize("name", list(CASES))
def test_block_matches_official_computation(name):
    out, ref, state = run_case(name)
    _, _, batch, settings = CASES[name]
    expected = "agent" if settings["agent_ratio"] >= 0.9 else "tome"
    assert dict(state.calls) == {expected: 1}  # our path ran, on the block input (no fallback)
    max_abs, max_rel = parity_numbers(out, ref)
    assert max_abs <= 1e-5 and max_rel <= 1e-5, (name, max_abs, max_rel)


def test_reference_detects_the_norm1_metric():
    """The test can fail: matching on ``norm1(x)`` (the old behaviour) is far from the reference."""
    kind, hw, batch, settings = CASES["agents on (paper phase 1)"]
    unet = sd_unet()
    block = first_block(unet)
    x = 2 * torch.randn(batch, hw[0] * hw[1], 32, generator=torch.Generator().manual_seed(7)) + 0.5
    context = torch.randn(batch, 7, CTX_DIM)
    with torch.no_grad():
        ref = ref_block(block, x, context, hw=hw, seed=11, **settings)
        state = apply_agentsd(unet, seed=11, **settings)
        state.latent_hw = hw
        out = block(x, encoder_hidden_states=context)
        for hook in state.block_hooks.values():  # without the block input, the processor matches on norm1(x)
            hook.remove()
        state.block_hooks.clear()
        state._generators.clear()
        wrong = block(x, encoder_hidden_states=context)
    assert state.calls["metric=attention input"] == 1
    assert parity_numbers(out, ref)[0] <= 1e-5 < parity_numbers(wrong, ref)[0]


def test_half_resolution_block_untouched():
    """A patched block fed a half-resolution map (downsample 2 > max_downsample 1) is bit-identical
    to the unpatched block, and the UNet's half-resolution blocks keep their own processors."""
    unet = sd_unet()
    block = first_block(unet)
    hw = (8, 12)
    x = torch.randn(2, hw[0] * hw[1], 32)
    context = torch.randn(2, 7, CTX_DIM)
    with torch.no_grad():
        stock = block(x, encoder_hidden_states=context)
        state = apply_agentsd(unet, seed=11)
        state.latent_hw = (2 * hw[0], 2 * hw[1])
        patched = block(x, encoder_hidden_states=context)
        ref = ref_block(block, x, context, hw=hw, sx=4, sy=4, ratio=0.4, agent_ratio=0.95, use_rand=True,
                        seed=11, downsample_ok=False)
    assert torch.equal(patched, stock) and dict(state.calls) == {"stock": 1}
    assert parity_numbers(stock, ref)[0] <= 1e-5
    mid = unet.mid_block.attentions[0].transformer_blocks[0]
    assert type(mid.attn1.processor).__name__ == "AttnProcessor2_0" and not mid._forward_pre_hooks
    remove_agentsd(unet)
    assert not block._forward_pre_hooks

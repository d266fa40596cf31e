"""AgentSD on diffusion transformers: PixArt-α/Σ (``BasicTransformerBlock`` on the patch grid) and
SD3/SD3.5 (``JointTransformerBlock``: image tokens merged, text tokens exact), against plain,
independent re-implementations of the intended attention computation on the same weights.

The references are written here from the math (explicit gathers/scatters, einsums, RMS norms); the
unchanged parts of a block (its adaptive norms, feed-forward, cross-attention) use the block's own
diffusers modules.  The merge helpers come from ``test_diffusion_parity`` (also library-free).
Every supported class is checked to be patched for real: the output changes and agent calls are
counted; ``remove_agentsd`` and the documented "off" settings give the stock output bit for bit.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel  # noqa: E402

from agent_attention.diffusion import AgentSDConfig, AgentSDSettings, Rule, apply_agentsd, remove_agentsd  # noqa: E402
from test_diffusion_parity import randomized, ref_match, ref_merge, ref_unmerge  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- tiny models
def tiny_pixart():
    torch.manual_seed(0)
    return randomized(PixArtTransformer2DModel(
        sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=12, patch_size=2, norm_num_groups=1, use_additional_conditions=False))


def tiny_sd3(dual=(0,), qk_norm="rms_norm"):
    """SD3.5-like: a dual-attention first block, RMS q/k norms, a ``context_pre_only`` last block."""
    torch.manual_seed(0)
    return randomized(SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        dual_attention_layers=dual, qk_norm=qk_norm))


def tiny_unet():
    torch.manual_seed(0)
    return randomized(UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=8, norm_num_groups=8))


def inputs(kind, batch=2, size=16, t=500.0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=g)
    text = torch.randn(batch, 5, 12, generator=g)
    timestep = torch.full((batch,), t)
    if kind == "unet":
        return dict(sample=x, timestep=timestep, encoder_hidden_states=text)
    if kind == "pixart":
        return dict(hidden_states=x, timestep=timestep, encoder_hidden_states=text)
    return dict(hidden_states=x, timestep=timestep, encoder_hidden_states=text,
                pooled_projections=torch.randn(batch, 8, generator=g))


MODELS = {"unet": tiny_unet, "pixart": tiny_pixart, "sd3": tiny_sd3}


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_supported_class_is_patched_for_real(kind):
    model = MODELS[kind]()
    kwargs = inputs(kind)
    with torch.no_grad():
        stock = model(**kwargs).sample
        state = apply_agentsd(model, sx=2, sy=2)
        patched = model(**kwargs).sample
        assert state.calls["agent"] >= 2 and state.calls["stock"] == 0, dict(state.calls)
        assert (patched - stock).abs().max() > 1e-3
        remove_agentsd(model)
        assert torch.equal(model(**kwargs).sample, stock)


def test_unsupported_model_is_a_one_line_error():
    with pytest.raises(TypeError, match="supported denoisers: UNet2DConditionModel, PixArtTransformer2DModel, SD3Transformer2DModel"):
        apply_agentsd(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["pixart", "sd3"])
def test_off_settings_are_the_stock_model(kind):
    """Blocks turned off by a rule, and steps outside every rule, run the stock processor."""
    model = MODELS[kind]()
    kwargs = inputs(kind)
    with torch.no_grad():
        stock = model(**kwargs).sample
        state = apply_agentsd(model, AgentSDConfig([Rule(AgentSDSettings(sx=2, sy=2), steps=(1, None))]))
        assert torch.equal(model(**kwargs).sample, stock) and state.calls["agent"] == 0  # step 0: off
        apply_agentsd(model, AgentSDConfig([Rule(None, blocks="first:1"), Rule(AgentSDSettings(sx=2, sy=2))]))
        state.calls.clear()
        partly = model(**kwargs).sample
        assert state.calls["agent"] > 0 and not torch.equal(partly, stock)
        first = next(spec for spec in state.layers.values() if spec.index == 0)
        assert state.active[first.name] is None


# ----------------------------------------------------------------------------- references
def lin(m, t):
    return t @ m.weight.T + (m.bias if m.bias is not None else 0)


def rms(norm, t):
    if norm is None:
        return t
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def heads(t, h):
    B, S, C = t.shape
    return t.reshape(B, S, h, C // h).permute(0, 2, 1, 3)


def unheads(t):
    B, h, S, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(B, S, h * d)


def softmax_attention(q, k, v, scale):
    return torch.einsum("bhij,bhjd->bhid", (torch.einsum("bhid,bhjd->bhij", q, k) * scale).softmax(-1), v)


def ref_agentsd_attention(attn, x, sets, text=None, k_scale2=0.3, k_shortcut=0.075):
    """Merged image tokens (+ exact text tokens as keys/values and queries); agent attention for the
    image queries when the agents are fewer than half the merged tokens."""
    h = attn.heads
    xm = ref_merge(x, sets, sets["r"])
    q, k, v = heads(lin(attn.to_q, xm), h), heads(lin(attn.to_k, xm), h), heads(lin(attn.to_v, xm), h)
    q, k = rms(attn.norm_q, q), rms(attn.norm_k, k)
    scale = q.shape[-1] ** -0.5
    keys, values = k, v
    if text is not None:
        qt = rms(attn.norm_added_q, heads(lin(attn.add_q_proj, text), h))
        kt = rms(attn.norm_added_k, heads(lin(attn.add_k_proj, text), h))
        vt = heads(lin(attn.add_v_proj, text), h)
        keys, values = torch.cat([k, kt], 2), torch.cat([v, vt], 2)
    if sets["agent_r"] is not None:
        a = rms(attn.norm_q, heads(lin(attn.to_q, ref_merge(x, sets, sets["agent_r"])), h))
        agent_v = softmax_attention(a, keys, values, scale)
        out = softmax_attention(q, a, agent_v, scale ** k_scale2) + k_shortcut * v
    else:
        out = softmax_attention(q, keys, values, scale)
    image = ref_unmerge(lin(attn.to_out[0], unheads(out)), sets)
    if text is None:
        return image
    out_t = unheads(softmax_attention(qt, keys, values, scale))
    return image, (out_t if attn.context_pre_only else lin(attn.to_add_out, out_t))


def sets_for(metric, hw, settings, seed):
    N = metric.shape[1]
    use_rand = settings["use_rand"] and metric.shape[0] % 2 == 0
    return ref_match(metric, *hw, settings["sx"], settings["sy"], int(N * settings["ratio"]),
                     int(N * settings["agent_ratio"]), use_rand, torch.Generator().manual_seed(seed))


def ref_pixart_block(block, x, context, t6, hw, settings, seed):
    B = x.shape[0]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (block.scale_shift_table[None] + t6.reshape(B, 6, -1)).chunk(6, 1)
    y = block.norm1(x) * (1 + scale_msa) + shift_msa
    x = gate_msa * ref_agentsd_attention(block.attn1, y, sets_for(x, hw, settings, seed)) + x
    x = block.attn2(x, encoder_hidden_states=context) + x  # unchanged cross-attention (stock)
    y = block.norm2(x) * (1 + scale_mlp) + shift_mlp
    return gate_mlp * block.ff(y) + x


def ref_sd3_block(block, x, context, temb, hw, settings, seed):
    sets = sets_for(x, hw, settings, seed)
    if block.use_dual_attention:
        y, gate_msa, shift_mlp, scale_mlp, gate_mlp, y2, gate_msa2 = block.norm1(x, emb=temb)
    else:
        y, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
    if block.context_pre_only:
        c = block.norm1_context(context, temb)
    else:
        c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(context, emb=temb)
    image, text = ref_agentsd_attention(block.attn, y, sets, text=c)
    x = x + gate_msa.unsqueeze(1) * image
    if block.use_dual_attention:  # the same merge (matched on the block input) for the image-only attention
        x = x + gate_msa2.unsqueeze(1) * ref_agentsd_attention(block.attn2, y2, sets)
    x = x + gate_mlp.unsqueeze(1) * block.ff(block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
    if block.context_pre_only:
        return None, x
    context = context + c_gate_msa.unsqueeze(1) * text
    y = block.norm2_context(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    return context + c_gate_mlp.unsqueeze(1) * block.ff_context(y), x


PHASES = {
    "agents (paper phase 1)": dict(sx=4, sy=4, ratio=0.4, agent_ratio=0.95, use_rand=True),
    "ToMe (phase 2)": dict(sx=2, sy=2, ratio=0.4, agent_ratio=0.5, use_rand=True),
    "top-left, odd grid": dict(sx=3, sy=2, ratio=0.3, agent_ratio=0.9, use_rand=False),
}


def close(out, ref):
    err = float((out - ref).abs().max())
    assert err <= 1e-5 * max(1.0, float(ref.abs().max())), err


@pytest.mark.parametrize("phase", list(PHASES))
def test_pixart_block_matches_reference(phase):
    settings = PHASES[phase]
    model = tiny_pixart()
    hw = (8, 12) if settings["use_rand"] else (9, 11)
    block = model.transformer_blocks[0]
    g = torch.Generator().manual_seed(7)
    x = 2 * torch.randn(2, hw[0] * hw[1], 16, generator=g) + 0.5
    context, t6 = torch.randn(2, 5, 16, generator=g), torch.randn(2, 6 * 16, generator=g)
    state = apply_agentsd(model, seed=11, **settings)
    state.grid = hw
    with torch.no_grad():
        out = block(x, encoder_hidden_states=context, timestep=t6)
        ref = ref_pixart_block(block, x, context, t6, hw, settings, seed=11)
    assert state.calls["agent" if settings["agent_ratio"] >= 0.9 else "tome"] == 1 and state.calls["stock"] == 0
    close(out, ref)


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("which", [0, 2])  # block 0: dual attention; block 2: context_pre_only
def test_sd3_block_matches_reference(phase, which):
    settings = PHASES[phase]
    model = tiny_sd3()
    hw = (8, 12) if settings["use_rand"] else (9, 11)
    block = model.transformer_blocks[which]
    g = torch.Generator().manual_seed(7)
    x = 2 * torch.randn(2, hw[0] * hw[1], 16, generator=g) + 0.5
    context, temb = torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g)
    state = apply_agentsd(model, seed=11, **settings)
    state.grid = hw
    with torch.no_grad():
        ctx_out, out = block(hidden_states=x, encoder_hidden_states=context, temb=temb)
        ref_ctx, ref = ref_sd3_block(block, x, context, temb, hw, settings, seed=11)
    path = "agent" if settings["agent_ratio"] >= 0.9 else "tome"
    assert state.calls[path] == (2 if block.use_dual_attention else 1) and state.calls["stock"] == 0
    close(out, ref)
    if ref_ctx is None:
        assert ctx_out is None
    else:
        close(ctx_out, ref_ctx)


def test_reference_detects_a_text_token_change():
    """The test can fail: merging the text tokens too (not the intended computation) is far off."""
    settings = PHASES["agents (paper phase 1)"]
    model = tiny_sd3()
    block = model.transformer_blocks[1]
    hw = (8, 12)
    g = torch.Generator().manual_seed(7)
    x = 2 * torch.randn(2, 96, 16, generator=g) + 0.5
    context, temb = torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g)
    state = apply_agentsd(model, seed=11, **settings)
    state.grid = hw
    with torch.no_grad():
        _, out = block(hidden_states=x, encoder_hidden_states=context, temb=temb)
        _, ref = ref_sd3_block(block, x, context, temb, hw, settings, seed=11)
        _, wrong = ref_sd3_block(block, x, context.mean(1, keepdim=True).expand_as(context), temb, hw, settings, seed=11)
    close(out, ref)
    assert float((out - wrong).abs().max()) > 1e-3


def test_dit_grid_mismatch_raises():
    model = tiny_pixart()
    state = apply_agentsd(model)
    state.grid = (5, 5)
    with pytest.raises(RuntimeError, match="token grid"), torch.no_grad():
        model.transformer_blocks[0](torch.randn(1, 64, 16), encoder_hidden_states=torch.randn(1, 5, 16),
                                    timestep=torch.randn(1, 96))

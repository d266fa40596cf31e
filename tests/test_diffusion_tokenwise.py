"""``merge_crossattn`` / ``merge_mlp``: a block's cross-attention and feed-forward on the merged rows
of its AgentSD merge, on every adapter, against plain re-implementations (the block references of
``test_diffusion_dit`` and ``test_diffusion_flux_wan`` with the sub-layer's input merged and its
output unmerged by the same index sets), and the cases where nothing may be merged."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from agent_attention.diffusion import AgentSDConfig, AgentSDSettings, Rule, apply_agentsd, remove_agentsd  # noqa: E402
from test_diffusion_dit import (  # noqa: E402
    PHASES, close, ref_agentsd_attention, sets_for, tiny_pixart, tiny_sd3, tiny_unet,
)
from test_diffusion_dit import inputs as dit_inputs  # noqa: E402
from test_diffusion_flux_wan import GRIDS, MODELS, install_reference, ref_match, run, run_reference  # noqa: E402
from test_diffusion_parity import ref_merge, ref_unmerge  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = {"mlp": dict(merge_mlp=True), "crossattn": dict(merge_crossattn=True),
         "both": dict(merge_mlp=True, merge_crossattn=True)}


def merged_call(fn, x, sets):
    """``fn`` on the merged rows of ``x``, unmerged by copy."""
    return ref_unmerge(fn(ref_merge(x, sets, sets["r"])), sets)


def ref_pixart_block(block, x, context, t6, hw, settings, seed, crossattn, mlp):
    B = x.shape[0]
    sets = sets_for(x, hw, settings, seed)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (block.scale_shift_table[None] + t6.reshape(B, 6, -1)).chunk(6, 1)
    y = block.norm1(x) * (1 + scale_msa) + shift_msa
    x = gate_msa * ref_agentsd_attention(block.attn1, y, sets) + x
    cross = lambda t: block.attn2(t, encoder_hidden_states=context)  # noqa: E731
    x = (merged_call(cross, x, sets) if crossattn else cross(x)) + x
    y = block.norm2(x) * (1 + scale_mlp) + shift_mlp
    return gate_mlp * (merged_call(block.ff, y, sets) if mlp else block.ff(y)) + x


def ref_sd3_image(block, x, context, temb, hw, settings, seed, mlp):
    """The image tokens of an SD3 block without dual attention."""
    sets = sets_for(x, hw, settings, seed)
    y, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
    c = block.norm1_context(context, emb=temb)[0]
    image, _ = ref_agentsd_attention(block.attn, y, sets, text=c)
    x = x + gate_msa.unsqueeze(1) * image
    y = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return x + gate_mlp.unsqueeze(1) * (merged_call(block.ff, y, sets) if mlp else block.ff(y))


def pixart_case():
    model = tiny_pixart()
    g = torch.Generator().manual_seed(7)
    hw = (8, 12)
    x = 2 * torch.randn(2, 96, 16, generator=g) + 0.5
    return model, hw, x, torch.randn(2, 5, 16, generator=g), torch.randn(2, 6 * 16, generator=g)


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("phase", ["agents (paper phase 1)", "ToMe (phase 2)"])
def test_pixart_block_merged_sublayers_match_reference(flags, phase):
    settings = PHASES[phase]
    model, hw, x, context, t6 = pixart_case()
    block = model.transformer_blocks[0]
    state = apply_agentsd(model, seed=11, **settings, **FLAGS[flags])
    state.grid = hw
    with torch.no_grad():
        out = block(x, encoder_hidden_states=context, timestep=t6)
        remove_agentsd(model)
        crossattn, mlp = "merge_crossattn" in FLAGS[flags], "merge_mlp" in FLAGS[flags]
        ref = ref_pixart_block(block, x, context, t6, hw, settings, 11, crossattn, mlp)
        plain = ref_pixart_block(block, x, context, t6, hw, settings, 11, False, False)
    assert state.calls["merged crossattn"] == crossattn and state.calls["merged mlp"] == mlp
    close(out, ref)
    assert float((out - plain).abs().max()) > 1e-3  # the merged sub-layers change the block: the test can fail


def test_sd3_feed_forward_on_merged_rows_matches_reference():
    settings = PHASES["agents (paper phase 1)"]
    model = tiny_sd3()
    block = model.transformer_blocks[1]  # no dual attention, not context_pre_only
    hw = (8, 12)
    g = torch.Generator().manual_seed(7)
    x = 2 * torch.randn(2, 96, 16, generator=g) + 0.5
    context, temb = torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g)
    state = apply_agentsd(model, seed=11, merge_mlp=True, **settings)
    state.grid = hw
    with torch.no_grad():
        _, out = block(hidden_states=x, encoder_hidden_states=context, temb=temb)
        remove_agentsd(model)
        ref = ref_sd3_image(block, x, context, temb, hw, settings, 11, mlp=True)
        plain = ref_sd3_image(block, x, context, temb, hw, settings, 11, mlp=False)
    assert state.calls["merged mlp"] == 1
    close(out, ref)
    assert float((out - plain).abs().max()) > 1e-3


def install_merged_reference(model, kind, ratio=0.4, agent_ratio=0.95):
    """The reference processors of ``test_diffusion_flux_wan`` plus torch hooks that run the MLPs
    (and Wan's cross-attention) on the rows merged by the reference index sets of the block input.
    FLUX's single-stream blocks stay unmerged (their MLP feeds the attention's output projection)."""
    handles = install_reference(model, kind)
    grid = GRIDS[kind]
    if kind == "flux":
        subs = [(b, b.ff) for b in model.transformer_blocks]
    else:
        subs = [(b, m) for b in model.blocks for m in (b.attn2, b.ffn)]
    for block, sub in subs:
        box = {}
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, box=box: box.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True))

        def pre(m, args, kwargs, box=box):
            x = args[0] if args else kwargs["hidden_states"]
            n = box["x"].shape[1]
            box["sets"] = ref_match(box["x"], grid, 2, 2, int(n * ratio), int(n * agent_ratio))
            merged = ref_merge(x, box["sets"], box["sets"]["r"])
            return ((merged,) + tuple(args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=merged))

        def post(m, args, kwargs, out, box=box):
            return ref_unmerge(out, box["sets"])

        handles.append(sub.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(sub.register_forward_hook(post, with_kwargs=True))
    return handles


@pytest.mark.parametrize("kind", list(MODELS))
def test_flux_and_wan_merged_sublayers_match_reference(kind):
    model = MODELS[kind]()
    state = apply_agentsd(model, sx=2, sy=2, use_rand=False, merge_mlp=True, merge_crossattn=kind == "wan")
    ours = run(model, kind)
    assert state.calls["agent"] == 2 and state.calls["merged mlp"] == (2 if kind == "wan" else 1)
    assert state.calls["merged crossattn"] == (2 if kind == "wan" else 0)
    if kind == "flux":  # the single-stream block's MLP is not merged
        assert not any(n.startswith("single_transformer_blocks") for n in state.tokenwise_hooks)
    remove_agentsd(model)
    ref = run_reference(model, kind, install_merged_reference)
    plain_state = apply_agentsd(model, sx=2, sy=2, use_rand=False)
    plain = run(model, kind)
    assert plain_state.calls["merged mlp"] == 0
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours - plain).abs().max().item() > 1e-3


def test_unet_merged_sublayers_change_the_output_and_remove_restores():
    model = tiny_unet()
    kw = dit_inputs("unet")
    with torch.no_grad():
        stock = model(**kw).sample
        state = apply_agentsd(model, merge_mlp=True, merge_crossattn=True)
        both = model(**kw).sample
        assert state.calls["merged mlp"] > 0 and state.calls["merged crossattn"] > 0
        apply_agentsd(model)  # applying again without the flags removes the sub-layer hooks
        plain = model(**kw).sample
        assert not get_tokenwise(model)
        remove_agentsd(model)
        assert torch.equal(model(**kw).sample, stock)
    assert float((both - plain).abs().max()) > 1e-4


def get_tokenwise(model):
    from diffusers.hooks import HookRegistry  # noqa: F401

    return [n for n, m in model.named_modules() if getattr(m, "_diffusers_hook", None) is not None
            and m._diffusers_hook.get_hook("agentsd_tokenwise") is not None]


def test_off_steps_and_todo_merge_nothing():
    model, hw, x, context, t6 = pixart_case()
    kw = dit_inputs("pixart")
    with torch.no_grad():
        stock = model(**kw, return_dict=False)[0]
        state = apply_agentsd(model, AgentSDConfig([Rule(AgentSDSettings(merge_mlp=True, merge_crossattn=True), steps=(1, None))]))
        assert torch.equal(model(**kw, return_dict=False)[0], stock)  # step 0 is outside the rule
        assert state.calls["merged mlp"] == 0 and state.calls["merged crossattn"] == 0
        remove_agentsd(model)
        assert not get_tokenwise(model)
    with pytest.raises(ValueError, match="merge_mlp .*method='agentsd'"):
        AgentSDSettings(method="todo", merge_mlp=True)
    with pytest.raises(ValueError, match="merge_crossattn must be True or False"):
        AgentSDSettings(merge_crossattn=1)


def test_chunked_feed_forward_is_left_alone():
    """A chunked feed-forward sees part of the tokens: it runs unmerged (as with merge_mlp off)."""
    model = tiny_pixart()
    kw = dit_inputs("pixart")
    with torch.no_grad():
        apply_agentsd(model, use_rand=False)
        plain = model(**kw, return_dict=False)[0]
        for block in model.transformer_blocks:
            block.set_chunk_feed_forward(16, 1)
        state = apply_agentsd(model, use_rand=False, merge_mlp=True)
        chunked = model(**kw, return_dict=False)[0]
    assert state.calls["merged mlp"] == 0
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)


def test_a_flag_without_sublayer_warns():
    model = tiny_sd3()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_agentsd(model, merge_crossattn=True)
    assert any("merge_crossattn=True does nothing on SD3Transformer2DModel" in str(w.message) for w in caught)
    remove_agentsd(model)

"""AgentSD on diffusers' conventions: schedules over blocks and steps (flow-matching timesteps),
HookRegistry hooks, applying twice, the attention dispatch (``set_attention_backend``), model CPU
offload, First Block Cache and attention slicing.  Tiny models/pipelines built from configs."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from agent_attention.diffusion import (  # noqa: E402
    AgentSDConfig, AgentSDSettings, Rule, apply_agentsd, get_agentsd_state, remove_agentsd,
)
from test_diffusion import tiny_pipeline  # noqa: E402
from test_diffusion_dit import inputs, tiny_pixart, tiny_sd3  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

AGENTS = AgentSDSettings(sx=2, sy=2)  # agents on the tiny 8x8 grids
TOME = AgentSDSettings(sx=2, sy=2, agent_ratio=0.5)


def test_schedule_blocks_and_steps_on_flow_matching_timesteps():
    """Step fractions with a flow-matching scheduler (timesteps from sigmas, bare model): agents in
    the first half, ToMe after; block rules: the last block ToDo, block 0 off."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_sd3()
    scheduler = FlowMatchEulerDiscreteScheduler()
    config = AgentSDConfig([
        Rule(None, blocks=0), Rule(AgentSDSettings(method="todo"), blocks="last:1"),
        Rule(AGENTS, steps=(0.0, 0.5)), Rule(TOME, steps=(0.5, None)),
    ], num_inference_steps=4)
    state = apply_agentsd(model, config)
    kwargs = inputs("sd3")
    seen = []
    with torch.no_grad():
        for run in range(2):
            scheduler.set_timesteps(4)
            for t in scheduler.timesteps:
                state.calls.clear()
                model(**dict(kwargs, timestep=t.expand(2)))
                seen.append((state.step, dict(state.calls)))
    expected = [(0, {"stock": 2, "agent": 1, "todo": 1}), (1, {"stock": 2, "agent": 1, "todo": 1}),
                (2, {"stock": 2, "tome": 1, "todo": 1}), (3, {"stock": 2, "tome": 1, "todo": 1})]
    assert seen == expected * 2  # the second run restarts at step 0 (timestep rose)


def test_step_fractions_need_the_number_of_steps():
    model = tiny_pixart()
    apply_agentsd(model, AgentSDConfig.paper(switch=0.4))
    with torch.no_grad():
        model(**inputs("pixart", t=900.0))  # step 0 is at 0 % of any run
        with pytest.raises(RuntimeError, match="number of steps is unknown"):
            model(**inputs("pixart", t=800.0))


def test_bad_schedules_raise():
    model = tiny_pixart()
    with pytest.raises(ValueError, match="selects none of the 2 attention blocks"):
        apply_agentsd(model, AgentSDConfig([Rule(AGENTS, blocks=range(5, 9))]))
    with pytest.raises(ValueError, match="every rule is off"):
        apply_agentsd(model, AgentSDConfig([Rule(None)]))
    with pytest.raises(ValueError, match="fractions"):
        Rule(AGENTS, steps=(0.0, 1.5))
    with pytest.raises(TypeError, match="two ints"):
        Rule(AGENTS, steps=(0, 0.5))
    with pytest.raises(ValueError, match="first:K"):
        Rule(AGENTS, blocks="middle:2")
    with pytest.raises(ValueError, match="one of a config"):
        apply_agentsd(model, AGENTS, ratio=0.3)
    with pytest.warns(RuntimeWarning, match="reduces no token"):
        apply_agentsd(model, ratio=0.0)


def test_apply_twice_replaces_and_hooks_are_diffusers_hooks():
    model = tiny_sd3()
    kwargs = inputs("sd3")
    with torch.no_grad():
        stock = model(**kwargs).sample
        state = apply_agentsd(model, AGENTS)
        assert model._diffusers_hook.get_hook("agentsd") is not None and not model._forward_pre_hooks
        assert model.transformer_blocks[0]._diffusers_hook.get_hook("agentsd_block") is not None
        assert apply_agentsd(model, TOME) is state  # replaces the configuration, same state
        state.calls.clear()
        model(**kwargs)
        assert dict(state.calls) == {"tome": 4}
        remove_agentsd(model)
        assert get_agentsd_state(model) is None and model._diffusers_hook.get_hook("agentsd") is None
        assert model.transformer_blocks[0]._diffusers_hook.get_hook("agentsd_block") is None
        assert torch.equal(model(**kwargs).sample, stock)


def test_softmax_calls_go_through_the_attention_backend():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model = tiny_pixart()
    state = apply_agentsd(model, TOME)  # ToMe: every call is a plain softmax attention on merged tokens
    name = AttentionBackendName._NATIVE_MATH
    backend_fn = _AttentionBackendRegistry._backends[name]
    active = _AttentionBackendRegistry._active_backend
    counted = []
    try:
        _AttentionBackendRegistry._backends[name] = lambda **kw: counted.append(1) or backend_fn(**kw)
        model.set_attention_backend("_native_math")
        with torch.no_grad():
            model(**inputs("pixart"))
    finally:
        _AttentionBackendRegistry._backends[name] = backend_fn
        _AttentionBackendRegistry._active_backend = active
    assert state.calls["tome"] == 2 and len(counted) == 2


def test_first_block_cache_composes():
    """FirstBlockCache on top of AgentSD: the first call runs every block (equal to AgentSD alone), a
    close second call runs only the first block, through AgentSD."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.models.cache_utils import CacheMixin

    model = tiny_pixart()
    kwargs = inputs("pixart")
    with torch.no_grad():
        state = apply_agentsd(model, AGENTS)
        alone = model(**kwargs).sample
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.5))
        with CacheMixin.cache_context(model, "cond"):  # (PixArt has no CacheMixin; the cache works all the same)
            state.calls.clear()
            state.new_generation()
            cached = model(**kwargs).sample
            assert torch.equal(cached, alone) and dict(state.calls) == {"agent": 2}
            state.calls.clear()
            model(**dict(kwargs, timestep=kwargs["timestep"] - 10))
        assert dict(state.calls) == {"agent": 1}  # the remaining block came from the cache


def generate(pipe):
    return pipe(prompt_embeds=torch.ones(1, 16, 32), negative_prompt_embeds=torch.zeros(1, 16, 32), num_inference_steps=1,
                guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_model_cpu_offload_and_attention_slicing(tmp_path):
    pytest.importorskip("accelerate")
    pipe = tiny_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    stock = generate(pipe)
    state = apply_agentsd(pipe)
    patched = generate(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    state.calls.clear()
    assert (generate(pipe) == patched).all() and dict(state.calls) == {"agent": 3}
    with pytest.warns(RuntimeWarning, match="were replaced after apply_agentsd"):
        pipe.enable_attention_slicing()
        state.calls.clear()
        generate(pipe)
    assert dict(state.calls) == {"agent": 3}  # still on, loudly
    remove_agentsd(pipe)
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert type(attn.processor).__name__ == "SlicedAttnProcessor"  # the user's latest choice comes back
    assert pipe.unet.forward.func.__module__.startswith("accelerate")  # offload's wrapper survives the removal
    pipe.disable_attention_slicing()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert (generate(pipe) == stock).all()


def test_every_call_falling_back_warns():
    """A self-attention mask makes every patched PixArt call go to the stock processor: loud, not silent."""
    model = tiny_pixart()
    state = apply_agentsd(model, AGENTS)
    kwargs = inputs("pixart")
    with pytest.warns(RuntimeWarning, match="fell back to the stock attention"), torch.no_grad():
        model(**kwargs, attention_mask=torch.ones(2, 64))
    assert state.calls["agent"] == 0 and state.calls["stock"] == 2


def test_sd3_pipeline_step_fractions_from_the_scheduler():
    """A tiny StableDiffusion3Pipeline (flow matching, text embeddings given): the pipeline's
    timesteps give the number of steps, so fractions of the run need no extra argument."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.0, scaling_factor=1.0)
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    state = apply_agentsd(pipe, AgentSDConfig([Rule(AGENTS, steps=(0.0, 0.5)), Rule(TOME)]))
    seen = []
    pipe.transformer.register_forward_hook(lambda *_: seen.append((state.step, dict(state.calls))) or state.calls.clear())
    e, p = torch.randn(1, 5, 12), torch.randn(1, 8)
    for _ in range(2):
        out = pipe(prompt_embeds=e, negative_prompt_embeds=e, pooled_prompt_embeds=p, negative_pooled_prompt_embeds=p,
                   height=16, width=16, num_inference_steps=4, guidance_scale=3.0, output_type="np")
    assert out.images.shape == (1, 16, 16, 3) and state.num_steps == 4
    assert seen == [(0, {"agent": 4}), (1, {"agent": 4}), (2, {"tome": 4}), (3, {"tome": 4})] * 2

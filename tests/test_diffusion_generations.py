"""AgentSD across repeated generations: a new generation is detected even when the timestep does
not rise (1-step / few-step pipelines, img2img, custom timesteps); the seeded random partition is
then reproducible and the schedule restarts at step 0."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from agent_attention.diffusion import AgentSDSchedule, apply_agentsd, remove_agentsd  # noqa: E402
from test_diffusion import tiny_pipeline, tiny_sd_unet, unet_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def generate(pipe, steps=1, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt_embeds=torch.ones(1, 16, 32), negative_prompt_embeds=torch.zeros(1, 16, 32),
                num_inference_steps=steps, guidance_scale=5.0, output_type="np", generator=g, **kwargs).images


def test_two_identical_one_step_generations_agree(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    state = apply_agentsd(pipe, use_rand=True, seed=3)  # CFG batch of 2: random destinations on
    first = generate(pipe)
    second = generate(pipe)  # same timestep as the first: no rise, yet a new generation
    assert state.step == 0 and state.calls["agent"] == 6
    assert (first == second).all()
    apply_agentsd(pipe, use_rand=True, seed=4)  # the partition is random and matters
    assert not (generate(pipe) == first).all()
    remove_agentsd(pipe)


def test_schedule_restarts_when_timesteps_fall(tmp_path):
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_pipeline(tmp_path)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # accepts custom timesteps
    schedule = AgentSDSchedule(switch_step=1)
    state = apply_agentsd(pipe, schedule=schedule)
    phases = []
    state_hook = pipe.unet.register_forward_hook(lambda *_: phases.append((state.step, dict(state.calls))) or state.calls.clear())
    generate(pipe, timesteps=[900, 700])
    generate(pipe, timesteps=[500])  # lower than the last timestep of the previous generation
    generate(pipe, timesteps=[500], callback_on_step_end=schedule)
    generate(pipe, timesteps=[500], callback_on_step_end=schedule)
    state_hook.remove()
    assert phases == [(0, {"agent": 3}), (1, {"tome": 3}), (0, {"agent": 3}), (0, {"agent": 3}), (0, {"agent": 3})]


def test_bare_unet_new_generation():
    unet = tiny_sd_unet()
    x, e = unet_inputs(batch=2)
    state = apply_agentsd(unet, use_rand=True, seed=5)
    with torch.no_grad():
        a = unet(x, 999, e).sample
        b = unet(x, 999, e).sample  # a bare UNet cannot tell: the same generation, the generator continues
        state.new_generation()
        c = unet(x, 999, e).sample
    assert not torch.equal(a, b) and torch.equal(a, c) and state.step == 0

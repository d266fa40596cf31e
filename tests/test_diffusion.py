"""AgentSD on diffusers: token merging, the attention processor, patching, the schedule, the CLI.

Everything runs on tiny UNets/pipelines built from configs (no downloads)."""
from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor  # noqa: E402

from agent_attention.diffusion import (  # noqa: E402
    AgentSDSchedule, AgentSDSettings, apply_agentsd, get_agentsd_state, latent_grid, match_tokens,
    merge_counts, merge_tokens, remove_agentsd, self_attention_layers,
)
from agent_attention.diffusion.merge import destination_partition  # noqa: E402
from agent_attention.functional import agent_attention_math  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_sd_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL-like: no attention in the first (full-resolution) block, text_time conditioning."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    ).eval()


def unet_inputs(batch=2, size=16, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g).to(dtype), torch.randn(batch, 7, 32, generator=g).to(dtype)


# ---------------------------------------------------------------- merge
@pytest.mark.parametrize("hw,sx,sy,ratio,agent_ratio", [
    ((8, 8), 2, 2, 0.5, 0.0), ((8, 8), 4, 4, 0.4, 0.95), ((10, 13), 3, 2, 0.3, 0.9), ((7, 5), 2, 2, 0.25, 0.8),
    ((6, 6), 4, 4, 0.4, 0.95), ((3, 3), 4, 4, 0.5, 0.95),
])
def test_merge_shapes_and_counts(hw, sx, sy, ratio, agent_ratio):
    n = hw[0] * hw[1]
    x = torch.randn(3, n, 12)
    merged, agents, unmerge = merge_tokens(x, hw, sx=sx, sy=sy, ratio=ratio, agent_ratio=agent_ratio)
    n_merged, n_agents = merge_counts(hw, sx=sx, sy=sy, ratio=ratio, agent_ratio=agent_ratio)
    num_dst = (hw[0] // sy) * (hw[1] // sx)
    expected_r = min(int(n * ratio), n - num_dst) if num_dst else 0
    assert merged.shape == (3, n - expected_r, 12) and n_merged == n - expected_r
    assert (agents is None) == (n_agents is None)
    if agents is not None:
        assert agents.shape == (3, n_agents, 12) and 2 * n_agents < n_merged
    assert unmerge(merged).shape == x.shape


def test_paper_token_counts():
    # spec §5.2: 64x64 latent -> 2458 tokens / 256 agents, then ToMe only; 96x96 -> 5530 / 576
    assert merge_counts((64, 64), sx=4, sy=4, ratio=0.4, agent_ratio=0.95) == (2458, 256)
    assert merge_counts((64, 64), sx=2, sy=2, ratio=0.4, agent_ratio=0.5) == (2458, None)
    assert merge_counts((96, 96), sx=4, sy=4, ratio=0.4, agent_ratio=0.95) == (5530, 576)
    assert merge_counts((64, 64), sx=2, sy=2, ratio=0.5, agent_ratio=0.8) == (2048, None)  # official defaults
    assert merge_counts((64, 64), sx=4, sy=4, ratio=0.0, agent_ratio=0.95) == (4096, None)


def test_merge_is_group_mean_and_unmerge_copies():
    x = torch.randn(2, 10 * 13, 6)
    m = match_tokens(x, (10, 13), sx=3, sy=2, ratio=0.4, agent_ratio=0.9)
    assert m.has_agents and m.num_agents < m.num_merged
    for merged, slot, rows in ((m.merge(x), m.slot, m.num_merged), (m.agents(x), m.agent_slot, m.num_agents)):
        assert merged.shape == (2, rows, 6)
        for b in range(2):
            assert sorted(slot[b].unique().tolist()) == list(range(rows))  # every row has members
            for row in range(rows):
                torch.testing.assert_close(merged[b, row], x[b, slot[b] == row].mean(0))
    y = torch.randn(2, m.num_merged, 5)
    assert torch.equal(m.unmerge(y), y.gather(1, m.slot[..., None].expand(-1, -1, 5)))
    # agents pooled from the merged rows (the processor's path) equal agents pooled from all tokens
    torch.testing.assert_close(m.agents_from_merged(m.merge(x)), m.agents(x))


def test_unmerge_of_merge_is_exact_for_duplicated_tokens():
    # every 2x2 cell holds one repeated token: merging only pairs identical tokens, nothing is lost
    h, w = 8, 12
    cells = torch.randn(2, h // 2, w // 2, 16)
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, h * w, 16)
    for use_rand in (False, True):
        g = torch.Generator().manual_seed(3)
        merged, _, unmerge = merge_tokens(x, (h, w), sx=2, sy=2, ratio=0.75, use_rand=use_rand, generator=g)
        assert merged.shape[1] == h * w // 4
        torch.testing.assert_close(unmerge(merged), x)


def test_destination_choice_deterministic_and_seeded():
    dst, src = destination_partition((8, 8), 4, 4, use_rand=False)
    assert dst.tolist() == [0, 4, 32, 36] and src.numel() == 60
    draws = [destination_partition((16, 16), 2, 2, use_rand=True, generator=torch.Generator().manual_seed(s))[0]
             for s in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    rows, cols = draws[0] // 16, draws[0] % 16
    cell = (rows // 2) * 8 + cols // 2
    assert sorted(cell.tolist()) == list(range(64))  # exactly one destination per cell


def test_merge_matches_tomesd_reference():
    tomesd_merge = pytest.importorskip("tomesd.merge")
    x = torch.randn(2, 10 * 13, 16)
    for sx, sy, ratio in [(2, 2, 0.5), (4, 4, 0.4), (3, 2, 0.3)]:
        r = int(130 * ratio)
        m, u = tomesd_merge.bipartite_soft_matching_random2d(x, 13, 10, sx, sy, r, no_rand=True)
        merged, _, unmerge = merge_tokens(x, (10, 13), sx=sx, sy=sy, ratio=ratio)
        torch.testing.assert_close(unmerge(merged), u(m(x)))


def test_merge_bad_input():
    with pytest.raises(ValueError, match="grid"):
        match_tokens(torch.randn(1, 10, 4), (3, 3))
    with pytest.raises(ValueError, match="sx"):
        match_tokens(torch.randn(1, 9, 4), (3, 3), sx=0)
    with pytest.raises(ValueError, match="ratio"):
        match_tokens(torch.randn(1, 9, 4), (3, 3), ratio=1.5)


def test_latent_grid():
    assert latent_grid(64 * 64, (64, 64)) == (1, 64, 64)
    assert latent_grid(33 * 49, (65, 97)) == (2, 33, 49)
    assert latent_grid(77, (64, 64)) is None


# ---------------------------------------------------------------- processor
def test_processor_computes_agentsd_formula():
    """One self-attention layer against the explicit formula of the paper on the merged tokens."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    from agent_attention.diffusion.processor import AgentSDProcessor, AgentSDState

    state = AgentSDState(settings=AgentSDSettings(use_rand=False), max_downsample=1, latent_hw=(8, 12))
    attn.set_processor(AgentSDProcessor(state, attn.processor))
    x = torch.randn(2, 96, 32)
    with torch.no_grad():
        out = attn(x)
        merged, agents, unmerge = merge_tokens(x, (8, 12), sx=4, sy=4, ratio=0.4, agent_ratio=0.95)
        split = lambda t: t.view(2, -1, 4, 8).transpose(1, 2)  # noqa: E731
        q, k, v, a = (split(f(t)) for f, t in ((attn.to_q, merged), (attn.to_k, merged), (attn.to_v, merged), (attn.to_q, agents)))
        s = 8 ** -0.5
        o = agent_attention_math(q, k, v, a, scale=s, query_scale=s ** 0.3) + 0.075 * v
        ref = unmerge(attn.to_out[0](o.transpose(1, 2).reshape(2, -1, 32)))
    assert state.calls["agent"] == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("precision", [None, "fp32"])
def test_processor_half_precision_finite(dtype, precision):
    from agent_attention.diffusion.processor import AgentSDProcessor, AgentSDState

    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=2, dim_head=32).eval()
    ref_state = AgentSDState(settings=AgentSDSettings(attn_precision="fp32"), max_downsample=1, latent_hw=(16, 16))
    attn.set_processor(AgentSDProcessor(ref_state, attn.processor))
    x = 30 * torch.randn(2, 256, 64)  # large activations: fp16 logits overflow without care
    with torch.no_grad():
        ref = attn(x)
        attn.to(dtype)
        attn.processor.state = AgentSDState(settings=AgentSDSettings(attn_precision=precision), max_downsample=1, latent_hw=(16, 16))
        out = attn(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    # rounding the input may pair a few near-tied tokens differently: compare on average
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


# ---------------------------------------------------------------- patching
def test_patch_round_trip_is_bit_identical():
    unet = tiny_sd_unet()
    unet.set_attn_processor(AttnProcessor())  # a non-default original, must come back as the same object
    before = dict(unet.attn_processors)
    x, e = unet_inputs()
    with torch.no_grad():
        y0 = unet(x, 10, e).sample
        apply_agentsd(unet)
        apply_agentsd(unet)  # idempotent
        y1 = unet(x, 10, e).sample
        remove_agentsd(unet)
        remove_agentsd(unet)  # idempotent
        y2 = unet(x, 10, e).sample
    assert not torch.equal(y0, y1)
    assert torch.equal(y0, y2)
    assert all(p is before[name] for name, p in unet.attn_processors.items())
    assert get_agentsd_state(unet) is None and not unet._forward_pre_hooks


def test_ratio_zero_equals_stock_attention():
    unet = tiny_sd_unet()
    x, e = unet_inputs()
    with torch.no_grad():
        y0 = unet(x, 10, e).sample
        state = apply_agentsd(unet, ratio=0.0, agent_ratio=0.0)
        y1 = unet(x, 10, e).sample
    assert state.calls["tome"] == 3 and state.calls["agent"] == 0  # our path ran, unmerged
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-6)


def test_layer_selection_sd_and_sdxl():
    unet = tiny_sd_unet()
    state = apply_agentsd(unet)
    assert state.max_downsample == 1
    assert sorted(state.levels) == sorted(n for n, _, lvl in self_attention_layers(unet) if lvl == 1)
    cross = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    assert cross and all(type(m.processor).__name__ == "AttnProcessor2_0" for m in cross)
    apply_agentsd(unet, max_downsample=2)  # now also the mid block
    assert len(get_agentsd_state(unet).levels) == 4
    apply_agentsd(unet, max_downsample=1)  # back: the mid block regains its own processor
    assert len(state.levels) == 3 and type(unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor).__name__ == "AttnProcessor2_0"

    xl = tiny_sdxl_unet()
    x, e = unet_inputs()
    added = dict(text_embeds=torch.randn(2, 32), time_ids=torch.randn(2, 6))
    with torch.no_grad():
        y0 = xl(x, 10, e, added_cond_kwargs=added).sample
        state = apply_agentsd(xl)  # SDXL: no attention at full resolution -> the highest attention level
        y1 = xl(x, 10, e, added_cond_kwargs=added).sample
    assert state.max_downsample == 2 and state.calls["agent"] == 8 and not torch.equal(y0, y1)
    with pytest.raises(ValueError, match="selects no self-attention"):
        apply_agentsd(xl, max_downsample=1)


def test_bad_settings():
    unet = tiny_sd_unet()
    with pytest.raises(TypeError, match="unknown setting"):
        apply_agentsd(unet, ratoi=0.3)
    with pytest.raises(ValueError, match="agent_ratio"):
        apply_agentsd(unet, agent_ratio=2)
    with pytest.raises(ValueError, match="attn_precision"):
        apply_agentsd(unet, attn_precision="fp64")
    with pytest.raises(TypeError, match="pipeline"):
        apply_agentsd(object())


def test_unet_half_precision_finite():
    unet = tiny_sd_unet().to(torch.bfloat16)
    x, e = unet_inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        state = apply_agentsd(unet, attn_precision="fp32")
        y = unet(x, 10, e).sample
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and state.calls["agent"] == 3


def test_random_mode_reproducible_per_generation():
    unet = tiny_sd_unet()
    x, e = unet_inputs(batch=2)
    with torch.no_grad():
        apply_agentsd(unet, use_rand=True, seed=5)
        a = [unet(x, t, e).sample for t in (900, 500)]
        b = [unet(x, t, e).sample for t in (900, 500)]  # timestep goes up: a new generation, re-seeded
        apply_agentsd(unet, use_rand=True, seed=6)
        c = unet(x, 900, e).sample
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c)


def test_schedule_switches_at_step():
    schedule = AgentSDSchedule(switch_step=2)
    assert schedule.settings_for(1) == AgentSDSettings() and schedule.settings_for(2).sx == 2
    assert schedule.late.agent_ratio == 0.5 and schedule.late.ratio == 0.4
    assert AgentSDSchedule(early=dict(attn_precision="fp32")).late.attn_precision == "fp32"
    unet = tiny_sd_unet()
    x, e = unet_inputs()
    state = apply_agentsd(unet, schedule=schedule)
    paths = []
    with torch.no_grad():
        for run in range(2):
            for t in (900, 700, 500, 300):
                state.calls.clear()
                unet(x, t, e)
                paths.append((state.step, dict(state.calls)))
    expected = [(0, {"agent": 3}), (1, {"agent": 3}), (2, {"tome": 3}), (3, {"tome": 3})]
    assert paths == expected * 2  # the second generation starts again with agents


def test_tiny_pipeline_end_to_end_with_callback(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    schedule = AgentSDSchedule(switch_step=2)
    state = apply_agentsd(pipe, schedule=schedule)
    seen = []

    def spy(pipe_, step, timestep, kwargs):
        seen.append(dict(state.calls))
        state.calls.clear()
        return schedule(pipe_, step, timestep, kwargs)

    out = pipe(prompt_embeds=torch.randn(1, 16, 32), negative_prompt_embeds=torch.randn(1, 16, 32),
               num_inference_steps=4, guidance_scale=5.0, output_type="np", callback_on_step_end=spy)
    assert out.images.shape == (1, 32, 32, 3) and (out.images == out.images).all()
    assert seen == [{"agent": 3}, {"agent": 3}, {"tome": 3}, {"tome": 3}]
    remove_agentsd(pipe)
    assert get_agentsd_state(pipe) is None


# ---------------------------------------------------------------- CLI
def tiny_pipeline(tmp_path):
    """A tiny StableDiffusionPipeline built from configs, with an offline character tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32))
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=tiny_sd_unet(),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def test_cli_side_by_side(tmp_path, capsys):
    from PIL import Image

    from agent_attention.commands.sd import main

    tiny_pipeline(tmp_path).save_pretrained(tmp_path / "model")
    out = tmp_path / "pair.png"
    rc = main(["--model", str(tmp_path / "model"), "--prompt", "a cat", "--steps", "3", "--warmup", "0",
               "--out", str(out)])
    assert rc == 0
    image = Image.open(out)
    assert image.width == 64 and image.height >= 32
    text = capsys.readouterr().out
    assert "speed-up" in text and "'agent'" in text
    assert main(["--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2


def test_bench_sd_smoke(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from agent_attention.bench.sd import main

    rc = main(["--tiny", "--sizes", "64", "--ratios", "0.5", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "sd.json").read_text())
    methods = {(r["method"], r["ratio"]) for r in data["records"]}
    assert {("baseline", 0.0), ("agentsd", 0.5)} <= methods
    assert all(r["seconds"] > 0 and r["peak_bytes"] >= 0 for r in data["records"])
    assert (tmp_path / "sd.png").stat().st_size > 0 and "AgentSD" in capsys.readouterr().out

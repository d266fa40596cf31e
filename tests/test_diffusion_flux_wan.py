"""AgentSD on FLUX.1 (double- and single-stream blocks, RoPE, packed 2×2 latent tokens) and Wan 2.x
(3-D ``T × H × W`` grid, 3-D RoPE, ``attn1`` only) against a plain, independent re-implementation of
the intended attention computation on the same tiny weights.

The reference is a test-local attention processor written from the math (explicit gathers,
einsums, RMS norms, the rotation of interleaved pairs); it shares no code with the library and is
installed on the same attention layers, so the rest of each block (adaptive norms, MLPs, Wan's
cross-attention) is diffusers' own.  Intended computation: every image token is projected,
normalised and rotated (RoPE) first; the rotated queries/keys/values are merged by the bipartite
matching of the block input (one destination per ``sy × sx`` cell of each frame, top-left); the
agents are the stronger merge of the rotated queries; text tokens stay exact (keys/values of every
query and agent, their own queries exact softmax); outputs projected and unmerged by copy.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FluxTransformer2DModel, WanTransformer3DModel  # noqa: E402

from agent_attention.diffusion import AgentSDConfig, AgentSDSettings, Rule, apply_agentsd, remove_agentsd  # noqa: E402
from agent_attention.diffusion.adapters import supported_classes  # noqa: E402
from test_diffusion_parity import randomized, ref_merge, ref_unmerge  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

K_SCALE2, K_SHORTCUT = 0.3, 0.075


# ----------------------------------------------------------------------------- tiny models
def tiny_flux():
    torch.manual_seed(0)
    return randomized(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)))


def tiny_wan():
    torch.manual_seed(0)
    return randomized(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=12,
        freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32))


GRIDS = {"flux": (8, 8), "wan": (3, 4, 4)}


def inputs(kind, batch=2, t=500.0):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(batch, 5, 12, generator=g)
    if kind == "flux":
        h, w = GRIDS["flux"]
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"), -1)
        return dict(hidden_states=torch.randn(batch, h * w, 16, generator=g), encoder_hidden_states=text,
                    pooled_projections=torch.randn(batch, 8, generator=g), timestep=torch.full((batch,), t / 1000),
                    img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3))
    tt, h, w = GRIDS["wan"]
    return dict(hidden_states=torch.randn(batch, 4, tt, 2 * h, 2 * w, generator=g), encoder_hidden_states=text,
                timestep=torch.full((batch,), t))


MODELS = {"flux": tiny_flux, "wan": tiny_wan}


def run(model, kind):
    with torch.no_grad():
        return model(**inputs(kind), return_dict=False)[0]


# ----------------------------------------------------------------------------- reference
def lin(m, t):
    return t @ m.weight.T + (m.bias if m.bias is not None else 0)


def rms(norm, t):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def heads(t, h):
    B, S, C = t.shape
    return t.reshape(B, S, h, C // h).permute(0, 2, 1, 3)


def unheads(t):
    B, h, S, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(B, S, h * d)


def rope(t, cos, sin):
    """Rotation of interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); cos/sin (S, d) repeated per pair."""
    x0, x1 = t[..., 0::2], t[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 0::2]
    out = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], -1)
    return out.flatten(-2)


def ref_match(metric, grid, sx, sy, r, agent_r):
    """Bipartite matching with the top-left token of each ``sy × sx`` cell of each frame as destination."""
    *frames, h, w = grid
    t = frames[0] if frames else 1
    B, N, _ = metric.shape
    is_dst = torch.zeros(t, h, w, dtype=torch.bool)
    is_dst[:, : (h // sy) * sy : sy, : (w // sx) * sx : sx] = True
    is_dst = is_dst.reshape(-1)
    dst_pos, src_pos = is_dst.nonzero()[:, 0], (~is_dst).nonzero()[:, 0]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    node_max, node_idx = torch.einsum("bic,bjc->bij", unit[:, src_pos], unit[:, dst_pos]).max(-1)
    r, agent_r = min(r, src_pos.numel()), min(agent_r, src_pos.numel())
    sets = {"r": r, "src_pos": src_pos, "dst_pos": dst_pos, "edge": node_max.argsort(-1, descending=True), "partner": node_idx}
    sets["agent_r"] = agent_r if (N - agent_r) * 2 < N - r else None
    return sets


def ref_attention(attn, metric, x, grid, text, cos, sin, *, joint, wan, sx=2, sy=2, ratio=0.4, agent_ratio=0.95):
    """Reduced image rows (projected, unmerged) and exact text rows of one patched attention call."""
    h = attn.heads
    N, T = x.shape[1], 0 if text is None else text.shape[1]
    sets = ref_match(metric, grid, sx, sy, int(N * ratio), int(N * agent_ratio))
    if wan:  # norms across heads, before the split
        q, k = heads(rms(attn.norm_q, lin(attn.to_q, x)), h), heads(rms(attn.norm_k, lin(attn.to_k, x)), h)
    else:
        q, k = rms(attn.norm_q, heads(lin(attn.to_q, x), h)), rms(attn.norm_k, heads(lin(attn.to_k, x), h))
    v = heads(lin(attn.to_v, x), h)
    q, k = rope(q, cos[T:], sin[T:]), rope(k, cos[T:], sin[T:])
    merged = [heads(ref_merge(unheads(t), sets, sets["r"]), h) for t in (q, k, v)]
    qm, km, vm = merged
    keys, values = km, vm
    if text is not None:
        if joint:
            tq, tk = rms(attn.norm_added_q, heads(lin(attn.add_q_proj, text), h)), rms(attn.norm_added_k, heads(lin(attn.add_k_proj, text), h))
            tv = heads(lin(attn.add_v_proj, text), h)
        else:  # single-stream: the same projections for text
            tq, tk = rms(attn.norm_q, heads(lin(attn.to_q, text), h)), rms(attn.norm_k, heads(lin(attn.to_k, text), h))
            tv = heads(lin(attn.to_v, text), h)
        tq, tk = rope(tq, cos[:T], sin[:T]), rope(tk, cos[:T], sin[:T])
        keys, values = torch.cat([km, tk], 2), torch.cat([vm, tv], 2)
    s = q.shape[-1] ** -0.5
    assert sets["agent_r"] is not None  # the settings of these tests use agents
    a = heads(ref_merge(unheads(q), sets, sets["agent_r"]), h)
    agent_v = torch.einsum("bhaj,bhjd->bhad", (torch.einsum("bhad,bhjd->bhaj", a, keys) * s).softmax(-1), values)
    img = torch.einsum("bhia,bhad->bhid", (torch.einsum("bhid,bhad->bhia", qm, a) * s ** K_SCALE2).softmax(-1), agent_v)
    img = unheads(img + K_SHORTCUT * vm)
    if hasattr(attn, "to_out") and not getattr(attn, "pre_only", False):
        img = lin(attn.to_out[0], img)
    img = ref_unmerge(img, sets)
    if text is None:
        return img, None
    txt = unheads(torch.einsum("bhij,bhjd->bhid", (torch.einsum("bhid,bhjd->bhij", tq, keys) * s).softmax(-1), values))
    return img, txt


class RefProcessor:
    """The reference as a diffusers processor; ``box["x"]`` holds the block input (the merge metric)."""

    def __init__(self, box, grid, kind, wan):
        self.box, self.grid, self.kind, self.wan = box, grid, kind, wan

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary=None):
        if self.wan:
            cos, sin = (f[0, :, 0] for f in rotary)  # (1, N, 1, d) -> (N, d)
        else:
            cos, sin = rotary
        if self.kind == "joint":
            img, txt = ref_attention(attn, self.box["x"], hidden_states, self.grid, encoder_hidden_states, cos, sin, joint=True, wan=False)
            return img, lin(attn.to_add_out, txt)
        if self.kind == "single":
            n = self.box["x"].shape[1]
            T = hidden_states.shape[1] - n
            img, txt = ref_attention(attn, self.box["x"], hidden_states[:, T:], self.grid, hidden_states[:, :T], cos, sin,
                                     joint=False, wan=False)
            return torch.cat([txt, img], 1)
        img, _ = ref_attention(attn, self.box["x"], hidden_states, self.grid, None, cos, sin, joint=False, wan=True)
        return img


def install_reference(model, kind):
    """Reference processors on the layers AgentSD patches, block pre-hooks keeping the block input."""
    handles = []
    if kind == "flux":
        blocks = [(b, "joint") for b in model.transformer_blocks] + [(b, "single") for b in model.single_transformer_blocks]
    else:
        blocks = [(b, "self") for b in model.blocks]
    for block, layer_kind in blocks:
        box = {}
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, box=box: box.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        attn = block.attn if kind == "flux" else block.attn1
        attn.set_processor(RefProcessor(box, GRIDS[kind], layer_kind, kind == "wan"))
    return handles


def run_reference(model, kind, install=install_reference):
    """The model's output with the reference installed by ``install`` (removed afterwards)."""
    handles = install(model, kind)
    try:
        return run(model, kind)
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- tests
def test_flux_and_wan_are_supported():
    assert {"FluxTransformer2DModel", "WanTransformer3DModel"} <= set(supported_classes())
    with pytest.raises(TypeError, match="FluxTransformer2DModel, WanTransformer3DModel"):
        apply_agentsd(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", list(MODELS))
def test_patched_for_real_and_removed_bit_for_bit(kind):
    model = MODELS[kind]()
    stock = run(model, kind)
    state = apply_agentsd(model, sx=2, sy=2)
    patched = run(model, kind)
    assert state.calls["agent"] == 2 and state.calls["stock"] == 0, dict(state.calls)  # one call per block
    assert (patched - stock).abs().max() > 1e-3
    remove_agentsd(model)
    assert torch.equal(run(model, kind), stock)


@pytest.mark.parametrize("kind", list(MODELS))
def test_matches_independent_reference(kind):
    model = MODELS[kind]()
    stock = run(model, kind)
    state = apply_agentsd(model, sx=2, sy=2, use_rand=False)
    ours = run(model, kind)
    assert state.calls["agent"] == 2
    remove_agentsd(model)
    ref = run_reference(model, kind)
    assert (ref - stock).abs().max() > 1e-3  # the reference is not the stock model
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", list(MODELS))
def test_off_settings_are_the_stock_model(kind):
    model = MODELS[kind]()
    stock = run(model, kind)
    state = apply_agentsd(model, AgentSDConfig([Rule(AgentSDSettings(sx=2, sy=2), steps=(1, None))]))
    assert torch.equal(run(model, kind), stock) and state.calls["agent"] == 0  # step 0 is outside the rule
    state = apply_agentsd(model, AgentSDConfig([Rule(None, blocks="first:1"), Rule(AgentSDSettings(sx=2, sy=2))]))
    partly = run(model, kind)
    assert state.calls["agent"] == 1 and not torch.equal(partly, stock)
    remove_agentsd(model)


@pytest.mark.parametrize("kind", list(MODELS))
def test_todo_runs_on_the_grid(kind):
    model = MODELS[kind]()
    stock = run(model, kind)
    state = apply_agentsd(model, method="todo", todo_factor=2)
    out = run(model, kind)
    assert state.calls["todo"] == 2 and (out - stock).abs().max() > 1e-4
    remove_agentsd(model)


def test_flux_grid_mismatch_is_an_error_not_a_fallback():
    model = tiny_flux()
    apply_agentsd(model, sx=2, sy=2)
    kw = inputs("flux")
    kw["img_ids"] = kw["img_ids"].flip(0)[:-1]  # one id short: no grid for the tokens
    kw["hidden_states"] = kw["hidden_states"][:, :-1]
    with pytest.raises(RuntimeError, match="token grid"), torch.no_grad():
        model(**kw)


def test_every_supported_class_has_a_patched_for_real_test():
    """Every class AgentSD supports is built by one of the 'patched for real' tests (here or in test_diffusion_dit)."""
    import test_diffusion_dit

    built = {type(factory()).__name__ for factory in list(test_diffusion_dit.MODELS.values()) + list(MODELS.values())}
    assert set(supported_classes()) <= built, set(supported_classes()) - built


def test_docs_snippet_runs(capsys):
    """The python example of docs/agentsd_dit.md runs and patches both Flux blocks."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "agentsd_dit.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    exec(compile(code, "agentsd_dit.md", "exec"), {})
    assert "{'agent': 2}" in capsys.readouterr().out


def test_two_denoisers_of_one_pipeline_are_both_patched_and_counted():
    """Wan 2.2 pipelines keep a second (low-noise) expert in ``transformer_2``: both are patched and
    ``agentsd_calls`` adds their counts."""
    from types import SimpleNamespace

    from agent_attention.diffusion.patch import agentsd_calls, get_agentsd_state

    pipe = SimpleNamespace(transformer=tiny_wan(), transformer_2=tiny_wan())
    apply_agentsd(pipe, sx=2, sy=2)
    run(pipe.transformer, "wan")
    run(pipe.transformer_2, "wan")
    assert get_agentsd_state(pipe.transformer_2) is not None
    assert agentsd_calls(pipe, clear=True) == {"agent": 4}
    assert agentsd_calls(pipe) == {}
    remove_agentsd(pipe)
    assert get_agentsd_state(pipe.transformer_2) is None

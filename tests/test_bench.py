"""Benchmarks: the measuring helpers, `bench op` / `bench models` end to end on tiny sizes, and
torch.compile on the agent attention module and on every model family."""
import json

import pytest
import torch

from agent_attention import AgentAttention, agent_attention
from agent_attention.bench import common
from agent_attention.commands.bench import main as bench_main
from agent_attention.bench.op import make_inputs, straightforward_agent_attention

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAMILIES = ["agent_deit_t", "agent_pvt_t", "agent_swin_t", "agent_cswin_t"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers
def test_cpu_peak_memory_replays_allocations_in_order():
    mb = 2**20

    def sequential():  # 1 MB, freed, then 1 MB: peak 1 MB
        a = torch.ones(mb // 4)
        del a
        return torch.ones(mb // 4)

    def overlapping():  # a, b and a + b alive together: peak 3 MB
        a, b = torch.ones(mb // 4), torch.ones(mb // 4)
        return a + b

    dev = torch.device("cpu")
    assert common.peak_memory(sequential, dev) == pytest.approx(mb, rel=0.01)
    assert common.peak_memory(overlapping, dev) == pytest.approx(3 * mb, rel=0.01)


def test_time_round_robin_and_slope():
    calls = {"a": 0, "b": 0}

    def fa():
        calls["a"] += 1

    def fb():
        calls["b"] += 1
        return torch.ones(64).sum()

    t = common.time_round_robin({"a": fa, "b": fb}, torch.device("cpu"), repeats=3, min_repeat_s=0.0)
    assert set(t) == {"a", "b"} and all(len(v.samples) == 3 and v.median > 0 for v in t.values())
    assert calls == {"a": 4, "b": 4}  # one estimate call + three rounds
    assert common.loglog_slope([10, 100, 1000], [3, 300, 30000]) == pytest.approx(2.0)
    assert common.loglog_slope([10], [1]) is None
    with pytest.raises(ValueError, match="repeats"):
        common.time_round_robin({"a": fa}, torch.device("cpu"), repeats=0)


def test_rounds_alternate_direction():
    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    common.time_round_robin(fns, torch.device("cpu"), repeats=3, min_repeat_s=0.0, warmed=False)
    assert order[3:] == list("abc") + list("cba") + list("abc")  # after the three estimate calls


def test_straightforward_baseline_equals_agent_attention():
    t = make_inputs(12, batch=3, dim=32, heads=2, agents=9, window=8, dtype=torch.float64, device=torch.device("cpu"))
    assert t["agent_bias"].shape == (1, 2, 9, 144) and t["query_bias"].shape == (1, 2, 144, 9)
    ref = straightforward_agent_attention(t["q"], t["k"], t["v"], t["agents"], t["agent_bias"], t["query_bias"], t["scale"])
    out = agent_attention(t["q"], t["k"], t["v"], t["agents"], agent_bias=t["agent_bias"],
                          query_bias=t["query_bias"], scale=t["scale"])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- commands
def test_bench_op_tiny_writes_table_and_plot(tmp_path, capsys):
    rc = bench_main(["op", "--sizes", "8", "16", "--agents", "9", "--repeats", "1", "--threads", "1",
                     "--max-seconds", "0.1", "--bias", "both", "--backward", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    for text in ("16×16", "op/math", "sdpa/op", "op/floor", "forward + backward, with agent biases",
                 "forward, without agent biases", "never slower than math, fwdbwd"):
        assert text in printed
    assert (tmp_path / "op.png").read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "op.md").read_text()
    assert "8×8" in md and "Machine:" in md and "### Goals" in md
    records = json.loads((tmp_path / "op.json").read_text())["records"]
    methods = ("agent", "math", "straightforward", "sdpa", "floor")
    assert {(r["side"], r["method"], r["bias"], r["pass"]) for r in records} == {
        (s, m, b, p) for s in (8, 16) for m in methods for b in (True, False) for p in ("fwd", "fwdbwd")}
    assert all(r["seconds"] > 0 and r["peak_bytes"] >= 0 for r in records)
    # the output of each call is counted: at least B·h·N·d·4 bytes (the floor copies into a preallocated buffer)
    assert all(r["peak_bytes"] >= r["tokens"] * 64 * 4 for r in records if r["method"] != "floor")
    assert max(r.get("max_abs_diff_vs_math", 0) for r in records) < 1e-5


def test_bench_op_functions_agree_and_floor_copies_operands():
    from agent_attention.bench.op import functions

    t = make_inputs(8, batch=2, dim=32, heads=2, agents=9, window=8, dtype=torch.float64, device=torch.device("cpu"))
    for bias in (True, False):
        fwd = functions(t, ("agent", "math", "straightforward", "floor"), bias, backward=False)
        torch.testing.assert_close(fwd["agent"](), fwd["math"]())
        torch.testing.assert_close(fwd["straightforward"](), fwd["math"]())
        operands = [t[n] for n in ("q", "k", "v", "agents") + (("agent_bias", "query_bias") if bias else ())]
        assert fwd["floor"]().numel() == sum(x.numel() for x in operands)
        bwd = functions(t, ("agent", "math"), bias, backward=True)
        for ga, gm in zip(bwd["agent"](), bwd["math"]()):
            torch.testing.assert_close(ga, gm)


def test_bench_op_goal_lines():
    from agent_attention.bench.op_report import goals

    def rec(method, seconds, side=128, bias=True, ps="fwd"):
        return {"side": side, "tokens": side * side, "method": method, "bias": bias, "pass": ps, "agents": 49,
                "seconds": seconds}

    lines = goals([rec("agent", 2.0), rec("math", 1.0), rec("sdpa", 100.0), rec("floor", 1.0)])
    assert "missed by 2.00×" in lines[0] and "sdpa/op 50×" in lines[1] and "missed by 2.00×" in lines[1]
    assert "op/floor 2.00×" in lines[2] and lines[2].endswith("met")


def test_every_bench_option_has_help_without_markup():
    import argparse

    from agent_attention.bench import amp_accuracy, gpu, models, op, sd

    for mod in (op, models, sd, amp_accuracy, gpu):
        parser = mod.build_parser()
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, (mod.__name__, action.option_strings)
        text = parser.format_help()
        assert "`" not in text and ":func:" not in text, (mod.__name__, text)


def test_bench_op_skips_over_budget(tmp_path, capsys):
    rc = bench_main(["op", "--sizes", "8", "--repeats", "1", "--threads", "1", "--mem-budget-gb", "0",
                     "--no-plot", "--out", str(tmp_path)])
    assert rc == 0
    assert "skipped (would need" in (tmp_path / "op.md").read_text()
    assert not (tmp_path / "op.png").exists()


def test_bench_dispatch_and_errors(capsys):
    assert bench_main(["--help"]) == 0
    assert "models" in capsys.readouterr().out
    assert bench_main(["nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert bench_main(["op", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "--threads must be positive" in err and len(err.strip().splitlines()) == 1
    assert bench_main(["op", "--dim", "30", "--heads", "4"]) == 2


def test_bench_models_tiny(tmp_path, capsys):
    rc = bench_main(["models", "--models", "agent_pvt_t", "--sizes", "64", "80", "--batch", "2", "--amp", "none",
                     "bf16", "--repeats", "1", "--threads", "1", "--max-seconds", "1", "--out", str(tmp_path)])
    assert rc == 0
    records = json.loads((tmp_path / "models.json").read_text())["records"]
    # the first size at every batch and mode, the second at the sweep batch (1), inference only
    assert {(r["size"], r["batch"], r["mode"]) for r in records} == {(64, 2, "infer"), (64, 2, "train"), (80, 1, "infer")}
    assert {(r["variant"], r["amp"]) for r in records} == {
        (v, a) for v in ("agent", "official", "softmax") for a in ("none", "bf16")}
    assert {r["timm_model"] for r in records if r["variant"] == "softmax"} == {"pvt_v2_b1"}
    assert all(r["images_per_s"] > 0 and r["peak_bytes"] > 0 for r in records)
    # the baseline computes the same logits (fp32: to rounding; bf16: to bf16 precision)
    diffs = {r["amp"]: r["max_abs_diff_vs_agent"] for r in records if r["variant"] == "official" and r["mode"] == "infer"}
    assert diffs["none"] < 1e-5 and diffs["bf16"] < 0.1
    # a training step allocates at least the gradients of every parameter (fp32)
    train = [r for r in records if r["mode"] == "train" and r["variant"] == "agent"]
    assert all(r["peak_bytes"] >= 4 * r["params"] for r in train)
    assert (tmp_path / "models.png").read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "models.md").read_text()
    for title in ("Inference, fp32", "Inference, bf16 autocast", "Training step (forward + backward + AdamW), fp32",
                  "agent/official", "mem official/agent", "agent bf16/fp32"):
        assert title in md
    assert bench_main(["models", "--models", "agent_nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert bench_main(["models", "--sizes", "64", "--train-sizes", "96"]) == 2
    assert "--train-sizes" in capsys.readouterr().err


def test_bench_models_plan():
    from agent_attention.bench.models import build_parser, plan

    args = build_parser().parse_args(["--sizes", "224", "384", "--batch", "1", "8", "--train-sizes", "224", "384"])
    assert plan(args) == [(224, 1, "infer"), (224, 1, "train"), (224, 8, "infer"), (224, 8, "train"),
                          (384, 1, "infer"), (384, 1, "train")]


# ----------------------------------------------------------------------------- torch.compile
def test_compile_agent_attention_full_graph():
    """Dynamo captures the module in one graph (no graph break) and gives the same result."""
    torch._dynamo.reset()
    m = AgentAttention(32, num_heads=2, agent_num=9, window=8).eval()
    x = torch.randn(2, 8 * 10, 32)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, (8, 10)), m(x, (8, 10)))


@pytest.mark.slow
def test_compile_agent_attention_inductor():
    torch._dynamo.reset()
    m = AgentAttention(32, num_heads=2, agent_num=9, window=8).eval()
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m)(x, (8, 8)), m(x, (8, 8)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_compile_every_model_full_graph(name):
    from agent_attention.models import create_model

    torch._dynamo.reset()
    model = create_model(name, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=True)(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_compile_every_model_inductor(name):
    from agent_attention.models import create_model

    torch._dynamo.reset()
    model = create_model(name, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), atol=1e-4, rtol=1e-3)


def test_models_goal_lines_state_met_or_missed_by_a_factor():
    from agent_attention.bench.models_report import goals

    def rec(model, batch, variant, ips, mem, mode="infer"):
        return dict(model=model, size=224, batch=batch, mode=mode, variant=variant, amp="none",
                    images_per_s=ips, peak_bytes=mem)

    recs = [rec("a", 1, "agent", 12.0, 100), rec("a", 1, "official", 10.0, 90),
            rec("b", 1, "agent", 23.0, 100), rec("b", 1, "official", 10.0, 100)]
    lines = goals(recs)
    assert len(lines) == 1 and "met (range 1.20-2.30×, worst a batch 1)" in lines[0]
    train = [dict(r, mode="train") for r in recs]
    lines = goals(train)
    assert "met (range" in lines[0] and "missed: ours needs 1.111× the baseline's" in lines[1]
    slow = [rec("a", 8, "agent", 10.0, 1), rec("a", 8, "official", 10.0, 1)]
    assert "missed by 1.15×" in goals(slow)[0] and goals(slow, size=384) == []


def test_sd_combine_rows_and_goals(tmp_path):
    import json

    from agent_attention.bench import sd_combine

    def run(size, dtype, batch, base, **sec):
        recs = [dict(size=size, method="baseline", ratio=0.0, seconds=base)]
        recs += [dict(size=size, method=m, ratio=0.4, seconds=s) for m, s in sec.items()]
        return dict(machine={}, args=dict(dtype=dtype, batch=batch, repeats=2), records=recs)

    runs = [run(512, "fp32", 1, 13.0, tomesd=12.0, todo=11.0, agentsd=10.0, **{"agentsd-late": 12.5}),
            run(1024, "fp32", 1, 36.0, tomesd=25.0, todo=21.0, agentsd=20.0, **{"agentsd-late": 24.0})]
    table = sd_combine.rows(runs)
    assert [r["size"] for r in table] == [512, 1024]
    assert abs(table[0]["speedup"]["schedule"] - 13.0 / (0.4 * 10.0 + 0.6 * 12.5)) < 1e-12
    lines = sd_combine.goals(table)
    assert any("512² fp32, AgentSD 1st phase ≥ 1.3× the baseline: met (batch 1: 1.30×)" in x for x in lines)
    assert any("512² fp32, AgentSD schedule ≥ 1.2× the baseline: missed by 1.06×" in x for x in lines)
    assert any("1024² fp32, AgentSD 1st phase ≥ 1.8× the baseline: met" in x for x in lines)
    assert any("faster than ToDo" in x and "met (range 1.05-1.10×)" in x for x in lines)
    dirs = []
    for i, r in enumerate(runs):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "sd.json").write_text(json.dumps(r))
        dirs.append(str(d))
    assert sd_combine.main(dirs + ["--out", str(tmp_path / "out"), "--no-plot"]) == 0
    assert "### Goals" in (tmp_path / "out" / "sd.md").read_text()

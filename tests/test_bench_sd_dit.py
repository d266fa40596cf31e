"""``bench sd --model pixart|sd3|flux|wan`` on toy widths, and its report's goal lines."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model,extra", [("flux", ["--sizes", "128"]), ("wan", ["--frames", "9", "--video-size", "64", "64", "--memory"])])
def test_bench_sd_dit_smoke(tmp_path, capsys, model, extra):
    from agent_attention.bench.sd import main

    rc = main(["--model", model, "--tiny", "--repeats", "1", "--no-warmup", "--out", str(tmp_path)] + extra)
    assert rc == 0
    data = json.loads((tmp_path / f"sd_{model}_fp32.json").read_text())
    methods = {r["method"]: r for r in data["records"]}
    assert set(methods) == {"baseline", "todo", "agentsd", "agentsd+merge"}
    assert methods["agentsd"]["calls"].get("agent", 0) > 0 and methods["todo"]["calls"].get("todo", 0) > 0
    assert not methods["agentsd"]["calls"].get("merged mlp") and methods["agentsd+merge"]["calls"].get("merged mlp", 0) > 0
    kinds = {"flux": {"transformer_blocks", "single_transformer_blocks"}, "wan": {"blocks"}}[model]
    assert all(set(r["blocks"]) == kinds and r["seconds"] > 0 for r in data["records"])
    out = capsys.readouterr().out
    assert "AgentSD" in out and "peak MiB" in out
    if "--memory" in extra:  # the memory pass: every method has a peak (toy widths: no ordering to expect)
        assert all(r["peak_bytes"] > 0 for r in data["records"])
    else:
        assert all(r["peak_bytes"] is None for r in data["records"])


def _run(title, size, base, agent, block_base, block_agent):
    rec = lambda m, s, b: dict(model="m", title=title, size=size, tokens=1, dtype="fp32", method=m, seconds=s,  # noqa: E731
                               cpu_seconds=s, blocks={"blocks": dict(seconds=b, cpu_seconds=b)}, calls={})
    return {"records": [rec("baseline", base, block_base), rec("agentsd", agent, block_agent)]}


def test_goal_lines_say_met_or_missed_by_how_much(tmp_path):
    pytest.importorskip("matplotlib")
    from agent_attention.bench.sd_dit_report import goal_lines, main

    runs = [_run("X", "2048²", 10.0, 4.0, 9.0, 2.0), _run("V", "480×832×81", 10.0, 4.0, 8.0, 2.0), _run("X", "1024²", 3.0, 2.0, 2.0, 1.0)]
    lines = goal_lines(runs)
    assert "goal: per transformer block ≥ 3× at 2048²: X 2048² fp32 AgentSD block: 4.50× — met" in lines
    assert "goal: per transformer block ≥ 5× on the 81-frame video: V 480×832×81 fp32 AgentSD block: 4.00× — MISSED by 1.25×" in lines
    assert "goal: reduced model's whole forward ≥ 2× at 2048²: X 2048² fp32 AgentSD forward: 2.50× — met" in lines
    assert any(line.startswith("report: 1024² X fp32 AgentSD: forward 1.50×, block 2.00×") for line in lines)
    files = []
    for i, run in enumerate(runs):
        f = tmp_path / f"r{i}.json"
        f.write_text(json.dumps(run))
        files.append(str(f))
    assert main(files + ["--out", str(tmp_path)]) == 0
    assert "MISSED by 1.25×" in (tmp_path / "sd_dit.md").read_text() and (tmp_path / "sd_dit.png").stat().st_size > 0


def test_a_later_run_replaces_the_same_case():
    from agent_attention.bench.sd_dit_report import goal_lines

    old, new = _run("X", "2048²", 10.0, 4.0, 9.0, 2.0), _run("X", "2048²", 10.0, 5.0, 9.0, 3.0)
    lines = goal_lines([old, new])
    assert "goal: per transformer block ≥ 3× at 2048²: X 2048² fp32 AgentSD block: 3.00× — met" in lines
    assert not any("4.50×" in line for line in lines) and len([x for x in lines if "block" in x]) == 1

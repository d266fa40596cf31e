"""Params / FLOPs report: counts match the official manifests, counting is honest about fused kernels."""
from __future__ import annotations

import csv
import io

import pytest
import torch
from torch import nn

from agent_attention import AgentAttention
from agent_attention.models import report
from agent_attention.models.registry import ALIASES, PAPER_TOP1
from reference_utils import FULL_VARIANTS, manifest


@pytest.fixture(scope="module")
def official_rows():
    return report.collect("official")  # builds every released model on the meta device


def test_every_official_model_with_exact_params(official_rows):
    assert sorted(PAPER_TOP1) == FULL_VARIANTS
    assert [r.name for r in official_rows] == list(PAPER_TOP1)
    for r in official_rows:
        m = manifest(r.name)
        assert r.params == m["num_params"], r.name
        assert r.input_size == (3, m["img_size"], m["img_size"])
        assert r.paper_top1 == PAPER_TOP1[r.name] and r.flops is None
        assert set(r.aliases) == {a for a, o in ALIASES.items() if o == r.name}


def test_cli_csv(official_rows, monkeypatch, capsys):
    seen = {}

    def fake_collect(names, flops=False, stream=None):
        seen.update(names=names, flops=flops)
        return official_rows

    monkeypatch.setattr(report, "collect_with_progress", fake_collect)
    from agent_attention.commands.models import main

    assert main(["--format", "csv", "--task", "cls", "--names", "all", "--no-flops"]) == 0
    assert seen == {"names": "all", "flops": False}
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["model"] for r in rows] == list(PAPER_TOP1)
    swin = rows[list(PAPER_TOP1).index("agent_swin_tiny")]
    assert swin == {"model": "agent_swin_tiny", "aliases": "agent_swin_t", "input": "224x224",
                    "params (M)": "28.90", "paper top-1 (%)": "82.6"}
    assert main(["--markdown"]) == 0 and seen["flops"] is True
    assert main(["--format", "csv", "--task", "cls"]) == 0 and seen["flops"] is True  # GFLOPs by default
    assert main(["--format", "html"]) == 2


@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_pvt_tiny", "agent_swin_tiny", "agent_cswin_tiny"])
def test_flops_match_official_fvcore(name):
    by_op = report.count_flops_by_op(report._build_meta(name))
    official = manifest(name)["flops_fvcore_b1"]
    assert sum(by_op.values()) == pytest.approx(official, rel=0.03)
    # matrix products and convolutions alone are nearly everything
    core = sum(n for op, n in by_op.items() if op in ("mm", "addmm", "bmm", "convolution"))
    assert 0.97 * official < core < sum(by_op.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_VARIANTS)
def test_flops_all_variants(name):
    assert report.model_stats(name, flops=True).flops == pytest.approx(manifest(name)["flops_fvcore_b1"], rel=0.03)


class _TokenAttention(nn.Module):
    """Image (1, C, H, W) -> tokens -> one AgentAttention, for an analytical FLOP count."""

    def __init__(self, dim: int, heads: int, agents: int) -> None:
        super().__init__()
        self.attn = AgentAttention(dim, num_heads=heads, agent_num=agents, dwc=False, agent_bias=False)

    def forward(self, x):
        B, C, H, W = x.shape
        return self.attn(x.flatten(2).transpose(1, 2), (H, W))


def test_agent_attention_is_counted():
    dim, heads, agents, H, W = 32, 4, 9, 6, 8
    N = H * W
    qkv, proj = N * dim * 3 * dim, N * dim * dim
    attention = 4 * N * agents * dim  # agents·Kᵀ, ·V, Q·agentsᵀ, ·V_A (all heads together)
    pool = N * dim  # fvcore counts adaptive_avg_pool2d as one FLOP per input element
    assert report.count_flops(_TokenAttention(dim, heads, agents), (dim, H, W)) == qkv + proj + attention + pool
    with torch.device("meta"):
        meta_model = _TokenAttention(dim, heads, agents)
    assert report.count_flops(meta_model, (dim, H, W)) == qkv + proj + attention + pool


class _Softmax(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)  # a CPU parameter: the input is a real CPU tensor

    def forward(self, x):  # (1, C, H, W): 2 heads of softmax attention over the H·W tokens
        t = self.proj(x.flatten(2).transpose(1, 2)).unflatten(-1, (2, -1)).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(t, t, t)


def test_fused_softmax_attention_is_counted():
    C, H, W = 16, 5, 6
    N = H * W
    model = _Softmax(C)
    expected = N * C * C + 2 * N * N * C
    assert report.count_flops(model, (C, H, W)) == expected
    # why the MATH backend is forced: the fused CPU kernel hides its products from FlopCounterMode
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, C, H, W))
    assert fc.get_total_flops() // 2 < expected


def test_fvcore_extra_handlers():
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)).eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):  # (1, 8, 2, 3) -> tokens (6, 8)
            y = torch.nn.functional.interpolate(x, size=(4, 6), mode="bilinear")
            return self.body(y.flatten(2).transpose(1, 2))

    # layer norm 5/elt, bilinear 4/output elt, linear 8*4 per token
    assert report.count_flops(Wrap(), (8, 2, 3)) == 5 * 24 * 8 + 4 * 8 * 24 + 24 * 8 * 4
    assert report.count_flops(Wrap(), (8, 2, 3), fvcore_extras=False) == 24 * 8 * 4


def test_formats():
    rows = [report.ModelStats("agent_x", ["ax"], (3, 224, 224), 28_902_964, 4_527_521_280, 82.6),
            report.ModelStats("agent_y", [], (3, 384, 384), 1_000_000, None, None)]
    md = report.format_rows(rows, "markdown").splitlines()
    assert md[0] == "| model | aliases | input | params (M) | GFLOPs | paper top-1 (%) |"
    assert md[2] == "| agent_x | ax | 224×224 | 28.90 | 4.53 | 82.6 |"
    assert len(md) == 4
    table = report.format_rows(rows, "table", aliases=False).splitlines()
    assert table[0].split() == ["model", "input", "params", "(M)", "GFLOPs", "paper", "top-1", "(%)"]
    assert "28.90" in table[2] and "4.53" in table[2]
    with pytest.raises(ValueError, match="format"):
        report.format_rows(rows, "html")
    with pytest.raises(ValueError, match="names"):
        report.collect("some")


@pytest.mark.parametrize("module", ["agent_deit", "agent_pvt", "agent_swin", "agent_cswin"])
def test_family_modules_star_import_defines_every_listed_name(module):
    namespace: dict = {}
    exec(f"from agent_attention.models.{module} import *", namespace)  # noqa: S102
    mod = __import__(f"agent_attention.models.{module}", fromlist=["__all__"])
    assert set(mod.__all__) <= set(namespace)
    assert any(name.endswith("_t") for name in mod.__all__)  # the short aliases are exported

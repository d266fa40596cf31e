"""The benchmark plots show what was measured: no empty memory panel under ``--no-memory``, no
legend over the curves, modes measured at one input size drawn against the batch size."""
from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch):
    from agent_attention.bench import common

    drawn = []
    monkeypatch.setattr(common, "save_figure", lambda fig, path: drawn.append(fig) or path)
    return drawn


def _sd_records(memory: bool):
    recs = [dict(size=64, method="baseline", ratio=None, seconds=1.0, cpu_seconds=1.8, peak_bytes=2**20 * memory)]
    for m, t in (("tomesd", 0.9), ("agentsd", 0.8)):
        recs.append(dict(size=64, method=m, ratio=0.4, seconds=t, cpu_seconds=1.5 * t, peak_bytes=2**19 * memory))
    return recs


@pytest.mark.parametrize("memory", [False, True])
def test_bench_sd_plot_one_ratio(figures, tmp_path, memory):
    from agent_attention.bench.sd import plot

    plot(_sd_records(memory), ["tomesd", "agentsd"], tmp_path / "sd.png", "t")
    (fig,) = figures
    axes = [ax for ax in fig.axes if ax.has_data()]
    assert len(axes) == (2 if memory else 1)  # no empty memory panel under --no-memory
    assert all(ax.get_legend() is None for ax in fig.axes) and fig.legends  # the legend is outside the axes
    ax = axes[0]
    lo, hi = ax.get_xlim()
    assert lo < 0.4 < hi and hi - lo <= 0.3  # the one ratio in the middle of a narrow axis
    agentsd = [ln for ln in ax.get_lines() if ln.get_label() == "AgentSD" or "AgentSD" in ln.get_label()]
    assert agentsd and agentsd[0].get_xydata().tolist() == [[0.4, 0.8]]


def test_bench_sd_combine_legend_outside(figures, tmp_path):
    from agent_attention.bench import sd_combine

    table = [dict(size=512, dtype="fp32", batch=1, speedup={m: 1.1 for m in sd_combine.COLUMNS})]
    sd_combine.plot(table, tmp_path / "sd.png", "t")
    (fig,) = figures
    assert all(ax.get_legend() is None for ax in fig.axes) and fig.legends


def test_bench_models_plot_one_size_modes_against_batch(figures, tmp_path):
    from agent_attention.bench.models_report import plot

    recs = []
    for mode, sizes in (("infer", (224, 384)), ("train", (224,))):
        for size in sizes:
            for batch in (1, 8):
                for variant in ("agent", "official"):
                    recs.append(dict(model="m", size=size, batch=batch, mode=mode, variant=variant, amp="none",
                                     images_per_s=10.0 * batch / size, peak_bytes=2**20 * batch))
    plot(recs, tmp_path / "models.png", "t")
    (fig,) = figures
    labels = [ax.get_xlabel() for ax in fig.axes if ax.has_data()]
    assert labels[:2] == ["input size (pixels per side)"] * 2
    assert labels[2:] == ["batch size (input 224²)"] * 2  # not a column of points at 224 on a 224-384 axis
    assert all(ax.get_legend() is None for ax in fig.axes) and fig.legends

"""The command line: eval/show read our checkpoints, eval on a single split, --amp, progress bars."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_attention.cli import main as cli

TINY_MODEL = "{patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2, agent_num: 4}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli(["train", "--model-kwargs", TINY_MODEL, "--img-size", "16", "--train-subset", "16", "--val-subset", "8",
                "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--threads", "1", "--no-progress",
                "--print-freq", "0", "--num-workers", "0", "--output", str(out)]) == 0
    return out


def _folder(root: Path, split: str, classes: int) -> Path:
    from PIL import Image

    for c in range(classes):
        (root / split / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 20 * c, 0)).save(root / split / f"c{c}" / f"{i}.png")
    return root


def test_eval_single_split_classes_from_checkpoint(run_dir, tmp_path, capsys):
    data = _folder(tmp_path / "data", "test", 10)  # no train/, no val/
    res = tmp_path / "r.json"
    assert cli(["eval", "--checkpoint", str(run_dir / "last.pth"), "--data", str(data), "--split", "test",
                "--no-throughput", "--threads", "1", "--num-workers", "0", "--json", str(res)]) == 0
    r = json.loads(res.read_text())
    assert r["samples"] == 20 and r["model"] == "agent_deit_tiny"
    capsys.readouterr()
    # more class folders than the checkpoint's classifier: one-line runtime error
    big = _folder(tmp_path / "big", "val", 12)
    assert cli(["eval", "--checkpoint", str(run_dir / "model.safetensors"), "--data", str(big), "--no-throughput",
                "--threads", "1", "--num-workers", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "12 classes" in err[0] and "10" in err[0]


def test_eval_amp_bf16_on_cpu(run_dir, tmp_path):
    res = tmp_path / "r.json"
    assert cli(["eval", "--checkpoint", str(run_dir / "last.pth"), "--amp", "bf16", "--no-throughput",
                "--threads", "1", "--val-subset", "8", "--json", str(res)]) == 0
    assert json.loads(res.read_text())["amp"] == "bf16"


def test_check_amp_refuses_unsupported(monkeypatch):
    import torch

    from agent_attention.commands.eval import check_amp

    assert check_amp("none", torch.device("cpu")) is None
    assert check_amp("bf16", torch.device("cpu")) == torch.bfloat16

    class Off:
        _enabled = False

    monkeypatch.setattr(torch, "autocast", lambda *a, **k: Off())
    with pytest.raises(ValueError, match="not supported"):
        check_amp("fp16", torch.device("cpu"))


def test_show_reads_model_from_checkpoint(run_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert cli(["show", "--checkpoint", str(run_dir / "last.pth"), "--block", "1.0", "--agents", "0",
                "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert cli(["show", "--checkpoint", str(run_dir / "model.safetensors"), "--list-blocks"]) == 0
    assert "blocks.1.attn" in capsys.readouterr().out


def test_pretrained_and_checkpoint_exclude_each_other(run_dir, capsys):
    assert cli(["eval", "--pretrained", "--checkpoint", str(run_dir / "last.pth")]) == 2
    assert cli(["show", "--pretrained", "--checkpoint", str(run_dir / "last.pth")]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_progress_bar_only_on_a_terminal(capsys):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from agent_attention.train.evaluation import evaluate

    loader = DataLoader(TensorDataset(torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])), batch_size=2)
    res = evaluate(torch.nn.Linear(3, 3), loader, torch.device("cpu"), progress=True)
    assert res["samples"] == 6
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out  # not a TTY: no bar frames

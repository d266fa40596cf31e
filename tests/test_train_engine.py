"""The training engine end to end on tiny runs: outputs, exact resume after a kill, accumulation,
EMA, AMP, evaluation and plotting."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agent_attention.train.checkpointing import load_state
from agent_attention.commands.eval import main as eval_main
from agent_attention.commands.train import main as train_main

TINY_MODEL = "{patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2, agent_num: 4}"


def tiny(out: Path, *extra: str) -> list:
    return ["--model-kwargs", TINY_MODEL, "--img-size", "8", "--train-subset", "48", "--val-subset", "24",
            "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--threads", "1", "--no-progress",
            "--print-freq", "0", "--output", str(out), *extra]


def weights(path: Path, key: str = "model") -> dict:
    return load_state(path)[key]


def assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_tiny_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    assert train_main(tiny(out, "--plot", "--save-freq", "1", "--keep-ckpts", "1")) == 0
    names = {p.name for p in out.iterdir()}
    assert {"last.pth", "best.pth", "checkpoint-2.pth", "log.jsonl", "log.csv", "curves.png", "model.safetensors",
            "summary.json"} <= names
    assert "checkpoint-1.pth" not in names  # keep_ckpts=1
    assert not [n for n in names if n.endswith(".tmp")]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 100 for r in rows)
    assert (out / "log.csv").read_text().splitlines()[0].startswith("epoch,lr,train_loss")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_state(out / "last.pth")  # weights_only load: tensors and plain containers only
    assert state["epoch"] == 2 and state["step_in_epoch"] == 0 and state["global_step"] == 12
    assert state["config"]["model"] == "agent_deit_tiny" and isinstance(state["config"], dict)
    exported = load_file(str(out / "model.safetensors"))
    assert_same(exported, state["model"], atol=0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_top1"] == rows[-1]["val_top1"] and summary["ddp_max_param_diff"] == 0.0


RESUME_ARGS = ("--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.2", "--reprob", "0.5", "--model-ema",
               "--model-ema-decay", "0.9", "--batch-size", "4", "--accum-steps", "2", "--ckpt-every-steps", "2",
               "--no-export")


@pytest.mark.parametrize("kill_at", [9, 6])  # mid-epoch 2 / the last step of epoch 1 (before its checkpoint)
def test_kill_and_resume_matches_uninterrupted(tmp_path, kill_at):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert train_main(tiny(ref, *RESUME_ARGS)) == 0
    assert train_main(tiny(run, *RESUME_ARGS, "--stop-after-steps", str(kill_at))) == 137
    saved = load_state(run / "last.pth")
    assert saved["global_step"] < kill_at  # the kill lost work that the resumed run redoes
    assert train_main(tiny(run, *RESUME_ARGS, "--resume", "auto")) == 0
    assert_same(weights(run / "last.pth"), weights(ref / "last.pth"))
    assert_same(weights(run / "last.pth", "model_ema"), weights(ref / "last.pth", "model_ema"))
    a = [json.loads(x) for x in (ref / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    drop = ("epoch_time_s", "train_images_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b]


def test_hard_kill_of_a_process_then_resume(tmp_path):
    """SIGKILL a real training process at an arbitrary moment; the resumed run ends identical."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = tiny(run, "--ckpt-every-steps", "1", "--epochs", "3", "--no-export", "--drop-path", "0.1")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "agent_attention.cli", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "last.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "last.pth").exists()
    assert train_main(args + ["--resume", "auto"]) == 0
    assert train_main(tiny(ref, "--ckpt-every-steps", "1", "--epochs", "3", "--no-export", "--drop-path", "0.1")) == 0
    assert_same(weights(run / "last.pth"), weights(ref / "last.pth"))


def test_gradient_accumulation_equals_large_batch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--epochs", "1", "--drop-path", "0", "--no-export")
    assert train_main(tiny(a, *common, "--batch-size", "8")) == 0
    assert train_main(tiny(b, *common, "--batch-size", "4", "--accum-steps", "2")) == 0
    assert_same(weights(a / "last.pth"), weights(b / "last.pth"), atol=1e-5)


def test_amp_bf16_on_cpu(tmp_path):
    out = tmp_path / "amp"
    assert train_main(tiny(out, "--amp", "bf16", "--epochs", "1", "--no-export")) == 0
    row = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert row["train_loss"] == row["train_loss"]  # finite, not NaN


def test_eval_ours_and_official_layout(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(tiny(out, "--epochs", "1")) == 0
    row = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    res = tmp_path / "eval.json"
    common = ["--val-subset", "24", "--throughput-warmup", "1", "--throughput-iters", "2", "--threads", "1"]
    assert eval_main(["--checkpoint", str(out / "best.pth"), "--json", str(res), *common]) == 0
    r = json.loads(res.read_text())
    assert r["top1"] == pytest.approx(row["val_top1"]) and r["top5"] == pytest.approx(row["val_top5"])
    assert r["loss"] == pytest.approx(row["val_loss"], rel=1e-5)
    assert r["samples"] == 24 and r["throughput"]["images_per_s"] > 0
    # the exported safetensors carries the model name and kwargs in its metadata
    assert eval_main(["--checkpoint", str(out / "model.safetensors"), "--json", str(res), *common]) == 0
    assert json.loads(res.read_text())["loss"] == pytest.approx(row["val_loss"], rel=1e-5)
    # an official-style file: {'model', 'optimizer', 'max_accuracy', 'epoch', 'config'}, --model given
    official = tmp_path / "official.pth"
    torch.save({"model": {f"module.{k}": v for k, v in weights(out / "best.pth").items()}, "epoch": 1,
                "max_accuracy": 1.0, "config": {"MODEL": {"NAME": "x"}}}, official)
    assert eval_main(["--model", "agent_deit_tiny", "--recipe", "digits", "--model-kwargs", TINY_MODEL, "--img-size",
                      "8", "--checkpoint", str(official), "--json", str(res), "--no-throughput", *common]) == 0
    assert json.loads(res.read_text())["loss"] == pytest.approx(row["val_loss"], rel=1e-5)
    assert "top-1" in capsys.readouterr().out


def test_eval_clear_errors(tmp_path):
    assert eval_main(["--checkpoint", str(tmp_path / "missing.pth")]) == 2  # usage: a missing file
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"head.weight": torch.zeros(3, 3)}}, bad)
    assert eval_main(["--model", "agent_deit_tiny", "--model-kwargs", TINY_MODEL, "--img-size", "8", "--checkpoint",
                      str(bad), "--no-throughput", "--val-subset", "4"]) == 1  # runtime: does not fit


def test_plot_curves_from_log(tmp_path):
    from agent_attention.train.report import EpochLog, plot_curves

    log = EpochLog(tmp_path)
    for e in range(3):
        log.append({"epoch": e + 1, "lr": 1e-3 / (e + 1), "train_loss": 2 - e * 0.5, "val_loss": 2.1 - e * 0.5,
                    "val_top1": 30.0 * e, "val_top5": 50.0 + 10 * e})
    log.truncate(2)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2
    png = plot_curves(tmp_path / "log.jsonl", tmp_path / "c.png")
    assert png.stat().st_size > 1000


def test_finetune_at_a_new_resolution_and_repeated_aug(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    assert train_main(tiny(src, "--epochs", "1", "--no-export")) == 0
    # 8x8 -> 12x12 input: pos_embed and the agent row/column biases are resized by the loader
    assert train_main(tiny(dst, "--epochs", "1", "--img-size", "12", "--pretrained", str(src / "last.pth"),
                           "--repeated-aug", "3", "--no-export", "--warmup-epochs", "0")) == 0
    state = load_state(dst / "last.pth")
    assert state["model"]["pos_embed"].shape[1] == 1 + 9
    assert state["global_step"] == 6  # RepeatAugSampler keeps the epoch length (48 samples / batch 8)

"""DistributedDataParallel with 2 CPU processes (gloo) through torchrun, against one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from agent_attention.train.checkpointing import load_state
from agent_attention.commands.train import main as train_main

TINY_MODEL = "{patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2, agent_num: 4}"


def args(out, batch):
    # no stochastic depth / mixup: those draw per-rank randomness; augmentation is seeded per sample
    return ["--model-kwargs", TINY_MODEL, "--img-size", "8", "--train-subset", "48", "--val-subset", "20",
            "--batch-size", str(batch), "--epochs", "2", "--warmup-epochs", "1", "--drop-path", "0", "--threads", "1",
            "--no-progress", "--print-freq", "0", "--ckpt-every-steps", "2", "--output", str(out)]


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "agent_attention.cli", "train", *args(ddp, 4)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ddp_max_param_diff"] == 0.0  # replicas identical
    rows = [json.loads(x) for x in (ddp / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # logged once, by rank 0
    assert not [p for p in ddp.iterdir() if p.name.endswith(".tmp")]
    assert proc.stdout.count("done:") == 1  # rank 0 only
    assert "Grad strides do not match" not in proc.stderr  # the DWC weight gradients keep their strides
    state = load_state(ddp / "last.pth")
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's RNG state is kept

    # one process with the same total batch sees the same samples per step: same training
    assert train_main(args(single, 8)) == 0
    ref = load_state(single / "last.pth")["model"]
    for k, v in state["model"].items():
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=0, msg=k)
    single_rows = [json.loads(x) for x in (single / "log.jsonl").read_text().splitlines()]
    assert [r["val_top1"] for r in rows] == [r["val_top1"] for r in single_rows]  # sharded eval sums exactly

"""A 2-process DistributedDataParallel smoke test on CUDA (NCCL, bf16 autocast) when the machine has two
GPUs and the device tests run on CUDA (``--device cuda``); skipped otherwise (the CPU run with gloo
is tests/test_train_ddp.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

TINY_MODEL = "{patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2, agent_num: 4}"


def test_ddp_two_gpus_nccl(test_device, tmp_path):
    if test_device.type != "cuda":
        pytest.skip("the DDP device smoke test needs --device cuda")
    if torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL DDP needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "agent_attention.cli", "train", "--model-kwargs", TINY_MODEL, "--img-size", "32",
           "--train-subset", "64", "--val-subset", "16", "--batch-size", "8", "--epochs", "1",
           "--warmup-epochs", "0", "--drop-path", "0", "--device", "cuda", "--amp", "bf16", "--no-progress",
           "--print-freq", "0", "--output", str(out)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ddp_max_param_diff"] == 0.0  # replicas identical

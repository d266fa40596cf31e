"""Helpers of the device tests (tests/test_device_*.py): dtype-aware comparisons and tiny model configs.

Every device case compares what runs on the device against a CPU reference in float32/float64, with a
tolerance that fits the dtype the device computed in."""
from __future__ import annotations

import contextlib

import torch

# max |out - ref| / max(1, max |ref|) for one op or module. fp32 on CUDA: cuDNN convolutions use TF32.
OP_TOL = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 5e-3,
          ("cpu", torch.float16): 5e-3, ("cuda", torch.float16): 5e-3,
          ("cpu", torch.bfloat16): 3e-2, ("cuda", torch.bfloat16): 3e-2}
# mean |out - ref| / mean |ref| of a whole model's logits under autocast (errors accumulate over blocks)
MODEL_TOL = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# tiny configs of each family, one or two blocks per stage (the shapes of tests/test_export.py)
TINY_MODELS = {
    "agent_deit_tiny": dict(embed_dim=32, depth=2, num_heads=2, img_size=64, patch_size=16, agent_num=4, num_classes=7),
    "agent_pvt_tiny": dict(img_size=64, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1],
                           mlp_ratios=[2, 2, 2, 2], agent_num=[4, 9, 4, 4], num_classes=7),
    "agent_cswin_tiny": dict(img_size=64, embed_dim=16, depth=(1, 1, 2, 1), num_heads=(2, 2, 4, 4),
                             agent_num=[4, 9, 4, 4], split_size=(1, 2, 7, 7), num_classes=7),
    "agent_swin_tiny": dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=2,
                            agent_num=[4, 9, 4, 4], attn_type="AABB", num_classes=7),
}


def assert_close_scaled(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    """``max |out - ref| <= tol · max(1, max |ref|)`` (compared in float64 on the CPU), and ``out`` finite."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err, scale = (out - ref).abs().max().item(), max(1.0, ref.abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def assert_mean_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    """``mean |out - ref| <= tol · mean |ref|`` and ``out`` finite (for whole models in low precision)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape and torch.isfinite(out).all(), f"{what}: shape or non-finite values"
    err, scale = (out - ref).abs().mean().item(), ref.abs().mean().item()
    assert err <= tol * scale, f"{what}: mean error {err:.3g} > {tol:g} x {scale:.3g}"


def assert_same_direction(out: torch.Tensor, ref: torch.Tensor, min_cos: float, what: str = "") -> None:
    """Cosine similarity of two gradients (flattened) at least ``min_cos``."""
    a, b = out.detach().double().cpu().flatten(), ref.detach().double().cpu().flatten()
    assert torch.isfinite(a).all(), f"{what}: non-finite gradient"
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert cos >= min_cos, f"{what}: gradient cosine {cos:.4f} < {min_cos}"


def autocast(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` in ``dtype`` on the device (nothing for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

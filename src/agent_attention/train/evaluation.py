"""Model building, weight loading, top-1/top-5 evaluation and throughput."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum

__all__ = ["build_model", "amp_dtype", "autocast", "evaluate", "throughput"]


def build_model(name: str, num_classes: Optional[int], *, img_size: Optional[int] = None,
                drop_path: Optional[float] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                pretrained: bool = False) -> nn.Module:
    """An agent model by official name / alias, or any timm model. ``model_kwargs`` win over the
    other arguments (e.g. a recipe's ``model_kwargs: {img_size: 24}``); ``num_classes=None`` keeps
    the model's default head; ``pretrained`` loads the released weights (``timm.create_model``)."""
    import timm

    from ..models import create_model, list_models
    from ..models.registry import check_model_name

    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    if pretrained:
        kwargs["pretrained"] = True
    if drop_path is not None:
        kwargs.setdefault("drop_path_rate", drop_path)
    if name in list_models():
        if img_size:
            kwargs.setdefault("img_size", img_size)
        return create_model(name, **kwargs)
    check_model_name(name, see="`agent-attention models`")
    if img_size and "img_size" not in kwargs:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:  # a timm model without an img_size argument (CNNs)
            pass
    return timm.create_model(name, **kwargs)


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """``none`` -> None; ``bf16`` / ``fp16``; ``auto`` -> bf16 on CUDA when supported, else fp16; off on CPU."""
    if mode == "none":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise ValueError(f"amp must be none, bf16, fp16 or auto, got {mode!r}")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: Optional[torch.dtype] = None, *,
             progress: bool = False, desc: str = "val") -> Dict[str, float]:
    """Loss, top-1 and top-5 (%) over the loader, summed exactly across ranks (each rank a shard).

    ``progress``: a tqdm bar on interactive terminals (none when stderr is not a TTY: logs stay clean).
    """
    from .report import progress_bar

    was_training = model.training
    model.eval()
    loss_sum = c1 = c5 = n = 0.0
    bar = progress_bar(len(loader), desc, progress)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(targets[:, None])
        c1 += hit[:, 0].sum().item()
        c5 += hit.any(dim=1).sum().item()
        n += targets.numel()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    loss_sum, c1, c5, n = all_reduce_sum([loss_sum, c1, c5, n], device)
    model.train(was_training)
    if n == 0:
        raise ValueError("the validation set is empty")
    return {"loss": loss_sum / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "samples": int(n)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def throughput(model: nn.Module, images: torch.Tensor, device: torch.device, warmup: int = 50, iters: int = 30,
               dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """The official measurement: eval mode, one batch, ``warmup`` forwards, then ``iters`` timed
    forwards -> images/s (``iters · batch / seconds``)."""
    if iters <= 0:
        raise ValueError(f"throughput needs at least one timed iteration, got {iters}")
    was_training = model.training
    model.eval()
    images = images.to(device)
    with autocast(device, dtype):
        for _ in range(warmup):
            model(images)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(images)
        _sync(device)
        seconds = time.perf_counter() - t0
    model.train(was_training)
    batch = images.shape[0]
    return {"images_per_s": iters * batch / seconds, "batch_size": batch, "seconds": seconds,
            "warmup": warmup, "iters": iters}

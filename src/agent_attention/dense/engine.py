"""Training and evaluation loops for the dense tasks.

* losses and evaluation (COCO mAP, mIoU) of the detectors and segmenters;
* a resumable iteration loop: the optimizer and per-iteration scheduler come from
  :mod:`agent_attention.train.optim` (one parameter-group rule, timm schedulers with mmcv's
  warm-up), the data order from :class:`agent_attention.train.data.ResumableSampler` (a function
  of seed and epoch, so a resumed run sees the same batches), progress bar, evaluation every
  ``eval_every`` steps, atomic checkpoints (``last.pth``, ``best.pth``), a JSON-lines log and a
  final ``metrics.json``.

Why not the classifier's :class:`~agent_attention.train.engine.Trainer`: that one is built around
epochs, timm's cosine schedule, mixup, EMA and DDP of an image classifier; the dense loop is
iteration-based, calls a task loss on list-of-images batches and evaluates COCO/mIoU.
Sharing the optimizer, scheduler, sampler, checkpoint and JSON code, and keeping the ~100-line loop
separate, costs less than teaching the Trainer a second kind of task.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .data import IGNORE_INDEX
from .._atomic import json_safe, write_json
from ..train.data import ResumableSampler, mix_seed, seeded_rng
from .metrics import coco_evaluate, confusion_matrix, detections_to_coco, segmentation_scores

# --------------------------------------------------------------------------- losses
def detection_loss(model: nn.Module, batch, device) -> Dict[str, Tensor]:
    images, targets = batch
    images = [im.to(device) for im in images]
    targets = [{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
    return model(images, targets)


def segmentation_loss(model: nn.Module, batch, device, aux_weight: float = 0.4) -> Dict[str, Tensor]:
    images, labels = batch[0].to(device), batch[1].to(device)
    if getattr(model, "aux_head", None) is not None and aux_weight > 0:
        logits, aux = model(images, with_aux=True)
        return {"loss_seg": F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX),
                "loss_aux": aux_weight * F.cross_entropy(aux, labels, ignore_index=IGNORE_INDEX)}
    return {"loss_seg": F.cross_entropy(model(images), labels, ignore_index=IGNORE_INDEX)}


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_detection(model: nn.Module, loader: DataLoader, coco_gt, device, label_to_cat=None,
                       iou_types: Sequence[str] = ("bbox",), progress: bool = False) -> Dict[str, float]:
    """COCO mAP of a detector over ``loader`` (``coco_gt``: the ground truth COCO index)."""
    from tqdm.auto import tqdm

    model.eval()
    results, ids = [], []
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        outputs = model([im.to(device) for im in images])
        img_ids = [int(t["image_id"]) for t in targets]
        ids += img_ids
        results += detections_to_coco(outputs, img_ids, label_to_cat)
    return coco_evaluate(coco_gt, results, iou_types, image_ids=ids)


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: DataLoader, num_classes: int, device,
                          class_names=None, progress: bool = False) -> Dict[str, object]:
    """mIoU / mAcc / aAcc over ``loader``; logits are resized to the label size when they differ."""
    from tqdm.auto import tqdm

    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
        logits = model(images.to(device))
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        cm += confusion_matrix(logits.argmax(1).cpu(), labels, num_classes)
    return segmentation_scores(cm, class_names)


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(obj: dict, path: Path) -> None:
    """Atomic save (temp file + fsync + ``os.replace``)."""
    from ..weights import save_checkpoint_atomic

    save_checkpoint_atomic(obj, path)


def load_training_checkpoint(path) -> dict:
    """Read a checkpoint of this engine safely (``weights_only`` unpickler)."""
    from ..weights import load_checkpoint

    ckpt = load_checkpoint(str(path))
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a dense training checkpoint (no 'model' entry)")
    return ckpt


def _write_json(path: Path, obj) -> None:
    write_json(path, obj, indent=2, default=float)


def _scalar_metrics(m: Dict[str, object]) -> Dict[str, float]:
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}


# --------------------------------------------------------------------------- the loop
@dataclass
class LoopConfig:
    out_dir: str
    total_steps: int
    batch_size: int = 2
    eval_every: int = 0  # 0: once per epoch
    num_workers: int = 0
    seed: int = 0
    clip_grad: Optional[float] = None
    progress: bool = True
    eval_init: bool = True  # evaluate the untrained model first (the random-init baseline)
    key_metric: str = "bbox_mAP"
    desc: str = "train"


def train_sampler(n: int, seed: int) -> ResumableSampler:
    """The training order: a permutation of ``range(n)`` drawn from ``seed * 100003 + epoch`` (the
    former ``SeededSampler``'s seeds), skippable for a mid-epoch resume."""

    class _Indices:  # DistributedSampler only needs len()
        def __len__(self) -> int:
            return n

    return ResumableSampler(DistributedSampler(_Indices(), num_replicas=1, rank=0, shuffle=True, seed=seed * 100003))


class EpochSeeded(Dataset):
    """``base[i]`` drawn with the Python / numpy / torch RNGs seeded by ``(seed, epoch, i)`` (the
    classification rule of :class:`~agent_attention.train.data.SeededTransformDataset`): the random
    flips / crops of the dense data sets are the same in every run, with any worker count, and after
    a mid-epoch resume. Call :meth:`set_epoch` before creating the epoch's loader."""

    def __init__(self, base: Dataset, seed: int = 0):
        self.base, self.seed, self.epoch = base, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        with seeded_rng(mix_seed(self.seed, self.epoch, int(i))):
            return self.base[i]


def _append_jsonl(path: Path, entry: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(json_safe(entry), allow_nan=False) + "\n")


def train(model: nn.Module, train_set: Dataset, collate: Callable, loss_fn: Callable, evaluate: Callable[[nn.Module], Dict],
          optimizer: torch.optim.Optimizer, scheduler, cfg: LoopConfig, device, *,
          resume: Optional[str] = None, run_config: Optional[dict] = None) -> Dict[str, object]:
    """Train for ``cfg.total_steps`` iterations with periodic evaluation; returns the final summary.

    ``scheduler``: stepped per iteration (``step_update(step)`` before each step), with the base lrs
    in ``lr_base`` (saved in and restored from the checkpoint): the timm-based schedulers of
    :func:`agent_attention.train.optim.build_dense_scheduler`.
    ``resume``: a checkpoint path or ``"auto"`` (``<out_dir>/last.pth`` if present). The summary
    (also written to ``<out_dir>/metrics.json``) holds ``init`` (the untrained model's metrics),
    ``final``, ``best``, ``history`` and the wall time.
    """
    from tqdm.auto import tqdm

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampler = train_sampler(len(train_set), cfg.seed)
    train_set = EpochSeeded(train_set, cfg.seed)
    drop_last = len(train_set) >= cfg.batch_size
    steps_per_epoch = len(train_set) // cfg.batch_size if drop_last else 1
    eval_every = cfg.eval_every or steps_per_epoch
    total_epochs = math.ceil(cfg.total_steps / steps_per_epoch)
    step, history, init, best = 0, [], None, None
    elapsed = 0.0
    if resume == "auto":
        resume = str(out / "last.pth") if (out / "last.pth").is_file() else None
    if resume:
        ckpt = load_training_checkpoint(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.lr_base = list(ckpt.get("base_lrs", scheduler.lr_base))  # the schedule of the checkpoint
        step, history = int(ckpt["step"]), list(ckpt.get("history", []))
        init, best, elapsed = ckpt.get("init"), ckpt.get("best"), float(ckpt.get("elapsed", 0.0))
        done, offset = divmod(step, steps_per_epoch)
        print(f"resumed from {resume} at step {step}/{cfg.total_steps} (epoch {done + 1}, {offset} of its "
              f"{steps_per_epoch} steps done)")
    log_path = out / "log.jsonl"
    if init is None and cfg.eval_init:
        t0 = time.time()
        init = _scalar_metrics(evaluate(model))
        print(f"untrained model: {_fmt(init)} ({time.time() - t0:.1f}s)")
        _append_jsonl(log_path, {"step": 0, "init": True, **init})
    model.train()
    t_start = time.time() - elapsed
    bar = tqdm(total=cfg.total_steps, initial=step, desc=cfg.desc, disable=not cfg.progress, dynamic_ncols=True)
    running: Dict[str, float] = {}
    while step < cfg.total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, offset * cfg.batch_size)
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=cfg.num_workers, drop_last=drop_last,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for batch in loader:
            scheduler.step_update(step)
            lr = optimizer.param_groups[0]["lr"]
            losses = loss_fn(model, batch, device)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}: {({k: v.item() for k, v in losses.items()})}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            step += 1
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + float(v.detach())
            running["n"] = running.get("n", 0) + 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
            if step % eval_every == 0 or step == cfg.total_steps:
                n = running.pop("n")
                train_losses = {k: v / n for k, v in running.items()}
                running = {}
                metrics = _scalar_metrics(evaluate(model))
                model.train()
                entry = {"step": step, "epoch": step / steps_per_epoch, "lr": lr,
                         "loss": sum(train_losses.values()), **train_losses, **metrics,
                         "time": time.time() - t_start}
                history.append(entry)
                _append_jsonl(log_path, entry)
                bar.write(f"epoch {(step - 1) // steps_per_epoch + 1}/{total_epochs}, step {step}/{cfg.total_steps}: "
                          f"loss {entry['loss']:.4f} | {_fmt(metrics)}")
                key = metrics.get(cfg.key_metric, float("nan"))
                improved = best is None or (not math.isnan(key) and key > best.get(cfg.key_metric, -1.0))
                if improved:
                    best = dict(metrics, step=step)
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "history": history, "init": init, "best": best, "base_lrs": scheduler.lr_base,
                         "elapsed": time.time() - t_start, "config": run_config or {}}
                save_checkpoint(state, out / "last.pth")
                if improved:
                    save_checkpoint({"model": state["model"], "step": step, "metrics": metrics,
                                     "config": run_config or {}}, out / "best.pth")
            if step >= cfg.total_steps:
                break
    bar.close()
    summary = {"init": init, "final": history[-1] if history else None, "best": best, "history": history,
               "wall_time_s": time.time() - t_start, "config": run_config or {}}
    _write_json(out / "metrics.json", summary)
    return summary


def _fmt(m: Dict[str, float]) -> str:
    keys = [k for k in ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "mIoU", "mAcc", "aAcc") if k in m]
    return ", ".join(f"{k} {100 * m[k]:.2f}" for k in keys)

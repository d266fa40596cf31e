"""Training and evaluation loops for the dense tasks.

* AdamW with per-parameter weight-decay exclusions (the Swin recipes: position tables, norms and
  agent biases get no decay);
* iteration-based learning-rate schedules: linear warmup, then step decay (detection, ×0.1 at the
  milestones) or poly decay (segmentation);
* a resumable loop: a seeded sampler (the data order is a function of seed and epoch, so a resumed
  run sees the same batches), progress bar, evaluation every ``eval_every`` steps, atomic
  checkpoints (``last.pth``, ``best.pth``), a JSON-lines log and a final ``metrics.json``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import IGNORE_INDEX
from .._atomic import write_json
from .metrics import coco_evaluate, confusion_matrix, detections_to_coco, segmentation_scores

#: parameter-name substrings without weight decay in the official Swin recipes (spec §6.2)
SWIN_NO_DECAY = ("absolute_pos_embed", "relative_position_bias_table", "norm",
                 "an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")


# --------------------------------------------------------------------------- optimiser and schedule
def build_optimizer(model: nn.Module, lr: float, weight_decay: float, no_decay: Sequence[str] = (),
                    betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW; parameters whose name contains one of ``no_decay`` get weight decay 0."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if any(k in name for k in no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


@dataclass
class Schedule:
    """Learning-rate factor per iteration: linear warmup from ``warmup_ratio``, then step or poly decay."""

    total_steps: int
    kind: str = "step"  # "step" | "poly" | "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 1e-3
    milestones: List[int] = field(default_factory=list)  # steps where the lr is multiplied by gamma
    gamma: float = 0.1
    power: float = 0.9
    min_ratio: float = 0.0

    def __post_init__(self):
        if self.kind not in ("step", "poly", "constant"):
            raise ValueError(f"schedule kind must be 'step', 'poly' or 'constant', got {self.kind!r}")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")

    def factor(self, step: int) -> float:
        if self.kind == "step":
            f = self.gamma ** sum(step >= m for m in self.milestones)
        elif self.kind == "poly":
            f = (1 - min(step, self.total_steps) / self.total_steps) ** self.power
            f = f * (1 - self.min_ratio) + self.min_ratio
        else:
            f = 1.0
        if step < self.warmup_steps:  # mmcv's linear warmup: scales the regular lr
            f *= 1 - (1 - step / self.warmup_steps) * (1 - self.warmup_ratio)
        return f


# --------------------------------------------------------------------------- data order
class SeededSampler(Sampler[int]):
    """Shuffled indices, a function of ``(seed, epoch)``; ``start`` skips the first indices (resume)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter(order[self.start:])

    def __len__(self) -> int:
        return self.n - self.start


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
    """COCO mAP of a torchvision detector over ``loader`` (``coco_gt``: the ground truth COCO index)."""
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
    from ..models.checkpoints import save_checkpoint_atomic

    save_checkpoint_atomic(obj, path)


def load_training_checkpoint(path) -> dict:
    """Read a checkpoint of this engine safely (``weights_only`` unpickler)."""
    from ..models.checkpoints import load_checkpoint

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


def train(model: nn.Module, train_set: Dataset, collate: Callable, loss_fn: Callable, evaluate: Callable[[nn.Module], Dict],
          optimizer: torch.optim.Optimizer, schedule: Schedule, cfg: LoopConfig, device, *,
          resume: Optional[str] = None, run_config: Optional[dict] = None) -> Dict[str, object]:
    """Train for ``cfg.total_steps`` iterations with periodic evaluation; returns the final summary.

    ``resume``: a checkpoint path or ``"auto"`` (``<out_dir>/last.pth`` if present). The summary
    (also written to ``<out_dir>/metrics.json``) holds ``init`` (the untrained model's metrics),
    ``final``, ``best``, ``history`` and the wall time.
    """
    from tqdm.auto import tqdm

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    sampler = SeededSampler(len(train_set), cfg.seed)
    drop_last = len(train_set) >= cfg.batch_size
    steps_per_epoch = len(train_set) // cfg.batch_size if drop_last else 1
    eval_every = cfg.eval_every or steps_per_epoch
    step, history, init, best = 0, [], None, None
    elapsed = 0.0
    if resume == "auto":
        resume = str(out / "last.pth") if (out / "last.pth").is_file() else None
    if resume:
        ckpt = load_training_checkpoint(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        base_lrs = list(ckpt.get("base_lrs", base_lrs))
        step, history = int(ckpt["step"]), list(ckpt.get("history", []))
        init, best, elapsed = ckpt.get("init"), ckpt.get("best"), float(ckpt.get("elapsed", 0.0))
        print(f"resumed from {resume} at step {step}/{cfg.total_steps}")
    log_path = out / "log.jsonl"
    if init is None and cfg.eval_init:
        t0 = time.time()
        init = _scalar_metrics(evaluate(model))
        print(f"untrained model: {_fmt(init)} ({time.time() - t0:.1f}s)")
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": 0, "init": True, **init}) + "\n")
    model.train()
    t_start = time.time() - elapsed
    bar = tqdm(total=cfg.total_steps, initial=step, desc=cfg.desc, disable=not cfg.progress, dynamic_ncols=True)
    running: Dict[str, float] = {}
    while step < cfg.total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, offset * cfg.batch_size)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=cfg.num_workers, drop_last=drop_last,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for batch in loader:
            f = schedule.factor(step)
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * f
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
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{base_lrs[0] * f:.2e}")
            if step % eval_every == 0 or step == cfg.total_steps:
                n = running.pop("n")
                train_losses = {k: v / n for k, v in running.items()}
                running = {}
                metrics = _scalar_metrics(evaluate(model))
                model.train()
                entry = {"step": step, "epoch": step / steps_per_epoch, "lr": base_lrs[0] * f,
                         "loss": sum(train_losses.values()), **train_losses, **metrics,
                         "time": time.time() - t_start}
                history.append(entry)
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
                bar.write(f"step {step}: loss {entry['loss']:.4f} | {_fmt(metrics)}")
                key = metrics.get(cfg.key_metric, float("nan"))
                improved = best is None or (not math.isnan(key) and key > best.get(cfg.key_metric, -1.0))
                if improved:
                    best = dict(metrics, step=step)
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "history": history, "init": init, "best": best, "base_lrs": base_lrs,
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

"""The training loop: AMP, EMA, gradient accumulation, DDP, atomic checkpoints and exact resume.

One code path serves a single CPU process and ``torchrun`` (see :mod:`.distributed`). A run
killed at any point resumes (``resume='auto'``) from ``last.pth`` — written at every epoch end and,
with ``ckpt_every_steps=N``, every N optimizer steps — and ends with the same weights as an
uninterrupted run (same seed and world size): the data order and augmentation are functions of
``(seed, epoch, index)`` (:mod:`.data`), mixup draws are seeded by ``(seed, rank, epoch, step)``
and every other RNG state is saved in the checkpoint.

Safety: the recipe is validated (:mod:`.validation`); resuming with a recipe that differs from the
checkpoint's is refused unless ``resume_override`` is set; a non-finite loss (or, without fp16 loss
scaling, a non-finite gradient norm) stops the run *before* the optimizer step with
:class:`NonFiniteLossError`, and no checkpoint is ever written from non-finite weights, so the files
on disk always hold the last good state. Epochs are 1-based in every message and log row.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from .._atomic import write_json
from . import checkpointing as ck
from .config import Config, defaults, lr_scale, recipe_diff, validate
from .data import build_loaders, mix_seed, seeded_rng
from .distributed import DistInfo, all_reduce_sum, init_distributed, params_in_sync
from .evaluation import amp_dtype, autocast, build_model, evaluate
from .optim import build_optimizer, build_scheduler
from .report import EpochLog, plot_curves, progress_bar, read_log

__all__ = ["Trainer", "SimulatedKill", "NonFiniteLossError", "train"]


class SimulatedKill(RuntimeError):
    """Raised by ``Trainer(stop_after_steps=k)`` after optimizer step k (tests of resume)."""


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN/inf; the run stopped before applying that step."""


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def match_grad_strides(model: nn.Module) -> int:
    """Give every parameter with a size-1 dimension a gradient with its own strides; returns how many.

    Why: torch's CPU depthwise-conv backward returns the gradient of a ``(C, 1, k, k)`` weight (the
    DWC of every agent block) with stride 1 on the size-1 dim, ``(k*k, 1, k, 1)`` for the weight's
    ``(k*k, k*k, k, 1)``: the same memory, but DDP compares the stride tuples literally, warns on
    every rank ("Grad strides do not match bucket view strides") and copies. The hook returns a view
    of the same memory with the weight's strides (a copy only if the layouts really differ)."""

    def hook(param: torch.Tensor):
        def fix(grad: torch.Tensor) -> torch.Tensor:
            if grad.stride() == param.stride():
                return grad
            if grad.is_contiguous() and param.is_contiguous():  # same layout, size-1 strides aside
                return grad.as_strided(param.shape, param.stride())
            return torch.empty_like(param).copy_(grad)

        return fix

    params = [p for p in model.parameters() if p.requires_grad and p.dim() > 1 and 1 in p.shape]
    for p in params:
        p.register_hook(hook(p))
    return len(params)


class Trainer:
    """``Trainer(cfg).fit()`` trains as the recipe says and returns a summary dict."""

    def __init__(self, cfg: Config, dist: Optional[DistInfo] = None, stop_after_steps: Optional[int] = None,
                 log=print):
        self.cfg, self.stop_after_steps = cfg, stop_after_steps
        self.dist = dist or init_distributed(cfg.device)
        self.output = Path(cfg.output or Path("runs") / cfg.recipe)
        self._log = log
        self.setup()

    def log(self, msg: str) -> None:
        if self.dist.is_main and self._log:
            self._log(msg)

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, d = self.cfg, self.dist
        validate(cfg, warn=False)  # (load_recipe warned already)
        if d.is_main:
            removed = ck.remove_stale_temps(self.output)
            if removed:
                self.log(f"removed {len(removed)} temp file(s) left in {self.output} by interrupted writes")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        _seed_all(cfg.seed)  # same initial weights on every rank
        self.loaders = build_loaders(cfg, d.rank, d.world_size, d.device)
        self.num_classes = cfg.num_classes or self.loaders.num_classes
        model = build_model(cfg.model, self.num_classes, img_size=cfg.img_size, drop_path=cfg.drop_path,
                            model_kwargs=cfg.model_kwargs)
        if cfg.pretrained:
            from ..weights import has_ema_weights, load_checkpoint, load_official_checkpoint

            ckpt = load_checkpoint(cfg.pretrained)  # with model_ema: its EMA weights when it has them
            load_official_checkpoint(model, ckpt, strict=False, use_ema=cfg.model_ema and has_ema_weights(ckpt))
            self.log(f"fine-tuning from {cfg.pretrained}")
        self.model = model.to(d.device)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.ema = None
        if cfg.model_ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay)
        if cfg.compile:
            self.model.compile()
        self.ddp = self.model
        if d.distributed:
            ids = [d.device.index] if d.device.type == "cuda" else None
            match_grad_strides(self.model)
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

        self.updates_per_epoch = len(self.loaders.train) // cfg.accum_steps
        if self.updates_per_epoch < 1:
            raise ValueError(f"fewer training batches ({len(self.loaders.train)}) than accum_steps {cfg.accum_steps}")
        scale = lr_scale(cfg, d.world_size)
        self.lr = cfg.base_lr * scale
        self.optimizer = build_optimizer(self.model, self.lr, cfg.weight_decay, cfg.opt_eps, cfg.opt_betas)
        self.scheduler = build_scheduler(self.optimizer, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                         updates_per_epoch=self.updates_per_epoch, min_lr=cfg.min_lr * scale,
                                         warmup_lr=cfg.warmup_lr * scale)
        self.amp_dtype = amp_dtype(cfg.amp, d.device)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.amp_dtype == torch.float16)
        self._setup_loss()

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.max_top1 = self.max_top1_ema = 0.0
        self.meters: Optional[Dict[str, float]] = None
        self.elapsed = 0.0
        self.epochs_total = cfg.epochs + cfg.cooldown_epochs
        resume = ck.find_resume(self.output, cfg.resume)
        if resume is not None:
            self._load(resume)
        else:
            if d.is_main and (self.output / ck.LAST).exists():
                self.log(f"warning: starting a fresh run in {self.output}; its checkpoints will be overwritten "
                         "(use --resume auto to continue it)")
            _seed_all(cfg.seed + d.rank)
        self.epoch_log = EpochLog(self.output, enabled=d.is_main)

    def _setup_loss(self) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        cfg = self.cfg
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
            if cfg.batch_size % 2:
                raise ValueError(f"mixup/cutmix needs an even batch_size, got {cfg.batch_size}")
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                               prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                               label_smoothing=cfg.label_smoothing, num_classes=self.num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    # ------------------------------------------------------------------------------- checkpoints
    def _state(self, epoch: int, step_in_epoch: int, meters: Optional[Dict[str, float]]) -> Dict[str, Any]:
        model_sd = self.model.state_dict()
        ema_sd = self.ema.module.state_dict() if self.ema is not None else None
        for what, sd in (("model", model_sd), ("EMA", ema_sd)):
            bad = ck.first_non_finite(sd or {})
            if bad is not None:  # every rank sees the same weights (DDP keeps them in sync)
                raise NonFiniteLossError(
                    f"refusing to write a checkpoint: {what} tensor {bad!r} holds NaN/inf; the checkpoints in "
                    f"{self.output} keep the last good state")
        rngs = [ck.rng_state()]
        if self.dist.distributed:
            rngs = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rngs, ck.rng_state())
        return {
            "model": model_sd,
            "model_ema": ema_sd,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": self.global_step,
            "meters": meters, "rng": rngs, "world_size": self.dist.world_size,
            "max_accuracy": self.max_top1, "max_accuracy_ema": self.max_top1_ema,
            "elapsed_s": self.elapsed + (time.perf_counter() - self._t_start if hasattr(self, "_t_start") else 0.0),
            "config": dict(self.cfg),
        }

    def _save(self, names, epoch: int, step_in_epoch: int, meters: Optional[Dict[str, float]] = None) -> None:
        state = self._state(epoch, step_in_epoch, meters)  # collective: every rank takes part
        if self.dist.is_main:
            for name in names:
                ck.save_state(self.output / name, state)
        if self.dist.distributed:
            torch.distributed.barrier()

    def _load(self, path: Path) -> None:
        state = ck.load_state(path)
        cfg, override = self.cfg, bool(self.cfg.resume_override)
        saved_cfg = state.get("config")
        diff = recipe_diff(saved_cfg, cfg, defaults()) if isinstance(saved_cfg, dict) else []
        listed = "; ".join(diff[:8] + ([f"{len(diff) - 8} more"] if len(diff) > 8 else []))
        if diff and not override:
            raise ValueError(f"{path} was trained with another recipe ({listed}): resume with the "
                             "checkpoint's values, or set resume_override (--resume-override) to apply the new ones")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("model_ema") is not None:
                self.ema.module.load_state_dict(state["model_ema"])
            elif override:
                self.ema.module.load_state_dict(self.model.state_dict())
                self.log("model_ema: the checkpoint has no EMA weights; the EMA starts from the resumed weights")
            else:
                raise ValueError(f"{path} has no EMA weights but the recipe enables model_ema")
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.meters = state.get("meters")
        self.max_top1 = float(state.get("max_accuracy", 0.0))
        self.max_top1_ema = float(state.get("max_accuracy_ema", 0.0))
        self.elapsed = float(state.get("elapsed_s", 0.0))
        if diff:  # override: the new recipe's schedule and optimizer hyper-parameters, at the same position
            for group, new in zip(self.optimizer.param_groups, fresh):
                group.update(new)
            self._convert_position(saved_cfg)
            done = self.epoch * self.updates_per_epoch + self.step_in_epoch
            if done > 0:
                self.scheduler.step_update(done - 1)
            self.log(f"resume_override: continuing with the new recipe values ({listed})")
        else:
            self.scheduler.load_state_dict(state["lr_scheduler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.dist.world_size:
            ck.set_rng_state(rngs[self.dist.rank])
        else:
            self.log(f"warning: {path} was written by {len(rngs)} processes, this run has {self.dist.world_size}; "
                     "the run continues but will not match an uninterrupted one exactly")
            _seed_all(self.cfg.seed + self.dist.rank + 1000 * self.global_step)
        if self.step_in_epoch:
            where = f"in epoch {self.epoch + 1}/{self.epochs_total} after step {self.step_in_epoch}/{self.updates_per_epoch}"
        else:
            where = f"after epoch {self.epoch}/{self.epochs_total}"
        self.log(f"resumed from {path} {where}")

    def _convert_position(self, saved_cfg: Dict[str, Any]) -> None:
        """Mid-epoch resume with another batch size / accumulation: the step that covers the same samples
        (rounded down: a few samples of the partial epoch are seen twice)."""
        old = int(saved_cfg.get("batch_size", self.cfg.batch_size)) * int(saved_cfg.get("accum_steps", 1))
        new = self.cfg.batch_size * self.cfg.accum_steps
        if self.step_in_epoch and old != new:
            self.step_in_epoch = min(self.step_in_epoch * old // new, self.updates_per_epoch)
            self.meters = None
        if self.step_in_epoch >= self.updates_per_epoch:  # the partial epoch is complete in the new recipe
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    # ---------------------------------------------------------------------------------- training
    def train_one_epoch(self, epoch: int, start_step: int = 0) -> Dict[str, float]:
        cfg, d = self.cfg, self.dist
        accum, bs = cfg.accum_steps, cfg.batch_size
        self.loaders.train_sampler.set_epoch(epoch, skip=start_step * accum * bs)
        self.loaders.train_set.set_epoch(epoch)
        self.ddp.train()
        m = dict(self.meters) if (self.meters and start_step) else {"loss": 0.0, "n": 0.0, "gnorm": 0.0, "steps": 0.0}
        self.meters = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        bar = progress_bar(self.updates_per_epoch, f"epoch {epoch + 1}/{self.epochs_total}",
                           cfg.progress and d.is_main, initial=start_step)
        it = iter(self.loaders.train)
        t0, seen = time.perf_counter(), 0
        for step in range(start_step, self.updates_per_epoch):
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for j in range(accum):
                images, targets = next(it)
                images = images.to(d.device, non_blocking=True)
                targets = targets.to(d.device, non_blocking=True)
                if self.mixup is not None:
                    with seeded_rng(mix_seed(cfg.seed, d.rank, epoch, step, j)):
                        images, targets = self.mixup(images, targets)
                sync = self.ddp.no_sync() if (d.distributed and j < accum - 1) else nullcontext()
                with sync:
                    with autocast(d.device, self.amp_dtype):
                        out = self.ddp(images)
                    loss = self.criterion(out.float(), targets)
                    self.scaler.scale(loss / accum).backward()
                value = loss.item()
                step_loss += value
                m["loss"] += value * images.shape[0]
                m["n"] += images.shape[0]
                seen += images.shape[0]
            self.scaler.unscale_(self.optimizer)
            if cfg.clip_grad:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            else:
                gnorm = _grad_norm(params)
            self._check_finite(step_loss, float(gnorm), epoch, step)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step_update(epoch * self.updates_per_epoch + step)  # official: index of the done step
            self.global_step += 1
            m["gnorm"] += float(gnorm)
            m["steps"] += 1
            if self.ema is not None:
                self.ema.update(self.model)
            done = step + 1
            if cfg.ckpt_every_steps and done % cfg.ckpt_every_steps == 0 and done < self.updates_per_epoch:
                self._save([ck.LAST], epoch, done, m)
            lr = self.optimizer.param_groups[0]["lr"]
            rate = seen * d.world_size / max(time.perf_counter() - t0, 1e-9)
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss'] / m['n']:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                bar.update(1)
            elif cfg.print_freq and done % cfg.print_freq == 0:
                self.log(f"epoch {epoch + 1} step {done}/{self.updates_per_epoch} loss {m['loss'] / m['n']:.4f} "
                         f"lr {lr:.3e} {rate:.0f} img/s")
            if self.stop_after_steps is not None and self.global_step >= self.stop_after_steps:
                raise SimulatedKill(f"stopped after global step {self.global_step}")
        if bar is not None:
            bar.close()
        loss_sum, n, gsum, steps = all_reduce_sum([m["loss"], m["n"], m["gnorm"], m["steps"]], d.device)
        seconds = time.perf_counter() - t0
        return {"train_loss": loss_sum / max(n, 1), "grad_norm": gsum / max(steps, 1),
                "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": seconds,
                "train_images_per_s": seen * d.world_size / max(seconds, 1e-9)}

    def _check_finite(self, loss: float, gnorm: float, epoch: int, step: int) -> None:
        """Stop before the optimizer step on a NaN/inf loss, or on a NaN/inf gradient norm unless fp16 loss
        scaling is on (then GradScaler skips the step and lowers the scale, as AMP does)."""
        bad_loss, bad_grad = not math.isfinite(loss), not math.isfinite(gnorm) and not self.scaler.is_enabled()
        if self.dist.distributed:  # the loss is per rank: agree, or one rank would wait forever for the others
            bad_loss, bad_grad = (v > 0 for v in all_reduce_sum([float(bad_loss), float(bad_grad)], self.dist.device))
        if bad_loss or bad_grad:
            what = f"loss ({loss})" if bad_loss else f"gradient norm ({gnorm})"
            raise NonFiniteLossError(
                f"non-finite {what} at epoch {epoch + 1}/{self.epochs_total}, step {step + 1}/{self.updates_per_epoch}: "
                f"stopped before the optimizer step; the checkpoints in {self.output} keep the last good state "
                "(try a lower base_lr, clip_grad, or amp none/bf16)")

    def validate(self) -> Dict[str, float]:
        row = {}
        bar = self.cfg.progress and self.dist.is_main
        res = evaluate(self.model, self.loaders.val, self.dist.device, self.amp_dtype, progress=bar)
        row.update(val_loss=res["loss"], val_top1=res["top1"], val_top5=res["top5"])
        if self.ema is not None:
            res = evaluate(self.ema.module, self.loaders.val, self.dist.device, self.amp_dtype, progress=bar,
                           desc="val (EMA)")
            row.update(ema_val_loss=res["loss"], ema_val_top1=res["top1"], ema_val_top5=res["top5"])
        return row

    def fit(self) -> Dict[str, Any]:
        cfg, d = self.cfg, self.dist
        if d.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        self.epoch_log.truncate(self.epoch)  # keep the rows of the epochs already done
        self.log(f"{cfg.model}: {self.n_params / 1e6:.3f}M params | data: {self.loaders.description} | "
                 f"{d.world_size} process(es) on {d.device} | lr {self.lr:.3g} | {self.updates_per_epoch} steps/epoch "
                 f"| {self.epochs_total} epochs | output {self.output}")
        self._t_start = time.perf_counter()
        row: Dict[str, Any] = {}
        if self.epoch >= self.epochs_total:  # a finished run: report its final metrics again
            row = self._last_row()
            self.log(f"the run in {self.output} is already finished ({self.epoch}/{self.epochs_total} epochs): "
                     + (_epoch_line(row, self.epochs_total) if row else "no log rows found"))
        for epoch in range(self.epoch, self.epochs_total):
            start = self.step_in_epoch if epoch == self.epoch else 0
            stats = self.train_one_epoch(epoch, start)
            last = epoch + 1 == self.epochs_total
            row = {"epoch": epoch + 1, **stats}  # 1-based, as in the messages and checkpoint-<epoch>.pth
            if (epoch + 1) % max(cfg.eval_freq, 1) == 0 or last:
                row.update(self.validate())
            names = [ck.LAST]
            if cfg.save_freq and ((epoch + 1) % cfg.save_freq == 0 or last):
                names.append(f"checkpoint-{epoch + 1}.pth")
            if row.get("val_top1", -1.0) > self.max_top1:
                self.max_top1 = row["val_top1"]
                names.append(ck.BEST)
            if row.get("ema_val_top1", -1.0) > self.max_top1_ema:
                self.max_top1_ema = row["ema_val_top1"]
                names.append(ck.BEST_EMA)
            row["max_top1"] = self.max_top1
            row["elapsed_s"] = self.elapsed + time.perf_counter() - self._t_start
            self.epoch_log.append(row)
            self._save(names, epoch + 1, 0)
            if d.is_main:
                ck.prune_checkpoints(self.output, cfg.keep_ckpts)
            self.log(_epoch_line(row, self.epochs_total))
        return self._finish(row)

    def _last_row(self) -> Dict[str, Any]:
        """The last logged epoch with validation metrics (log.jsonl, else the previous summary.json)."""
        rows = [r for r in read_log(self.output / "log.jsonl") if r.get("val_top1") is not None]
        if rows:
            return rows[-1]
        prev = ck.read_summary(self.output)
        keys = {"final_top1": "val_top1", "final_top5": "val_top5", "final_ema_top1": "ema_val_top1"}
        row = {new: prev[old] for old, new in keys.items() if prev.get(old) is not None}
        return {"epoch": self.epoch, **row} if row else {}

    def _finish(self, row: Dict[str, Any]) -> Dict[str, Any]:
        cfg, d = self.cfg, self.dist
        drift = params_in_sync(self.model, d.device)
        ran = self.epoch < self.epochs_total  # (self.epoch is where this fit() started)
        summary = {
            "model": cfg.model, "recipe": cfg.recipe, "params": self.n_params, "epochs": self.epochs_total,
            "world_size": d.world_size, "final_top1": row.get("val_top1"), "final_top5": row.get("val_top5"),
            "final_ema_top1": row.get("ema_val_top1"), "max_top1": self.max_top1,
            "max_top1_ema": self.max_top1_ema if self.ema is not None else None,
            "wall_time_s": self.elapsed + (time.perf_counter() - self._t_start if ran else 0.0),
            "ddp_max_param_diff": drift,
            "output": str(self.output),
        }
        if d.is_main:
            import json

            if cfg.export:
                from ..weights import export_safetensors

                src = self.ema.module if self.ema is not None else self.model
                meta = {"model": cfg.model, "model_kwargs": json.dumps(cfg.model_kwargs), "img_size": cfg.img_size,
                        "num_classes": self.num_classes, "weights": "ema" if self.ema is not None else "model",
                        "recipe": cfg.recipe}
                export_safetensors(src, self.output / "model.safetensors", metadata=meta)
            if cfg.plot and row:
                plot_curves(self.output / "log.jsonl", self.output / "curves.png", title=f"{cfg.model} ({cfg.recipe})")
            write_json(self.output / "summary.json", summary, indent=2)
        return summary


def _grad_norm(params) -> torch.Tensor:
    """Total 2-norm of the gradients (logged when clipping is off, as the official code does)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


def _fmt(v: Optional[float], spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _epoch_line(row: Dict[str, Any], total: int) -> str:
    s = (f"epoch {row['epoch']}/{total}: train loss {_fmt(row.get('train_loss'), '.4f')} | "
         f"val top-1 {_fmt(row.get('val_top1'))} "
         f"top-5 {_fmt(row.get('val_top5'))} loss {_fmt(row.get('val_loss'), '.4f')}")
    if row.get("ema_val_top1") is not None:
        s += f" | EMA top-1 {row['ema_val_top1']:.2f}"
    if "lr" in row:
        s += f" | lr {row['lr']:.2e} | {row['epoch_time_s']:.1f}s ({row['train_images_per_s']:.0f} img/s)"
    return s


def train(cfg: Config, **kwargs) -> Dict[str, Any]:
    """Build a :class:`Trainer` and run it."""
    return Trainer(cfg, **kwargs).fit()


"""``agent-attention bench models``: images/s and peak memory of the agent models, inference and training.

Every T-size agent model is measured in the same process, in interleaved rounds, as:

* ``agent``: the model as shipped;
* ``official``: the same model and weights computing its attention the way the official code does
  (:func:`agent_attention.bench.official.official_style`: explicit attention maps, biases
  recomposed on every call and repeated per sample) — the baseline the speed goals refer to;
* ``math``: the same model with the fused op switched off (``functional.fused(False)``);
* ``softmax``: its softmax-attention counterpart from timm (random weights): DeiT-T →
  ``deit_tiny_patch16_224``; PVT-T → ``pvt_v2_b1`` (timm has no PVT v1; v2-b1 is the closest size,
  14.0 M parameters vs 13.2 M for PVT-v1-T and 11.6 M for Agent-PVT-T); Swin-T →
  ``swin_tiny_patch4_window7_224``; CSWin-T → none (timm has no CSWin);
* ``compiled`` (``--compile``): ``torch.compile`` of the shipped model.

Modes (``--modes``): ``infer`` (a forward under ``torch.inference_mode``) and ``train`` (forward,
cross-entropy, backward and an AdamW step; peak memory = growth during one step, gradients
included). ``--amp bf16`` (or ``fp16``) adds the same measurements under ``torch.autocast``;
``--amp none bf16`` measures both precisions in one run, so the bf16 speed-up is a ratio of
interleaved rounds. The first of ``--sizes`` is measured at every ``--batch`` and mode; larger
sizes at ``--sweep-batch``, inference only (``--train-sizes`` to train there too).

Writes ``models.md``/``models.json``/``models.png``. ``--profile N`` prints the N most expensive
operators of ``agent`` and ``official`` per model, mode and precision at the first size and batch.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import fused
from . import common
from .models_report import goals, label, plot, profile_table, tables

#: agent model -> (timm softmax counterpart or None, note)
COUNTERPARTS = {
    "agent_deit_tiny": ("deit_tiny_patch16_224", ""),
    "agent_pvt_tiny": ("pvt_v2_b1", "PVT v1 is not in timm; pvt_v2_b1 is the closest size"),
    "agent_swin_tiny": ("swin_tiny_patch4_window7_224", ""),
    "agent_cswin_tiny": (None, "no CSWin in timm"),
}
DEFAULT_MODELS = tuple(COUNTERPARTS)
VARIANTS = ("agent", "official", "math", "softmax")
DEFAULT_VARIANTS = ("agent", "official", "softmax")
MODES = ("infer", "train")
AMPS = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _official_name(name: str) -> str:
    from ..models.registry import ALIASES

    return ALIASES.get(name, name)


def build(name: str, size: int, *, agent: bool) -> nn.Module:
    """An agent model (ours) or a timm model, random weights, eval mode, for ``size``² images."""
    if agent:
        from ..models import create_model

        model = create_model(name, img_size=size)
    else:
        import timm

        try:
            model = timm.create_model(name, pretrained=False, img_size=size)
        except TypeError:  # fully convolutional stems (pvt_v2) take no img_size
            model = timm.create_model(name, pretrained=False)
    return model.eval()


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def inference_fn(model: nn.Module, x: torch.Tensor, dtype: Optional[torch.dtype] = None,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    """One forward of ``model`` on ``x`` under ``inference_mode`` (and autocast to ``dtype``)."""
    def run():
        with torch.inference_mode(), context(), _autocast(x.device, dtype):
            return model(x)
    return run


def train_step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
                  dtype: Optional[torch.dtype] = None,
                  context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    """One training step: forward (autocast to ``dtype``), cross-entropy, backward, optimizer step.

    Gradients are set to ``None`` after the step, so every step allocates them anew (counted in
    its peak memory, as in a training loop)."""
    def run():
        with context(), _autocast(x.device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return run


class _Prepared:
    """The models of one (model name, size, mode): one copy per variant, same initial weights."""

    def __init__(self, name: str, size: int, mode: str, variants: Sequence[str], compile_: bool, device):
        self.name, self.mode = name, mode
        self.counterpart, self.note = COUNTERPARTS.get(name, (None, "no known softmax counterpart"))
        self.models: Dict[str, nn.Module] = {}
        self.contexts: Dict[str, Callable] = {}
        self.errors: Dict[str, str] = {}
        self.stack = contextlib.ExitStack()
        train = mode == "train"
        try:
            base = build(name, size, agent=True).to(device)
        except Exception as e:  # report, keep going with the other models
            self.errors["agent"] = f"{type(e).__name__}: {e}"
            base = None
        wanted = [v for v in variants if v != "softmax"] + (["compiled"] if compile_ else [])
        if base is not None:
            for v in wanted:
                m = base if v == "agent" else copy.deepcopy(base)
                if v == "official":
                    from .official import official_style

                    self.stack.enter_context(official_style(m))
                self.models[v] = m
                self.contexts[v] = (lambda: fused(False)) if v == "math" else contextlib.nullcontext
            if "compiled" in self.models:
                self.models["compiled"] = torch.compile(self.models["compiled"])
        if self.counterpart and "softmax" in variants:
            try:
                self.models["softmax"] = build(self.counterpart, size, agent=False).to(device)
                self.contexts["softmax"] = contextlib.nullcontext
            except Exception as e:
                self.errors["softmax"] = f"{type(e).__name__}: {e}"
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        for v, m in self.models.items():
            m.train(train)
            if train:  # a small lr keeps random-weight models finite over many steps
                self.optimizers[v] = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.05)
        self.params = {v: sum(p.numel() for p in m.parameters()) for v, m in self.models.items()}

    def fn(self, variant: str, x: torch.Tensor, target: torch.Tensor, dtype: Optional[torch.dtype]):
        m, ctx = self.models[variant], self.contexts[variant]
        if self.mode == "train":
            return train_step_fn(m, self.optimizers[variant], x, target, dtype, ctx)
        return inference_fn(m, x, dtype, ctx)

    def close(self):
        self.stack.close()


def measure(name: str, size: int, batch: int, mode: str, args, device: torch.device, log=print) -> List[dict]:
    """Every variant × precision of one model at one size, batch and mode."""
    official = _official_name(name)
    prep = _Prepared(official, size, mode, args.variants, args.compile, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), generator=g).to(device)
    fns: Dict[str, Callable] = {}
    keys: Dict[str, tuple] = {}
    for amp in args.amp:
        for v in prep.models:
            key = label(v, amp)
            fns[key], keys[key] = prep.fn(v, x, target, AMPS[amp]), (v, amp)
    diffs: Dict[str, float] = {}
    if mode == "infer" and "agent" in prep.models and "official" in prep.models:
        for amp in args.amp:  # the baseline computes the same function
            a, b = fns[label("agent", amp)](), fns[label("official", amp)]()
            diffs[amp] = (a.float() - b.float()).abs().max().item()
    for fn in fns.values():  # warm-up: compilation, oneDNN primitives, bias caches, AdamW state
        for _ in range(2 if mode == "train" else 1):
            fn()
    memory = {k: common.peak_memory(fn, device) for k, fn in fns.items()}
    timings = common.time_round_robin(fns, device, repeats=args.repeats, max_s_per_fn=args.max_seconds, warmed=True)
    records = []
    for key in list(fns) + [k for k in prep.errors if k not in prep.models]:
        v, amp = keys.get(key, (key, "none"))
        rec = {"model": official, "size": size, "batch": batch, "mode": mode, "variant": v, "amp": amp,
               "label": key, "timm_model": prep.counterpart if v == "softmax" else official,
               "note": prep.note if v == "softmax" else ""}
        if key in timings:
            t = timings[key]
            sec = t.stat(args.stat)
            rec.update(seconds=sec, seconds_median=t.median, seconds_min=t.best, samples=t.samples,
                       images_per_s=batch / sec, peak_bytes=memory[key], params=prep.params[v])
            if v == "official" and amp in diffs:
                rec["max_abs_diff_vs_agent"] = diffs[amp]
        else:
            rec["error"] = prep.errors.get(key, "")
        records.append(rec)
    log(f"  {official} @ {size}, batch {batch}, {mode}: " + ", ".join(
        f"{k} {batch / timings[k].stat(args.stat):.2f} img/s" for k in timings) +
        ("" if not prep.errors else f" (errors: {prep.errors})"))
    if args.profile and size == args.sizes[0] and batch == args.batch[0]:
        for amp in args.amp:
            for v in ("agent", "official"):
                if label(v, amp) in fns:
                    log(f"torch.profiler, {official} @ {size}, batch {batch}, {mode}, {label(v, amp)}:\n"
                        + profile_table(fns[label(v, amp)], args.profile))
    prep.close()
    return records


def plan(args) -> List[tuple]:
    """(size, batch, mode) triples in run order: the first size at every batch and mode, the others
    at ``--sweep-batch``, inference (and training where ``--train-sizes`` says)."""
    first = args.sizes[0]
    train_sizes = set(args.train_sizes if args.train_sizes is not None else [first])
    out = []
    for size in args.sizes:
        for batch in (args.batch if size == first else [args.sweep_batch]):
            for mode in args.modes:
                if mode == "train" and size not in train_sizes:
                    continue
                out.append((size, batch, mode))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-attention bench models", description=common.description(__doc__))
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="agent model names (default: the four T)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 384], help="input sizes (default 224 384; also 512 768)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                   help="what to time: agent (as shipped), official (official-style computation), math (agent_attention_math), softmax (timm softmax model); default: agent official softmax")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="infer and/or train (default both)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes at the first size (default 1)")
    p.add_argument("--sweep-batch", type=int, default=1, help="batch at the other sizes (default 1)")
    p.add_argument("--train-sizes", type=int, nargs="+", default=None, help="sizes to train at (default: the first)")
    p.add_argument("--amp", nargs="+", choices=list(AMPS), default=["none"],
                   help="precisions: none (fp32), bf16, fp16 (torch.autocast); several = compared in one run")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    common.add_timing_options(p, repeats=5, max_seconds=20.0, unit="variant")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(agent model)")
    p.add_argument("--channels-last", action="store_true", help="feed channels-last images")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest operators (agent, official)")
    common.add_output_options(p, "models")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_cli(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    from .._dtypes import warn_slow_dtype

    device = common.resolve_device(args.device)
    for amp in args.amp:
        warn_slow_dtype(AMPS[amp], device, f"--amp {amp}", "agent-attention bench models")
    if min(args.batch) < 1 or args.sweep_batch < 1 or args.repeats < 1 or min(args.sizes) < 32:
        raise ValueError("--batch, --sweep-batch and --repeats must be positive and --sizes at least 32")
    if args.train_sizes and not set(args.train_sizes) <= set(args.sizes):
        raise ValueError(f"--train-sizes {args.train_sizes} must be among --sizes {args.sizes}")
    from ..models import list_models

    known = set(list_models())
    unknown = [m for m in args.models if m not in known]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; see `agent-attention models`")
    common.set_threads(args.threads)
    info = common.machine_info(device)
    print(f"bench models on {common.machine_line(info)}")
    print(f"random weights; precisions {', '.join(args.amp)}; modes {', '.join(args.modes)}")
    records: List[dict] = []
    for size, batch, mode in plan(args):
        for name in args.models:
            records += measure(name, size, batch, mode, args, device)
            report(records, args, info, final=False)  # a killed run keeps what it measured
    info["load_avg_1min_end"] = common.machine_info(device).get("load_avg_1min")
    for p in report(records, args, info, final=True):
        print(f"wrote {p}")
    return 0


def report(records: List[dict], args, info: dict, final: bool) -> list:
    """Write models.md/.json (and, at the end, print the tables and draw models.png)."""
    md_parts = []
    for title, headers, rows in tables(records):
        if final:
            print(f"\n{title}\n" + common.text_table(headers, rows))
        md_parts.append(f"### {title}\n\n" + common.markdown_table(headers, rows))
    goal_lines = goals(records, size=args.sizes[0])
    if goal_lines:
        if final:
            print("\nGoals\n" + "\n".join(goal_lines))
        md_parts.append("### Goals\n\n" + "\n".join(goal_lines))
    paths = []
    if final and not args.no_plot:
        paths.append(plot(records, args.out / "models.png",
                          f"agent models vs the official-style computation and timm softmax models\n"
                          f"{common.machine_line(info, wrap=True)}"))
    end = info.get("load_avg_1min_end")
    md = (f"Machine: {common.machine_line(info)}" + (f"; load average {end} at the end" if end is not None else
                                                      " (run in progress or interrupted)") + "\n\n"
          f"Random weights. img/s = batch / {args.stat} time of up to {args.repeats} interleaved rounds; "
          f"memory = peak extra bytes allocated by one call (inference: a forward; train: forward, backward "
          f"and AdamW step). `agent/official`: speed-up of the shipped model over the same model and weights "
          f"computing attention as the official code; `mem official/agent`: how much more memory the official "
          f"computation needs.\n\n" + "\n\n".join(md_parts))
    return paths + common.write_outputs(args.out, "models", md, {"machine": info, "args": vars(args), "records": records})

"""Shared command-line code of ``train-det`` and ``train-seg``: the parser (run options plus one flag
per recipe field), recipe resolution and the train / evaluate run."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Sequence

import torch

from ..train.config import Config, Field, overrides_from_args

#: recipe fields that are per-family / per-head tables: set them in a yaml recipe (or with --set)
TABLE_FIELDS = ("family_kwargs", "drop_path_rates", "detector_defaults")


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _optional(base):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null", "") else base(text)

    parse.__name__ = base.__name__
    return parse


def build_parser(prog: str, description: str, task: str, fields: Sequence[Field], recipes: Sequence[str]
                 ) -> argparse.ArgumentParser:
    """Run options, then one flag per recipe field (only given flags override the recipe)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--preset", "--recipe", dest="preset", default=None, metavar="NAME|YAML",
                   help=f"recipe: one of {', '.join(recipes)} or a yaml file (default: shapes without --data; "
                        "--data needs an official recipe)")
    p.add_argument("--list-recipes", action="store_true", help="print the bundled recipes and exit")
    p.add_argument("--data", default=None, help="dataset folder (default: the embedded shapes data set)")
    p.add_argument("--output", default=f"runs/{task}", help="output folder (checkpoints, log.jsonl, metrics.json)")
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' (<output>/last.pth if present)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --output folder that holds one (its checkpoints and logs are deleted)")
    p.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint (or the untrained model)")
    p.add_argument("--checkpoint", default=None, help="checkpoint of this command to evaluate with --eval-only")
    p.add_argument("--pretrained", default=None, help="classification checkpoint for the backbone (.pth/.safetensors)")
    p.add_argument("--no-strict", action="store_true", help="load the matching backbone weights only (warn on the rest)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (0: load in the main process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights, the data order and the embedded data")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-eval-init", action="store_true", help="skip evaluating the untrained model first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (none either when stderr is not a terminal)")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any recipe field from a yaml value, e.g. --set drop_path_rates={}")
    group = p.add_argument_group("recipe fields (override the recipe)")
    for f in fields:
        if f.name in TABLE_FIELDS:
            continue
        kw: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.help)
        if f.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif f.kind == "dict":
            kw.update(type=_json_object, metavar="JSON")
        elif f.kind in ("floats", "strs"):
            kw["metavar"] = "A,B,..."
        elif f.kind in ("int", "float"):
            base = {"int": int, "float": float}[f.kind]
            kw["type"] = _optional(base) if f.optional else base
        if f.choices:
            kw["choices"] = f.choices
        group.add_argument("--" + f.name.replace("_", "-"), **kw)
    return p


def parse(p: argparse.ArgumentParser, task: str, fields: Sequence[Field], argv: List[str]) -> argparse.Namespace:
    """Parse ``argv`` and resolve the recipe: a namespace of the run options and every recipe field.
    A bad recipe or value, a flat backbone, or a folder holding a run (without ``--resume`` or
    ``--overwrite``) is a usage error."""
    from .._extras import require
    from ..dense.backbone import flat_backbone_error
    from ..dense.recipe import dense_recipes, load_dense_recipe
    from ..models.registry import family_of
    from ..train.run_dir import DENSE_RUN_FILES, check_run_dir
    from ._dispatch import usage_errors

    args = p.parse_args(argv)
    from .._device import resolve_device

    with usage_errors():  # an unknown device or a GPU this machine lacks: one line, before any work
        args.device = str(resolve_device(str(args.device)))  # a string: the run config is JSON
    if args.list_recipes:
        print("\n".join(dense_recipes(task)))
        raise SystemExit(0)
    preset = args.preset or ("shapes" if args.data is None else None)
    if preset is None:
        p.error(f"--data needs a --preset (one of {', '.join(r for r in dense_recipes(task) if r != 'shapes')})")
    with usage_errors():
        cfg: Config = load_dense_recipe(task, preset, overrides_from_args(args, fields))
        if family_of(cfg["backbone"]) == "deit":
            raise ValueError(flat_backbone_error(cfg["backbone"]))
        if not args.eval_only:
            check_run_dir(args.output, bool(args.resume), args.overwrite, DENSE_RUN_FILES)
    if task == "det":
        require("pycocotools", f"{p.prog} (COCO mAP)", "dense")
    elif cfg.get("head") == "upernet":
        require("segmentation_models_pytorch", f"{p.prog} --head upernet", "dense")
    run = argparse.Namespace(**{**vars(args), **cfg})
    run.preset = cfg["recipe"]
    if not sys.stderr.isatty():  # piped logs get the per-evaluation lines, not progress-bar frames
        run.no_progress = True
    if run.threads:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    return run


def _check_ranges(args) -> None:
    """Values that would train silently wrong (a negative clip flips the gradients) are refused."""
    checks = [("lr", args.lr > 0, "> 0"), ("batch_size", args.batch_size >= 1, ">= 1"),
              ("weight_decay", args.weight_decay >= 0, ">= 0"), ("warmup_iters", args.warmup_iters >= 0, ">= 0"),
              ("warmup_ratio", 0 <= args.warmup_ratio <= 1, "in [0, 1]"),
              ("clip_grad", args.clip_grad is None or args.clip_grad > 0, "> 0 (or none)")]
    checks += [(name, getattr(args, name) >= 1, ">= 1") for name in ("epochs", "iters", "eval_interval")
               if hasattr(args, name)]
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"recipe field {name!r} must be {rule}, got {getattr(args, name)!r}")


def run(args, model, train_set, collate, loss_fn, evaluate, steps, eval_every, scheduler_kw, key) -> int:
    """``--eval-only``: evaluate and print the metrics; else train and print the final metric."""
    from .._atomic import json_safe
    from ..dense.engine import LoopConfig, load_training_checkpoint, train
    from ..train.optim import build_dense_scheduler, build_optimizer

    device = torch.device(args.device)
    model.to(device)
    if args.eval_only:
        if args.checkpoint:
            model.load_state_dict(load_training_checkpoint(args.checkpoint)["model"])
        t0 = time.time()
        metrics = evaluate(model)
        print(json.dumps(json_safe({k: v for k, v in metrics.items() if not isinstance(v, dict)}), indent=2))
        print(f"evaluated in {time.time() - t0:.1f}s")
        return 0
    _check_ranges(args)
    opt = build_optimizer(model, args.lr, args.weight_decay, no_decay_1d=False, model_no_decay=args.model_no_decay,
                          no_decay_keys=tuple(args.no_decay))
    scheduler = build_dense_scheduler(opt, total_steps=steps, warmup_iters=args.warmup_iters,
                                      warmup_ratio=args.warmup_ratio, **scheduler_kw)
    cfg = LoopConfig(out_dir=args.output, total_steps=steps, batch_size=args.batch_size, eval_every=eval_every,
                     num_workers=args.workers, seed=args.seed, clip_grad=args.clip_grad, progress=not args.no_progress,
                     eval_init=not args.no_eval_init, key_metric=key, desc=args.command)
    run_config = json_safe({k: v for k, v in vars(args).items() if k not in ("set_", "list_recipes")})
    summary = train(model, train_set, collate, loss_fn, evaluate, opt, scheduler, cfg, device, resume=args.resume,
                    run_config=run_config)
    init, final = summary["init"] or {}, summary["final"] or {}
    base = f" (untrained {100 * init[key]:.2f})" if key in init else ""
    print(f"done in {summary['wall_time_s']:.1f}s: {key} {100 * final.get(key, float('nan')):.2f}{base}; "
          f"outputs in {args.output}")
    return 0

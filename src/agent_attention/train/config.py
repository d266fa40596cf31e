"""Training recipes: the official defaults, one yaml per recipe, command-line overrides.

A recipe is a flat mapping ``field: value``. Resolution order: :data:`FIELDS` defaults (the
official ``config.py`` values) <- the recipe yaml <- command-line flags. Every field has
a generated flag (``warmup_epochs`` -> ``--warmup-epochs``; booleans also ``--no-...``) and
``--set FIELD=VALUE`` sets any field from a yaml value (``--set model_kwargs.depth=6``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml

from .validation import RANGES, RESUME_IGNORED, check_range, recipe_diff, validate

__all__ = [
    "Field", "FIELDS", "Config", "defaults", "list_recipes", "recipe_path", "read_recipe", "load_recipe",
    "add_config_args", "config_from_args", "default_recipe", "overrides_from_args", "coerce", "apply_override", "lr_scale",
    "check_range", "validate", "recipe_diff", "RANGES", "RESUME_IGNORED",
]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class Field:
    """One recipe field. ``kind``: int, float, str, bool, floats / strs (lists), dict; ``optional``: may be None."""

    name: str
    default: Any
    kind: str
    help: str
    optional: bool = False
    choices: Optional[Sequence[str]] = None


def _f(name, default, kind, help, optional=False, choices=None) -> Field:
    return Field(name, default, kind, help, optional, tuple(choices) if choices else None)


FIELDS: List[Field] = [
    # model
    _f("model", "agent_deit_tiny", "str", "model name (official names, aliases, or any timm model)"),
    _f("model_kwargs", {}, "dict", "extra keyword arguments of the model constructor (yaml/JSON mapping)"),
    _f("num_classes", None, "int", "classifier size (default: the dataset's class count)", True),
    _f("drop_path", 0.1, "float", "stochastic depth rate (drop_path_rate)"),
    _f("pretrained", "", "str", "fine-tune: initialise from this checkpoint (ours or official; grids resized)"),
    _f("finetune_from", "", "str", "the variant the official recipe fine-tunes from (informational)"),
    _f("model_ema", False, "bool", "keep an EMA of the weights (timm ModelEmaV3), validated every epoch"),
    _f("model_ema_decay", 0.9999, "float", "EMA decay per optimizer step"),
    # data
    _f("data", "", "str", "ImageFolder root with train/ and val/ (empty: the embedded digits set)"),
    _f("train_split", "train", "str", "training sub-folder of --data"),
    _f("val_split", "val", "str", "validation sub-folder of --data"),
    _f("img_size", 224, "int", "training / evaluation image size"),
    _f("interpolation", "bicubic", "str", "resize interpolation", choices=("bicubic", "bilinear", "nearest")),
    _f("test_crop", True, "bool", "eval: resize to img_size/crop_pct then center-crop (else resize to img_size)"),
    _f("crop_pct", 0.875, "float", "eval crop fraction (official: 224/256)"),
    _f("eval_resize", "square", "str", "eval resize: 'square' (official, aspect not kept) or 'shorter' side",
       choices=("square", "shorter")),
    _f("mean", IMAGENET_MEAN, "floats", "normalisation mean"),
    _f("std", IMAGENET_STD, "floats", "normalisation std"),
    _f("batch_size", 128, "int", "batch size per process (official: per GPU)"),
    _f("eval_batch_size", None, "int", "evaluation batch size per process (default: batch_size)", True),
    _f("num_workers", 8, "int", "data loader worker processes"),
    _f("pin_memory", True, "bool", "pin host memory (CUDA only)"),
    _f("skip_bad_images", False, "bool", "log and skip unreadable image files (default: stop, naming the file)"),
    _f("train_subset", None, "int", "use only the first N training samples (smoke tests)", True),
    _f("val_subset", None, "int", "use only the first N validation samples", True),
    _f("val_fraction", 0.2, "float", "embedded digits set: held-out fraction (stratified, fixed seed)"),
    # augmentation and loss
    _f("scale", [0.08, 1.0], "floats", "RandomResizedCrop scale range"),
    _f("ratio", [0.75, 4 / 3], "floats", "RandomResizedCrop aspect-ratio range"),
    _f("hflip", 0.5, "float", "horizontal flip probability"),
    _f("color_jitter", 0.4, "float", "colour jitter (ignored by timm when auto_augment is set)"),
    _f("auto_augment", "rand-m9-mstd0.5-inc1", "str", "timm auto-augment policy (none: off)", True),
    _f("reprob", 0.25, "float", "random erasing probability"),
    _f("remode", "pixel", "str", "random erasing mode", choices=("const", "rand", "pixel")),
    _f("recount", 1, "int", "random erasing count"),
    _f("mixup", 0.8, "float", "mixup alpha (0: off)"),
    _f("cutmix", 1.0, "float", "cutmix alpha (0: off)"),
    _f("cutmix_minmax", None, "floats", "cutmix min/max area ratio (overrides alpha)", True),
    _f("mixup_prob", 1.0, "float", "probability of applying mixup or cutmix per batch"),
    _f("mixup_switch_prob", 0.5, "float", "probability of cutmix instead of mixup"),
    _f("mixup_mode", "batch", "str", "mixup granularity", choices=("batch", "pair", "elem")),
    _f("label_smoothing", 0.1, "float", "label smoothing"),
    _f("repeated_aug", 0, "int", "repeated augmentation repeats (0: off, as the official recipe)"),
    # optimisation
    _f("epochs", 300, "int", "epochs of the cosine schedule"),
    _f("warmup_epochs", 20, "int", "linear warm-up epochs (from warmup_lr)"),
    _f("cooldown_epochs", 0, "int", "extra epochs at min_lr after the cosine"),
    _f("base_lr", 5e-4, "float", "learning rate for a total batch of lr_scale_batch"),
    _f("warmup_lr", 5e-7, "float", "warm-up start lr (scaled like base_lr)"),
    _f("min_lr", 5e-6, "float", "final lr (scaled like base_lr)"),
    _f("lr_scale_batch", 512, "int", "linear scaling rule: lr = base_lr * total_batch / this (none: no scaling)",
       True),
    _f("weight_decay", 0.05, "float", "AdamW weight decay (not on 1-D params, '.bias', no_weight_decay())"),
    _f("opt_eps", 1e-8, "float", "AdamW epsilon"),
    _f("opt_betas", [0.9, 0.999], "floats", "AdamW betas"),
    _f("clip_grad", 5.0, "float", "gradient norm clipping (none: off)", True),
    _f("accum_steps", 1, "int", "gradient accumulation micro-batches per optimizer step"),
    # engine
    _f("amp", "none", "str", "mixed precision: none (official fp32), bf16, fp16, auto (CUDA: bf16 if supported)",
       choices=("none", "bf16", "fp16", "auto")),
    _f("compile", False, "bool", "torch.compile the model"),
    _f("device", "auto", "str", "cpu, cuda, cuda:N or auto"),
    _f("seed", 0, "int", "random seed (each rank uses seed + rank)"),
    _f("output", "", "str", "run directory (default: runs/<recipe>)"),
    _f("resume", "", "str", "'auto' (last.pth of the run directory) or a checkpoint path"),
    _f("save_freq", 1, "int", "write checkpoint-<epoch>.pth every N epochs"),
    _f("keep_ckpts", 3, "int", "how many checkpoint-<epoch>.pth files to keep"),
    _f("ckpt_every_steps", 0, "int", "also write last.pth every N optimizer steps (exact mid-epoch resume)"),
    _f("eval_freq", 1, "int", "validate every N epochs (and after the last)"),
    _f("print_freq", 100, "int", "log a line every N steps when the progress bar is off (0: never)"),
    _f("progress", True, "bool", "progress bar (rank 0, interactive terminals only)"),
    _f("plot", False, "bool", "write curves.png (loss, accuracy, lr) at the end"),
    _f("export", True, "bool", "export the final weights (EMA if enabled) to model.safetensors"),
    _f("threads", None, "int", "torch CPU threads per process (default: torch's choice)", True),
    _f("resume_override", False, "bool", "with --resume: train on with this recipe where it differs from the "
       "checkpoint's (lr schedule rebuilt, optimizer hyper-parameters replaced) instead of refusing"),
]
_BY_NAME: Dict[str, Field] = {f.name: f for f in FIELDS}
_META_KEYS = ("description",)  # recipe keys that are not fields
_HINTS = {"lr": "base_lr", "learning_rate": "base_lr", "wd": "weight_decay", "warmup": "warmup_epochs"}


class Config(dict):
    """A resolved recipe: a plain dict with attribute access (stored as a plain dict in checkpoints)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"unknown config field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def defaults(fields: Optional[Sequence[Field]] = None) -> Config:
    """The default value of every field of ``fields`` (default: the classification :data:`FIELDS`)."""
    return Config({f.name: json.loads(json.dumps(f.default)) for f in (FIELDS if fields is None else fields)})


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))


def coerce(name: str, value: Any, fields: Optional[Sequence[Field]] = None) -> Any:
    """Check and convert ``value`` for field ``name`` of ``fields`` (default: :data:`FIELDS`; type,
    choices, and for the classification fields the allowed range: :func:`check_range`); a one-line
    ValueError naming the field otherwise."""
    value = _convert(name, value, fields)
    return check_range(name, value) if fields is None else value


def _convert(name: str, value: Any, fields: Optional[Sequence[Field]] = None) -> Any:
    by_name = _BY_NAME if fields is None else {f.name: f for f in fields}
    f = by_name.get(name)
    if f is None:
        import difflib

        close = difflib.get_close_matches(name, by_name, n=3)
        if not close and fields is None:
            close = [n for k, n in _HINTS.items() if k == name]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown recipe field {name!r}{hint}")
    if f.optional and _is_none(value) and not (f.kind == "str" and value == ""):
        return None
    try:
        if f.kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            if not isinstance(value, (bool, int)):
                raise TypeError
            return bool(value)
        if f.kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if f.kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if f.kind == "str":
            if not isinstance(value, (str, int, float)):
                raise TypeError
            value = str(value)
            if f.choices and value not in f.choices:
                raise ValueError(f"field {name!r} must be one of {', '.join(f.choices)}, got {value!r}")
            return value
        if f.kind == "floats":
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if isinstance(value, str):  # "8,11"
                value = [v for v in value.split(",") if v.strip()]
            if isinstance(value, (int, float)):
                value = [value]
            return [float(v) for v in value]
        if f.kind == "strs":
            if isinstance(value, str):  # "norm,an_bias"
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return list(value)
        if f.kind == "dict":
            if isinstance(value, str):
                value = yaml.safe_load(value) or {}
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except ValueError as e:
        if "must be one of" in str(e):
            raise
        raise ValueError(f"recipe field {name!r} expects {f.kind}, got {value!r}") from None
    except TypeError:
        raise ValueError(f"recipe field {name!r} expects {f.kind}, got {value!r}") from None
    raise AssertionError(f"unhandled kind {f.kind}")  # pragma: no cover


# ------------------------------------------------------------------------------------------ recipes
def _recipe_dir(folder: Optional[Path] = None) -> Path:
    return Path(str(resources.files("agent_attention.train") / "recipes")) if folder is None else Path(folder)


def list_recipes(folder: Optional[Path] = None) -> List[str]:
    """Names of the bundled recipes of ``folder`` (default: the classification recipes, ``digits``
    and one per official variant); files starting with ``_`` are bases, not recipes."""
    return sorted(p.stem for p in _recipe_dir(folder).glob("*.yaml") if not p.stem.startswith("_"))


def recipe_path(name_or_path: str, folder: Optional[Path] = None) -> Path:
    """A bundled recipe of ``folder`` by name (official name or short alias) or a yaml file path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    name = p.stem if p.suffix in (".yaml", ".yml") else name_or_path
    from ..models.registry import ALIASES

    name = ALIASES.get(name, name)
    candidate = _recipe_dir(folder) / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    import difflib

    names = list_recipes(folder)
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown recipe {name_or_path!r}{hint} (bundled: {', '.join(names)})")


def read_recipe(path: Path, folder: Optional[Path] = None, _seen: Sequence[Path] = ()) -> Dict[str, Any]:
    """The raw mapping of a recipe yaml, meta keys dropped; ``base: NAME`` first reads ``NAME.yaml``
    (a ``_``-prefixed shared part) of the file's folder, else of ``folder`` (the bundled recipes),
    and lets this file override it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping of fields, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        candidates = [path.parent / f"{base}.yaml", _recipe_dir(folder) / f"{base}.yaml"]
        base_path = next((c for c in candidates if c.is_file()), None)
        if base_path is None or base_path.resolve() in _seen:
            raise ValueError(f"recipe {path}: base {base!r} is not a yaml file of {path.parent} or of the "
                             f"bundled recipes (or is a cycle)")
        data = {**read_recipe(base_path, folder, (*_seen, path.resolve())), **data}
    return {k: v for k, v in data.items() if k not in _META_KEYS}


def load_recipe(name_or_path: str = "digits", overrides: Optional[Dict[str, Any]] = None, *,
                fields: Optional[Sequence[Field]] = None, folder: Optional[Path] = None, check: bool = True) -> Config:
    """Defaults <- recipe yaml <- ``overrides`` (field -> value), all values checked (``check=False``:
    each value on its own, not yet the relations between fields: call :func:`validate` after).

    ``fields`` / ``folder``: another family of recipes (default: the classification :data:`FIELDS`
    and the bundled ``train/recipes``), e.g. the dense recipes of ``agent_attention.dense.recipes``."""
    path = recipe_path(name_or_path, folder)
    cfg = defaults(fields)
    for key, value in read_recipe(path, folder).items():
        cfg[key] = coerce(key, value, fields)
    cfg["recipe"] = path.stem
    for key, value in (overrides or {}).items():
        apply_override(cfg, key, value, fields)
    if fields is None and check:
        validate(cfg)
    return cfg


def apply_override(cfg: Config, key: str, value: Any, fields: Optional[Sequence[Field]] = None) -> None:
    """Set field ``key`` (or ``model_kwargs.<name>``, merged into the mapping) from ``value``."""
    if key.startswith("model_kwargs."):
        sub = key[len("model_kwargs."):]
        if not sub:
            raise ValueError("--set model_kwargs.<name>=<value> needs a name")
        cfg["model_kwargs"] = {**cfg["model_kwargs"], sub: yaml.safe_load(value) if isinstance(value, str) else value}
    elif key == "model_kwargs":
        cfg["model_kwargs"] = {**cfg["model_kwargs"], **coerce(key, value, fields)}
    else:
        cfg[key] = coerce(key, value, fields)


def lr_scale(cfg: Config, world_size: int) -> float:
    """The official linear scaling factor ``batch_size * world_size * accum_steps / lr_scale_batch``."""
    if cfg["lr_scale_batch"] is None:
        return 1.0
    return cfg["batch_size"] * world_size * cfg["accum_steps"] / cfg["lr_scale_batch"]


# -------------------------------------------------------------------------------------------- CLI
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser_type(f: Field):
    if f.kind == "dict":
        def mapping(s: str) -> Any:
            try:
                return coerce(f.name, s)
            except ValueError as e:  # argparse would print "invalid mapping value"
                raise argparse.ArgumentTypeError(str(e)) from None

        return mapping
    base = {"int": int, "float": float, "str": str, "floats": float}[f.kind]
    if f.optional:
        return lambda s: None if _is_none(s) else base(s)
    return base


def add_config_args(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
    """Add ``--recipe``, ``--set`` and one flag per field (defaults suppressed: only given flags override)."""
    parser.add_argument("--recipe", "--cfg", default=None, metavar="NAME|YAML",
                        help="bundled recipe name (see --list-recipes) or a yaml file; default: digits, or with "
                             "another --model its own recipe (else 'generic')")
    parser.add_argument("--set", dest="set_", action="append", default=[], metavar="FIELD=VALUE",
                        help="set any field from a yaml value, e.g. --set scale=[0.5,1] --set model_kwargs.depth=6")
    group = parser.add_argument_group("recipe fields (override the recipe)")
    skip = set(skip)
    for f in FIELDS:
        if f.name in skip:
            continue
        kw: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.help)
        if f.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _parser_type(f)
            if f.kind == "floats":
                kw["nargs"] = "+"
            if f.choices:
                kw["choices"] = f.choices
        names = [_flag(f.name)] + (["--data-path"] if f.name == "data" else [])
        group.add_argument(*names, **kw)


def overrides_from_args(args: argparse.Namespace, fields: Optional[Sequence[Field]] = None) -> Dict[str, Any]:
    """``--set`` items (``args.set_``) <- explicit field flags (attributes named as ``fields``)."""
    overrides: Dict[str, Any] = {}
    for item in getattr(args, "set_", []) or []:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    for f in FIELDS if fields is None else fields:
        if hasattr(args, f.name):
            overrides[f.name] = getattr(args, f.name)
    return overrides


def default_recipe(overrides: Dict[str, Any]) -> str:
    """The recipe when none is named: ``digits``; with another ``model``, that model's bundled recipe
    (its official hyper-parameters), else ``generic`` (the official DeiT recipe at 224 px): the
    digits recipe's small-model ``model_kwargs`` and 24 px size are for its own model only."""
    model = overrides.get("model")
    if not isinstance(model, str) or not model.strip():
        return "digits"
    from ..models.registry import ALIASES

    name = ALIASES.get(model, model)
    digits_model = read_recipe(recipe_path("digits")).get("model")
    if name == ALIASES.get(digits_model, digits_model):
        return "digits"
    return name if name in list_recipes() else "generic"


def config_from_args(args: argparse.Namespace, note=None) -> Config:
    """Recipe named by ``args.recipe`` (none: :func:`default_recipe`) <- ``--set`` items <- explicit
    field flags. A recipe warm-up that the given ``epochs`` would not outlast (not set on the command
    line) is clipped to half the epochs, and the recipe's cool-down to a tenth of ``epochs`` given on
    the command line, each with a note (``note(text)``, default: printed)."""
    overrides = overrides_from_args(args)
    cfg = load_recipe(args.recipe or default_recipe(overrides), overrides, check=False)
    if "warmup_epochs" not in overrides and 1 <= cfg["epochs"] <= cfg["warmup_epochs"]:
        clipped = cfg["epochs"] // 2
        (note or _print_note)(f"note: warm-up clipped to {clipped} epoch(s): the recipe's warmup_epochs "
                               f"{cfg['warmup_epochs']} would last the whole {cfg['epochs']}-epoch run")
        cfg["warmup_epochs"] = clipped
    cool = cfg["cooldown_epochs"]
    if "epochs" in overrides and "cooldown_epochs" not in overrides and cool > cfg["epochs"] // 10:
        (note or _print_note)(f"note: cool-down clipped to {cfg['epochs'] // 10} epoch(s): the recipe's "
                               f"cooldown_epochs {cool} would add them to the {cfg['epochs']}-epoch run")
        cfg["cooldown_epochs"] = cfg["epochs"] // 10
    validate(cfg)
    return cfg


def _print_note(text: str) -> None:
    import os

    if os.environ.get("RANK", "0") in ("", "0"):  # once under torchrun
        print(text, flush=True)

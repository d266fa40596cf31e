"""The model registry: each family file declares itself here; timm registration, names, cfgs, builds.

A family file (``agent_<family>.py``) calls :func:`register_family` once, after its
``@register_model`` functions, with its checkpoint filter, short aliases and the paper's top-1 per model; the merged
views :data:`ALIASES`, :data:`PAPER_TOP1` and :data:`FAMILIES` are filled from those calls.
:func:`default_cfg` and :func:`build` are the cfg / builder every family uses (``pool_size``,
``first_conv`` and ``classifier`` by timm's rules, the checkpoint filter, the ``getter`` feature
wrapper); weights come from :mod:`agent_attention.weights`.
"""
from __future__ import annotations

import difflib
import sys
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from ..weights.checkpoints import checkpoint_filter as registered_filter, register_checkpoint_filter
from ..weights.pretrained import prepare_pretrained

__all__ = ["ALIASES", "PAPER_TOP1", "FAMILIES", "TEST_KWARGS", "register_family", "register_alias", "family_of", "model_class",
           "check_model_name", "default_cfg", "build"]

#: short alias -> official name, from every registered family
ALIASES: Dict[str, str] = {}
#: ImageNet top-1 reported in the paper / official README, by official name
PAPER_TOP1: Dict[str, float] = {}
#: registered family prefixes (``"agent_swin"`` ...) -> their model class
FAMILIES: Dict[str, type] = {}
#: family prefix -> constructor kwargs of a tiny model of the family (the contract tests use them)
TEST_KWARGS: Dict[str, dict] = {}
_FAMILY_OF: Dict[str, str] = {}  # every registered name (official and alias) -> family prefix


def register_alias(alias: str, fn):
    """Register ``alias`` with timm as a second entry point of the model function ``fn``."""
    from timm.models import register_model

    def _alias(pretrained: bool = False, **kwargs):
        return fn(pretrained=pretrained, **kwargs)

    _alias.__name__ = alias
    _alias.__qualname__ = alias
    _alias.__module__ = fn.__module__
    _alias.__doc__ = f"Alias of ``{fn.__name__}``."
    _alias.__wrapped__ = fn  # how the weights code resolves an alias to its official name
    registered = register_model(_alias)  # timm lists the name in the module's __all__ ...
    setattr(sys.modules[fn.__module__], alias, registered)  # ... so the module must define it
    return registered


def register_family(module_name: str, model_cls: type, *, checkpoint_filter: Callable, aliases: Dict[str, str],
                    paper_top1: Dict[str, float], test_kwargs: dict) -> None:
    """Declare the family of module ``module_name`` (its ``@register_model`` functions are already
    registered): its ``checkpoint_filter(state_dict, model)`` (official checkpoints -> ``model_cls``,
    used by :func:`build` and by the weights loaders), the short ``aliases`` (alias -> official name,
    registered with timm), the paper's top-1 and ``test_kwargs`` (a tiny model of the family, for
    ``tests/test_model_contract.py``)."""
    module = sys.modules[module_name]
    prefix = module_name.rsplit(".", 1)[-1]
    if not prefix.startswith("agent_"):
        raise ValueError(f"a family module is named agent_<family>.py, got {module_name!r}")
    FAMILIES[prefix] = model_cls
    register_checkpoint_filter(model_cls, checkpoint_filter)
    TEST_KWARGS[prefix] = dict(test_kwargs)
    for name, top1 in paper_top1.items():
        if not callable(getattr(module, name, None)):
            raise ValueError(f"{prefix}: paper_top1 names {name!r}, which the module does not register")
        PAPER_TOP1[name] = top1
        _FAMILY_OF[name] = prefix
    for alias, name in aliases.items():
        register_alias(alias, getattr(module, name))
        ALIASES[alias] = name
        _FAMILY_OF[alias] = prefix


def family_of(name: str) -> Optional[str]:
    """The family of a zoo model name (official or alias) without the ``agent_`` prefix
    (``'swin'``), or ``None`` for other names."""
    prefix = _FAMILY_OF.get(name)
    return prefix[len("agent_"):] if prefix else None


def model_class(family: str) -> Optional[type]:
    """The model class of a family (``'swin'`` or ``'agent_swin'``), or ``None``."""
    return FAMILIES.get(family if family.startswith("agent_") else f"agent_{family}")


def check_model_name(name: str, known: Optional[Iterable[str]] = None, *, kind: str = "model",
                     see: str = "`agent-attention models` for the list") -> None:
    """ValueError ``unknown <kind> 'name'; did you mean ...?`` unless ``name`` is in ``known`` (default:
    every timm model, ours included)."""
    if known is None:
        import timm

        if timm.is_model(name):
            return
        known = timm.list_models("agent_*") + timm.list_models()
    known = list(known)
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown {kind} {name!r}{hint}" + (f" (see {see})" if see else ""))


# ---------------------------------------------------------------- cfgs and builds
def default_cfg(*, first_conv: str, size: int = 224, pool_size: Optional[Tuple[int, int]] = None, **kwargs) -> dict:
    """timm pretrained cfg of a released model (ImageNet-1k, bicubic, ImageNet mean/std, crop 0.875).

    ``pool_size``: the unpooled feature grid at ``size`` (timm's rule; ``None`` for token outputs).
    Other keys (``crop_pct``, ``crop_mode``, ``url``, ``hf_hub_id`` ...) override the defaults.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {"url": "", "num_classes": 1000, "input_size": (3, size, size), "pool_size": pool_size, "crop_pct": 0.875,
            "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": first_conv, "classifier": "head",
            "paper_ids": "arXiv:2312.08874", **kwargs}


def build(model_cls, variant: str, pretrained: bool = False, *, out_indices=(0, 1, 2, 3), **kwargs):
    """Every family's builder: :func:`~agent_attention.weights.pretrained.prepare_pretrained` (safe,
    converted weights; an error when there are none), then ``build_model_with_cfg`` with the family's
    registered checkpoint filter and a ``getter`` feature wrapper."""
    from timm.models import build_model_with_cfg

    kwargs = prepare_pretrained(variant, pretrained, kwargs)
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=registered_filter(model_cls),
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs)


def official_names() -> List[str]:
    """The official names of every registered model, family by family."""
    return list(PAPER_TOP1)

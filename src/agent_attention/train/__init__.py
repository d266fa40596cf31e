"""Training and evaluation: the official ImageNet recipes and the embedded digits main job.

    >>> from agent_attention.train import load_recipe, train
    >>> cfg = load_recipe("digits", {"epochs": 1})          # doctest: +SKIP
    >>> summary = train(cfg)                                # doctest: +SKIP

Command line: ``agent-attention train`` / ``agent-attention eval`` (:mod:`agent_attention.commands`).
"""
from importlib import import_module

from .config import Config, list_recipes, load_recipe

_LAZY = {
    "Trainer": ".engine", "train": ".engine", "SimulatedKill": ".engine",
    "evaluate": ".evaluation", "throughput": ".evaluation", "build_model": ".evaluation",
    "DigitsDataset": ".data", "build_loaders": ".data",
    "param_groups": ".optim", "build_optimizer": ".optim", "build_scheduler": ".optim",
    "plot_curves": ".report",
}

__all__ = ["Config", "list_recipes", "load_recipe", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

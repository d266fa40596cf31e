"""The weights package stands apart from the zoo: it imports no model code, a model class declares its
checkpoint filter, a family file's cfgs carry its download URLs."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import timm
import torch
from torch import nn

import agent_attention.weights as W
from agent_attention.models import agent_swin
from agent_attention.weights import checkpoint_filter, load_official_checkpoint, register_checkpoint_filter

WEIGHTS = Path(W.__file__).parent


def _imports(path: Path) -> set:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_weights_imports_nothing_from_models_or_dense():
    files = sorted(WEIGHTS.glob("*.py"))
    assert len(files) >= 8
    for f in files:
        bad = [m for m in _imports(f) if m.lstrip(".").split(".")[0] in ("models", "dense")
               or m.startswith(("agent_attention.models", "agent_attention.dense"))]
        assert not bad, (f.name, bad)


def checkpoint_filter_fn(state_dict, model):  # a module-level filter must not be found by its name
    raise AssertionError("only a registered filter is used")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)


class _SubNet(_Net):
    pass


def test_only_a_registered_filter_is_applied():
    state = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}
    assert checkpoint_filter(_Net()) is None
    load_official_checkpoint(_Net(), dict(state))  # no filter: this module's checkpoint_filter_fn is ignored
    seen = []

    def renamed(sd, model):
        seen.append(type(model))
        return {k.replace("layer.", "fc."): v for k, v in sd.items()}

    register_checkpoint_filter(_Net, renamed)
    m = load_official_checkpoint(_SubNet(), {"layer.weight": torch.ones(2, 2), "layer.bias": torch.zeros(2)})
    assert seen == [_SubNet] and torch.equal(m.fc.weight, torch.ones(2, 2))  # found through the base class
    assert checkpoint_filter(timm.create_model("agent_swin_t", embed_dim=16, depths=(1, 1, 2, 2),
                                               num_heads=(1, 2, 2, 4), agent_num=[4, 9, 4, 4])) is agent_swin.checkpoint_filter_fn


def test_family_file_declares_its_urls():
    source = inspect.getsource(agent_swin)
    for name in ("agent_swin_tiny", "agent_swin_base_384"):
        url = timm.models.get_pretrained_cfg(name).url
        assert url.startswith("https://cloud.tsinghua.edu.cn/f/") and f'"{url}"' in source

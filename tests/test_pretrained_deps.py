"""The dependency layout: a lean core (no plotting / scikit packages, no torch upper cap), extras for
the commands that need more, and a one-line error naming the extra when one is missing."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from agent_attention import cli
from agent_attention._extras import MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("matplotlib", "sklearn", "skimage")


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_has_no_optional_packages_and_no_torch_cap():
    project = _pyproject()
    core = " ".join(project["dependencies"]).lower()
    for dist in ("matplotlib", "scikit-learn", "scikit-image"):
        assert dist not in core
    torch_req = next(d for d in project["dependencies"] if d.startswith("torch>") or d.startswith("torch="))
    assert "<" not in torch_req, torch_req  # the next torch release is not blocked
    extras = project["optional-dependencies"]
    assert {"train", "viz", "bench", "cli"} <= set(extras)
    assert any("scikit-learn" in d for d in extras["train"]) and any("scikit-image" in d for d in extras["viz"])
    assert "cli" in extras["all"][0]  # CI's .[all] installs every command's extra


def test_core_imports_and_models_work_without_the_optional_packages():
    code = (
        "import sys; sys.modules.update({m: None for m in %r})\n"
        "import agent_attention, agent_attention.models, agent_attention.commands.train, agent_attention.viz, timm\n"
        "from agent_attention.weights import pretrained, hub\n"
        "m = timm.create_model('agent_deit_tiny', depth=1, num_classes=3)\n"
        "import torch; print(tuple(m(torch.randn(1, 3, 32, 32)).shape))\n" % (OPTIONAL,)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(1, 3)")


def test_require_names_the_extra(monkeypatch):
    assert require("json", "anything").__name__ == "json"
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingExtraError, match=r"^the embedded digits set needs scikit-learn, which is not installed: "
                                                 r'pip install "agent-attention\[train\]"$'):
        from agent_attention.train.data import DigitsDataset

        DigitsDataset("train")
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(MissingExtraError, match=r"needs scikit-image.*agent-attention\[viz\]"):
        from agent_attention.viz import load_image

        load_image(None, 32)
    assert issubclass(MissingExtraError, ImportError)


def test_cli_prints_one_line_for_a_missing_extra(monkeypatch, capsys):
    fake = types.ModuleType("fake_cmd")
    fake.main = lambda argv: require("matplotlib", "the fake plot", "viz")
    monkeypatch.setitem(sys.modules, "fake_cmd", fake)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.dispatch("agent-attention", {"plot": ("fake_cmd", "main", "")}, ["plot"]) == 1
    err = capsys.readouterr().err
    assert err == "agent-attention plot: error: the fake plot needs matplotlib, which is not installed: " \
                  'pip install "agent-attention[viz]"\n'

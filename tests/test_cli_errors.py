"""Every CLI failure ends with one line on stderr and exit code 2 (usage) or 1 (runtime), never a
traceback (issue 13 item 13); ``--debug`` shows the traceback instead."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agent_attention.cli import main as cli

TINY_MODEL = "{patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2, agent_num: 4}"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_train(out: Path, *extra: str) -> list:
    return ["train", "--model-kwargs", TINY_MODEL, "--img-size", "8", "--train-subset", "16", "--val-subset", "8",
            "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--threads", "1", "--no-progress",
            "--print-freq", "0", "--num-workers", "0", "--output", str(out), *extra]


def one_line_error(capsys, rc: int, expected_rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert rc == expected_rc, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and ": error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One finished tiny digits run: last.pth (our .pth with its config) and model.safetensors."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli(tiny_train(out)) == 0
    return out


# ------------------------------------------------------------------------------------ usage errors
def test_unknown_command_and_option(capsys):
    one_line_error(capsys, cli(["trian"]), 2, "unknown command 'trian'", "did you mean 'train'")
    one_line_error(capsys, cli(["train", "--epochz", "3"]), 2, "unrecognized arguments: --epochz")
    one_line_error(capsys, cli(["train", "--epochs", "x"]), 2, "--epochs", "invalid int value")


@pytest.mark.parametrize("epochs", ["0", "-2"])
def test_epochs_not_positive(capsys, tmp_path, epochs):
    one_line_error(capsys, cli(tiny_train(tmp_path / "r", "--epochs", epochs)), 2, "epochs")


def test_unknown_device(capsys, tmp_path):
    one_line_error(capsys, cli(tiny_train(tmp_path / "r", "--device", "gpu")), 2, "unknown device 'gpu'")
    one_line_error(capsys, cli(["eval", "--model", "agent_deit_tiny", "--device", "tpu:0", "--no-accuracy"]), 2,
                   "unknown device")


def test_unknown_or_mistyped_model_kwargs(capsys, tmp_path):
    one_line_error(capsys, cli(tiny_train(tmp_path / "r", "--set", "model_kwargs.agent_nmu=4")), 2,
                   "unexpected keyword argument 'agent_nmu'")
    one_line_error(capsys, cli(tiny_train(tmp_path / "r", "--model-kwargs", TINY_MODEL.replace("2,", "two,", 1))), 2,
                   "model_kwargs")
    one_line_error(capsys, cli(tiny_train(tmp_path / "r", "--model-kwargs", "[1, 2]")), 2, "model_kwargs")
    one_line_error(capsys, cli(["train", "--model", "agent_deit_tinny"]), 2, "unknown model", "agent_deit_tiny")


def test_malformed_yaml(capsys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("epochs: [1, 2\nmodel: : x\n")
    one_line_error(capsys, cli(["train", "--recipe", str(recipe)]), 2, "YAML")
    one_line_error(capsys, cli(tiny_train(tmp_path / "r", "--model-kwargs", "{depth: [")), 2, "YAML")


def test_show_bad_values(capsys, tmp_path):
    one_line_error(capsys, cli(["show", "--img-size", "0"]), 2, "--img-size must be at least 16, got 0")
    one_line_error(capsys, cli(["show", "--img-size", "-3"]), 2, "--img-size")


def test_show_out_dir_is_refused_without_temp_files(capsys, tmp_path):
    out = tmp_path / "figs"
    out.mkdir()
    one_line_error(capsys, cli(["show", "--img-size", "32", "--out", str(out)]), 2, "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs"] and not any(out.iterdir())


def test_convert_refuses_same_path_and_directory(capsys, tmp_path):
    src = tmp_path / "x.pth"
    torch.save({"model": {"w": torch.ones(2)}}, src)
    before = src.read_bytes()
    one_line_error(capsys, cli(["convert", str(src), str(src)]), 2, "is the input file")
    link = tmp_path / "same.pth"
    os.link(src, link)
    one_line_error(capsys, cli(["convert", str(src), str(link)]), 2, "is the input file")
    one_line_error(capsys, cli(["convert", str(src), str(tmp_path)]), 2, "is a directory")
    one_line_error(capsys, cli(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors")]), 2,
                   "no such file")
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.pth", "x.pth"]


def test_corrupt_safetensors_header(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((200).to_bytes(8, "little") + b"{not json" + b" " * 20)
    one_line_error(capsys, cli(["eval", "--checkpoint", str(bad), "--no-throughput"]), 2, str(bad))
    one_line_error(capsys, cli(["show", "--checkpoint", str(bad), "--img-size", "32"]), 2, str(bad))
    rc = cli(["convert", str(bad), str(tmp_path / "o.safetensors")])
    line = one_line_error(capsys, rc, 1)
    assert "bad.safetensors" in line or "header" in line.lower()


# ---------------------------------------------------------------------------------- runtime errors
def test_eval_checkpoint_with_other_model_kwargs(capsys, run_dir):
    rc = cli(["eval", "--checkpoint", str(run_dir / "last.pth"), "--set", "model_kwargs.embed_dim=24",
              "--no-throughput", "--val-subset", "8", "--threads", "1"])
    one_line_error(capsys, rc, 1, "checkpoint")


def test_resume_checkpoint_of_another_model(capsys, run_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.pth").write_bytes((run_dir / "last.pth").read_bytes())
    rc = cli(tiny_train(other, "--model", "agent_pvt_tiny", "--model-kwargs", "{}", "--resume", "auto",
                        "--img-size", "32"))
    assert rc in (1, 2)
    one_line_error(capsys, rc, rc)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_output(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        one_line_error(capsys, cli(tiny_train(ro / "run")), 1, "Permission denied", "EACCES", str(ro / "run"))
    finally:
        ro.chmod(0o700)


def test_output_under_a_file(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(capsys, cli(tiny_train(blocker / "run")), 1, str(blocker))
    one_line_error(capsys, cli(tiny_train(blocker)), 1, str(blocker))


def test_disk_full_names_enospc(capsys, tmp_path, monkeypatch):
    import agent_attention._atomic as atomic

    real = atomic.tempfile.mkstemp

    def full(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        os.close(fd)
        os.unlink(name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", full)
    src = tmp_path / "x.pth"
    torch.save({"model": {"w": torch.ones(2)}}, src)
    one_line_error(capsys, cli(["convert", str(src), str(tmp_path / "x.safetensors")]), 1, "ENOSPC", "disk full")


def test_file_size_limit_in_a_subprocess(tmp_path):
    """A real write failure: RLIMIT_FSIZE makes the checkpoint write fail with EFBIG."""
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000));"
        "from agent_attention.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *tiny_train(tmp_path / "run")], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "EFBIG" in lines[0] and "file-size limit" in lines[0]


def test_unreadable_image_names_the_file_and_skip_flag(capsys, tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(root / split / c / f"{i}.png")
    bad = root / "train" / "a" / "9.jpg"
    bad.write_text("not an image")
    args = ["--data", str(root), "--mixup", "0", "--cutmix", "0", "--train-subset", "none", "--val-subset", "none",
            "--batch-size", "4", "--auto-augment", "none"]
    one_line_error(capsys, cli(tiny_train(tmp_path / "r1", *args)), 1, "cannot read image", str(bad))
    assert cli(tiny_train(tmp_path / "r2", *args, "--skip-bad-images")) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and str(bad) in err


def test_debug_shows_the_traceback(capsys):
    from agent_attention.commands import _dispatch

    try:
        with pytest.raises(Exception, match="--img-size"):
            cli(["--debug", "show", "--img-size", "0"])
    finally:
        _dispatch.set_debug(False)


def test_every_option_has_help_without_rst():
    """Help text for every option of every command, and no RST markup leaking into --help."""
    import argparse
    from importlib import import_module

    from agent_attention.cli import COMMANDS
    from agent_attention.commands.bench import SUBCOMMANDS

    parsers = {}
    for name, (module, _, _) in COMMANDS.items():
        try:
            mod = import_module(module)
        except ImportError:  # a command another branch adds (export, train-det, train-seg)
            continue
        if hasattr(mod, "build_parser"):
            parsers[name] = mod.build_parser()
    assert {"train", "eval", "models", "convert", "show", "sd"} <= set(parsers)
    missing, rst = [], []
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        text = parser.format_help()
        if "``" in text or ":func:" in text or ":mod:" in text:
            rst.append(name)
    assert not missing, missing
    assert not rst, rst
    assert set(SUBCOMMANDS) == {"op", "models", "sd", "gpu"}


def test_eval_json_is_written_atomically(capsys, run_dir, tmp_path):
    res = tmp_path / "r.json"
    assert cli(["eval", "--checkpoint", str(run_dir / "model.safetensors"), "--json", str(res), "--threads", "1",
                "--val-subset", "8", "--no-throughput"]) == 0
    assert json.loads(res.read_text())["samples"] == 8

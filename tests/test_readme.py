"""The README's snippets hold: every ```python block runs (a block that needs released weights or a
downloaded pipeline says so in a ``<!-- needs: ... -->`` line above it and is skipped with that
reason; ``<!-- slow: ... -->`` marks one that runs only with ``-m slow``), and every ``agent-attention`` command of its ```bash blocks parses with the command's own
parser (``train`` commands also resolve their recipe)."""
from __future__ import annotations

import re
import shlex
from importlib import import_module
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!-- (?P<tag>needs|slow): (?P<needs>.*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def blocks(lang: str):
    text = README.read_text()
    for m in _BLOCK.finditer(text):
        if m.group("lang") == lang:
            line = text[: m.start("body")].count("\n") + 1
            if m.group("tag") == "slow":  # runs, with -m slow (CI's time budget)
                yield pytest.param(m.group("body"), None, id=f"line{line}", marks=pytest.mark.slow)
            else:
                yield pytest.param(m.group("body"), m.group("needs"), id=f"line{line}")


@pytest.mark.parametrize("code, needs", list(blocks("python")))
def test_python_snippet_runs(code, needs, one_thread, monkeypatch, tmp_path):
    if needs:
        pytest.skip(f"needs {needs}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_snippet"})


def test_snippets_needing_downloads_are_few():
    skipped = [needs for _, needs in (p.values for p in blocks("python")) if needs]
    assert len(skipped) <= 3, skipped


# ---------------------------------------------------------------------------------------------- bash blocks
def _commands():
    """``argv`` of every ``agent-attention ...`` (or ``-m agent_attention.cli ...``) command."""
    found = []
    for param in blocks("bash"):
        for line in param.values[0].splitlines():
            for part in re.split(r"&&|;", line.split(" #")[0]):
                words = shlex.split(part, comments=True)
                if "agent-attention" in words:
                    argv = words[words.index("agent-attention") + 1:]
                elif "agent_attention.cli" in words:
                    argv = words[words.index("agent_attention.cli") + 1:]
                else:
                    continue
                if argv:
                    found.append(pytest.param(argv, id=" ".join(argv)[:60]))
    return found


def _parser(argv):
    from agent_attention.cli import COMMANDS

    name, rest = argv[0], argv[1:]
    assert name in COMMANDS, f"unknown command {name!r}"
    if name == "bench":
        from agent_attention.commands.bench import SUBCOMMANDS

        module, rest = SUBCOMMANDS[rest[0]][0], rest[1:]
    else:
        module = COMMANDS[name][0]
    return import_module(module).build_parser(), rest


@pytest.mark.parametrize("argv", _commands())
def test_bash_command_parses(argv):
    parser, rest = _parser(argv)
    args = parser.parse_args(rest)  # argparse exits (SystemExit 2) on anything unknown
    if argv[0] == "train":
        from agent_attention.train.config import config_from_args

        config_from_args(args, note=lambda text: None)  # recipe and --set values resolve


def test_every_command_of_the_cli_table_is_shown():
    from agent_attention.cli import COMMANDS

    shown = {argv.values[0][0] for argv in _commands()}
    assert set(COMMANDS) - shown <= {"convert", "export", "models"}, set(COMMANDS) - shown  # (in the text)

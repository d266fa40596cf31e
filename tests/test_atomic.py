"""The one atomic-write helper: no partial file, no leftover temp file, strict JSON."""
import json
import os

import pytest

from agent_attention._atomic import atomic_path, remove_stale_temps, write_json, write_text


def test_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(os.listdir(target.parent)) == ["out.txt"]


def test_error_mid_write_keeps_previous_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"good"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_json_is_strict(tmp_path):
    p = write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.5, float("-inf")]})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None]}


def test_remove_stale_temps_only_touches_own_temps(tmp_path):
    target = tmp_path / "last.pth"
    (tmp_path / ".last.pth.abc123.tmp").write_text("orphan")
    (tmp_path / ".other.pth.abc.tmp").write_text("someone else's")
    target.write_text("real")
    removed = remove_stale_temps(target)
    assert [p.name for p in removed] == [".last.pth.abc123.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".other.pth.abc.tmp", "last.pth"]

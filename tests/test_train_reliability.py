"""Training reliability (issue 13): validated recipes, refused recipe changes on resume, NaN guard,
final metrics kept by a resume of a finished run, stale temp files, strict JSON logs, 1-based epochs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from agent_attention.train.checkpointing import LAST, load_state
from agent_attention.train.config import FIELDS, RANGES, load_recipe
from agent_attention.train.engine import NonFiniteLossError, SimulatedKill, Trainer
from agent_attention.train.report import EpochLog

TINY = {"model_kwargs": "{patch_size: 4, embed_dim: 16, depth: 2, num_heads: 2, agent_num: 4}", "img_size": 8,
        "train_subset": 16, "val_subset": 8, "batch_size": 8, "epochs": 2, "warmup_epochs": 1, "threads": 1,
        "progress": False, "print_freq": 0, "export": False, "plot": False}  # 2 optimizer steps per epoch


def tiny(out, **kw):
    return load_recipe("digits", {**TINY, "output": str(out), **kw})


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ item 2: ranges
@pytest.mark.parametrize("field, value, match", [
    ("clip_grad", "-1", r"'clip_grad' must be >= 0 \(0 or none: no clipping\), got -1.0"),
    ("label_smoothing", "1.0", r"'label_smoothing' must be in \[0, 1\), got 1.0"),
    ("base_lr", "0", r"'base_lr' must be > 0"),
    ("base_lr", "nan", r"'base_lr' must be a finite number"),
    ("min_lr", "-1e-5", r"'min_lr' must be >= 0"),
    ("epochs", "0", r"'epochs' must be >= 1, got 0"),
    ("warmup_epochs", "30", r"'warmup_epochs' must be <= epochs \(25\), got 30"),
    ("drop_path", "1", r"'drop_path' must be in \[0, 1\)"),
    ("reprob", "1.5", r"'reprob' must be in \[0, 1\]"),
    ("batch_size", "0", r"'batch_size' must be >= 1"),
    ("accum_steps", "0", r"'accum_steps' must be >= 1"),
    ("threads", "0", r"'threads' must be >= 1"),
    ("save_freq", "-1", r"'save_freq' must be >= 0 \(0: no checkpoint-<epoch>.pth\)"),
    ("keep_ckpts", "-2", r"'keep_ckpts' must be >= 0 \(0: keep all\)"),
    ("ckpt_every_steps", "-1", r"'ckpt_every_steps' must be >= 0"),
    ("train_subset", "0", r"'train_subset' must be >= 1"),
    ("val_subset", "-3", r"'val_subset' must be >= 1"),
    ("scale", "[0.9, 0.2]", r"'scale' is a \(low, high\) pair"),
    ("opt_betas", "[0.9]", r"'opt_betas' needs 2 values"),
    ("opt_betas", "[0.9, 1.0]", r"'opt_betas' must be in \[0, 1\)"),
    ("std", "[0.5, 0, 0.5]", r"'std' must be in \(0, 1\]"),
])
def test_numeric_fields_are_range_checked(field, value, match):
    with pytest.raises(ValueError, match=match) as err:
        load_recipe("digits", {field: value})
    assert "\n" not in str(err.value)


def test_every_numeric_field_has_a_range():
    numeric = {f.name for f in FIELDS if f.kind in ("int", "float", "floats")}
    assert numeric - set(RANGES) == set()


def test_warmup_equal_to_epochs_warns_and_none_or_zero_clip_means_off():
    with pytest.warns(UserWarning, match=r"warmup_epochs \(3\) >= epochs \(3\)"):
        load_recipe("digits", {"epochs": 3, "warmup_epochs": 3})
    assert load_recipe("digits", {"clip_grad": "none"}).clip_grad is None
    assert load_recipe("digits", {"clip_grad": 0}).clip_grad == 0.0


def test_trainer_validates_a_hand_built_config(tmp_path):
    cfg = tiny(tmp_path / "run")
    cfg.clip_grad = -1.0  # set after load_recipe: the trainer checks again (negative clipping trains backwards)
    with pytest.raises(ValueError, match="'clip_grad' must be >= 0"):
        Trainer(cfg, log=None)


# ------------------------------------------------------------------- item 3: changed recipe on resume
def test_resume_with_a_changed_recipe_is_refused_or_applied_explicitly(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny(out, epochs=1, warmup_epochs=0), log=None).fit()
    changed = dict(epochs=2, warmup_epochs=0, batch_size=4, base_lr=1e-3, resume="auto")
    with pytest.raises(ValueError) as err:
        Trainer(tiny(out, **changed), log=None)
    msg = str(err.value)
    assert "another recipe" in msg and "\n" not in msg and "--resume-override" in msg
    assert "batch_size: 8 -> 4" in msg and "epochs: 1 -> 2" in msg and "base_lr: 0.002 -> 0.001" in msg
    # a path, speed or logging change is not a recipe change
    Trainer(tiny(out, epochs=1, warmup_epochs=0, resume="auto", threads=2, print_freq=5), log=None)

    lines = []
    t = Trainer(tiny(out, **changed, resume_override=True), log=lines.append)
    assert any("resume_override" in line and "batch_size: 8 -> 4" in line for line in lines)
    assert t.updates_per_epoch == 4 and t.scheduler.t_initial == 8  # the new schedule: 2 epochs x 4 steps
    assert t.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 4 / 32)  # the new base_lr, scaled
    summary = t.fit()
    assert summary["epochs"] == 2 and load_state(out / LAST)["global_step"] == 2 + 4


# --------------------------------------------------------------------------------- item 7: NaN loss
def test_nan_loss_stops_before_the_step_and_keeps_good_checkpoints(tmp_path):
    out = tmp_path / "run"
    t = Trainer(tiny(out, ckpt_every_steps=1), log=None)
    criterion = t.criterion

    def poisoned(logits, targets):  # NaN from the 4th optimizer step on (epoch 2, step 2)
        loss = criterion(logits, targets)
        return loss * float("nan") if t.global_step >= 3 else loss

    t.criterion = poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 2/2, step 2/2: stopped before"):
        t.fit()
    saved = load_state(out / LAST)
    assert saved["global_step"] == 3 and saved["epoch"] == 1 and saved["step_in_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert all(torch.isfinite(p).all() for p in t.model.parameters())  # the NaN step was never applied

    before = (out / LAST).read_bytes()
    with torch.no_grad():
        next(t.model.parameters())[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="refusing to write a checkpoint: model tensor .* holds NaN/inf"):
        t._save([LAST], 2, 0)
    assert (out / LAST).read_bytes() == before


# ---------------------------------------------------------------------- item 8: finished run resumed
def test_resume_of_a_finished_run_keeps_the_final_metrics(tmp_path):
    out = tmp_path / "run"
    first = Trainer(tiny(out, epochs=1, warmup_epochs=0), log=None).fit()
    assert first["final_top1"] is not None
    lines = []
    again = Trainer(tiny(out, epochs=1, warmup_epochs=0, resume="auto"), log=lines.append).fit()
    for key in ("final_top1", "final_top5", "max_top1"):
        assert again[key] == first[key]
    stored = json.loads((out / "summary.json").read_text())
    assert stored["final_top1"] == first["final_top1"]
    assert any("already finished (1/1 epochs)" in line and f"val top-1 {first['final_top1']:.2f}" in line
               for line in lines)
    assert len(_strict((out / "log.jsonl").read_text())) == 1  # the history is kept, not duplicated


# ------------------------------------------------------------------------- item 10: stale temp files
def test_stale_temp_files_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [".last.pth.k3j2.tmp", ".checkpoint-3.pth.a1.tmp", ".best.pth.x.tmp", ".log.jsonl.q.tmp",
             ".summary.json.z.tmp", ".model.safetensors.w.tmp"]
    keep = [".notes.txt.a.tmp", "last.pth.bak", "mine.tmp"]
    for name in stale + keep:
        (out / name).write_bytes(b"partial")
    lines = []
    Trainer(tiny(out), log=lines.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(keep)
    assert any(f"removed {len(stale)} temp file(s)" in line for line in lines)


# ---------------------------------------------------------------- strict JSON logs, 1-based epochs
def test_epoch_log_is_strict_json(tmp_path):
    log = EpochLog(tmp_path)
    log.append({"epoch": 1, "train_loss": float("nan"), "val_loss": float("inf"), "val_top1": 50.0})
    rows = _strict((tmp_path / "log.jsonl").read_text())
    assert rows == [{"epoch": 1, "train_loss": None, "val_loss": None, "val_top1": 50.0}]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_epochs_are_one_based_in_messages_logs_and_resume(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SimulatedKill):
        Trainer(tiny(out, ckpt_every_steps=1), stop_after_steps=1, log=None).fit()
    lines = []
    Trainer(tiny(out, ckpt_every_steps=1, resume="auto"), log=lines.append).fit()
    assert any(line.endswith("in epoch 1/2 after step 1/2") for line in lines), lines
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert [r["epoch"] for r in _strict((out / "log.jsonl").read_text())] == [1, 2]
    csv_rows = (out / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in csv_rows[1:]] == ["1", "2"]
    assert all(math.isfinite(r["train_loss"]) for r in _strict((out / "log.jsonl").read_text()))

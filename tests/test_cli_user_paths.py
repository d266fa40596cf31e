"""The paths a new user takes: a second run into the same folder, missing extras, exit codes, silent
wrong values refused, a dtype without fast kernels, a flat backbone for a dense model, a smoke run
of any model on a folder. Every CLI failure is one line and an exit code."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from agent_attention.cli import main as cli

TINY_MODEL = "{patch_size: 4, embed_dim: 16, depth: 1, num_heads: 2, agent_num: 4}"


def tiny_train(out: Path, *extra: str) -> list:
    return ["train", "--model-kwargs", TINY_MODEL, "--img-size", "8", "--train-subset", "16", "--val-subset", "8",
            "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--threads", "1", "--no-progress",
            "--print-freq", "0", "--num-workers", "0", "--set", "plot=false", "--output", str(out), *extra]


def error_line(capsys, rc: int, expected_rc: int, *needles: str) -> str:
    """The one error line of stderr (other lines: notes and warnings), checked."""
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert rc == expected_rc, err
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, err)
    return errors[0]


def image_folder(root: Path, splits=("train", "val"), per_class: int = 2, size=(40, 56)) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in splits:
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 255, (*size, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


# ----------------------------------------------------------------------- a run is never replaced silently
def test_second_train_run_needs_resume_or_overwrite(capsys, tmp_path, one_thread):
    out = tmp_path / "run"
    assert cli(tiny_train(out)) == 0
    capsys.readouterr()
    first = (out / "last.pth").read_bytes()
    error_line(capsys, cli(tiny_train(out)), 2, f"--output {out} already holds a run", "--resume auto", "--overwrite")
    assert (out / "last.pth").read_bytes() == first  # untouched
    error_line(capsys, cli(tiny_train(out, "--resume", "auto", "--overwrite")), 2, "exclude each other")
    (out / "checkpoint-7.pth").write_bytes((out / "checkpoint-1.pth").read_bytes())  # a stale one of a longer run
    (out / "notes.txt").write_text("mine")
    assert cli(tiny_train(out, "--overwrite", "--seed", "1")) == 0
    assert "removed" in capsys.readouterr().out
    assert not (out / "checkpoint-7.pth").exists() and (out / "checkpoint-1.pth").exists()
    assert (out / "notes.txt").read_text() == "mine"  # not a file of the run: left alone
    assert (out / "last.pth").read_bytes() != first
    assert cli(tiny_train(out, "--resume", "auto", "--seed", "1")) == 0  # finished: says so, writes nothing new


@pytest.mark.parametrize("command", ["train-det", "train-seg"])
def test_second_dense_run_needs_resume_or_overwrite(capsys, tmp_path, command):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(b"x")
    error_line(capsys, cli([command, "--output", str(out)]), 2, "already holds a run (last.pth)", "--overwrite")


def test_overwrite_removes_only_the_run_files(tmp_path):
    from agent_attention.train.run_dir import DENSE_RUN_FILES, check_run_dir

    for name in ("last.pth", "best.pth", "log.jsonl", "metrics.json", "data.txt"):
        (tmp_path / name).write_text("x")
    removed = check_run_dir(tmp_path, resume=False, overwrite=True, patterns=DENSE_RUN_FILES, log=None)
    assert sorted(p.name for p in removed) == ["best.pth", "last.pth", "log.jsonl", "metrics.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]
    assert check_run_dir(tmp_path, resume=False, overwrite=False) == []  # no run there: nothing to refuse


# ----------------------------------------------------------------------------------- exit codes of usage errors
def test_usage_errors_exit_2(capsys, tmp_path):
    error_line(capsys, cli(["train", "--data", str(tmp_path / "nonexistent")]), 2, "no such directory")
    (tmp_path / "ds" / "train" / "a").mkdir(parents=True)
    error_line(capsys, cli(["eval", "--model", "agent_deit_tiny", "--data", str(tmp_path / "ds")]), 2, "val/<class>")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    error_line(capsys, cli(["train-det", "--preset", str(bad)]), 2, "YAML")
    error_line(capsys, cli(["train-seg", "--preset", str(tmp_path / "none.yaml")]), 2, "unknown recipe")


# ---------------------------------------------------------------------------------------------- missing extras
@pytest.mark.parametrize("module, argv", [
    ("diffusers", ["sd", "--model", "{model}", "--prompt", "a cat", "--out", "{tmp}/x.png", "--steps", "1"]),
    ("segmentation_models_pytorch", ["train-seg", "--head", "upernet", "--output", "{tmp}/r"]),
    ("pycocotools", ["train-det", "--output", "{tmp}/r"]),
])
def test_missing_extra_is_named_in_one_line(capsys, monkeypatch, tmp_path, module, argv):
    model = tmp_path / "sd-model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails as if it were not installed
    argv = [a.format(model=model, tmp=tmp_path) for a in argv]
    line = error_line(capsys, cli(argv), 1, "which is not installed", 'pip install "agent-attention[')
    assert "ModuleNotFoundError" not in line


@pytest.mark.parametrize("module", ["onnx", "onnxscript", "diffusers", "pycocotools"])
def test_missing_module_deep_inside_a_command(capsys, monkeypatch, module):
    """However deep the failing import, the command line names the extra."""
    import types

    from agent_attention.cli import dispatch

    def fail(argv):
        __import__(module)

    fake = types.ModuleType("fake_cmd")
    fake.main = fail
    monkeypatch.setitem(sys.modules, "fake_cmd", fake)
    monkeypatch.setitem(sys.modules, module, None)
    extra = {"onnx": "export", "onnxscript": "export", "diffusers": "diffusers", "pycocotools": "dense"}[module]
    rc = dispatch("agent-attention", {"x": ("fake_cmd", "main", "")}, ["x"])
    error_line(capsys, rc, 1, f'pip install "agent-attention[{extra}]"')


# ----------------------------------------------------------------------------------------- silent wrong values
@pytest.mark.parametrize("value, needle", [("[0.5]", "needs 3 values"), ("[123.7, 116.3, 103.5]", "0-255"),
                                           ("[0.5, 0.5, -0.1]", "in [0, 1]")])
def test_mean_std_are_checked(capsys, value, needle):
    error_line(capsys, cli(["train", "--set", f"mean={value}", "--print-config"]), 2, "'mean'", needle)
    error_line(capsys, cli(["train", "--set", f"std={value}", "--print-config"]), 2, "'std'")


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_dropout_p_out_of_range(p):
    from agent_attention import agent_attention
    from agent_attention.functional import agent_attention_math

    q = torch.randn(1, 1, 4, 8)
    for op in (agent_attention, agent_attention_math):
        with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)") as e:
            op(q, q, q, q[:, :, :2], dropout_p=p)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------- dtypes without fast kernels
AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})
SAPPHIRE = AVX2_ONLY | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def test_slow_dtype_reason():
    from agent_attention._dtypes import slow_dtype_reason

    assert "emulated" in slow_dtype_reason(torch.bfloat16, "cpu", AVX2_ONLY)
    assert slow_dtype_reason("bf16", "cpu", SAPPHIRE) is None
    assert "use fp32" in slow_dtype_reason(torch.float16, "cpu", AVX2_ONLY)
    assert "use bf16" in slow_dtype_reason("fp16", "cpu", SAPPHIRE)
    assert slow_dtype_reason(torch.float16, "cpu", SAPPHIRE | {"amx_fp16"}) is None
    assert slow_dtype_reason(torch.bfloat16, "cuda:0", AVX2_ONLY) is None
    assert slow_dtype_reason(torch.float32, "cpu", AVX2_ONLY) is None
    assert slow_dtype_reason(None, "cpu", AVX2_ONLY) is None


@pytest.mark.parametrize("argv", [
    ["train", "--amp", "bf16", "--data", "/nonexistent-folder"],
    ["eval", "--model", "agent_deit_tiny", "--amp", "bf16", "--data", "/nonexistent-folder"],
    ["bench", "op", "--dtype", "bfloat16", "--sizes", "0"],
    ["bench", "models", "--amp", "none", "bf16", "--sizes", "16"],
    ["sd", "--model", "/nonexistent-model", "--prompt", "x", "--dtype", "bf16"],
])
def test_every_dtype_flag_warns_on_a_cpu_without_kernels(capsys, monkeypatch, argv):
    import agent_attention._dtypes as dtypes

    monkeypatch.setattr(dtypes, "cpu_flags", lambda: AVX2_ONLY)
    cli(argv)  # each stops at a later usage error; the warning comes first
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ": warning: " in ln]
    assert len(warnings) == 1 and "bf16 has no native support on this CPU" in warnings[0], err
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: SAPPHIRE)
    cli(argv)
    assert ": warning: " not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ dense backbones
def test_flat_backbone_is_refused(capsys):
    error_line(capsys, cli(["train-det", "--backbone", "agent_deit_t"]), 2, "flat (strides 16-16-16-16)",
               "hierarchical backbone")
    from agent_attention.dense.backbone import AgentBackbone

    with pytest.raises(ValueError, match="is flat"):  # any flat timm model, also from Python
        AgentBackbone("vit_tiny_patch16_224", out_indices=(0, 1, 2, 3), img_size=32, depth=4)


# --------------------------------------------------------------------------------- a smoke run of any model
def test_other_model_without_recipe_gets_its_own_recipe(capsys):
    import yaml

    assert cli(["train", "--model", "agent_pvt_t", "--epochs", "1", "--print-config"]) == 0
    out = capsys.readouterr()
    cfg = yaml.safe_load(out.out)
    assert cfg["recipe"] == "agent_pvt_tiny" and cfg["model_kwargs"] == {} and cfg["img_size"] == 224
    assert cfg["warmup_epochs"] == 0 and cfg["cooldown_epochs"] == 0
    assert "warm-up clipped" in out.err + out.out and "cool-down clipped" in out.err + out.out
    assert cli(["train", "--model", "resnet18", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["recipe"] == "generic"
    assert cli(["train", "--epochs", "1", "--print-config"]) == 0  # digits: warm-up 2 clipped, not refused
    assert yaml.safe_load(capsys.readouterr().out)["warmup_epochs"] == 0


def test_smoke_run_of_another_model_on_a_folder(capsys, tmp_path, one_thread):
    data = image_folder(tmp_path / "data", per_class=2)
    rc = cli(["train", "--data", str(data), "--model", "agent_pvt_t", "--epochs", "1", "--num-workers", "0",
              "--no-progress", "--output", str(tmp_path / "run"), "--set", "plot=false"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "using batch_size 4" in out.out  # the recipe's 128 is more than the folder holds
    assert (tmp_path / "run" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------- first contact
def test_ddp_gradients_keep_the_parameter_strides():
    """The DWC weight (C, 1, 3, 3) gets its gradient from torch's depthwise conv backward with stride 1
    on the size-1 dim; DDP compares stride tuples literally and warned on every rank."""
    from agent_attention.models import create_model
    from agent_attention.train.engine import match_grad_strides

    model = create_model("agent_deit_tiny", img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, agent_num=4)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    dwc = model.blocks[0].attn.dwc.weight
    if dwc.grad.stride() == dwc.stride():
        pytest.skip("this torch build returns the depthwise weight gradient with the weight's strides")
    model.zero_grad(set_to_none=True)
    assert match_grad_strides(model) >= 1
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert bad == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_sd_device_output_format_and_switch_step(capsys, tmp_path):
    model = tmp_path / "sd-model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    base = ["sd", "--model", str(model), "--prompt", "a cat"]
    error_line(capsys, cli([*base, "--device", "cuda"]), 2, "--device cuda: this machine has no CUDA GPU", "--device cpu")
    error_line(capsys, cli([*base, "--out", str(tmp_path / "x.gif")]), 2, "x.gif", ".png, .jpg or .webp")
    error_line(capsys, cli([*base, "--out", str(tmp_path / "x")]), 2, ".png, .jpg or .webp")
    cli([*base, "--switch-step", "5", "--steps", "2", "--out", str(tmp_path / "x.png")])  # fails later: no real model
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "note:" in ln]
    assert len(notes) == 1 and "--switch-step 5 >= --steps 2" in notes[0]


@pytest.mark.parametrize("name, fmt", [("x.jpg", "JPEG"), ("x.JPEG", "JPEG"), ("x.png", "PNG"), ("x.webp", "WEBP")])
def test_sd_writes_the_format_of_the_extension(tmp_path, name, fmt):
    from PIL import Image

    from agent_attention.commands._sd_pipe import save_image, side_by_side

    im = Image.new("RGB", (8, 8), "red")
    save_image(side_by_side([im, im], ["a", "b"]), tmp_path / name)
    with Image.open(tmp_path / name) as back:
        assert back.format == fmt


def test_models_says_what_it_does_when_piped(capsys, monkeypatch):
    from agent_attention.models import report

    monkeypatch.setattr(report, "model_stats", lambda name, flops=False: report.ModelStats(name=name, flops=1e9 if flops else None))
    assert cli(["models"]) == 0
    out = capsys.readouterr()
    assert "counting params and GFLOPs of 18 models" in out.err and "--no-flops" in out.err
    assert "agent_swin_tiny" in out.out


def test_show_keeps_the_aspect_of_a_wide_image(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from agent_attention import viz

    Image.new("RGB", (200, 100), "gray").save(tmp_path / "wide.png")
    seen = {}
    draw = viz.draw

    def spy(image, *args):
        seen["shape"] = image.shape
        return draw(image, *args)

    monkeypatch.setattr(viz, "draw", spy)
    assert cli(["show", "--model", "agent_pvt_t", "--image", str(tmp_path / "wide.png"), "--img-size", "64",
                "--out", str(tmp_path / "a.png")]) == 0
    assert seen["shape"] == (64, 128, 3)  # 2:1 kept, not cropped or squashed to 64 x 64
    assert viz.load_image(str(tmp_path / "wide.png"), 64).shape == (64, 64, 3)  # the square crop on request


def test_offline_pretrained_hint_names_the_flag(capsys):
    line = error_line(capsys, cli(["eval", "--model", "agent_deit_tiny", "--pretrained", "--no-accuracy",
                                   "--no-throughput"]), 1, "--checkpoint PATH instead of --pretrained")
    assert "pretrained_cfg_overlay" not in line


def test_dense_progress_bars_only_on_a_terminal(capsys, tmp_path):
    """Piped logs get the per-evaluation lines, not tqdm frames (capsys: stderr is not a terminal)."""
    from agent_attention.commands import _dense, train_det
    from agent_attention.dense.recipe import DET_FIELDS

    run = _dense.parse(train_det.build_parser(), "det", DET_FIELDS, ["--output", str(tmp_path / "r")])
    assert run.no_progress is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("command", ["train-det", "train-seg"])
def test_dense_device_is_checked_before_any_work(capsys, tmp_path, command):
    out = str(tmp_path / "run")
    error_line(capsys, cli([command, "--device", "cuda", "--output", out]), 2, "no CUDA GPU")
    error_line(capsys, cli([command, "--device", "gpu", "--output", out]), 2, "unknown device 'gpu'")
    assert not (tmp_path / "run").exists()


def test_sd_merge_flags_reach_both_phases():
    from agent_attention.commands.sd import build_parser, schedule_from_args

    args = build_parser().parse_args(["--model", "m", "--prompt", "p", "--merge-mlp", "--merge-crossattn"])
    schedule, _ = schedule_from_args(args)
    assert schedule.early.merge_mlp and schedule.early.merge_crossattn
    assert schedule.late.merge_mlp and schedule.late.merge_crossattn and schedule.late.sx == 2
    plain, _ = schedule_from_args(build_parser().parse_args(["--model", "m", "--prompt", "p"]))
    assert not plain.early.merge_mlp and not plain.late.merge_crossattn

"""agent-attention bench gpu: the plan of the device check, its report, failing and timed-out stages."""
import json
import sys

from agent_attention.bench import gpu


def _argv(stages, name):
    return next(s["argv"] for s in stages if s["name"].startswith(name))


def test_full_plan_covers_the_check_within_8_minutes(tmp_path):
    stages = gpu.stages("cuda", tmp_path, quick=False, dit=True)
    assert sum(s.get("timeout", 0) for s in stages) <= 480
    tests = _argv(stages, "device tests")
    assert "--device" in tests and tests[tests.index("--device") + 1] == "cuda"
    assert {"tests/test_device_op.py", "tests/test_device_models.py", "tests/test_device_sd.py",
            "tests/test_device_ddp.py"} <= set(tests)
    op49, op256 = _argv(stages, "bench op, 49"), _argv(stages, "bench op, 256")
    for argv in (op49, op256):
        assert {"float16", "bfloat16", "56", "128", "256", "sdpa", "floor", "both"} <= set(argv)
    assert "--backward" in op49 and "flex" in _argv(stages, "bench op, flex")
    models = _argv(stages, "bench models")
    assert {"bf16", "64", "224", "infer", "train", *gpu.T_MODELS} <= set(models)
    sd = _argv(stages, "bench sd, SD")
    assert {"fp16", "512", "1024"} <= set(sd)
    assert "2048" in _argv(stages, "bench sd, DiT")
    assert [s for s in gpu.stages("cuda", tmp_path, quick=False, dit=False) if s["name"] == "bench sd, DiT block"][0]["skip"]


def test_quick_cpu_plan_is_small(tmp_path):
    stages = gpu.stages("cpu", tmp_path, quick=True, dit=False)
    assert not any("flex" in s["name"] for s in stages)  # compiling the CPU kernels takes minutes
    assert "--tiny" in _argv(stages, "bench sd, SD") and "float32" in _argv(stages, "bench op, 49")
    tests = _argv(stages, "device tests")
    assert tests[tests.index("-k") + 1] == "fp32" and tests[tests.index("--device") + 1] == "cpu"


def test_report_with_stages_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "_has_dit_bench", lambda: False)
    assert gpu.main(["--device", "cpu", "--quick", "--skip", "tests", "op", "models", "sd", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "copy bandwidth" in out
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["versions"]["copy_bandwidth_gbs"] > 0 and data["versions"]["torch"]
    assert data["stages"] == []  # --skip sd leaves out the DiT stage too
    assert "0 stage(s) failed" in (tmp_path / "gpu.md").read_text()


def test_failing_and_slow_stages_are_reported(tmp_path):
    bad = gpu._run_stage(dict(name="bad", argv=["-c", "import sys; print('boom'); sys.exit(3)"], timeout=60), tmp_path)
    assert bad["status"] == "failed (exit 3)" and "boom" in bad["tail"] and (tmp_path / "bad.log").exists()
    slow = gpu._run_stage(dict(name="slow", argv=["-c", "import time; time.sleep(30)"], timeout=1), tmp_path)
    assert slow["status"].startswith("timed out")
    assert sys.executable  # the stages run in this interpreter


def test_dit_stage_parses_with_the_dit_bench(tmp_path):
    """The DiT stage's command line is one that ``bench sd --model ...`` accepts (its own options,
    not the UNet bench's), in the full and the quick plan."""
    from agent_attention.bench import sd_dit

    for device, quick in (("cuda", False), ("cpu", True)):
        argv = _argv(gpu.stages(device, tmp_path, quick=quick, dit=True), "bench sd, DiT")
        args = sd_dit.build_parser().parse_args(argv[argv.index("sd") + 1:])
        assert args.model == "pixart" and args.sizes == ([2048] if not quick else [256]) and args.tiny == quick

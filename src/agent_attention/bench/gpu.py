"""agent-attention bench gpu: one command that checks the library on a device and measures it.

Stages, each a separate process with its own time limit (a failing stage is reported, the next runs):

1. the device tests (``tests/test_device_*.py --device <device>``; needs a source checkout);
2. ``bench op``: fp16 and bf16, 56²–256² tokens, 49 and 256 agents, with and without the agent
   biases, against SDPA over all tokens and the memory floor; the FlexAttention path at 128²;
3. ``bench models``: the four T models, bf16 autocast, batch 64, inference and a training step,
   against the official computation and timm's softmax models;
4. ``bench sd``: the SD-1.5 UNet at 512² and 1024² in fp16, and a DiT block at 2048² when ``bench sd``
   has a ``--model`` option.

Prints the card, driver, torch, CUDA and cuDNN versions and the measured copy bandwidth, and writes
``gpu.md``/``gpu.json`` (with each stage's own md/json in a subfolder) to ``--out``. ``--quick``
shrinks every stage (the dry run on the CPU: ``--device cpu --quick``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import common

__all__ = ["main", "stages", "versions", "copy_bandwidth"]

T_MODELS = ("agent_deit_tiny", "agent_pvt_tiny", "agent_swin_tiny", "agent_cswin_tiny")


def versions(device: torch.device) -> Dict[str, object]:
    """Card, driver, torch, CUDA and cuDNN versions (what is known on this machine)."""
    info: Dict[str, object] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                               "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info.update(card=f"CPU: {common.machine_info(device)['cpu']}", driver=None)
    return info


def copy_bandwidth(device: torch.device, mib: int = 1024, repeats: int = 5) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written per second, best
    of ``repeats``): the denominator of the memory floor."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        common.sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        common.sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def _source_tests() -> Optional[Path]:
    """The tests folder of a source checkout (src/agent_attention/bench → repo root), if any."""
    root = Path(__file__).resolve().parents[3]
    tests = root / "tests"
    return tests if (tests / "test_device_op.py").exists() else None


def stages(device: str, out: Path, quick: bool, dit: bool) -> List[dict]:
    """The commands of the check: ``{"name", "argv", "timeout", "cwd"}`` each (argv without the python)."""
    bench = ["-m", "agent_attention", "bench"]
    slack = 1800 if quick else 0  # the reduced dry run is not held to the H100 time limits
    result = []
    tests = _source_tests()
    if tests is not None:
        select = ["-k", "fp32"] if quick else []
        result.append(dict(name="device tests", timeout=slack or 150, cwd=str(tests.parent),
                           argv=["-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "--device", device,
                                 *select, *sorted(str(p.relative_to(tests.parent)) for p in tests.glob("test_device_*.py"))]))
    else:
        result.append(dict(name="device tests", skip="no tests/ folder next to the package (run from a source checkout)"))
    cpu = device == "cpu"
    dtypes = ["float32"] if cpu else ["float16", "bfloat16"]
    sizes = ["14", "28"] if quick else ["56", "128", "256"]
    common_op = ["--device", device, "--dtype", *dtypes, "--bias", "both", "--no-plot", "--repeats", "2" if quick else "10",
                 "--max-seconds", "2" if quick else "5", "--mem-budget-gb", "2" if quick else "16"]
    for agents in (["49"] if quick else ["49", "256"]):
        result.append(dict(name=f"bench op, {agents} agents", timeout=slack or (60 if agents == "49" else 45),
                           argv=[*bench, "op", *common_op, "--sizes", *sizes, "--agents", agents,
                                 "--methods", "agent", "math", "sdpa", "floor", *([] if quick else ["--backward"]),
                                 "--out", str(out / f"op_{agents}")]))
    if not cpu:  # the compiled CPU FlexAttention takes minutes per shape: CUDA only
        result.append(dict(name="bench op, flex path", timeout=60,
                           argv=[*bench, "op", *common_op, "--sizes", "128", "--agents", "49", "--backward",
                                 "--methods", "agent", "flex", "sdpa", "floor", "--out", str(out / "op_flex")]))
    result.append(dict(name="bench models", timeout=slack or 90,
                       argv=[*bench, "models", "--device", device, "--models", *(T_MODELS[:1] if quick else T_MODELS),
                             "--sizes", "64" if quick else "224", "--batch", "2" if quick else "64",
                             "--amp", "none" if cpu else "bf16", "--modes", "infer", "train", "--repeats", "1" if quick else "2",
                             *(["--variants", "agent", "official"] if quick else []),
                             "--no-plot", "--out", str(out / "models")]))
    sd = [*bench, "sd", "--device", device, "--dtype", "fp32" if cpu else "fp16", "--ratios", "0.4",
          "--methods", "agentsd", "--repeats", "2" if quick else "3", "--no-plot"]
    result.append(dict(name="bench sd, SD-1.5 UNet", timeout=slack or 45,
                       argv=[*sd, *(["--tiny", "--sizes", "256"] if quick else ["--sizes", "512", "1024"]),
                             "--out", str(out / "sd")]))
    if dit:
        result.append(dict(name="bench sd, DiT block", timeout=slack or 30,
                           argv=[*bench, "sd", "--model", "pixart", "--device", device,
                                 "--dtype", "fp32" if cpu else "fp16", "--ratio", "0.4", "--methods", "agentsd", "agentsd+merge",
                                 "--repeats", "2" if quick else "3", "--sizes", "256" if quick else "2048",
                                 *(["--tiny"] if quick else []), "--out", str(out / "sd_dit")]))
    else:
        result.append(dict(name="bench sd, DiT block", skip="bench sd has no --model option in this version"))
    return result


def _has_dit_bench() -> bool:
    from .sd import build_parser

    return any("--model" in a.option_strings for a in build_parser()._actions)


def _run_stage(stage: dict, log_dir: Path) -> dict:
    rec = {"name": stage["name"]}
    if "skip" in stage:
        print(f"== {stage['name']}: skipped ({stage['skip']})", flush=True)
        return {**rec, "status": "skipped", "note": stage["skip"]}
    cmd = [sys.executable, *stage["argv"]]
    print(f"== {stage['name']} (limit {stage['timeout']} s): {' '.join(stage['argv'])}", flush=True)
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=stage.get("cwd"), env=env, capture_output=True, text=True, timeout=stage["timeout"])
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {stage['timeout']} s"
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    seconds = time.perf_counter() - t0
    log = log_dir / (stage["name"].replace(" ", "_").replace(",", "") + ".log")
    log.write_text(output)
    tail = "\n".join(output.strip().splitlines()[-12:])
    print(tail, flush=True)
    print(f"== {stage['name']}: {status} in {seconds:.0f} s", flush=True)
    return {**rec, "status": status, "seconds": round(seconds, 1), "log": log.name, "tail": tail}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agent-attention bench gpu", description=common.description(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda if available)")
    p.add_argument("--quick", "--cpu-dry-run", dest="quick", action="store_true",
                   help="reduced sizes and fp32-only device tests (the dry run on the CPU)")
    p.add_argument("--skip", nargs="+", default=[], choices=("tests", "op", "models", "sd"), help="stages to leave out")
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu.md, gpu.json and the stages' outputs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return common.run_cli(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    device = common.resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    info = versions(device)
    print("bench gpu: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    info["copy_bandwidth_gbs"] = round(copy_bandwidth(device, mib=256 if args.quick else 1024), 1)
    print(f"copy bandwidth {info['copy_bandwidth_gbs']} GB/s (read + write)", flush=True)
    plan = [s for s in stages(str(device), args.out, args.quick, _has_dit_bench())
            if not any(s["name"].startswith({"tests": "device tests"}.get(k, f"bench {k}")) for k in args.skip)]
    t0 = time.perf_counter()
    records = [_run_stage(s, args.out) for s in plan]
    total = time.perf_counter() - t0
    failed = [r for r in records if r["status"] not in ("ok", "skipped")]
    md = [f"# Device check on {info['card']}", "",
          "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()] + [
          "", f"Machine: {common.machine_line(common.machine_info(device))}", "",
          f"Total {total:.0f} s; {len(failed)} stage(s) failed.", "", "| stage | status | seconds |", "|---|---|---|"]
    md += [f"| {r['name']} | {r['status']}{': ' + r['note'] if 'note' in r else ''} | {r.get('seconds', '')} |" for r in records]
    for r in records:
        if r["name"].startswith("device tests") and "tail" in r:
            md += ["", "## Device tests", "", "```", r["tail"], "```"]
    for sub in sorted(p for p in args.out.iterdir() if p.is_dir()):
        for f in sorted(sub.glob("*.md")):
            md += ["", f"## {sub.name}", "", f.read_text().strip()]
    for path in common.write_outputs(args.out, "gpu", "\n".join(md) + "\n",
                                     {"versions": info, "stages": records, "seconds": round(total, 1)}):
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""benchmarks/gpu.py, the prepared device check, on the CPU: its sections run and its table reads a real run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_parts import table

ROOT = Path(__file__).resolve().parents[1]


def test_table_of_the_recorded_gpu_run_shows_every_section():
    r = json.loads((ROOT / "benchmarks/results/gpu-h200.json").read_text())
    t = table(r)
    assert "NVIDIA H200" in t and "| gpt2-124m | 123.6M | 64 x 1024 | 493,691 | 55.5% | 42.6% |" in t
    assert "| gpt2-124m + fp8 |" in t and "fp8 vs bf16: 0.95x" in t
    for section in ("main_job: wall 28.0 s", "cuda_tests:", "distributed: plain", "decode: gpt2-124m"):
        assert section in t
    assert "- stages: not run" in t  # recorded before the section existed


def quick_check(tmp_path: Path, sections: str) -> tuple[dict, str]:
    """Return (the JSON, stdout) of `benchmarks.gpu --device cpu --quick` with these sections."""
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--json", str(out)]
    cmd += ["--work", str(tmp_path / "work"), "--sections", sections]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(out.read_text()), p.stdout


def test_quick_check_on_the_cpu_runs_its_sections_and_writes_json(tmp_path):
    r, stdout = quick_check(tmp_path, "cuda_tests,throughput,fp8")
    s = r["sections"]
    assert s["cuda_tests"]["skipped"] >= 10 and not s["cuda_tests"].get("failed")  # no GPU: skipped
    tiny = s["throughput"]["tiny"]
    assert tiny["tokens_per_s"] > 0 and len(tiny["losses"]) == 5
    assert "needs an NVIDIA GPU" in s["fp8"]["refused"]
    assert "| tiny | 0.7M | 4 x 64 |" in stdout and "fp8: --fp8 needs an NVIDIA GPU" in stdout


@pytest.mark.slow
def test_quick_check_runs_each_post_training_stage_from_the_main_jobs_run(tmp_path):
    r, stdout = quick_check(tmp_path, "main_job,stages")
    s = r["sections"]["stages"]
    for stage in ("sft", "dpo", "grpo", "distill"):
        v = s[stage]
        assert v["finished"] and v["finite_losses"] and v["steps"] == 4, v
        assert 0 < v["median_step_ms"] and 0 < v["peak_mem_gib"] and math.isfinite(v["last_loss"])
        assert f"| {stage} | True | {v['median_step_ms']} |" in stdout
    assert "cpu, dtype fp32, compile off" in stdout


def test_quick_check_decode_section_runs_the_compiled_static_cache_step(tmp_path):
    r, stdout = quick_check(tmp_path, "decode")
    d = r["sections"]["decode"]
    for b in ("b1", "b4"):
        assert d[b]["qinglm_compiled_tok_s"] > 0 and d[b]["compiled_same_tokens"], d
    assert d["b1"]["speculate8_tok_s"] > 0 and d["b1"]["speculate8_same_tokens"], d
    assert "decode: tiny" in stdout and "compiled" in stdout and "--speculate 8" in stdout


@pytest.mark.slow
def test_quick_check_scaling_section_trains_a_grid_and_plans_within_memory(tmp_path):
    r, stdout = quick_check(tmp_path, "scaling")
    s = r["sections"]["scaling"]
    assert "error" not in s, s
    assert len(s["points"]) == 6 and all(math.isfinite(p["bpc"]) for p in s["points"])
    assert s["constants"]["alpha"] > 0 and "R" in s["constants"]
    plan = "\n".join(s["plan_10m"])
    assert "model: dial" in plan and "GiB to use" in plan
    assert "- scaling: held-out bits/char dial" in stdout

"""benchmarks/gpu_harness.py, the plumbing of gpu_check.py, with tiny jobs of a throwaway script:
the typed job context survives the trip to the child, and a crash, a hang or a skip becomes a
result in the report instead of stopping the run."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # a script folder, not a package

import gpu_harness  # noqa: E402
from gpu_harness import JobContext, check_targets, run_job, run_sections  # noqa: E402

SCRIPT = """
import os, sys, time
sys.path.insert(0, {benchmarks!r})
from gpu_harness import run_job_here

def echo(ctx):
    return {{"status": "ok", "device": ctx.device, "params": ctx.params, "left": ctx.time_left() > 0,
             "workdir": str(ctx.workdir), "summary": "echoed"}}

def crash(ctx):
    raise ValueError("broken check\\nsecond line")

def hang(ctx):
    time.sleep(60)

JOBS = {{"echo": echo, "crash": crash, "hang": hang}}
sys.exit(run_job_here(JOBS, sys.argv[2], sys.argv[4], sys.argv[6]))
"""


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "jobs.py"
    path.write_text(textwrap.dedent(SCRIPT.format(benchmarks=str(ROOT / "benchmarks"))))
    return path


def _ctx(tmp_path: Path) -> JobContext:
    return JobContext(device="cpu", mode="cpu", workdir=tmp_path, log=tmp_path / "run.log")


def test_context_round_trips_through_json(tmp_path):
    ctx = _ctx(tmp_path).with_params(n=5, eps=0.6).with_params(dim=8)
    back = JobContext.from_json(ctx.to_json())
    assert back == ctx and isinstance(back.workdir, Path) and back.params == {"n": 5, "eps": 0.6, "dim": 8}


def test_a_job_gets_its_context_and_a_crash_or_hang_is_a_result(tmp_path, script):
    ctx = _ctx(tmp_path).with_params(n=3)
    echoed = run_job(script, "echo", ctx, timeout=60)
    assert echoed["status"] == "ok" and echoed["params"] == {"n": 3} and echoed["left"]
    assert echoed["workdir"] == str(tmp_path) and "seconds" in echoed
    crashed = run_job(script, "crash", ctx, timeout=60)
    assert crashed["status"] == "failed" and crashed["error"] == "ValueError: broken check"
    hung = run_job(script, "hang", ctx, timeout=3)
    assert hung == {"status": "failed", "error": "timed out after 3 s", "seconds": hung["seconds"]}
    assert "Traceback" in (tmp_path / "run.log").read_text()  # the child's output goes to the log
    assert not list(tmp_path.glob("*.json"))  # result files are removed


def test_run_sections_writes_the_report_after_each_section(tmp_path, script, capsys):
    output = tmp_path / "report.json"
    report = run_sections(script, ["echo", "skipme", "crash"], _ctx(tmp_path), output, budget=120,
                          caps={"echo": 60, "crash": 60}, min_start_s=1,
                          skip=lambda name: {"status": "skipped", "reason": "asked"} if name == "skipme" else None)
    assert [r["status"] for r in report.values()] == ["ok", "skipped", "failed"]
    assert json.loads(output.read_text()) == report
    assert gpu_harness.overall_status(report) == "failed"
    table = gpu_harness.format_table(report)
    assert "overall: failed" in table and "reason: asked" in table
    assert "echo" in capsys.readouterr().out
    spent = run_sections(script, ["echo"], _ctx(tmp_path), output, budget=0, caps={"echo": 60}, min_start_s=1)
    assert spent["echo"]["status"] == "skipped" and "budget" in spent["echo"]["reason"]


def test_targets_fail_only_when_enforced():
    result = {"status": "ok"}
    check_targets(result, [("ratio", 1.3, "<=", 1.15), ("speed", 2.0, ">=", 1.0)], enforce=True)
    assert result["status"] == "failed" and "ratio 1.3" in result["reason"]
    assert result["targets"]["speed"]["met"] is True
    relaxed = {"status": "ok"}
    check_targets(relaxed, [("ratio", 1.3, "<=", 1.15)], enforce=False)
    assert relaxed["status"] == "ok" and relaxed["targets"]["ratio"]["met"] is None

"""The plumbing of ``benchmarks/gpu_check.py``: each check runs as a job in a subprocess with a time
limit, gets a :class:`JobContext`, and hands back a result dict that goes into an atomically
rewritten JSON report. Nothing here knows what a check measures.

Uses only the standard library: the report must be written even when isereid or torch cannot be
imported.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]

Result = Dict[str, Any]


@dataclass(frozen=True)
class JobContext:
    """What a job is told: the device, where to write, and how long it may take."""

    device: str  # "cuda" or "cpu"
    mode: str  # which sizes to use (the device name)
    workdir: Path  # temporary folder shared by the jobs of one run (demo data, run folders)
    log: Path  # every command's output is appended here
    data_root: Optional[str] = None  # real data in Market layout (absolute), for real_data
    pretrained_path: Optional[str] = None  # backbone weights (absolute), for real_data
    deadline: Optional[float] = None  # time.time() by which the job must be done; set by run_job
    params: Dict[str, Any] = field(default_factory=dict)  # arguments of one job (e.g. a clustering size)

    def with_params(self, **params: Any) -> JobContext:
        """This context with ``params`` added (for a job that runs another job)."""
        return dataclasses.replace(self, params={**self.params, **params})

    def time_left(self) -> float:
        """Seconds until the deadline."""
        assert self.deadline is not None, "the deadline is set by run_job"
        return self.deadline - time.time()

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data.update(workdir=str(self.workdir), log=str(self.log))
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> JobContext:
        data = json.loads(text)
        return cls(**{**data, "workdir": Path(data["workdir"]), "log": Path(data["log"])})


# ============================================================================ report
def one_line(text: object, limit: int = 300) -> str:
    """The first non-empty line of ``text`` (an exception gets its type name), cut to ``limit``."""
    if isinstance(text, BaseException):
        body = str(text).strip().splitlines()
        text = f"{type(text).__name__}: {body[0]}" if body else type(text).__name__
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def last_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of a command's output (where isereid prints its one-line error)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return one_line(lines[-1], limit) if lines else ""


def check_targets(result: Result, targets: Sequence[tuple], enforce: bool) -> None:
    """Record ``targets`` — (name, value, "<=" | ">=" | "<" | "==", limit) — in ``result["targets"]``;
    with ``enforce`` a missed (or unmeasured) one turns an "ok" result into "failed" with a reason."""
    ops: Dict[str, Callable[[Any, Any], bool]] = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t,
                                                  "<": lambda v, t: v < t, "==": lambda v, t: v == t}
    table, missed = {}, []
    for name, value, op, limit in targets:
        met = None if (value is None or not enforce) else bool(ops[op](value, limit))
        table[name] = {"value": value, "target": f"{op} {limit}", "met": met}
        if enforce and not met:
            missed.append(f"{name} {value} (target {op} {limit})")
    result["targets"] = table
    if not enforce:
        result["targets_note"] = "targets apply to --device cuda; CPU figures are only recorded"
    elif missed and result.get("status") == "ok":
        result["status"] = "failed"
        result["reason"] = "target missed: " + "; ".join(missed)


def overall_status(report: Dict[str, Result]) -> str:
    """"failed" if any check failed, else "ok"."""
    return "failed" if any(r.get("status") == "failed" for r in report.values()) else "ok"


def format_table(report: Dict[str, Result]) -> str:
    """A plain-text table: check, status, seconds, summary; reason or error below."""
    lines = [f"{'check':<19}{'status':<9}{'seconds':>8}  summary", "-" * 100]
    for name, r in report.items():
        secs = r.get("seconds")
        secs_text = f"{secs:8.1f}" if isinstance(secs, (int, float)) else f"{'':8}"
        lines.append(f"{name:<19}{r.get('status', '?'):<9}{secs_text}  {r.get('summary', '')}")
        for key in ("reason", "error"):
            if r.get(key):
                lines.append(f"{'':36}{key}: {r[key]}")
    lines.append("-" * 100)
    lines.append(f"overall: {overall_status(report)}")
    return "\n".join(lines)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file beside ``path``, fsync, rename. (Not isereid.utils: the report
    must be written even when isereid cannot be imported.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ============================================================================ subprocesses
def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This environment for a subprocess, PYTHONPATH made absolute (children may change folder)."""
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("ISEREID_FAILPOINT", None)
    env.update(extra or {})
    return env


def run_command(cmd: Sequence[str], log: Path, timeout: float, env: Optional[Dict[str, str]] = None,
                cwd: Path = ROOT) -> Dict[str, Any]:
    """Run ``cmd`` in its own process group, output appended to ``log``; past ``timeout`` the
    group gets SIGTERM, then SIGKILL. Returns rc, seconds, timed_out and the output's last line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(str(c) for c in cmd)}\n")
        f.flush()
        start_pos = f.tell()
        started = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or child_env(), stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
    with open(log) as f:
        f.seek(start_pos)
        tail = f.read()[-20000:]
    return {"rc": rc, "seconds": round(time.perf_counter() - started, 2), "timed_out": timed_out,
            "last_line": last_line(tail), "output_tail": tail}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (torchrun then stops its workers), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ============================================================================ jobs
def run_job(script: Path, name: str, ctx: JobContext, timeout: float, launcher: Sequence[str] = ()) -> Result:
    """Run job ``name`` of ``script`` (which hands ``--job`` to :func:`run_job_here`) in a subprocess,
    optionally under ``launcher`` (e.g. torchrun), and return its result dict; a crash or time-out
    becomes a "failed" result."""
    fd, result_path = tempfile.mkstemp(prefix=f"{name}_", suffix=".json", dir=ctx.workdir)
    os.close(fd)
    ctx = dataclasses.replace(ctx, deadline=time.time() + timeout - 3)  # 3 s to write the result
    cmd = [*(launcher or [sys.executable]), str(Path(script).resolve()), "--job", name,
           "--job-args", ctx.to_json(), "--result", result_path]
    run = run_command(cmd, ctx.log, timeout)
    try:
        text = Path(result_path).read_text()
        result = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        result = None
    finally:
        Path(result_path).unlink(missing_ok=True)
    if result is None:
        why = (f"timed out after {timeout:.0f} s" if run["timed_out"]
               else f"exit status {run['rc']}: {run['last_line'] or 'no output'}")
        result = {"status": "failed", "error": why}
    result.setdefault("seconds", run["seconds"])
    return result


Job = Callable[[JobContext], Optional[Result]]


def run_job_here(jobs: Mapping[str, Job], name: str, ctx_json: str, result_path: str) -> int:
    """Child side: run one job, write its result (or a one-line error) as JSON. A job that returns
    None (a torchrun rank other than 0) writes nothing."""
    started = time.perf_counter()
    try:
        result = jobs[name](JobContext.from_json(ctx_json))
    except Exception as e:  # noqa: BLE001 - any failure of a check is a result, not a crash
        import traceback

        traceback.print_exc()
        result = {"status": "failed", "error": one_line(e)}
    if result is not None:
        result.setdefault("seconds", round(time.perf_counter() - started, 2))
        write_json_atomic(Path(result_path), result)
    return 0


def run_sections(script: Path, sections: Sequence[str], ctx: JobContext, output: Path, *, budget: float,
                 caps: Mapping[str, float], min_start_s: float,
                 skip: Callable[[str], Optional[Result]] = lambda name: None) -> Dict[str, Result]:
    """Run the jobs ``sections`` in order, each within its cap and what is left of ``budget``
    seconds, rewriting the report ``output`` after each; ``skip(name)`` returns the result of a
    section that should not run, else None. A line per section goes to stdout."""
    deadline = time.time() + budget
    started = time.time()
    report: Dict[str, Result] = {}
    for name in sections:
        left = deadline - time.time()
        skipped = skip(name)
        if left < min_start_s:
            report[name] = {"status": "skipped", "reason": f"time budget ({budget:.0f} s) spent"}
        elif skipped is not None:
            report[name] = skipped
        else:
            report[name] = run_job(script, name, ctx, min(caps[name], left))
        r = report[name]
        print(f"[{time.time() - started:6.1f} s] {name:<18} {r['status']:<8} {r.get('summary', '')}"
              + (f"  ({r.get('reason') or r.get('error')})" if r["status"] != "ok" else ""), flush=True)
        write_json_atomic(output, report)
    return report


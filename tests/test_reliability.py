"""kill -9 at any moment, then the same command: the run resumes from the last complete
checkpoint, with no corrupted file and no repeated or lost epoch in metrics.jsonl.

Two real SIGKILLs in a subprocess: mid-iteration, and halfway through writing checkpoint_last.pt.
A stop between two epochs (was a kill at the start of epoch 2's clustering) and a kill while
writing model_best.pt (a stale best file, a metrics line too many, a temp file) are covered
in-process, with a bit-identical continuation, by
tests/test_trainer.py::test_stopped_run_resumes_bit_identical_and_repairs_the_folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from isereid.cli import main

EPOCHS = 2
# tiny images keep each of the 4 subprocess runs short; the kill/resume logic does not depend on size
ARGS = ["--config", "demo", f"optim.epochs={EPOCHS}", "optim.iters=3", "eval.every=1", "data.workers=0",
        "train.progress=false", "train.tensorboard=false", "data.batch_size=32", "model.bn_chunk=16",
        "data.height=32", "data.width=16", "data.pad=2", "cluster.eps=0.5"]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_kill")
    assert main(["demo-data", str(root), "--identities", "40", "--seed", "5"]) == 0
    return root


def _train(root, out, failpoint=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ISEREID_FAILPOINT", None)
    if failpoint:
        env["ISEREID_FAILPOINT"] = failpoint
    cmd = [sys.executable, "-m", "isereid", "train", "--data-root", str(root), "--output-dir", str(out), *ARGS]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _check_complete_run(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines]
    assert epochs == list(range(1, EPOCHS + 1)), epochs
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert state["epoch"] == EPOCHS and [r["epoch"] for r in state["history"]] == epochs
    best = torch.load(out / "model_best.pt", weights_only=True)
    assert best["epoch"] == state["best_epoch"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", [
    "iteration:5",  # epoch 2, second iteration (3 per epoch), after epoch 1's checkpoint
    "checkpoint_write:2",  # halfway through writing epoch 1's checkpoint_last.pt (write 1 is config.yaml)
])
def test_sigkill_then_same_command_resumes(small_demo, tmp_path, failpoint):
    out = tmp_path / "run"
    killed = _train(small_demo, out, failpoint)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if (out / "checkpoint_last.pt").exists():  # whatever is there is complete and loadable
        state = torch.load(out / "checkpoint_last.pt", weights_only=True)
        metrics = out / "metrics.jsonl"
        done = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
        # metrics.jsonl is written right after the checkpoint: it is complete, at most one epoch behind
        assert done == list(range(1, len(done) + 1)) and state["epoch"] - len(done) in (0, 1)
    resumed = _train(small_demo, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _check_complete_run(out)

"""The benchmark scripts users run stay runnable: tiny smoke runs that check their output files
(the figures themselves are measured on real data, never asserted here)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["optim.iters=2", "data.workers=0", "data.batch_size=32", "model.bn_chunk=16", "data.height=32",
        "data.width=16", "data.pad=2", "cluster.eps=0.5", "eval.every=1"]


def test_epoch_profile_writes_phases_and_ratio(tiny_demo, tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "epoch_profile.py"), "--config", "demo",
                           "--data-root", str(tiny_demo), "--output", str(out), "--bare-steps", "2", "--warmup", "1",
                           *TINY], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"extract", "cluster", "train", "data_wait", "evaluate"} <= set(result["phases"])
    assert result["iters"] == 2 and result["bare_step_seconds"] > 0
    assert result["train_ratio"] == pytest.approx(result["phases"]["train"] / (2 * result["bare_step_seconds"]))
    assert "train / bare" in proc.stdout


def test_epoch_profile_bad_config_is_one_line(tiny_demo, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "epoch_profile.py"), "--config", "demo",
                           "--data-root", str(tiny_demo), "--output", str(tmp_path / "p.json"), "optim.nope=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "optim.nope" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p.json").exists()


def _accuracy_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("handler", [True, False], ids=["handler", "without_handler"])
def test_accuracy_sigterm_stops_the_training_run_it_waits_for(tmp_path, handler):
    """``kill PID`` of accuracy.py once left its ``isereid train`` child running alone. A stand-in
    child writes its pid and sleeps; after SIGTERM to the script's process it must be gone, and
    without the handler (the control) it must still be running: the check can tell the two apart."""
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    driver = "\n".join([
        "import importlib.util, sys",
        "from pathlib import Path",
        f"spec = importlib.util.spec_from_file_location('acc', {str(ROOT / 'benchmarks' / 'accuracy.py')!r})",
        "acc = importlib.util.module_from_spec(spec); spec.loader.exec_module(acc)",
        "acc._stop_children_on_sigterm()" if handler else "",
        f"acc._run([sys.executable, '-c', {child!r}], Path({str(tmp_path / 'log.txt')!r}))",
    ])
    proc = subprocess.Popen([sys.executable, "-c", driver])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == (128 + signal.SIGTERM if handler else -signal.SIGTERM)

    def alive() -> bool:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return False
        return True

    if not handler:
        assert alive()
        os.kill(child_pid, signal.SIGKILL)
        return
    deadline = time.time() + 10
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    if alive():
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the child outlived accuracy.py's SIGTERM")


@pytest.mark.parametrize("preset", ["cpu", "demo"])
def test_accuracy_variants_are_valid_and_plain_ise_is_plain(preset):
    """Every variant's overrides load on both shipped presets (those made for one preset's schedule load on it
    and are refused on the other), and the plain-ISE rows turn off every
    camera switch and the colour cue that a preset ships (a switch added later must join them)."""
    from isereid.config import load_config
    from isereid.engine.trainer import camera_switches_on
    from isereid.errors import ConfigError

    accuracy = _accuracy_module()
    for name, overrides in accuracy.VARIANTS.items():
        if overrides is None:
            continue
        if accuracy.ONLY_FOR.get(name, preset) != preset:  # made for another preset's schedule: refused here
            with pytest.raises(ConfigError):
                load_config(preset, overrides)
        else:
            load_config(preset, overrides)
    assert set(accuracy.ONLY_FOR) <= set(accuracy.VARIANTS)
    shipped = load_config(preset)
    assert camera_switches_on(shipped) and shipped.cluster.colour_weight > 0  # else the check below is empty
    assert shipped.model.bn_mode == "camera"
    for name in ("ise", "pil", "lp", "baseline"):
        plain = load_config(preset, accuracy.VARIANTS[name])
        assert camera_switches_on(plain) == {} and plain.cluster.colour_weight == 0, name
        assert plain.model.bn_mode != "camera", name
    assert accuracy.VARIANTS["preset"] == []


def test_accuracy_records_the_machine_a_run_was_made_on_and_the_network_beside_the_average(tmp_path, monkeypatch):
    """Runs reproduce on one processor only, so each run keeps the machine it was made on (a reused run keeps
    its own, not the collecting machine's), and a run with optim.average_from reports both scores."""
    import argparse
    import json

    accuracy = _accuracy_module()
    made = []

    def fake_run(cmd, log_path):  # a finished training run: the last record has the average's and the network's
        out = Path(cmd[cmd.index("--output-dir") + 1])
        out.mkdir(parents=True)
        record = {"epoch": 2, "mAP": 0.4, "rank1": 0.5, "num_clusters": 9, "unaveraged": {"mAP": 0.42, "rank1": 0.5}}
        (out / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        made.append(cmd)
        return 12.0

    monkeypatch.setattr(accuracy, "_run", fake_run)
    args = argparse.Namespace(work_dir=str(tmp_path), config="cpu", data_root="data")
    first = accuracy.run_one("preset_average8", ["optim.average_from=8"], 4, args, [])
    assert first["machine"] == accuracy.machine() and first["machine"]["processor"]
    assert (first["mAP"], first["unaveraged_mAP"], first["unaveraged_rank1"]) == (0.4, 0.42, 0.5)
    monkeypatch.setattr(accuracy, "machine", lambda: {"processor": "another"})
    again = accuracy.run_one("preset_average8", ["optim.average_from=8"], 4, args, [])
    assert len(made) == 1 and again["machine"] == first["machine"]  # reused, with the machine it was made on


def test_holdout_split_waits_for_another_process_building_it(tiny_demo, tmp_path):
    """Two benchmarks started together on one --work-dir built the same split at once and one failed on the
    other's links (FileExistsError). Now a builder waits while another holds the split's lock (here the
    test), writes nothing meanwhile, and two waiting builders then build it once and agree."""
    import threading

    from isereid.data.datasets import build_dataset

    accuracy = _accuracy_module()
    train = build_dataset("demo", tiny_demo).train
    out = tmp_path / "runs" / "holdout_split"
    results, errors = [], []

    def build():
        try:
            results.append(accuracy.holdout_split(train, out, 0.25, seed=3))
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    workers = [threading.Thread(target=build) for _ in range(2)]
    with accuracy.split_lock(out):
        for w in workers:
            w.start()
        time.sleep(1.0)
        assert all(w.is_alive() for w in workers) and not out.exists()  # blocked on the lock, nothing written
    for w in workers:
        w.join(timeout=60)
    assert not errors and len(results) == 2 and results[0] == results[1]
    linked = sorted(p.name for folder in ("bounding_box_train", "query", "bounding_box_test")
                    for p in (out / folder).iterdir())
    assert linked == sorted(Path(s.path).name for s in train)  # every image once


def test_holdout_split_holds_out_whole_multi_camera_identities_and_never_reads_the_test_split(tiny_demo, tmp_path):
    """--holdout: every training image lands in exactly one split folder (a link to itself); the held-out
    identities are all seen by two or more cameras and leave the training folder entirely; the query
    holds the first file of each (identity, camera); the split is reused as it is, rebuilt when asked
    for another; the benchmark scores on it and reports the source folder. Oracle: plain loops here."""
    from isereid.data.datasets import build_dataset

    accuracy = _accuracy_module()
    train = build_dataset("demo", tiny_demo).train
    out = tmp_path / "split"
    manifest = accuracy.holdout_split(train, out, 0.25, seed=3)
    held = set(manifest["held_out_ids"])
    by_pid = {}
    for s in train:
        by_pid.setdefault(s.pid, []).append(s)
    assert len(held) == round(0.25 * sum(len({s.camid for s in v}) >= 2 for v in by_pid.values())) > 0
    assert all(len({s.camid for s in by_pid[pid]}) >= 2 for pid in held)
    folders = {name: sorted(p.name for p in (out / name).iterdir())
               for name in ("bounding_box_train", "query", "bounding_box_test")}
    everything = sorted(name for names in folders.values() for name in names)
    assert everything == sorted(Path(s.path).name for s in train)  # each image once
    for name in everything:
        link = next(out / f / name for f, names in folders.items() if name in names)
        assert link.is_symlink() and link.resolve() == (Path(next(s.path for s in train
                                                                 if Path(s.path).name == name))).resolve()
    expected_query = []
    for pid in held:
        for cam in {s.camid for s in by_pid[pid]}:
            expected_query.append(min(Path(s.path).name for s in by_pid[pid] if s.camid == cam))
    assert folders["query"] == sorted(expected_query)
    train_names = {Path(s.path).name for s in train if s.pid not in held}
    assert set(folders["bounding_box_train"]) == train_names
    assert manifest["query_images"] == len(expected_query)

    stamp = (out / "holdout.json").stat().st_mtime_ns
    assert accuracy.holdout_split(train, out, 0.25, seed=3) == manifest
    assert (out / "holdout.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = accuracy.holdout_split(train, out, 0.5, seed=3)
    assert len(other["held_out_ids"]) > len(held)
    assert sorted(p.name for p in (out / "query").iterdir()) != folders["query"]
    for bad in (0.0, 1.0):
        with pytest.raises(SystemExit, match="--holdout"):
            accuracy.holdout_split(train, tmp_path / "bad", bad)

    # End to end: direct transfer scored on the development split; the test split is not read.
    result = tmp_path / "acc.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--data-root", str(tiny_demo),
                           "--config", "demo", "--variants", "direct", "--holdout", "0.25", "--holdout-seed", "3",
                           "--work-dir", str(tmp_path / "runs"), "--output", str(result), *TINY],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(result.read_text())
    assert payload["data_root"] == str(tiny_demo)
    assert payload["holdout"]["query_images"] == manifest["query_images"]
    log = (tmp_path / "runs" / "direct-seed1" / "log.txt").read_text()
    assert str(tmp_path / "runs" / "holdout_split") in log and "development split" in proc.stderr


def _write_run(folder: Path, records: list) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _rank_correlation_oracle(x: list, y: list) -> float:
    """Spearman's rho without ties, written out: 1 - 6 * sum(d^2) / (n (n^2 - 1)) on the ranks."""
    rank = lambda v: {value: i for i, value in enumerate(sorted(v))}  # noqa: E731
    rx, ry = rank(x), rank(y)
    n = len(x)
    return 1 - 6 * sum((rx[a] - ry[b]) ** 2 for a, b in zip(x, y)) / (n * (n * n - 1))


def test_signals_rank_correlates_each_epoch_with_the_last_score(tmp_path):
    """Five runs, two epochs: epoch 1's signal ranks the scores in an arbitrary order, epoch 2's
    exactly; a run without the nested ``association.merged`` drops out of that signal only."""
    rng = random.Random(0)
    scores = [0.31, 0.42, 0.27, 0.39, 0.35]
    first = [rng.random() for _ in scores]
    folders = []
    for i, (score, value) in enumerate(zip(scores, first)):
        cluster1 = {"mutual_cross_camera": value, "association": {"merged": 10 + i}}
        cluster2 = {"mutual_cross_camera": 2 * score, "association": {"merged": 5 - i} if i else {}}
        folders.append(_write_run(tmp_path / f"r{i}" / "run", [{"epoch": 1, "cluster": cluster1},
                                                               {"epoch": 2, "cluster": cluster2, "mAP": score}]))
    out = tmp_path / "signals.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "signals.py"),
                           *[str(f.parent) for f in folders], "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [r["score"] for r in result["runs"]] == scores
    by_name = {s["name"]: s for s in result["signals"]}
    mutual = by_name["mutual_cross_camera"]["epochs"]
    assert mutual[0]["spearman"] == pytest.approx(_rank_correlation_oracle(first, scores), abs=1e-12)
    assert mutual[1]["spearman"] == pytest.approx(1.0) and mutual[1]["runs"] == 5
    merged = by_name["association.merged"]["epochs"]
    assert merged[0]["spearman"] == pytest.approx(_rank_correlation_oracle(list(range(10, 15)), scores))
    assert merged[1]["runs"] == 4
    assert merged[1]["spearman"] == pytest.approx(_rank_correlation_oracle([4, 3, 2, 1], scores[1:]))
    assert by_name["nmi"]["label_free"] is False and by_name["nmi"]["epochs"][0]["spearman"] is None
    assert "mutual_cross_camera" in proc.stdout and "+1.00" in proc.stdout
    assert [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("association.merged")] == ["5"]


def test_signals_refuses_unscored_runs_in_one_line(tmp_path):
    folders = [_write_run(tmp_path / f"r{i}", [{"epoch": 1, "cluster": {}}]) for i in range(3)]
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "signals.py"), *map(str, folders),
                           "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'mAP'" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "signals.py"), str(folders[0]),
                           str(tmp_path / "missing"), str(folders[1]), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing" in proc.stderr and "Traceback" not in proc.stderr

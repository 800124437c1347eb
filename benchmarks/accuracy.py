"""Accuracy on real crops: direct transfer, the ISE ablations, camera-aware ISE and the supervised ceiling.

    python benchmarks/accuracy.py --data-root ../shared/data/cuhk03-dev --config cpu --seeds 2 \\
        --variants direct,ise,camera_aware,supervised --output acc.json model.pretrained_path=mnv2.pt

Each variant runs the real command line (``isereid train`` / ``isereid test``) in its own run
folder under ``--work-dir``, once per seed (``seed=1..N``, or from ``--first-seed``), and is
scored by the metrics of its **last** epoch (not the best one: choosing the epoch on the test set flatters, see
docs/reference_quirks.md). Variants:

* ``direct``: no training, the configured (pretrained) backbone as it is;
* ``preset``: the preset exactly as shipped, no override (the README's headline row);
* ``baseline``: plain Cluster Contrast (``ise.pil=false ise.lp=false``, camera switches off);
* ``pil`` / ``lp``: ISE with only the support samples in the contrastive loss / only the LP loss;
* ``ise``: plain ISE (both; every camera switch off, whatever the preset turns on);
* ``camera_aware``: ISE + camera-aware proxies + camera-mean normalisation before clustering;
* ``camera_associate``: ``camera_aware`` + cross-camera association of clusters (``cluster.associate``);
* ``supervised``: the same trainer and budget, with the true identities of the file names as labels:
  the ceiling pseudo-labels can reach. ``label efficiency`` = variant mAP / supervised mAP.
* ``NAME`` defined with ``--define NAME="key=value key=value"``.

A run folder that already holds a finished run is reused (re-running the benchmark resumes).
Prints a markdown table; ``--output`` writes ``{"rows": [...], "command": ..., ...}``.

``--holdout F`` scores on a development split instead of the dataset's test split: a fraction F of
the *training* identities (those seen by two or more cameras) become query (the first image of each
identity in each camera) and gallery (the rest), the other training identities stay the training
set, and the test split is not read at all. Settings are chosen there, so that the test split only
reports (docs/benchmarks.md, *Choosing without the test split*).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from isereid.config import load_config
from isereid.data.datasets import MARKET_SPLITS, build_dataset
from isereid.errors import IsereidError
from isereid.utils import atomic_write_text

# Plain ISE: every camera switch, the colour cue and camera-based BatchNorm off, whatever the preset
# turns on (the clustering radius stays the preset's).
_PLAIN = ["memory.camera_aware=false", "memory.camera_online=0", "cluster.camera_norm=false",
          "cluster.associate=false", "cluster.camera_jaccard=false", "ise.foreign=any", "memory.cluster_weight=1.0",
          "memory.cluster_online=negative",
          "cluster.colour_weight=0", "model.bn_mode=chunk"]
_CAMERA = ["memory.camera_aware=true", "cluster.camera_norm=true"]
VARIANTS = {
    "direct": None,
    "preset": [],
    "baseline": [*_PLAIN, "ise.pil=false", "ise.lp=false"],
    "pil": [*_PLAIN, "ise.lp=false"],
    "lp": [*_PLAIN, "ise.pil=false"],
    "ise": _PLAIN,
    "camera_aware": [*_PLAIN, *_CAMERA],
    "camera_associate": [*_PLAIN, *_CAMERA, "cluster.associate=true"],
    "supervised": ["train.supervised=true"],
    # The ceiling in the budget of preset_iters140 / preset_iters140_auto (same minutes per run).
    "supervised_iters140": ["train.supervised=true", "optim.iters=140"],
    # The shipped preset without O2CAP's online association (the preset before 2026-12-02's second
    # round), with it but without the label merge, and with it on top of a preset that lacks it.
    "preset_no_online": ["memory.camera_online=0"],
    "preset_online_nomerge": ["memory.camera_online=1", "cluster.associate=false"],
    "preset_online": ["memory.camera_online=1"],
    # CA-Jaccard in the preset's clustering from the 4th epoch on (docs/camera_aware.md#ca-jaccard):
    # own-camera lists of 5 (the paper's), shorter other-camera lists (3) and query expansion over
    # 2 + 1 rows, since an other-camera ranking is the less reliable one.
    "preset_ca_jaccard": ["cluster.camera_jaccard=true", "cluster.k1_intra=5", "cluster.k1_inter=3",
                          "cluster.k2_intra=2", "cluster.k2_inter=1", "cluster.camera_jaccard_start=3"],
    # The preset with the learning rate falling linearly to lr / epochs over the run (budget-aware).
    "preset_linear_lr": ["optim.scheduler=linear"],
    # Its ceiling: true labels under the same schedule, so that the label efficiency compares like with like.
    "supervised_linear_lr": ["train.supervised=true", "optim.scheduler=linear"],
    # The preset with 140 iterations an epoch: what 20 minutes on an idle 2-core machine hold
    # (benchmarks/epoch_profile.py: 91 s for an epoch of 100 iterations, 0.59 s an iteration).
    "preset_iters140": ["optim.iters=140"],
    # Both changes of the third round that led the preset by more than a point (inside the spread
    # each): 140 iterations an epoch and the label-free DBSCAN radius (docs/auto_eps.md).
    "preset_iters140_auto": ["optim.iters=140", "cluster.eps=auto"],
    # The colour cue in the first two epochs' clustering (docs/camera_aware.md#colour-cue): half the
    # similarity from striped HSV histograms in epoch 1, a quarter in epoch 2, none after. The weight
    # is the even split, chosen before any run, not tuned.
    "preset_colour": ["cluster.colour_weight=0.5", "cluster.colour_epochs=2"],
    # The two changes of the fourth round that led the preset on both seeds, together: the colour
    # cue and the label-free radius, in the preset's budget (100 iterations an epoch). Both are in
    # the cpu and demo presets since 2026-12-03, so this row and `preset_colour` now run `preset`.
    "preset_colour_auto": ["cluster.colour_weight=0.5", "cluster.colour_epochs=2", "cluster.eps=auto"],
    # The preset without the colour cue (the automatic radius alone). The preset before 2026-12-03:
    # --define previous="cluster.colour_weight=0 cluster.eps=0.5" (0.6 for demo).
    "preset_no_colour": ["cluster.colour_weight=0"],
    # The colour cue plus training augmentation against a camera's colour cast (docs/camera_aware.md,
    # section 2d): random greyscale with probability 0.2 and jitter 0.2 of brightness, contrast and
    # saturation; moderate values chosen before any run, not tuned.
    "preset_colour_aug": ["cluster.colour_weight=0.5", "cluster.colour_epochs=2", "data.grayscale_prob=0.2",
                          "data.color_jitter=0.2"],
    # Camera-based BatchNorm (docs/camera_aware.md#camera-bn): every BN layer normalises each camera's
    # rows with that camera's statistics, in training and at extraction. In the cpu and demo presets
    # since 2026-12-03 (fifth round), so this row now runs `preset`.
    "preset_camera_bn": ["model.bn_mode=camera"],
    # The supervised ceiling of a preset with camera-based BatchNorm (now the same as `supervised`).
    "supervised_camera_bn": ["train.supervised=true", "model.bn_mode=camera"],
    # CAP's proxy-balanced sampling (data.sampler=proxy): num_instances images per (cluster, camera)
    # proxy instead of per cluster. In the cpu preset since the ninth round (docs/benchmarks.md), so on
    # cpu this row now runs `preset`, and `preset_cluster_sampler` the per-cluster sampling before it.
    "preset_proxy_sampler": ["data.sampler=proxy"],
    "preset_cluster_sampler": ["data.sampler=cluster"],
    # Both, the proxy sampler measured on top of camera-based BatchNorm (with camera BN in the presets,
    # `preset_proxy_sampler` now runs the same).
    "preset_camera_bn_proxy": ["model.bn_mode=camera", "data.sampler=proxy"],
    # Channels-last memory format (model.channels_last): the same network, its convolutions about 1.3x
    # (training) to 1.7x (inference) faster on CPU; float rounding differs, nothing else.
    "preset_channels_last": ["model.channels_last=true"],
    # What the saved time buys: 140 iterations an epoch in channels-last, about 19 idle minutes a run
    # (benchmarks/epoch_profile.py: 94 s an epoch of 100 iterations, 0.56 s an iteration), and its ceiling.
    # The cpu preset since the sixth round (docs/benchmarks.md), so on cpu these now run `preset` and
    # `supervised`.
    "preset_cl_iters140": ["model.channels_last=true", "optim.iters=140"],
    "supervised_cl_iters140": ["train.supervised=true", "model.channels_last=true", "optim.iters=140"],
    # The same 1,400 iterations as 14 epochs of 100, so the pseudo-labels are re-made 14 times instead of 10
    # as the features improve; evaluation only at the end pays for the 4 extra extractions and clusterings
    # (benchmarks/epoch_profile.py: about 81 s an epoch without evaluation, 19 minutes a run). True labels
    # never change, so with the same iterations the supervised ceiling does not depend on the split.
    "preset_more_epochs": ["optim.epochs=14", "optim.iters=100", "eval.every=0"],
    # Evaluation only at the end of the run, its time spent on iterations: an idle cpu epoch evaluates for
    # 11.2 s of its 115 s (benchmarks/epoch_profile.py), 9 x 11.2 s = 101 s a run, 179 iterations at 0.56 s,
    # so 155 an epoch instead of 140 (rounded down; fixed before any run). A user's own camera folders have
    # no query/gallery to evaluate on, so there the time is already free. And its ceiling in the same budget.
    # The cpu preset since the eighth round (docs/benchmarks.md), so on cpu these now run `preset` and `supervised`.
    "preset_eval_end": ["eval.every=0", "optim.iters=155"],
    "supervised_eval_end": ["train.supervised=true", "eval.every=0", "optim.iters=155"],
    # The preset's supports without the camera restriction: ISE moves each sample towards its nearest
    # foreign centroid of any camera, as the reference does, instead of one of its own camera's
    # (docs/camera_aware.md#camera-aware-ise). Measures that one part of the camera-aware combination.
    "preset_foreign_any": ["ise.foreign=any"],
    # The cpu preset of the fifth round (camera-based BatchNorm, contiguous layout, 100 iterations an epoch).
    "preset_fifth_round": ["model.channels_last=false", "optim.iters=100"],
    # The association gated by the features themselves: a cross-camera pair merges only when it is closer
    # than the median cluster is to its nearest same-camera cluster (docs/camera_aware.md#association-gate).
    "preset_associate_auto": ["cluster.associate_min_similarity=auto"],
    # The cpu preset ranks with k-reciprocal re-ranking since the tenth round; this is its plain cosine
    # ranking, the one every earlier CUHK03 row reports.
    "preset_plain_ranking": ["eval.rerank=false"],
    # Every mutual cross-camera pair of clusters merged: after the first epoch of the development run all
    # 102 mutual pairs are above 0.4 cosine (85 above the preset's 0.5); the gate (fewer merges) lost 2.6 points.
    "preset_associate_040": ["cluster.associate_min_similarity=0.4"],
    # The camera-blind cluster-memory loss at the reference's full weight instead of the preset's quarter:
    # the quarter came in with a combination of camera-aware changes and was never measured alone.
    "preset_cluster_weight_1": ["memory.cluster_weight=1"],
    # The other direction: no camera-blind cluster-memory loss at all, as in CAP and O2CAP (the supports then
    # act through the label-preserving loss only).
    "preset_cluster_weight_0": ["memory.cluster_weight=0"],
    # The inter-camera term at twice the preset's weight (CAP's scale for 2 cameras is the preset's 1): the
    # term that pulls a cluster's proxies of different cameras together, and the online association's positives.
    "preset_inter_weight_2": ["memory.camera_inter_weight=2"],
    # Flip-averaged clustering features (docs/camera_aware.md#flip-features): each training image's and its
    # mirror image's embeddings summed and re-normalised before the clustering; training and evaluation as before.
    "preset_flip_cluster": ["cluster.flip=true"],
    # The same with wider k-reciprocal sets (the preset's k1 6 / k2 3 were chosen for the ImageNet features'
    # purity; on trained features k1 10 / k2 4 kept the precision and raised the recall in a screen).
    "preset_flip_k1_10": ["cluster.flip=true", "cluster.k1=10", "cluster.k2=4"],
    # Wider k-reciprocal sets alone, on single-view clustering features: separates the k1 / k2 change from
    # the flip averaging, which lost on its own in the twelfth round.
    "preset_k1_10": ["cluster.k1=10", "cluster.k2=4"],
    # The preset without ISE's support samples (Cluster Contrast with the same camera-aware parts):
    # what the method's own contribution is on real crops, never measured there.
    "preset_no_ise": ["ise.pil=false", "ise.lp=false"],
    # Twice the learning rate: the preset's rate is constant over its 10 short epochs and both the
    # unsupervised and the supervised curves still rise at the last one. The cpu preset's rate since the
    # twenty-first round and the demo preset's since the twenty-third (docs/benchmarks.md), so on both it
    # now runs `preset`.
    "preset_lr_2x": ["optim.lr=7e-4"],
    # The reference's rate, the cpu preset's until the twenty-first round and the demo preset's until the
    # twenty-third: reproduces the rows measured before those rounds, and the cpu preset's ceiling then
    # (pinned to the online weight of that time, 1, which both presets ship again, and to the constant rate
    # of that time, which the cpu preset left in the thirty-third round, so the rows stay reproducible).
    "preset_reference_lr": ["optim.lr=3.5e-4", "memory.camera_online_weight=1", "optim.step_size=20"],
    "supervised_reference_lr": ["train.supervised=true", "optim.lr=3.5e-4", "memory.camera_online_weight=1",
                                "optim.step_size=20"],
    # The rate at a tenth for the last two of the cpu preset's ten epochs (StepLR, step 8): the last two
    # clusterings and epochs settle on pseudo-labels that are already mostly fixed. The cpu preset's since the
    # thirty-third round (docs/benchmarks.md), so there it now runs `preset`; `preset_constant_lr` and
    # `supervised_constant_lr` run the constant rate of the rounds before it.
    "preset_step8": ["optim.step_size=8"],
    "supervised_step8": ["train.supervised=true", "optim.step_size=8"],
    "preset_constant_lr": ["optim.step_size=20"],
    "supervised_constant_lr": ["train.supervised=true", "optim.step_size=20"],
    # The same shape on the demo preset's seven epochs (the last two at a tenth): lost on every seed of three
    # demo sets (thirty-fifth round), not kept. Three epochs at a tenth on the cpu preset: the thirty-sixth
    # round's screen.
    "preset_step5": ["optim.step_size=5"],
    "preset_step7": ["optim.step_size=7"],
    # A tenth of the colour cue kept in every clustering after its fade (cluster.colour_floor): the
    # thirty-seventh round's screen, ahead on 2 of 4 development seeds, not kept.
    "preset_colour_floor": ["cluster.colour_floor=0.1"],
    # The online association off in the first epoch (memory.camera_online_start): the thirty-eighth round's screen,
    # behind on both development seeds that finished, not kept.
    "preset_online_start1": ["memory.camera_online_start=1"],
    # The online association's positive at twice the weight of a cluster's own proxies: pulls a cluster
    # that lacks a camera towards its most similar proxy there harder, without touching the labels. The cpu
    # preset's from the twenty-fifth to the twenty-seventh round, then taken out (weight 1 again, so there
    # `preset_online_w1` runs the same as `preset`; it keeps the name the docs cite for weight-1 rows).
    "preset_online_w2": ["memory.camera_online_weight=2"],
    "preset_online_w1": ["memory.camera_online_weight=1"],
    # The online association in the camera-blind cluster-memory loss too (memory.cluster_online): a row's nearest
    # cluster seen by none of its cluster's cameras as a second positive, or left out of its softmax (forty-second
    # round's screens).
    "preset_cluster_online": ["memory.cluster_online=positive"],
    "preset_cluster_online_ignore": ["memory.cluster_online=ignore"],
    # The uniform average of the weights after every step of the last two epochs (the tenth of the rate,
    # optim.average_from=8) evaluated in place of the last weights; the network trains exactly as in
    # `preset`, and the run records the network's own last scores too (unaveraged_mAP): a pairing within one
    # run (forty-fourth round).
    "preset_average8": ["optim.average_from=8"],
    "supervised_average8": ["train.supervised=true", "optim.average_from=8"],
    # DBSCAN's core size 3 instead of the reference's 4: fewer outliers on a set with ~5 images of a
    # person per camera (twenty-fifth round, not kept).
    "preset_min_samples_3": ["cluster.min_samples=3"],
    # Pseudo-labels from an exponential moving average of the weights (decay 0.99: about the last 100
    # of an epoch's 155 steps), so that one noisy step moves an epoch's clusters less.
    "preset_ema": ["cluster.ema=0.99"],
    # GeM pooling (a trainable exponent, initialised at 3; Cluster Contrast's default head) instead of the
    # average: weights the strongest activations of each channel, e.g. a bag or a coloured garment.
    "preset_gem": ["model.pooling=gem"],
    # The stem and first three inverted residuals (the 64x32 and 32x16 maps at 128x64) kept at their ImageNet
    # weights, so the backward stops before them, and the time saved spent on iterations: the training phase
    # ran 1.29x faster in a same-load profile (docs/development.md), so 155 x 1.29 = 200 iterations an epoch.
    "preset_freeze4": ["model.freeze_blocks=4", "optim.iters=200"],
    # Its ceiling with true labels in the same minutes (the test-split rows a kept change needs).
    "supervised_freeze4": ["train.supervised=true", "model.freeze_blocks=4", "optim.iters=200"],
}

# Variants that fit one preset's schedule only: with another preset the run's config check refuses their
# overrides (e.g. optim.average_from=8 on the demo preset's seven epochs) and accuracy.py stops with its line.
ONLY_FOR = {"preset_average8": "cpu", "supervised_average8": "cpu"}


@contextlib.contextmanager
def split_lock(out: Path):
    """Hold an exclusive lock on ``out``'s sibling file ``<name>.lock`` for the ``with`` block.

    Two benchmark processes started together on one ``--work-dir`` would otherwise build the same
    development split at the same time and one would fail on the other's links; with the lock the
    second waits and then finds the split complete. Advisory ``flock``: POSIX only (elsewhere no
    lock, so run one process per work dir there)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "a") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def holdout_split(train: list, out: Path, fraction: float, seed: int = 0) -> dict:
    """A Market-layout development split of training samples ``train`` (path, pid, camid) in ``out``.

    A fraction of the identities seen by two or more cameras, drawn with ``seed``, is held out: its
    first image (by file name) in each camera goes to ``query/``, the rest to ``bounding_box_test/``;
    every other training image goes to ``bounding_box_train/``. Files are symbolic links named as
    their targets (the readers parse identity and camera from the name). Returns the manifest
    (also written to ``out/holdout.json``); an ``out`` holding the same manifest is reused.
    """
    if not 0 < fraction < 1:
        raise SystemExit(f"accuracy.py: --holdout {fraction}: expected a fraction between 0 and 1")
    cameras: dict[int, set] = {}
    for sample in train:
        if sample.pid >= 0:
            cameras.setdefault(sample.pid, set()).add(sample.camid)
    eligible = sorted(pid for pid, cams in cameras.items() if len(cams) >= 2)
    held = set(np.random.default_rng(seed).permutation(eligible)[:round(fraction * len(eligible))].tolist())
    if not held or len(held) == len(cameras):
        raise SystemExit(f"accuracy.py: --holdout {fraction} holds out {len(held)} of the {len(cameras)} "
                         f"training identities (of which {len(eligible)} are seen by two or more cameras); "
                         "choose a fraction that leaves both sides some")
    manifest = {"fraction": fraction, "seed": seed, "held_out_ids": sorted(held),
                "train_images": len(train)}
    with split_lock(out):
        return _write_split(train, out, held, manifest)


def _write_split(train: list, out: Path, held: set, manifest: dict) -> dict:
    """:func:`holdout_split`'s folders and manifest, reused when ``out`` already holds this split."""
    marker = out / "holdout.json"
    if marker.exists():
        stored = json.loads(marker.read_text())
        if {k: stored.get(k) for k in manifest} == manifest:  # the same split: its folders are complete
            return stored
    split: dict[str, list] = {folder: [] for folder in MARKET_SPLITS}  # the layout the readers expect
    seen_first: set = set()
    for sample in sorted(train, key=lambda s: os.path.basename(s.path)):
        if sample.pid not in held:
            split["bounding_box_train"].append(sample.path)
        elif (sample.pid, sample.camid) not in seen_first:
            seen_first.add((sample.pid, sample.camid))
            split["query"].append(sample.path)
        else:
            split["bounding_box_test"].append(sample.path)
    names = [os.path.basename(p) for paths in split.values() for p in paths]
    if len(set(names)) != len(names):
        raise SystemExit("accuracy.py: --holdout needs distinct training file names (a Market layout)")
    if marker.exists():
        marker.unlink()  # a different split: rebuild the folders, then write the marker last
    for folder, paths in split.items():
        target = out / folder
        if target.exists():
            for old in target.iterdir():
                old.unlink()
        target.mkdir(parents=True, exist_ok=True)
        for path in paths:
            (target / os.path.basename(path)).symlink_to(Path(path).resolve())
    manifest.update({f"{folder}_images": len(paths) for folder, paths in split.items()})
    atomic_write_text(marker, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _isereid() -> list[str]:
    return [sys.executable, "-m", "isereid"]


def _stop_children_on_sigterm() -> None:
    """``kill PID`` of this script must not leave its training run going on alone: SIGTERM becomes
    SystemExit, on which ``subprocess.run`` kills the child it waits for (the run keeps its last
    checkpoint and resumes when the same command is run again)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _run(cmd: list[str], log_path: Path) -> float:
    started = time.time()
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["?"]
        raise SystemExit(f"accuracy.py: command failed ({proc.returncode}): {shlex.join(cmd)}: {tail[0]}")
    return time.time() - started


def machine() -> dict:
    """Where a run is made: the same code and seed give the same scores to every digit on one processor and
    other scores on another (float kernels differ; docs/benchmarks.md, *Forty-fourth round*), so a pairing
    with a stored run holds only when both were made on the same processor."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return {"processor": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform()}


def run_one(variant: str, extra: list[str], seed: int, args, overrides: list[str]) -> dict:
    """One variant, one seed -> {"mAP", "rank1", "seconds", "cross_camera_clusters", "nmi", ...}."""
    folder = Path(args.work_dir) / f"{variant}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    base = ["--config", args.config, "--data-root", args.data_root]
    settings = ["train.progress=false", f"seed={seed}", *overrides]  # positional key=value arguments last
    if extra is None:  # direct transfer: evaluate the configured backbone
        out = folder / "test.json"
        seconds = None
        if not out.exists():
            seconds = _run(_isereid() + ["test", *base, "--json", str(out), *settings], folder / "log.txt")
        result = json.loads(out.read_text())
        cached = folder / "seconds.txt"
        if seconds is not None:
            cached.write_text(f"{seconds:.1f}")
        return {"mAP": result["mAP"], "rank1": result["rank1"],
                "seconds": float(cached.read_text()) if cached.exists() else None}
    metrics = folder / "run" / "metrics.jsonl"
    done = folder / "seconds.txt"
    made_on = folder / "machine.json"  # written with the run: a reused run keeps the machine it was made on
    if not done.exists():
        atomic_write_text(made_on, json.dumps(machine()) + "\n")
        seconds = _run(_isereid() + ["train", *base, "--output-dir", str(folder / "run"), *settings, *extra],
                       folder / "log.txt")
        done.write_text(f"{seconds:.1f}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    last = records[-1]
    cluster = last.get("cluster") or {}
    return {"mAP": last["mAP"], "rank1": last["rank1"], "seconds": float(done.read_text()),
            "epochs": last["epoch"], "num_clusters": last["num_clusters"],
            "cross_camera_clusters": cluster.get("cross_camera_clusters"),
            "cross_camera_images": cluster.get("cross_camera_images"), "nmi": cluster.get("nmi"),
            # with optim.average_from, the network's own scores beside the average's (mAP, rank1)
            "unaveraged_mAP": (last.get("unaveraged") or {}).get("mAP"),
            "unaveraged_rank1": (last.get("unaveraged") or {}).get("rank1"),
            "machine": json.loads(made_on.read_text()) if made_on.exists() else None,  # None: made before it was kept
            "curve": [{"epoch": r["epoch"], "mAP": r.get("mAP"), "rank1": r.get("rank1"),
                       "cross_camera_clusters": (r.get("cluster") or {}).get("cross_camera_clusters"),
                       "nmi": (r.get("cluster") or {}).get("nmi"),
                       "mutual_cross_camera": (r.get("cluster") or {}).get("mutual_cross_camera"),
                       "cross_camera_nn_accuracy": (r.get("cluster") or {}).get("cross_camera_nn_accuracy")}
                      for r in records]}


def _mean_std(values: list) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)  # no std of one run


def summarise(variant: str, runs: list[dict]) -> dict:
    row = {"variant": variant, "seeds": len(runs), "runs": runs}
    for key in ("mAP", "rank1", "cross_camera_clusters", "nmi", "seconds"):
        row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r.get(key) for r in runs])
    row["seconds"] = row["seconds_mean"]
    return row


def _pct(mean, std) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def table(rows: list[dict]) -> str:
    sup = next((r["mAP_mean"] for r in rows if r["variant"] == "supervised"), None)
    lines = ["| variant | mAP % | rank-1 % | label efficiency | clusters spanning ≥2 cameras % | NMI | "
             "minutes / run | seeds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = f"{r['mAP_mean'] / sup:.2f}" if sup and r["variant"] != "supervised" else "–"
        nmi = "–" if r["nmi_mean"] is None else f"{r['nmi_mean']:.3f}"
        minutes = "–" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"
        lines.append(f"| {r['variant']} | {_pct(r['mAP_mean'], r['mAP_std'])} | "
                     f"{_pct(r['rank1_mean'], r['rank1_std'])} | {eff} | "
                     f"{_pct(r['cross_camera_clusters_mean'], r['cross_camera_clusters_std'])} | {nmi} | "
                     f"{minutes} | {r['seeds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--config", required=True, help="preset name or YAML (e.g. cpu, demo)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per variant: FIRST..FIRST+N-1 (default 2)")
    p.add_argument("--first-seed", type=int, default=1,
                   help="first seed (default 1); e.g. run seeds in parallel processes, then once more with "
                        "--seeds N to collect the finished runs")
    p.add_argument("--variants", default="direct,baseline,pil,lp,ise,supervised")
    p.add_argument("--define", action="append", default=[], metavar='NAME="k=v k=v"',
                   help="an extra variant made of overrides")
    p.add_argument("--output", help="JSON file to write")
    p.add_argument("--work-dir", default="accuracy-runs", help="run folders (reused when re-run)")
    p.add_argument("--holdout", type=float, metavar="F",
                   help="score on a development split: a fraction F of the training identities as query/gallery, "
                        "built under --work-dir; the test split is not read")
    p.add_argument("--holdout-seed", type=int, default=0, help="which identities --holdout holds out (default 0)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every variant")
    args = p.parse_args(argv)
    _stop_children_on_sigterm()
    variants = dict(VARIANTS)
    for d in args.define:
        name, _, spec = d.partition("=")
        if not name or not spec:
            p.error(f"--define {d!r}: expected NAME=\"key=value ...\"")
        variants[name] = shlex.split(spec)
    wanted = [v for v in args.variants.split(",") if v]
    unknown = [v for v in wanted if v not in variants]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(variants)}")
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    source_root, holdout = args.data_root, None
    if args.holdout is not None:
        try:
            dataset = build_dataset(load_config(args.config, args.overrides).data.dataset, args.data_root)
        except IsereidError as e:
            p.error(str(e))
        holdout = holdout_split(dataset.train, Path(args.work_dir) / "holdout_split", args.holdout, args.holdout_seed)
        args.data_root = str(Path(args.work_dir) / "holdout_split")
        print(f"[accuracy] development split in {args.data_root}: {len(holdout['held_out_ids'])} held-out "
              f"identities, {holdout['query_images']} query / {holdout['bounding_box_test_images']} gallery / "
              f"{holdout['bounding_box_train_images']} training images", file=sys.stderr, flush=True)
    rows = []
    for variant in wanted:
        # direct transfer has no randomness
        seeds = [1] if variant == "direct" else range(args.first_seed, args.first_seed + args.seeds)
        runs = []
        for seed in seeds:
            print(f"[accuracy] {variant} seed {seed} ...", file=sys.stderr, flush=True)
            runs.append(run_one(variant, variants[variant], seed, args, args.overrides))
            print(f"[accuracy] {variant} seed {seed}: mAP {100 * runs[-1]['mAP']:.1f}%  "
                  f"rank-1 {100 * runs[-1]['rank1']:.1f}%", file=sys.stderr, flush=True)
        rows.append(summarise(variant, runs))
    text = table(rows)
    print(text)
    if args.output:
        payload = {"rows": rows, "table": text, "config": args.config, "data_root": source_root,
                   "holdout": None if holdout is None else {k: v for k, v in holdout.items() if k != "held_out_ids"},
                   "overrides": args.overrides, "seeds": args.seeds,
                   "command": shlex.join([os.path.basename(sys.executable), *sys.argv]), "cpus": os.cpu_count()}
        atomic_write_text(args.output, json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

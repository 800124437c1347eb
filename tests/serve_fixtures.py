"""A small run folder for the serve / index / embed tests, made without training (seconds, not
minutes): demo data, a seeded random-init ResNet-18 checkpoint at 64 x 32, two epochs of
pseudo-labels written by RunFolder.write_labels (epoch 1: every identity its own cluster; epoch
2: identities paired across, with outliers), metrics.jsonl and a config.yaml naming the data."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from isereid.config import ModelConfig
from isereid.data.datasets import build_dataset
from isereid.data.demo import generate_demo_data
from isereid.embedding import load_embedder
from isereid.engine import checkpoint as ckpt
from isereid.engine.records import EpochRecord
from isereid.engine.run_state import RunFolder
from isereid.features import extract_features
from isereid.models import build_model

HEIGHT, WIDTH = 64, 32


def make_demo(root: Path) -> Path:
    generate_demo_data(root, identities=24, cameras=3, seed=2)
    return root


def make_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", pretrained=False, bn_mode="plain")
    model = build_model(cfg).eval()
    ckpt.save(path, ckpt.model_payload(model.state_dict(), dataclasses.asdict(cfg), 2, 0.1, [HEIGHT, WIDTH]))
    return path


def make_run(demo: Path, run: Path) -> Path:
    """The run folder described in the module doc; returns ``run``."""
    run.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(run / "model_best.pt")
    dataset = build_dataset("demo", str(demo))
    samples = sorted(dataset.train, key=lambda s: s.path)
    paths = [s.path for s in samples]
    camids = np.array([s.camid for s in samples], dtype=np.int64)
    pids = np.array([s.pid for s in samples])
    model, prep = load_embedder(checkpoint)
    feats = extract_features(model, paths, prep.transform(), batch_size=64, progress=False)
    folder = RunFolder(run)
    epoch1 = np.unique(pids, return_inverse=True)[1].ravel()
    epoch2 = epoch1 // 2
    epoch2[::7] = -1
    epoch2 = np.where(epoch2 >= 0, np.unique(epoch2, return_inverse=True)[1].ravel() - 1, -1)
    for epoch, labels in ((1, epoch1), (2, epoch2)):
        folder.write_labels(epoch, labels, paths, camids, feats)
    records = [EpochRecord(epoch=e, num_clusters=int(lab.max()) + 1, num_outliers=int((lab < 0).sum()), loss=3.0 - e,
                           loss_cc=2.0, loss_lp=0.5, lr=3.5e-4, seconds=1.0, interpolation_weight=0.1,
                           mAP=0.1 * e, rank1=0.2 * e, cluster={"cross_camera_clusters": 0.5 + 0.1 * e})
               for e, lab in ((1, epoch1), (2, epoch2))]
    folder.write_metrics(records)
    (run / "config.yaml").write_text(f"data:\n  root: {demo}\n")
    return run


_SHARED: dict[str, Path] = {}


def shared_run(tmp_path_factory) -> Path:
    """One run folder per test session (demo data under ``<run>/../demo``), shared by the modules."""
    if "run" not in _SHARED:
        base = tmp_path_factory.mktemp("serve")
        _SHARED["run"] = make_run(make_demo(base / "demo"), base / "run")
    return _SHARED["run"]

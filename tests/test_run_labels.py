"""Training records each epoch's pseudo-labels in the run folder (labels/epoch_NNN.npz, the image
list once), identical to the trainer's own, and a stopped run that resumes ends with the same files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from isereid.cli import main
from isereid.config import load_config
from isereid.data.datasets import build_dataset
from isereid.distributed import DistContext
from isereid.engine.trainer import Trainer
from isereid.models import trainable_parameters
from isereid.models.reid import ReidNet
from isereid.utils import seed_everything
from test_trainer import _ArgmaxClusters

TINY = ["optim.epochs=2", "optim.iters=1", "eval.every=0", "data.workers=0", "train.progress=false",
        "train.tensorboard=false", "data.batch_size=16", "data.height=32", "data.width=16", "data.pad=2",
        "memory.camera_aware=false", "memory.camera_online=0"]


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_labels")
    assert main(["demo-data", str(root), "--identities", "12", "--cameras", "2", "--seed", "5"]) == 0
    return root


def _trainer(root: Path, out: Path) -> Trainer:
    cfg = load_config("demo", [*TINY, f"data.root={root}"])
    seed_everything(0)
    model = ReidNet(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()), 8)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    return Trainer(cfg, build_dataset(cfg.data.dataset, cfg.data.root), out, DistContext(), model=model,
                   optimizer=optimizer, scheduler=scheduler, cluster_fn=_ArgmaxClusters())


def test_each_epoch_records_its_labels_and_resume_keeps_them(demo, tmp_path):
    trainer = _trainer(demo, tmp_path / "whole")
    seen = []
    update = trainer.update_pseudo_labels

    def record(epoch):
        parts = update(epoch)
        seen.append(trainer.pseudo_labels.copy())
        return parts

    trainer.update_pseudo_labels = record
    trainer.run()
    folder = tmp_path / "whole" / "labels"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_001.npz", "epoch_002.npz", "images.npz"]
    images = np.load(folder / "images.npz")
    assert images["paths"].tolist() == [str(Path(s.path).resolve()) for s in trainer.train_samples]
    np.testing.assert_array_equal(images["camids"], trainer.camids)
    for epoch, labels in enumerate(seen, 1):
        stored = np.load(folder / f"epoch_{epoch:03d}.npz")
        assert stored["labels"].dtype == np.int32
        np.testing.assert_array_equal(stored["labels"], labels)
        assert len(stored["inside"]) == len(stored["between"]) > 0
        assert (stored["inside"] >= -1e-6).all() and (stored["between"] <= 2 + 1e-6).all()

    # stopped after epoch 1, resumed by a new trainer: the same label files
    first = _trainer(demo, tmp_path / "resumed")
    save = first.save

    def save_then_stop(epoch, record):
        save(epoch, record)
        raise _Stop

    first.save = save_then_stop
    with pytest.raises(_Stop):
        first.run()
    assert not (tmp_path / "resumed" / "labels" / "epoch_002.npz").exists()
    _trainer(demo, tmp_path / "resumed").run()
    for name in ("images.npz", "epoch_001.npz", "epoch_002.npz"):
        a, b = np.load(folder / name), np.load(tmp_path / "resumed" / "labels" / name)
        for key in a.files:
            if key != "paths":
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
    assert not list((tmp_path / "resumed" / "labels").glob(".*"))

"""The trainer in-process with parts injected through its constructor: a tiny conv net in place of
ResNet and a test-owned clustering function. A 2-epoch run writes its run folder; a run stopped
after epoch 1 and continued by a new Trainer on the same folder ends bit-identical to the
uninterrupted run, after repairing what a kill between two writes leaves behind."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from isereid.cli import main
from isereid.config import load_config
from isereid.data.datasets import build_dataset
from isereid.distributed import DistContext
from isereid.engine.records import EpochRecord
from isereid.engine.run_log import epoch_scalars
from isereid.engine.trainer import Trainer
from isereid.models import trainable_parameters
from isereid.models.reid import ReidNet
from isereid.utils import seed_everything
from test_run_log import FakeWriter

TINY = ["optim.epochs=2", "optim.iters=2", "eval.every=1", "data.workers=0", "train.progress=false",
        "train.tensorboard=false", "data.batch_size=32", "data.height=32", "data.width=16", "data.pad=2",
        "optim.step_size=1"]  # the learning rate changes between the epochs: the scheduler state matters


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_inproc")
    assert main(["demo-data", str(root), "--identities", "24", "--cameras", "3", "--seed", "2"]) == 0
    return root


def _tiny_net() -> ReidNet:
    seed_everything(0)  # python, NumPy and torch, as `isereid train` does
    base = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    return ReidNet(base, 16)


class _ArgmaxClusters:
    """A clustering that depends on the features and always finds clusters: the argmax of the 16
    feature dimensions; members of clusters with one image are outliers. Records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, features: torch.Tensor, camids: np.ndarray, epoch: int) -> np.ndarray:
        self.calls.append((features.shape, camids.copy()))
        labels = features.argmax(1).numpy().astype(np.int64)
        counts = np.bincount(labels)
        labels[counts[labels] < 2] = -1
        return np.unique(labels, return_inverse=True)[1].ravel() - int((labels < 0).any())


def _trainer(root: Path, out: Path, *overrides: str) -> Trainer:
    cfg = load_config("demo", [*TINY, f"data.root={root}", *overrides])
    model = _tiny_net()
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.optim.step_size, gamma=cfg.optim.gamma)
    return Trainer(cfg, build_dataset(cfg.data.dataset, cfg.data.root), out, DistContext(), model=model,
                   optimizer=optimizer, scheduler=scheduler, cluster_fn=_ArgmaxClusters())


class _Stop(Exception):
    pass


def _stop_after_first_save(trainer: Trainer) -> None:
    save = trainer.save

    def save_then_stop(epoch, record):
        save(epoch, record)
        raise _Stop

    trainer.save = save_then_stop


def _records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall times (seconds, phases)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "phases")} for line in lines]


def test_injected_parts_are_used_and_the_run_folder_is_written(demo, tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(demo, out)
    history = trainer.run()
    assert [r.epoch for r in history] == [1, 2] and all(isinstance(r, EpochRecord) for r in history)
    calls = trainer.cluster_fn.calls
    assert len(calls) == 2 and calls[0][0] == (len(trainer.train_samples), 16)
    np.testing.assert_array_equal(calls[0][1], trainer.camids)
    assert history[1].lr == pytest.approx(0.1 * history[0].lr)  # StepLR(step_size=1, gamma=0.1) stepped
    assert all(r.evaluated and r.cluster is not None for r in history)
    assert [EpochRecord.from_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == history
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert state["epoch"] == 2 and [r["epoch"] for r in state["history"]] == [1, 2]
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(state["state_dict"][name], tensor), name
    best = torch.load(out / "model_best.pt", weights_only=True)
    assert best["epoch"] == state["best_epoch"] and best["mAP"] == max(r.mAP for r in history)
    assert (out / "config.yaml").is_file()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_stopped_run_resumes_bit_identical_and_repairs_the_folder(demo, tmp_path):
    whole = _trainer(demo, tmp_path / "whole")
    whole.run()

    out = tmp_path / "stopped"
    first = _trainer(demo, out)
    _stop_after_first_save(first)
    with pytest.raises(_Stop):
        first.run()
    assert [r["epoch"] for r in _records(out)] == [1]
    # What a kill between two writes of the next epoch would leave: a metrics line of an epoch that
    # did not finish, model_best.pt not (or half) written, a temp file of an atomic write.
    saved_best = torch.load(out / "model_best.pt", weights_only=True)
    assert saved_best["epoch"] == 1  # epoch 1 is the best so far
    (out / "model_best.pt").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "loss": 1.0}) + "\n")
    (out / ".model_best.pt.tmp").write_bytes(b"half")

    again = _trainer(demo, out)
    again.resume()
    assert again.start_epoch == 1 and [r.epoch for r in again.history] == [1]
    assert [r["epoch"] for r in _records(out)] == [1]
    repaired = torch.load(out / "model_best.pt", weights_only=True)
    assert repaired["epoch"] == 1
    assert all(torch.equal(repaired["state_dict"][k], v) for k, v in saved_best["state_dict"].items())
    assert not (out / ".model_best.pt.tmp").exists()

    again.run()
    assert _records(out) == _records(tmp_path / "whole")
    final, expected = again.model.state_dict(), whole.model.state_dict()
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    torch.testing.assert_close(again.memory.centroids, whole.memory.centroids, rtol=0, atol=0)


@pytest.mark.parametrize("layout", [(), ("model.bn_mode=camera", "model.channels_last=true")],
                         ids=["default", "camera_bn_channels_last"])
def test_camera_aware_run_resumes_bit_identical(demo, tmp_path, layout):
    """With cluster.every=2 epoch 2 trains on the memories restored from the checkpoint (no
    re-clustering): both must come back bit for bit, which rebuilding them through the constructors
    (which re-normalise) did not. Also in the cpu preset's layout: camera-based BatchNorm with
    channels-last weights, whose optimizer state must come back in the same layout."""
    overrides = ("memory.camera_aware=true", "ise.foreign=same_camera", "cluster.every=2", "memory.camera_online=1",
                 *layout)
    whole = _trainer(demo, tmp_path / "whole", *overrides)
    whole.run()
    out = tmp_path / "stopped"
    first = _trainer(demo, out, *overrides)
    _stop_after_first_save(first)
    with pytest.raises(_Stop):
        first.run()
    again = _trainer(demo, out, *overrides)
    again.run()
    assert len(again.cluster_fn.calls) == 0  # epoch 2 did not re-cluster
    assert _records(out) == _records(tmp_path / "whole")
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    assert torch.equal(again.memory.centroids, whole.memory.centroids)
    for name, tensor in whole.camera_memory.state_dict().items():
        assert torch.equal(again.camera_memory.state_dict()[name], tensor), name


def test_the_writer_gets_the_iteration_and_epoch_scalars(demo, tmp_path):
    trainer = _trainer(demo, tmp_path / "tb", "train.log_every=1")
    writer = trainer.writer = FakeWriter()
    history = trainer.run()
    train = [(tag, step) for tag, _, step in writer.scalars if tag.startswith("train/")]
    assert {step for _, step in train} == {0, 1, 2, 3} and ("train/interpolation_weight", 3) in train
    epochs = [(tag, value, step) for tag, value, step in writer.scalars if not tag.startswith("train/")]
    assert epochs == [(tag, value, r.epoch) for r in history for tag, value in epoch_scalars(r)]
    assert writer.closed and writer.flushed == 2


class _ArgmaxClustersWithOutliers(_ArgmaxClusters):
    """:class:`_ArgmaxClusters` with every fifth image made an outlier as well, so each epoch has some."""

    def __call__(self, features: torch.Tensor, camids: np.ndarray, epoch: int) -> np.ndarray:
        labels = super().__call__(features, camids, epoch)
        labels[::5] = -1
        kept = labels >= 0
        labels[kept] = np.unique(labels[kept], return_inverse=True)[1].ravel()
        return labels


def test_singleton_outliers_train_on_every_image_and_resume_bit_identical(demo, tmp_path):
    """cluster.outliers=singletons: each outlier is a pseudo-identity of its own in the cluster memory, the
    camera proxies, the sampler and the supports, while the record and labels/ keep DBSCAN's clusters."""
    overrides = ("cluster.outliers=singletons", "memory.camera_aware=true", "ise.foreign=same_camera",
                 "memory.camera_online=1", "data.sampler=proxy", "cluster.every=2")

    def trainer(out):
        t = _trainer(demo, out, *overrides)
        t.cluster_fn = _ArgmaxClustersWithOutliers()
        return t

    whole = trainer(tmp_path / "whole")
    history = whole.run()
    labels = whole.pseudo_labels
    outliers = int((labels < 0).sum())
    clusters = int(labels.max()) + 1
    assert outliers > 0 and history[0].num_outliers == outliers and history[0].num_clusters == clusters
    assert history[0].cluster["num_clusters"] == clusters
    assert whole.memory.centroids.shape[0] == clusters + outliers
    trained = whole.train_labels
    assert (trained >= 0).all() and np.array_equal(trained[labels >= 0], labels[labels >= 0])
    pairs = {(int(t), int(c)) for t, c in zip(trained, whole.camids)}
    assert whole.camera_memory.proxies.shape[0] == len(pairs)
    saved = np.load(tmp_path / "whole" / "labels" / "epoch_001.npz")
    assert np.array_equal(saved["labels"], labels)  # what `isereid serve` shows: DBSCAN's clusters
    drawn = np.unique(whole._epoch_loader(1).batch_sampler.batches)
    assert np.isin(np.flatnonzero(labels < 0), drawn).any()  # the epoch's rows are all images: outliers drawn

    out = tmp_path / "stopped"
    first = trainer(out)
    _stop_after_first_save(first)
    with pytest.raises(_Stop):
        first.run()
    again = trainer(out)
    again.run()
    assert len(again.cluster_fn.calls) == 0  # epoch 2 trained on the memories restored from the checkpoint
    assert _records(out) == _records(tmp_path / "whole")
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    assert torch.equal(again.memory.centroids, whole.memory.centroids)


def test_dropped_outliers_stay_out_of_the_epoch(demo, tmp_path):
    t = _trainer(demo, tmp_path / "drop", "memory.camera_aware=true", "optim.epochs=1")
    t.cluster_fn = _ArgmaxClustersWithOutliers()
    t.run()
    labels = t.pseudo_labels
    assert (labels < 0).any() and t.train_labels is labels
    assert t.memory.centroids.shape[0] == int(labels.max()) + 1
    assert len(t._epoch_loader(0).dataset) == int((labels >= 0).sum())

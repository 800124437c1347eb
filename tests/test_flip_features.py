"""Flip-averaged features (``extract_features(flip=True)``, ``cluster.flip``, ``eval.flip``) against an
oracle that runs the network on each image and on its mirror image one at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn

from isereid.features import extract_features


class _Unit(nn.Module):
    """A small network that is not left-right symmetric (a flatten keeps positions), unit-length output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 3)),
                                  nn.Flatten(), nn.Linear(24, 7))

    def forward(self, x):
        return F.normalize(self.body(x), dim=1)


def _images(folder, n=7, mirrored=False):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (10, 6, 3), dtype=np.uint8)
        if mirrored:
            pixels = pixels[:, ::-1]
        path = folder / f"{i}.png"
        Image.fromarray(np.ascontiguousarray(pixels)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("channels_last", [False, True])
def test_flip_features_match_the_per_image_oracle(tmp_path, channels_last):
    net = _Unit().eval()
    paths = _images(tmp_path)
    transform = T.ToTensor()
    feats = extract_features(net, paths, transform, batch_size=3, progress=False, flip=True,
                             channels_last=channels_last)
    with torch.no_grad():
        for i, path in enumerate(paths):
            x = transform(Image.open(path).convert("RGB"))[None]
            oracle = (net(x) + net(torch.flip(x, dims=[3]))) / 2  # the mean of the two views ...
            oracle = oracle / oracle.norm()  # ... at unit length
            torch.testing.assert_close(feats[i:i + 1], oracle, rtol=1e-5, atol=1e-6)
    plain = extract_features(net, paths, transform, batch_size=3, progress=False)
    assert (feats - plain).abs().max() > 1e-3  # the network is not symmetric: flipping changes the features
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(paths)))


def test_flip_features_are_the_same_for_mirror_images(tmp_path):
    """The point of flip averaging: an image and its mirror image get one feature (not so without it)."""
    net = _Unit().eval()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths, mirrored = _images(tmp_path / "a"), _images(tmp_path / "b", mirrored=True)
    transform = T.ToTensor()
    torch.testing.assert_close(extract_features(net, paths, transform, progress=False, flip=True),
                               extract_features(net, mirrored, transform, progress=False, flip=True),
                               rtol=1e-5, atol=1e-6)
    differ = (extract_features(net, paths, transform, progress=False)
              - extract_features(net, mirrored, transform, progress=False)).abs().max()
    assert differ > 1e-3


def _cfg(root, *extra):
    from isereid.config import load_config
    return load_config("demo", ["optim.epochs=1", "optim.iters=1", "data.workers=0", "train.progress=false",
                                "train.tensorboard=false", "data.height=32", "data.width=16", "data.pad=2",
                                "model.bn_mode=camera", f"data.root={root}", *extra])


def test_cluster_flip_reaches_the_clustering_features(tiny_demo, tmp_path):
    """With cluster.flip the trainer's clustering pass extracts flip-averaged features (camera-based
    BatchNorm included); without it the single-view ones."""
    from isereid.data.datasets import build_dataset
    from isereid.data.transforms import build_test_transform
    from isereid.distributed import DistContext
    from isereid.engine.trainer import Trainer

    got = {}
    for flip in (False, True):
        cfg = _cfg(tiny_demo, f"cluster.flip={str(flip).lower()}")
        trainer = Trainer.from_config(cfg, build_dataset(cfg.data.dataset, cfg.data.root), tmp_path / str(flip),
                                      DistContext())
        paths = [s.path for s in trainer.train_samples]
        got[flip] = trainer._extract_train(paths, 0)
        direct = extract_features(trainer.model, paths, build_test_transform(cfg.data), progress=False,
                                  camids=trainer.camids, camera_images=cfg.model.camera_bn_images, flip=flip)
        torch.testing.assert_close(got[flip], direct)
    assert (got[True] - got[False]).abs().max() > 1e-3


def test_eval_flip_reaches_the_evaluation_features(tiny_demo):
    from isereid.data.datasets import build_dataset
    from isereid.data.transforms import build_test_transform
    from isereid.engine.evaluate import evaluate_model
    from isereid.models.reid import build_model

    cfg = _cfg(tiny_demo, "eval.flip=true", "model.pretrained=false")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    dataset = build_dataset(cfg.data.dataset, cfg.data.root)
    flipped = evaluate_model(model, dataset, cfg, torch.device("cpu"), progress=False)
    # evaluate_model extracts the sorted union of query and gallery, each camera with its own statistics
    samples = {s.path: s.camid for s in [*dataset.query, *dataset.gallery]}
    paths = sorted(samples)
    oracle = extract_features(model, paths, build_test_transform(cfg.data), progress=False,
                              camids=[samples[p] for p in paths], camera_images=cfg.model.camera_bn_images, flip=True)
    row = {p: i for i, p in enumerate(paths)}
    torch.testing.assert_close(flipped.query_features, oracle[[row[s.path] for s in dataset.query]])
    torch.testing.assert_close(flipped.gallery_features, oracle[[row[s.path] for s in dataset.gallery]])
    cfg.eval.flip = False
    single = evaluate_model(model, dataset, cfg, torch.device("cpu"), progress=False)
    assert (flipped.query_features - single.query_features).abs().max() > 1e-3

"""isereid.clustering.pseudo_labels: the one pseudo-label pipeline equals the chain of its steps
bit for bit; the camera pieces moved out of isereid.camera stay importable from there."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import isereid.camera
from isereid.camera_memory import CameraProxyMemory
from isereid.clustering import PseudoLabels, PseudoLabelSettings, pseudo_labels
from isereid.clustering import camera as camera_steps
from isereid.clustering.camera import associate_clusters, camera_normalize, mutual_share, nearest_other_camera
from isereid.clustering.dbscan import jaccard_dbscan, jaccard_dbscan_auto
from isereid.config import ClusterConfig, load_config
from isereid.engine.trainer import jaccard_clusterer
from isereid.errors import InvalidArgument


def camera_styled(seed: int, people: int = 10, per_camera: int = 6, cameras: int = 3, style: float = 0.8):
    """(N, 32) unit rows: person centre + a strong per-camera style + noise; (N,) camera ids."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(people, 32, generator=g)
    styles = style * torch.randn(cameras, 32, generator=g)
    pid = torch.arange(people).repeat_interleave(cameras * per_camera)
    cam = torch.arange(cameras).repeat_interleave(per_camera).repeat(people)
    x = centres[pid] + styles[cam] + 0.3 * torch.randn(pid.numel(), 32, generator=g)
    return F.normalize(x, dim=1), cam.numpy().astype(np.int64)


def old_chain(features, camids, s: PseudoLabelSettings):
    """The trainer's chain before the pipeline existed (engine/trainer.py jaccard_clusterer)."""
    if s.camera_norm:
        features = camera_normalize(features, torch.as_tensor(camids))
    if s.eps == "auto":
        labels, choice = jaccard_dbscan_auto(features, k1=s.k1, k2=s.k2, min_samples=s.min_samples,
                                             knn_backend=s.knn_backend)
        scale = {"eps": choice.eps, "scale": choice.to_dict()}
    else:
        labels = jaccard_dbscan(features, eps=s.eps, k1=s.k1, k2=s.k2, min_samples=s.min_samples,
                                knn_backend=s.knn_backend)
        scale = {"eps": s.eps}
    labels_before = labels
    if s.associate:
        labels = associate_clusters(features, labels, camids, s.associate_min_similarity)
        merged = camera_steps.associate(features, labels_before, camids, s.associate_min_similarity)
        scale["association"] = merged.summary()
    return labels, scale


@pytest.mark.parametrize("eps", [0.5, "auto"])
@pytest.mark.parametrize("seed", [0, 1])
def test_pipeline_gives_exactly_the_labels_of_the_old_chain(seed, eps):
    features, camids = camera_styled(seed)
    outcomes = {}
    for camera_norm in (False, True):
        for associate in (False, True):
            s = PseudoLabelSettings(eps=eps, k1=10, k2=3, min_samples=3, camera_norm=camera_norm,
                                    associate=associate, associate_min_similarity=0.3)
            expected, scale = old_chain(features.clone(), camids, s)
            got = pseudo_labels(features.clone(), camids, s)
            assert isinstance(got, PseudoLabels) and got.labels.dtype == np.int64
            np.testing.assert_array_equal(got.labels, expected)
            assert got.record() == scale
            outcomes[camera_norm, associate] = got.labels
    # the steps matter on this data, so the comparison above covers each of them
    assert not np.array_equal(outcomes[False, False], outcomes[True, False])
    assert any(not np.array_equal(outcomes[n, False], outcomes[n, True]) for n in (False, True))


def test_the_trainers_clusterer_is_the_pipeline():
    features, camids = camera_styled(3)
    cfg = load_config("demo", ["cluster.k1=10", "cluster.k2=3", "cluster.min_samples=3", "cluster.eps=0.5",
                               "cluster.camera_norm=true", "cluster.associate=true", "cluster.colour_weight=0"]).cluster
    cluster = jaccard_clusterer(cfg)
    expected = pseudo_labels(features, camids, PseudoLabelSettings.of(cfg))
    np.testing.assert_array_equal(cluster(features, camids), expected.labels)
    assert cluster.scale == {"eps": 0.5, "association": expected.association}


def test_settings_mirror_the_cluster_config():
    cfg = ClusterConfig()
    settings = PseudoLabelSettings.of(cfg)
    assert settings == PseudoLabelSettings()  # same defaults as the config's cluster section
    for name in vars(settings):
        assert getattr(settings, name) == getattr(cfg, name)


def test_camera_steps_need_camera_ids():
    features, _ = camera_styled(0, people=4)
    with pytest.raises(InvalidArgument, match="camids"):
        pseudo_labels(features, None, PseudoLabelSettings(camera_norm=True))
    labels = pseudo_labels(features, None, PseudoLabelSettings(eps=0.5, k1=10, k2=3, min_samples=3)).labels
    assert labels.shape == (features.shape[0],)


def test_old_import_paths_still_work():
    assert isereid.camera.CameraProxyMemory is CameraProxyMemory
    assert isereid.camera.camera_normalize is camera_normalize
    assert isereid.camera.associate_clusters is associate_clusters
    assert isereid.camera.nearest_other_camera is nearest_other_camera
    assert isereid.camera.mutual_share is mutual_share


def test_pure_modules_import_no_engine_cli_or_config():
    code = ("import sys, isereid.clustering, isereid.memory, isereid.camera_memory, isereid.camera, isereid.ise, "
            "isereid.losses; print(sorted(m for m in sys.modules if m.startswith(('isereid.engine', "
            "'isereid.cli', 'isereid.config'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"

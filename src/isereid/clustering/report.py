"""Summary of a pseudo-label partition: cluster counts, size histogram, how many clusters span
several cameras (from camera ids alone, no ground truth needed) and, when the true identities
are known, NMI / ARI / purity against them.

Re-identification means matching a person *across* cameras, so clusters that each hold one
camera's images teach the network the wrong thing even when they are pure. The camera shares
are therefore the first thing to read: ``cross_camera_clusters`` is the fraction of clusters
with images from at least two cameras, ``cross_camera_images`` the fraction of clustered images
that sit in such clusters.

NMI and ARI (sklearn.metrics) are computed over all points, each outlier (-1) counted as its
own singleton cluster, so discarding images is penalised. Purity is the fraction of clustered
(non-outlier) points whose true label is the majority label of their cluster (0.0 when no
point is clustered).

``previous_agreement`` needs no identities either: the ARI between this clustering and the previous
epoch's (outliers as singletons again; :func:`label_agreement`). It tells whether the pseudo-labels have
settled (near 1) or are still being remade (towards 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from ..errors import ClusteringError
from .pseudo_labels import outliers_as_singletons


@dataclass
class ClusteringReport:
    """Counts and quality scores of one clustering.

    ``size_histogram`` maps power-of-two size buckets ("1", "2-3", "4-7", ...) to the number
    of clusters in them, from "1" up to the bucket of the largest cluster."""

    num_clusters: int
    num_outliers: int
    size_histogram: Dict[str, int]
    nmi: Optional[float] = None
    ari: Optional[float] = None
    purity: Optional[float] = None
    cross_camera_clusters: Optional[float] = None
    cross_camera_images: Optional[float] = None
    # Of the features, not the partition (clustering.camera.nearest_other_camera): share of images whose nearest
    # other-camera image has them as its nearest too (label-free), and, with true identities, share
    # whose nearest other-camera image is the same person.
    mutual_cross_camera: Optional[float] = None
    cross_camera_nn_accuracy: Optional[float] = None
    previous_agreement: Optional[float] = None  # label_agreement with the previous epoch's labels (label-free)

    def to_dict(self) -> dict:
        """JSON-serialisable dict with keys num_clusters, num_outliers, histogram, nmi, ari, purity,
        cross_camera_clusters, cross_camera_images, mutual_cross_camera, cross_camera_nn_accuracy,
        previous_agreement."""
        return {"num_clusters": self.num_clusters, "num_outliers": self.num_outliers,
                "histogram": dict(self.size_histogram), "nmi": self.nmi, "ari": self.ari,
                "purity": self.purity, "cross_camera_clusters": self.cross_camera_clusters,
                "cross_camera_images": self.cross_camera_images, "mutual_cross_camera": self.mutual_cross_camera,
                "cross_camera_nn_accuracy": self.cross_camera_nn_accuracy,
                "previous_agreement": self.previous_agreement}


def label_agreement(previous: np.ndarray, labels: np.ndarray) -> float:
    """Adjusted Rand index between two clusterings (N,) of the same images, -1 for outliers, each
    outlier its own singleton cluster: 1 for the same partition, about 0 for unrelated ones."""
    previous = np.asarray(previous).astype(np.int64, copy=False).ravel()
    labels = np.asarray(labels).astype(np.int64, copy=False).ravel()
    if previous.shape != labels.shape:
        raise ClusteringError(f"the previous labels have {previous.size} entries but labels has {labels.size}")
    return float(adjusted_rand_score(outliers_as_singletons(previous), outliers_as_singletons(labels)))


def size_histogram(sizes: np.ndarray) -> Dict[str, int]:
    """Cluster counts per power-of-two size bucket: {"1": a, "2-3": b, "4-7": c, ...}."""
    hist: Dict[str, int] = {}
    if sizes.size == 0:
        return hist
    top = int(sizes.max()).bit_length()
    for b in range(top):
        lo, hi = 1 << b, (1 << (b + 1)) - 1
        name = str(lo) if lo == hi else f"{lo}-{hi}"
        hist[name] = int(((sizes >= lo) & (sizes <= hi)).sum())
    return hist


def camera_spread(labels: np.ndarray, cameras: np.ndarray) -> tuple[float, float]:
    """``(cross_camera_clusters, cross_camera_images)`` of a clustering.

    Args:
        labels: (N,) cluster labels, -1 for outliers (ignored).
        cameras: (N,) camera ids.
    Returns the fraction of clusters holding images of >= 2 cameras and the fraction of
    clustered images in such clusters (0.0 and 0.0 when nothing is clustered)."""
    labels = np.asarray(labels).astype(np.int64, copy=False).ravel()
    cameras = np.asarray(cameras).astype(np.int64, copy=False).ravel()
    if cameras.shape != labels.shape:
        raise ClusteringError(f"cameras has {cameras.size} entries but labels has {labels.size}")
    clustered = labels >= 0
    if not clustered.any():
        return 0.0, 0.0
    pairs = np.unique(np.stack([labels[clustered], cameras[clustered]]), axis=1)  # distinct (cluster, camera)
    cams_per_cluster = np.bincount(pairs[0], minlength=int(labels.max()) + 1)
    present = np.bincount(labels[clustered], minlength=cams_per_cluster.size) > 0
    multi = cams_per_cluster >= 2
    share_clusters = float(multi[present].mean())
    share_images = float(multi[labels[clustered]].mean())
    return share_clusters, share_images


def cluster_report(labels: np.ndarray, true_labels: Optional[np.ndarray] = None,
                   cameras: Optional[np.ndarray] = None) -> ClusteringReport:
    """Describe a clustering.

    Args:
        labels: (N,) integer cluster labels, -1 for outliers.
        true_labels: optional (N,) ground-truth identities for NMI, ARI and purity.
        cameras: optional (N,) camera ids for the cross-camera shares (:func:`camera_spread`).

    Returns:
        A :class:`ClusteringReport`; nmi, ari and purity are None without ``true_labels``, the
        camera shares None without ``cameras``."""
    labels = np.asarray(labels).astype(np.int64, copy=False).ravel()
    clustered = labels >= 0
    sizes = np.bincount(labels[clustered]) if clustered.any() else np.zeros(0, np.int64)
    sizes = sizes[sizes > 0]
    report = ClusteringReport(num_clusters=int(sizes.size), num_outliers=int((~clustered).sum()),
                              size_histogram=size_histogram(sizes))
    if cameras is not None:
        report.cross_camera_clusters, report.cross_camera_images = camera_spread(labels, cameras)
    if true_labels is None:
        return report
    truth = np.asarray(true_labels).ravel()
    if truth.shape != labels.shape:
        raise ClusteringError(f"true_labels has {truth.size} entries but labels has {labels.size}")
    if labels.size == 0:
        return report
    singleton = outliers_as_singletons(labels)
    report.nmi = float(normalized_mutual_info_score(truth, singleton))
    report.ari = float(adjusted_rand_score(truth, singleton))
    if clustered.any():
        _, truth_ids = np.unique(truth[clustered], return_inverse=True)
        pairs = np.unique(np.stack([labels[clustered], truth_ids.ravel()]), axis=1, return_counts=True)
        cluster_of_pair, pair_counts = pairs[0][0], pairs[1]
        majority = np.zeros(int(labels.max()) + 1, dtype=np.int64)
        np.maximum.at(majority, cluster_of_pair, pair_counts)
        report.purity = float(majority.sum() / clustered.sum())
    else:
        report.purity = 0.0
    return report

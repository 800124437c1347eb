"""Pseudo-labels: exact kNN, sparse k-reciprocal Jaccard distance and DBSCAN (docs/method.md#pseudo-labels),
with the camera steps around them (docs/camera_aware.md) chained by :func:`pseudo_labels`.

The reference builds three dense N x N float32 matrices; this package keeps everything
O(N * k) in memory and produces the same distances and the same DBSCAN partition.
"""
from .camera import associate_clusters, camera_normalize, mutual_share, nearest_other_camera
from .dbscan import jaccard_dbscan, jaccard_dbscan_auto
from .jaccard import jaccard_distance
from .knn import exact_knn
from .pseudo_labels import OUTLIER_MODES, PseudoLabels, PseudoLabelSettings, outliers_as_singletons, pseudo_labels
from .report import ClusteringReport, cluster_report, label_agreement
from .scale import ScaleChoice, partition_warning

__all__ = ["jaccard_distance", "jaccard_dbscan", "jaccard_dbscan_auto", "exact_knn", "cluster_report",
           "label_agreement", "ClusteringReport", "ScaleChoice", "partition_warning", "pseudo_labels", "PseudoLabels",
           "PseudoLabelSettings", "camera_normalize", "associate_clusters", "nearest_other_camera", "mutual_share",
           "outliers_as_singletons", "OUTLIER_MODES"]

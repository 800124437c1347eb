"""Pseudo-labels: exact kNN, sparse k-reciprocal Jaccard distance and DBSCAN (docs/method.md#pseudo-labels).

The reference builds three dense N x N float32 matrices; this package keeps everything
O(N * k) in memory and produces the same distances and the same DBSCAN partition.
"""
from .dbscan import jaccard_dbscan, jaccard_dbscan_auto
from .jaccard import jaccard_distance
from .knn import exact_knn
from .report import ClusteringReport, cluster_report
from .scale import ScaleChoice, partition_warning

__all__ = ["jaccard_distance", "jaccard_dbscan", "jaccard_dbscan_auto", "exact_knn", "cluster_report",
           "ClusteringReport", "ScaleChoice", "partition_warning"]

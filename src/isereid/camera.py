"""Compatibility module: the camera-aware pieces moved (docs/camera_aware.md).

* :func:`camera_normalize`, :func:`associate_clusters`, :func:`nearest_other_camera` and
  :func:`mutual_share` are steps and diagnostics of the pseudo-label pipeline:
  :mod:`isereid.clustering.camera` (the pipeline is :func:`isereid.clustering.pseudo_labels`);
* :class:`CameraProxyMemory` lives beside the cluster memory: :mod:`isereid.camera_memory`.

The names stay importable from here for existing scripts.
"""
from __future__ import annotations

from .camera_memory import CameraProxyMemory
from .clustering.camera import associate_clusters, camera_normalize, mutual_share, nearest_other_camera

__all__ = ["camera_normalize", "associate_clusters", "nearest_other_camera", "mutual_share", "CameraProxyMemory"]

"""The pseudo-label pipeline of one epoch (docs/method.md#pseudo-labels, docs/camera_aware.md).

    features (N, D) --camera_normalize?--> blend_cue(colour)? --> DBSCAN on (camera-aware?) Jaccard distances
                    --associate_clusters?--> labels (N,)

Each step is its own public function; :func:`pseudo_labels` is the one place that chains them,
so the trainer, the benchmarks and a user's script cluster alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from ..errors import InvalidArgument
from ..utils import ArrayLike
from .camera import associate, camera_normalize
from .camera_jaccard import camera_expanded_neighbourhoods
from .colour import blend_cue
from .dbscan import check_not_constant, jaccard_dbscan, jaccard_dbscan_auto, neighbourhood_dbscan
from .knn import as_features
from .scale import ScaleChoice

__all__ = ["PseudoLabelSettings", "PseudoLabels", "pseudo_labels", "outliers_as_singletons", "OUTLIER_MODES"]

#: What training does with DBSCAN's outliers (config ``cluster.outliers``): leave them out of the epoch (the
#: reference), or give each one a pseudo-identity of its own (SpCL's un-clustered instances).
OUTLIER_MODES = ("drop", "singletons")


@dataclass(frozen=True)
class PseudoLabelSettings:
    """What :func:`pseudo_labels` does; the fields and defaults of the config's ``cluster`` section.

    eps: DBSCAN radius on the Jaccard distance, or ``"auto"`` (chosen from the features,
    docs/auto_eps.md). camera_norm: subtract each camera's mean feature first. associate: merge
    mutual-nearest clusters of disjoint cameras at cosine >= ``associate_min_similarity`` (or the
    gate ``"auto"`` of :func:`isereid.clustering.camera.associate`) after DBSCAN.
    camera_jaccard: build the Jaccard distance from own-camera and other-camera k-reciprocal lists
    (k1_intra, k1_inter, query expansion over k2_intra + k2_inter rows) in place of k1 / k2
    (:mod:`isereid.clustering.camera_jaccard`). colour_weight: the weight of the colour cue blended
    into the features after camera normalisation (:mod:`isereid.clustering.colour`; 0 = off).
    """

    eps: Union[float, str] = 0.4
    k1: int = 30
    k2: int = 6
    min_samples: int = 4
    knn_backend: str = "torch"
    camera_norm: bool = False
    associate: bool = False
    associate_min_similarity: Union[float, str] = 0.5
    camera_jaccard: bool = False
    k1_intra: int = 5
    k1_inter: int = 20
    k2_intra: int = 2
    k2_inter: int = 4
    colour_weight: float = 0.0

    @classmethod
    def of(cls, section: Any) -> "PseudoLabelSettings":
        """The settings named by the attributes of ``section`` (e.g. a ``ClusterConfig``; extra ones ignored)."""
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class PseudoLabels:
    """labels: (N,) int64, -1 for outliers, clusters 0..C-1. eps: the radius DBSCAN used.
    choice: how ``eps="auto"`` chose it (None for a fixed eps). association: what the cross-camera
    association looked at and merged (None when ``associate`` is off)."""

    labels: np.ndarray
    eps: Union[float, str]
    choice: Optional[ScaleChoice] = None
    association: Optional[dict] = None

    def record(self) -> dict:
        """The epoch record's clustering entries: ``eps`` (and ``scale`` for ``eps="auto"``, the
        ``association`` summary of :meth:`isereid.clustering.camera.Association.summary` when on)."""
        out: dict = {"eps": self.eps} if self.choice is None else {"eps": self.choice.eps,
                                                                  "scale": self.choice.to_dict()}
        if self.association is not None:
            out["association"] = self.association
        return out


def pseudo_labels(features: ArrayLike, camids: Optional[ArrayLike],
                  settings: PseudoLabelSettings = PseudoLabelSettings(),
                  colour: Optional[ArrayLike] = None) -> PseudoLabels:
    """Pseudo-labels of ``features`` (N, D), rows L2-normalised, from cameras ``camids`` (N,) ints.

    ``camids`` may be None when no camera step is on; ``colour`` (N, E) unit rows (e.g.
    :func:`isereid.clustering.colour.hsv_histograms`) is needed when ``settings.colour_weight > 0``.
    Steps: camera normalisation (when ``settings.camera_norm``, of the colour rows too), the colour
    blend (when ``settings.colour_weight > 0``), DBSCAN on the k-reciprocal Jaccard distance (camera-aware with
    ``settings.camera_jaccard``), cross-camera
    association of the clusters (when ``settings.associate``), the latter on the features DBSCAN saw.
    """
    if (settings.camera_norm or settings.associate or settings.camera_jaccard) and camids is None:
        raise InvalidArgument("camids are needed for camera_norm, associate and camera_jaccard")
    if settings.colour_weight > 0 and colour is None:
        raise InvalidArgument("colour rows are needed for colour_weight > 0")
    if settings.camera_norm:
        features = camera_normalize(features, torch.as_tensor(camids))
    if settings.colour_weight > 0:
        colour = as_features(colour)
        if settings.camera_norm:  # the cue's camera casts removed as the features' are
            colour = camera_normalize(colour, torch.as_tensor(camids))
        features = blend_cue(features, colour, settings.colour_weight)
    choice = None
    if settings.camera_jaccard:
        if settings.eps == "auto":
            check_not_constant(as_features(features))
        v = camera_expanded_neighbourhoods(features, camids, settings.k1_intra, settings.k1_inter,
                                           settings.k2_intra, settings.k2_inter)
        labels, choice = neighbourhood_dbscan(v, settings.eps, settings.min_samples)
    elif settings.eps == "auto":
        labels, choice = jaccard_dbscan_auto(features, k1=settings.k1, k2=settings.k2,
                                             min_samples=settings.min_samples, knn_backend=settings.knn_backend)
    else:
        labels = jaccard_dbscan(features, eps=settings.eps, k1=settings.k1, k2=settings.k2,
                                min_samples=settings.min_samples, knn_backend=settings.knn_backend)
    association = None
    if settings.associate:
        merged = associate(features, labels, camids, settings.associate_min_similarity)
        labels, association = merged.labels, merged.summary()
    return PseudoLabels(labels=labels, eps=settings.eps, choice=choice, association=association)


def outliers_as_singletons(labels: ArrayLike) -> np.ndarray:
    """(N,) int64 ``labels`` with each outlier (-1) given a label of its own.

    Clusters keep their labels 0..C-1; the outliers get C, C+1, ... in the order they occur, so
    the result is a function of ``labels`` alone (a resumed run rebuilds the same labels).
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    out = labels.copy()
    outliers = labels < 0
    out[outliers] = labels.max(initial=-1) + 1 + np.arange(int(outliers.sum()), dtype=np.int64)
    return out

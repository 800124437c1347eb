"""Evaluate a model on a dataset's query/gallery split (docs/method.md#evaluation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data.datasets import ReidDataset
from ..data.transforms import build_test_transform
from ..distributed import DistContext
from ..errors import DatasetError
from ..evaluation.ranking import RankingResult, evaluate_ranking, pairwise_distance
from ..evaluation.rerank import re_ranking
from ..features import extract_features


@dataclass
class Evaluation:
    """Ranking result plus what pictures and reports need."""

    result: RankingResult
    distmat: np.ndarray  # (Q, G) float32
    query_features: torch.Tensor  # (Q, D)
    gallery_features: torch.Tensor  # (G, D)


def evaluate_model(
    model: nn.Module,
    dataset: ReidDataset,
    cfg: Config,
    device: torch.device,
    dist_ctx: Optional[DistContext] = None,
    progress: bool = True,
) -> Evaluation:
    """Extract features of query ∪ gallery (flip-averaged with ``eval.flip``), score them with the Market protocol."""
    if not dataset.has_test:
        raise DatasetError(f"dataset {dataset.name} at {dataset.root} has no query/gallery split to evaluate on")
    paths = sorted({s.path for s in dataset.query} | {s.path for s in dataset.gallery})
    row = {p: i for i, p in enumerate(paths)}
    camera = {s.path: s.camid for s in [*dataset.query, *dataset.gallery]}
    feats = extract_features(
        model, paths, build_test_transform(cfg.data), batch_size=cfg.data.test_batch_size,
        workers=cfg.data.workers, device=device, progress=progress, desc="evaluate", dist_ctx=dist_ctx,
        channels_last=cfg.model.channels_last, camids=[camera[p] for p in paths],
        camera_images=cfg.model.camera_bn_images, flip=cfg.eval.flip,
    )
    qf = feats[[row[s.path] for s in dataset.query]]
    gf = feats[[row[s.path] for s in dataset.gallery]]
    if cfg.eval.rerank:
        distmat = re_ranking(qf, gf, k1=cfg.eval.rerank_k1, k2=cfg.eval.rerank_k2,
                             lambda_value=cfg.eval.rerank_lambda)
    else:
        distmat = pairwise_distance(qf.to(device), gf.to(device)).cpu().numpy()
    result = evaluate_ranking(
        distmat,
        np.array([s.pid for s in dataset.query]), np.array([s.pid for s in dataset.gallery]),
        np.array([s.camid for s in dataset.query]), np.array([s.camid for s in dataset.gallery]),
        max_rank=cfg.eval.max_rank,
    )
    return Evaluation(result=result, distmat=np.asarray(distmat, dtype=np.float32), query_features=qf,
                      gallery_features=gf)

"""Evaluation: query-gallery distances, Market-protocol ranking metrics, k-reciprocal re-ranking."""
from __future__ import annotations

from .ranking import RankingResult, evaluate_ranking, pairwise_distance
from .rerank import re_ranking

__all__ = ["RankingResult", "evaluate_ranking", "pairwise_distance", "re_ranking"]

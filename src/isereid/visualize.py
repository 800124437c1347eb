"""Rank-list pictures: a query crop followed by its top-k gallery crops with distances.

Borders are green for a true match and red for a wrong one when identities are known
(grey otherwise). Drawn with PIL: one row per query.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from .utils import atomic_path

CELL_H, CELL_W, BORDER, GAP, LABEL_H = 128, 64, 4, 6, 16
GREEN, RED, GREY, BLUE = (40, 170, 60), (210, 40, 40), (150, 150, 150), (40, 90, 210)


@dataclass
class RankRow:
    """One query and its retrieved gallery entries (best first)."""

    query_path: str
    gallery_paths: Sequence[str]
    distances: Sequence[float]
    matches: Optional[Sequence[bool]] = None  # None: identities unknown
    title: str = ""


def _cell(path: str, colour: tuple[int, int, int]) -> Image.Image:
    with Image.open(path) as im:
        crop = im.convert("RGB").resize((CELL_W - 2 * BORDER, CELL_H - 2 * BORDER), Image.BICUBIC)
    return ImageOps.expand(crop, border=BORDER, fill=colour)


def draw_rank_rows(rows: Sequence[RankRow], output: str | Path) -> Path:
    """Write one PNG with a row per query; returns its path."""
    if not rows:
        raise ValueError("no rows to draw")
    k = max(len(r.gallery_paths) for r in rows)
    width = (k + 1) * (CELL_W + GAP) + GAP + CELL_W // 2
    height = len(rows) * (CELL_H + LABEL_H * 2 + GAP) + GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        y = GAP + i * (CELL_H + LABEL_H * 2 + GAP)
        draw.text((GAP, y), row.title or Path(row.query_path).name, fill=(0, 0, 0))
        y += LABEL_H
        canvas.paste(_cell(row.query_path, BLUE), (GAP, y))
        draw.text((GAP, y + CELL_H + 2), "query", fill=BLUE)
        for j, (path, dist) in enumerate(zip(row.gallery_paths, row.distances)):
            colour = GREY if row.matches is None else (GREEN if row.matches[j] else RED)
            x = GAP + CELL_W // 2 + (j + 1) * (CELL_W + GAP)
            canvas.paste(_cell(path, colour), (x, y))
            draw.text((x, y + CELL_H + 2), f"{j + 1}: {dist:.3f}", fill=colour)
    output = Path(output)
    with atomic_path(output, suffix=".tmp.png") as tmp:  # PIL picks the format from the suffix
        canvas.save(tmp)
    return output


def rank_rows_from_distances(distmat: np.ndarray, query_paths: Sequence[str], gallery_paths: Sequence[str],
                             topk: int, query_pids=None, gallery_pids=None, query_camids=None,
                             gallery_camids=None, rows: Optional[Sequence[int]] = None,
                             titles: Optional[Sequence[str]] = None) -> list[RankRow]:
    """Top-k gallery entries per query from a (Q, G) distance matrix. With cameras given, the
    protocol's junk (same identity AND same camera) is left out, as in the evaluation."""
    rows = range(len(query_paths)) if rows is None else rows
    out = []
    for n, q in enumerate(rows):
        order = np.argsort(distmat[q], kind="stable")
        if query_pids is not None and query_camids is not None:
            junk = (gallery_pids[order] == query_pids[q]) & (gallery_camids[order] == query_camids[q])
            order = order[~junk]
        order = order[:topk]
        matches = None if query_pids is None or query_pids[q] < 0 else list(gallery_pids[order] == query_pids[q])
        out.append(RankRow(query_paths[q], [gallery_paths[g] for g in order], distmat[q, order].tolist(),
                           matches, titles[n] if titles else ""))
    return out


def write_best_and_worst(evaluation, dataset, n: int, folder: str | Path, topk: int = 10) -> list[Path]:
    """Pictures of the ``n`` best and ``n`` worst queries by average precision
    (``folder/best.png``, ``folder/worst.png``)."""
    ap = evaluation.result.average_precision
    valid = np.flatnonzero(~np.isnan(ap))
    if len(valid) == 0:
        return []
    order = valid[np.argsort(ap[valid], kind="stable")]
    q_pids = np.array([s.pid for s in dataset.query])
    g_pids = np.array([s.pid for s in dataset.gallery])
    q_cams = np.array([s.camid for s in dataset.query])
    g_cams = np.array([s.camid for s in dataset.gallery])
    written = []
    for name, picked in (("worst", order[:n]), ("best", order[::-1][:n])):
        titles = [f"{Path(dataset.query[q].path).name}  AP {100 * ap[q]:.1f}%" for q in picked]
        rows = rank_rows_from_distances(evaluation.distmat, [s.path for s in dataset.query],
                                        [s.path for s in dataset.gallery], topk, q_pids, g_pids, q_cams, g_cams,
                                        rows=picked, titles=titles)
        written.append(draw_rank_rows(rows, Path(folder) / f"{name}.png"))
    return written

"""Batched feature extraction on any device (sharded across ranks when distributed), and the
``.npz`` file of ``isereid extract``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data.datasets import Sample
from .data.images import ImageDataset
from .data.loader import make_loader
from .distributed import DistContext
from .errors import DatasetError, first_line
from .utils import atomic_path


@torch.no_grad()
def extract_features(
    model: nn.Module,
    paths: Sequence[str],
    transform,
    batch_size: int = 256,
    workers: int = 0,
    device: Optional[torch.device] = None,
    progress: bool = True,
    desc: str = "features",
    dist_ctx: Optional[DistContext] = None,
    channels_last: bool = False,
    loader=None,
) -> torch.Tensor:
    """Run ``model`` in eval mode over ``paths`` -> (N, D) float32 CPU tensor, rows in input order.

    Always float32, also when training uses ``train.amp`` (docs/reference_quirks.md#q31).
    Under torch.distributed each rank extracts a contiguous shard and the shards are
    gathered, so every rank returns the full matrix. ``loader(path) -> PIL image`` reads the
    images (default :func:`~isereid.data.images.load_rgb`; e.g. a ResizedImageCache).
    """
    ctx = dist_ctx or DistContext(device=device or torch.device("cpu"))
    device = device or ctx.device
    shard = ctx.shard(len(paths))
    dataset = ImageDataset([paths[i] for i in shard], transform, **({"loader": loader} if loader else {}))
    loader = make_loader(dataset, workers, batch_size=batch_size, shuffle=False,
                         pin_memory=device.type == "cuda", persistent_workers=False)
    was_training = model.training
    model.eval()
    chunks = []
    bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and ctx.is_main), unit="batch")
    for images, _, _ in bar:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=False):  # float32 even inside a caller's autocast
            feats = model(images)
        chunks.append(feats.float())
    model.train(was_training)
    if chunks:
        local = torch.cat(chunks)
    else:
        dim = getattr(model, "num_features", None) or getattr(getattr(model, "module", None), "num_features", 0)
        local = torch.zeros((0, dim), device=device)
    return ctx.all_gather_uneven(local).cpu()


# ---------------------------------------------------------------------------- the .npz file
FEATURE_FILE_KEYS = ("features", "paths", "pids", "camids", "splits")


@dataclass(frozen=True)
class FeatureFile:
    """The contents of a features ``.npz``: row ``i`` of every array describes image ``i``.

    features (N, D) float32; paths (N,) str; pids (N,) int64 (-1 = unknown); camids (N,) int64;
    splits (N,) str, the split each image came from ("train", "query", "gallery" or "images").
    """

    features: np.ndarray
    paths: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    splits: np.ndarray


def save_features(path: str | os.PathLike, features: torch.Tensor | np.ndarray, samples: Sequence[Sample],
                  splits: Sequence[str]) -> None:
    """Write ``features`` (N, D) of ``samples`` (N) with their ``splits`` (N) to the ``.npz`` at
    ``path`` (that exact name), atomically: a reader never sees a half-written file."""
    feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if not (len(feats) == len(samples) == len(splits)):
        raise ValueError(f"{len(feats)} feature rows, {len(samples)} samples and {len(splits)} splits")
    # np.savez appends ".npz" to a name without it: the temp name ends in it so the rename moves that file
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, features=feats, paths=np.array([s.path for s in samples]),
                 pids=np.array([s.pid for s in samples], dtype=np.int64),
                 camids=np.array([s.camid for s in samples], dtype=np.int64), splits=np.array(splits))


def load_features(path: str | os.PathLike) -> FeatureFile:
    """The :class:`FeatureFile` written by :func:`save_features`; DatasetError naming ``path`` when the
    file is missing, not an ``.npz`` or lacks one of the arrays."""
    return FeatureFile(**read_npz(path, FEATURE_FILE_KEYS, "features file"))


def read_npz(path: str | os.PathLike, keys: Sequence[str], what: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the ``.npz`` at ``path`` (no pickles); DatasetError naming ``path`` and
    ``what`` it should be when the file is missing, not an ``.npz`` or lacks one of them."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {what} {path}: {first_line(e)}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path} is not a {what}: a single array, not an .npz")
    with data:
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise DatasetError(f"{path} is not a {what}: no {', '.join(missing)}")
        return {k: data[k] for k in keys}

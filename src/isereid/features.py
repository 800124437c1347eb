"""Batched feature extraction on any device (sharded across ranks when distributed), and the
``.npz`` file of ``isereid extract``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data.datasets import Sample
from .data.images import ImageDataset
from .data.loader import make_loader
from .distributed import DistContext
from .errors import DatasetError, first_line
from .models.camera_bn import camera_statistics, has_camera_bn, use_camera_statistics
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
    camids: Optional[Sequence[int]] = None,
    camera_images: int = 512,
    flip: bool = False,
) -> torch.Tensor:
    """Run ``model`` in eval mode over ``paths`` -> (N, D) float32 CPU tensor, rows in input order.

    ``flip``: each row is the sum of the image's and its left-right mirror image's embeddings,
    L2-normalised (for the unit-length embeddings of ReidNet, the normalised mean): a view-direction
    invariant feature at twice the extraction cost (docs/camera_aware.md#flip-features).

    Always float32, also when training uses ``train.amp`` (docs/reference_quirks.md#q31).
    Under torch.distributed each rank extracts a contiguous shard and the shards are
    gathered, so every rank returns the full matrix. ``loader(path) -> PIL image`` reads the
    images (default :func:`~isereid.data.images.load_rgb`; e.g. a ResizedImageCache).

    With camera-based BatchNorm (``model.bn_mode=camera``) and ``camids`` (N,), each camera's
    images are extracted with that camera's statistics, estimated from up to ``camera_images`` of
    them (models/camera_bn.py); without ``camids`` the running statistics are used.
    """
    ctx = dist_ctx or DistContext(device=device or torch.device("cpu"))
    device = device or ctx.device
    if camids is not None and has_camera_bn(model):
        return _extract_by_camera(model, paths, transform, np.asarray(camids), camera_images,
                                  batch_size=batch_size, workers=workers, device=device, progress=progress,
                                  desc=desc, dist_ctx=ctx, channels_last=channels_last, loader=loader, flip=flip)
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
            feats = model(images).float()
            if flip:  # width is the last axis in both memory formats' logical (B, C, H, W) view
                feats = F.normalize(feats + model(images.flip(3)).float(), dim=1)
        chunks.append(feats)
    model.train(was_training)
    if chunks:
        local = torch.cat(chunks)
    else:
        dim = getattr(model, "num_features", None) or getattr(getattr(model, "module", None), "num_features", 0)
        local = torch.zeros((0, dim), device=device)
    return ctx.all_gather_uneven(local).cpu()


def _extract_by_camera(model: nn.Module, paths: Sequence[str], transform, camids: np.ndarray, camera_images: int,
                       **kwargs) -> torch.Tensor:
    """:func:`extract_features` one camera at a time, each with its own BN statistics (every rank
    estimates them from the same images, so the statistics agree across ranks). ``kwargs``: every
    other argument of :func:`extract_features`, device and dist_ctx resolved."""
    if len(camids) != len(paths):
        raise ValueError(f"{len(camids)} camera ids for {len(paths)} images")
    if len(paths) == 0:
        return extract_features(model, paths, transform, **kwargs)
    out: Optional[torch.Tensor] = None
    for camera in np.unique(camids):
        rows = np.flatnonzero(camids == camera)
        chosen = [paths[i] for i in rows]
        if len(rows) < 2:  # no statistics from one image: the running (all-camera) statistics
            feats = extract_features(model, chosen, transform, **kwargs)
        else:
            picked = np.unique(np.linspace(0, len(rows) - 1, min(camera_images, len(rows))).round().astype(int))
            stats = _camera_statistics(model, [chosen[i] for i in picked], transform, kwargs["device"],
                                       batch_size=kwargs["batch_size"], reader=kwargs["loader"],
                                       channels_last=kwargs["channels_last"])
            with use_camera_statistics(model, stats):
                feats = extract_features(model, chosen, transform, **kwargs)
        if out is None:
            out = torch.empty((len(paths), feats.shape[1]), dtype=torch.float32)
        out[torch.from_numpy(rows)] = feats
    return out


def _camera_statistics(model: nn.Module, paths: list[str], transform, device: torch.device, batch_size: int,
                       reader=None, channels_last: bool = False):
    """BN statistics of one camera from ``paths`` (at least two), in near-equal batches of at least two
    rows (a batch of one row has no variance), the model in eval mode and float32."""
    dataset = ImageDataset(paths, transform, **({"loader": reader} if reader else {}))
    count = max(1, len(paths) // max(int(batch_size), 2))

    def batches():
        for group in np.array_split(np.arange(len(paths)), count):
            images = torch.stack([dataset[int(i)][0] for i in group]).to(device)
            yield images.contiguous(memory_format=torch.channels_last) if channels_last else images

    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            return camera_statistics(model, batches())
    finally:
        model.train(was_training)


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

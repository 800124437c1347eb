"""Reading images: a map-style torch Dataset and a fast pre-flight check for broken files."""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

from PIL import Image, ImageFile
from torch.utils.data import Dataset

from ..errors import DatasetError
from .datasets import ReidDataset


def load_rgb(path: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image; DatasetError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


class ImageDataset(Dataset):
    """``dataset[i] -> (transform(RGB image), label, i)``; label is ``labels[i]`` or -1."""

    def __init__(self, paths: Sequence[str], transform: Optional[Callable] = None,
                 labels: Optional[Sequence[int]] = None):
        self.paths = [str(p) for p in paths]
        if labels is not None and len(labels) != len(self.paths):
            raise ValueError(f"{len(labels)} labels for {len(self.paths)} images")
        self.labels = None if labels is None else [int(v) for v in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_rgb(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        label = -1 if self.labels is None else self.labels[index]
        return image, label, int(index)


def _is_readable(path: str) -> bool:
    """Fully decode the image (``load()``), so truncated files are caught, not only bad headers."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.width > 0 and im.height > 0
    except Exception:  # noqa: BLE001 - any decoder failure means "unreadable"
        return False


def name_paths(paths: Sequence[str], limit: int = 3) -> str:
    """``"a.jpg, b.jpg, c.jpg and 4 more"``: the first ``limit`` paths, then how many others."""
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_images(samples: Sequence, max_bad_fraction: float, workers: Optional[int] = None):
    """Decode every sample's image; return ``(good_samples, bad_paths)`` in input order.

    Raises DatasetError when more than ``max_bad_fraction`` of the images are unreadable.
    Decoding runs in a small thread pool (PIL releases the GIL while decoding).
    """
    samples = list(samples)
    if not samples:
        return [], []
    paths = [s.path if hasattr(s, "path") else str(s) for s in samples]
    workers = workers or min(8, os.cpu_count() or 1)
    allow_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # detect truncated files even if someone allowed them globally
    try:
        if workers > 1 and len(paths) > 64:
            with ThreadPoolExecutor(workers) as pool:
                ok = list(pool.map(_is_readable, paths))
        else:
            ok = [_is_readable(p) for p in paths]
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
    good = [s for s, flag in zip(samples, ok) if flag]
    bad = [p for p, flag in zip(paths, ok) if not flag]
    if bad and len(bad) / len(samples) > max_bad_fraction:
        raise DatasetError(
            f"{len(bad)} of {len(samples)} images are unreadable ({len(bad) / len(samples):.1%}): "
            f"{name_paths(bad)}; "
            f"fix or remove them, or raise data.max_bad_fraction (now {max_bad_fraction})"
        )
    return good, bad


def drop_unreadable(dataset: ReidDataset, max_bad_fraction: float,
                    workers: Optional[int] = None) -> tuple[ReidDataset, list[str]]:
    """The training policy for broken files: ``(dataset without its unreadable training images,
    their paths)``; query and gallery are left as they are (a broken test image fails loudly later).

    Raises DatasetError naming one file when more than ``max_bad_fraction`` of the training images
    are unreadable (:func:`check_images`). The caller says which files were skipped.
    """
    train, bad = check_images(dataset.train, max_bad_fraction, workers)
    return dataclasses.replace(dataset, train=train), bad

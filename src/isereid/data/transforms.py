"""Train / test image transforms of the reference (docs/method.md#transforms, docs/reference_quirks.md#q16)."""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ReferenceRandomErasing:
    """The reference's own RandomErasing (not torchvision's), applied to a normalised (C, H, W)
    tensor, in place.

    With probability ``1 - probability`` nothing happens (the test is ``uniform(0, 1) >=
    probability``). Otherwise up to 100 attempts draw ``target = U(sl, sh) * H * W`` and
    ``aspect = U(r1, 1/r1)``, ``h = round(sqrt(target * aspect))``, ``w = round(sqrt(target /
    aspect))``; the first box with ``w < W`` and ``h < H`` is placed at ``top = randint(0, H - h)``,
    ``left = randint(0, W - w)`` (both inclusive) and channel c is filled with ``value[c]``.

    Fill values: the reference uses 0.485/0.456/0.406 in *normalised* space (``value``;
    docs/reference_quirks.md#q16).
    Randomness: like the reference, python's ``random`` module (seeded by torch in each
    DataLoader worker, and saved/restored with the other RNG states on resume); pass
    ``rng=random.Random(seed)`` for a private stream. The draws are made in exactly the
    reference's order (uniform, then per attempt uniform, uniform, and randint, randint).
    """

    def __init__(self, probability: float = 0.5, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3,
                 value: Sequence[float] = IMAGENET_MEAN, rng: Optional[random.Random] = None):
        self.probability = float(probability)
        self.sl, self.sh, self.r1 = float(sl), float(sh), float(r1)
        self.value = [float(v) for v in value]
        self.rng = rng

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        rng = self.rng if self.rng is not None else random
        if rng.uniform(0, 1) >= self.probability:
            return img
        channels, height, width = img.shape[-3], img.shape[-2], img.shape[-1]
        area = height * width
        for _ in range(100):
            target_area = rng.uniform(self.sl, self.sh) * area
            aspect_ratio = rng.uniform(self.r1, 1 / self.r1)
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                if channels == 3:
                    for c in range(3):
                        img[c, top:top + h, left:left + w] = self.value[c]
                else:
                    img[0, top:top + h, left:left + w] = self.value[0]
                return img
        return img

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(probability={self.probability}, sl={self.sl}, sh={self.sh}, "
                f"r1={self.r1}, value={self.value})")


def build_train_transform(cfg) -> T.Compose:
    """Resize (bicubic, exact H x W) -> flip -> [colour jitter, random grayscale] -> pad (zeros) ->
    random crop -> tensor -> normalise -> reference RandomErasing (``cfg`` is a
    :class:`~isereid.config.DataConfig`; the bracketed steps only when ``color_jitter`` /
    ``grayscale_prob`` are positive)."""
    size = (int(cfg.height), int(cfg.width))
    # Colour augmentations only when asked: the reference has none, and adding a transform with
    # probability 0 would still shift the random streams.
    colour = []
    if getattr(cfg, "color_jitter", 0.0) > 0:
        j = float(cfg.color_jitter)
        colour.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    if getattr(cfg, "grayscale_prob", 0.0) > 0:
        colour.append(T.RandomGrayscale(p=float(cfg.grayscale_prob)))
    return T.Compose([
        T.Resize(size, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=cfg.flip_prob),
        *colour,
        T.Pad(cfg.pad, fill=0),
        T.RandomCrop(size),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ReferenceRandomErasing(probability=cfg.erasing_prob, sl=0.02, sh=0.4, r1=0.3, value=cfg.erasing_value),
    ])


def build_test_transform(cfg) -> T.Compose:
    """Resize (bicubic, exact H x W) -> tensor -> normalise; no augmentation."""
    size = (int(cfg.height), int(cfg.width))
    return T.Compose([
        T.Resize(size, interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])

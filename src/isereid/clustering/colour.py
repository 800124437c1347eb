"""A colour cue for the first epochs' clustering (docs/camera_aware.md#colour-cue).

At initialisation the ImageNet features match a person across two cameras at chance, while
plain HSV histograms of horizontal stripes, each camera's mean removed, match about 2.5x as
often (issue 19's measurements on CUHK03). The cue is blended into the features that the
clustering sees, with a weight the trainer fades to zero as the network learns its own
cross-camera signal:

    histograms (N, E) = one joint HSV histogram per horizontal stripe, Hellinger-mapped
    blend (N, D + E)  = [sqrt(1 - w) * features, sqrt(w) * histograms]

so that, for unit rows, ``blend_i . blend_j = (1 - w) f_i . f_j + w h_i . h_j``: a convex
combination of the two cosine similarities, no N x N matrix built.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InvalidArgument
from .knn import as_features

__all__ = ["HSV_BINS", "STRIPES", "hsv_histograms", "blend_cue"]

# 8 hues x 3 saturations x 3 values: coarse enough that ~1,400 pixels per stripe (128 x 64 crops)
# fill the bins, fine enough to tell a red shirt from an orange one.
HSV_BINS = (8, 3, 3)
STRIPES = 6


def hsv_histograms(hsv: np.ndarray, stripes: int = STRIPES, bins: tuple[int, int, int] = HSV_BINS) -> torch.Tensor:
    """Striped joint HSV histograms of images, as unit rows.

    Args:
        hsv: (N, H, W, 3) uint8, the images in PIL's HSV mode (each channel 0..255).
        stripes: horizontal stripes, top to bottom (row r of H falls in stripe ``r * stripes // H``).
        bins: (hue, saturation, value) bins; channel value x falls in bin ``x * b // 256``.

    Returns:
        (N, stripes * bh * bs * bv) float32. Each stripe's histogram is normalised to sum 1 and
        square-rooted (so the dot product of two rows is the mean Bhattacharyya coefficient of
        their stripes), then the row is divided by sqrt(stripes): unit length.
    """
    hsv = np.asarray(hsv)
    if hsv.ndim != 4 or hsv.shape[3] != 3 or hsv.dtype != np.uint8:
        raise InvalidArgument(f"hsv must be a (N, H, W, 3) uint8 array, got shape {hsv.shape} dtype {hsv.dtype}")
    n, height, width, _ = hsv.shape
    if stripes < 1 or stripes > height:
        raise InvalidArgument(f"stripes must be in 1..{height} (the image height), got {stripes}")
    if any(b < 1 or b > 256 for b in bins):
        raise InvalidArgument(f"bins must be in 1..256, got {bins}")
    bh, bs, bv = (int(b) for b in bins)
    x = hsv.astype(np.int64)
    joint = ((x[..., 0] * bh >> 8) * bs + (x[..., 1] * bs >> 8)) * bv + (x[..., 2] * bv >> 8)  # (N, H, W)
    per_stripe = bh * bs * bv
    stripe = (np.arange(height) * stripes // height)[None, :, None]  # (1, H, 1)
    flat = (np.arange(n)[:, None, None] * stripes + stripe) * per_stripe + joint  # (N, H, W)
    counts = np.bincount(flat.ravel(), minlength=n * stripes * per_stripe).reshape(n, stripes, per_stripe)
    pixels = np.bincount(stripe.ravel(), minlength=stripes) * width  # (stripes,) pixels per stripe
    hist = np.sqrt(counts / pixels[None, :, None]) / math.sqrt(stripes)
    return torch.from_numpy(hist.reshape(n, stripes * per_stripe).astype(np.float32))


def blend_cue(features: torch.Tensor, cue: torch.Tensor, weight: float) -> torch.Tensor:
    """``[sqrt(1 - weight) * features, sqrt(weight) * cue]``: (N, D + E) rows whose dot products
    are ``(1 - weight)`` times the features' plus ``weight`` times the cue's.

    Args:
        features: (N, D) unit rows. cue: (N, E) unit rows, e.g. :func:`hsv_histograms` (tensors or
            NumPy arrays; the result is float32).
        weight: in [0, 1] (1: the cue alone).
    """
    features, cue = as_features(features), as_features(cue)  # float32, validated
    if cue.shape[0] != features.shape[0]:
        raise InvalidArgument(f"cue has {cue.shape[0]} rows for {features.shape[0]} features")
    if not 0.0 <= weight <= 1.0:
        raise InvalidArgument(f"the cue's weight must be in [0, 1], got {weight}")
    return torch.cat([features * math.sqrt(1.0 - weight), cue.to(features.device) * math.sqrt(weight)], dim=1)

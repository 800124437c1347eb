"""isereid: unsupervised person re-identification with Implicit Sample Extension."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "embed", "load_model"]


def load_model(checkpoint_path, map_location="cpu"):
    """Load a re-ID network from an isereid checkpoint or a released ISE / Cluster Contrast
    ``.pth.tar``; returns the model in eval mode. See :func:`isereid.models.load_model`."""
    from .models.loading import load_model as _load

    return _load(checkpoint_path, map_location=map_location)


def embed(model_or_checkpoint, images, batch_size=64, height=None, width=None):
    """L2-normalised features (N, D) float32 of ``images`` (paths, PIL images or HWC uint8 arrays),
    preprocessed as the checkpoint says. See :func:`isereid.embedding.embed`."""
    from .embedding import embed as _embed

    return _embed(model_or_checkpoint, images, batch_size=batch_size, height=height, width=width)

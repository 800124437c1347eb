"""isereid: unsupervised person re-identification with Implicit Sample Extension."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(checkpoint_path, map_location="cpu"):
    """Load a re-ID network from an isereid checkpoint or a released ISE / Cluster Contrast
    ``.pth.tar``; returns the model in eval mode. See :func:`isereid.models.load_model`."""
    from .models.loading import load_model as _load

    return _load(checkpoint_path, map_location=map_location)

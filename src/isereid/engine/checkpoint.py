"""Training checkpoints: what a run saves, written atomically, and how it resumes.

A run folder holds ``checkpoint_last.pt`` (everything needed to continue: model, optimizer,
scheduler, memory, epoch, best score, RNG states, metrics history) and ``model_best.pt``
(model weights and config of the epoch with the best evaluation mAP). Both are plain dicts
of tensors and builtins so that ``torch.load(weights_only=True)`` reads them.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from ..models.loading import FORMAT, FORMAT_VERSION, model_payload
from ..models.state_io import safe_load
from ..utils import atomic_torch_save

__all__ = ["FORMAT", "FORMAT_VERSION", "LAST", "BEST", "model_payload", "rng_state", "python_rng_state",
           "set_rng_state", "save", "load"]

LAST = "checkpoint_last.pt"
BEST = "model_best.pt"


def rng_state() -> dict:
    """Python and torch RNG states as weights_only-loadable objects."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def python_rng_state(saved) -> tuple:
    """The ``random.setstate`` argument from a saved Python RNG state (torch.save keeps the inner tuple
    a tuple, another writer may have made it a list)."""
    return saved[0], tuple(saved[1]), saved[2]


def set_rng_state(state: dict) -> None:
    random.setstate(python_rng_state(state["python"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save(path: Path, payload: dict) -> None:
    atomic_torch_save(payload, path)


def load(path: Path) -> dict[str, Any]:
    return safe_load(path, map_location="cpu")

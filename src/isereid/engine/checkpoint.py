"""Training checkpoints: what a run saves, written atomically, and how it resumes.

A run folder holds ``checkpoint_last.pt`` (everything needed to continue: model, optimizer,
scheduler, memory, epoch, best score, RNG states, metrics history) and ``model_best.pt``
(model weights and config of the epoch with the best evaluation mAP). Both are plain dicts
of tensors and builtins so that ``torch.load(weights_only=True)`` reads them.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import torch

from ..models.state_io import safe_load
from ..utils import atomic_torch_save

FORMAT = "isereid-checkpoint"
FORMAT_VERSION = 1
LAST = "checkpoint_last.pt"
BEST = "model_best.pt"


def rng_state() -> dict:
    """Python and torch RNG states as weights_only-loadable objects."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def model_payload(model_state: dict, model_config: dict, epoch: int, score: Optional[float],
                  input_size: Optional[list] = None) -> dict:
    """The contents of ``model_best.pt`` (also the model part of the last checkpoint).
    ``input_size`` = [H, W] the model was trained at (tools default to it)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": model_state,
        "model_config": model_config,
        "epoch": epoch,
        "mAP": score,
        "input_size": input_size,
    }


def save(path: Path, payload: dict) -> None:
    atomic_torch_save(payload, path)


def load(path: Path) -> dict[str, Any]:
    return safe_load(path, map_location="cpu")

"""What a run needs to continue after epoch ``epoch``: :class:`TrainingState`.

The trainer builds one after each epoch and hands it to :meth:`RunFolder.save_state
<isereid.engine.run_state.RunFolder.save_state>`; on resume :meth:`RunFolder.load_state
<isereid.engine.run_state.RunFolder.load_state>` returns one and the trainer takes its parts back.
The memories travel as objects and serialise through their own ``state_dict`` / ``from_state``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..camera_memory import CameraProxyMemory
from ..config import MemoryConfig
from ..errors import CheckpointError, first_line
from ..memory import ClusterMemory
from ..models.averaged import averaged_weights
from .records import EpochRecord


def cluster_memory_kwargs(m: MemoryConfig) -> dict:
    """The hyper-parameters of :class:`ClusterMemory` in ``memory`` settings ``m``."""
    return {"temperature": m.temperature, "momentum": m.momentum, "mode": m.mode}


def camera_memory_kwargs(m: MemoryConfig) -> dict:
    """The hyper-parameters of :class:`CameraProxyMemory` in ``memory`` settings ``m``."""
    return {"temperature": m.camera_temperature, "momentum": m.camera_momentum,
            "hard_negatives": m.camera_hard_negatives}


@dataclass
class TrainingState:
    """Everything ``checkpoint_last.pt`` holds besides the config.

    epoch: finished epochs (1-based number of the last one); score: its mAP, None when not evaluated.
    model / optimizer / scheduler / scaler: their ``state_dict()``s. memory / camera_memory: the
    memories of the current pseudo-labels (None before the first clustering, or without camera-aware
    memory). pseudo_labels: (N,) int64, -1 for outliers. history: the records of epochs 1..epoch.
    rng: :func:`isereid.engine.checkpoint.rng_state`. averaged: the ``state_dict()`` of the weight
    average of ``cluster.ema`` (None without it). tail_average: the ``state_dict()`` of the uniform
    average of ``optim.average_from`` (None without it). source: the file it was read from ("" when built
    in memory), named by errors while restoring.
    """

    epoch: int
    score: Optional[float]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    memory: Optional[ClusterMemory]
    camera_memory: Optional[CameraProxyMemory]
    pseudo_labels: Optional[np.ndarray]
    best_score: float
    best_epoch: int
    history: list[EpochRecord]
    rng: dict[str, Any]
    world_size: int = 1
    averaged: Optional[dict[str, torch.Tensor]] = None
    tail_average: Optional[dict[str, torch.Tensor]] = None
    source: str = field(default="", compare=False)

    def evaluated_weights(self) -> dict[str, torch.Tensor]:
        """The weights this epoch was evaluated with, what model_best.pt holds: the tail average's once it
        has averaged a step (``optim.average_from``), else the network's."""
        if self.tail_average is not None and int(self.tail_average.get("n_averaged", 0)) > 0:
            return averaged_weights(self.tail_average)
        return self.model

    def restore(self, *, model: torch.nn.Module, optimizer, scheduler, scaler,
                averaged: Optional[torch.nn.Module] = None, tail_average: Optional[torch.nn.Module] = None) -> None:
        """Load the four states (and ``averaged``, the weight average of ``cluster.ema``, and ``tail_average``,
        that of ``optim.average_from``, when given) into the given parts; CheckpointError naming the file and
        the part that does not fit (another architecture, another parameter grouping, no average saved)."""
        parts = (("state_dict", model, self.model), ("optimizer", optimizer, self.optimizer),
                 ("scheduler", scheduler, self.scheduler), ("scaler", scaler, self.scaler))
        averages = (("averaged_state_dict", averaged, self.averaged, "weight average of cluster.ema"),
                    ("tail_average_state_dict", tail_average, self.tail_average,
                     "uniform average of optim.average_from"))
        for key, part, state, what in averages:
            if part is None:
                continue
            if state is None:
                raise CheckpointError(f"cannot resume from {self.source or 'the checkpoint'}: it holds no "
                                      f"{key!r} (the {what})")
            parts += ((key, part, state),)
        for key, part, state in parts:
            try:
                part.load_state_dict(state)
            except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
                raise CheckpointError(f"cannot resume from {self.source or 'the checkpoint'}: "
                                      f"key {key!r} does not fit: {first_line(e)}") from None

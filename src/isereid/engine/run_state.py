"""A training run's folder: what it saves after each epoch and how a re-run continues from it.

    checkpoint_last.pt   everything needed to continue (model, optimizer, scheduler, scaler, memories,
                         pseudo-labels, best score, RNG states, the epoch records, the config)
    metrics.jsonl        one EpochRecord a line, rewritten from the checkpoint's records on resume
    model_best.pt        the model of the epoch with the best mAP (the latest one without a test split)
    labels/images.npz    the training images in pseudo-label order: paths (absolute), camids (int32)
    train.log            the run's log lines, timestamped (:meth:`RunFolder.log_file`)
    labels/epoch_NNN.npz the pseudo-labels of epoch NNN (1-based): labels (int32, -1 = outlier), and
                         inside/between, sampled distances to the nearest image of the same / another
                         cluster (index.cluster_distances), from which `isereid serve` suggests a
                         "no match" threshold; written when the epoch clusters, before it trains

Every file is written atomically, in that order, so a kill at any moment leaves complete files;
what a kill between two writes leaves behind (a metrics line too many or too few, a stale best
file, ``.*.tmp`` files) is repaired by :meth:`RunFolder.read_last` / :meth:`RunFolder.repair`.
Only rank 0 touches the folder; the callers decide who calls.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ..config import Config, to_dict
from ..errors import CheckpointError, first_line
from ..index import cluster_distances
from ..utils import atomic_path, atomic_write_text
from . import checkpoint as ckpt
from .records import EpochRecord

# Config sections that must match for a run folder to be resumed.
RESUME_MUST_MATCH = ("model", "data", "cluster", "memory", "ise", "optim")
METRICS = "metrics.jsonl"
LABELS = "labels"
LABEL_IMAGES = "images.npz"
LOG = "train.log"


class RunFolder:
    """The checkpoint, best-model and metrics files of the run in ``path``."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def last(self) -> Path:
        return self.path / ckpt.LAST

    @property
    def best(self) -> Path:
        return self.path / ckpt.BEST

    @contextlib.contextmanager
    def log_file(self, logger: logging.Logger) -> Iterator[None]:
        """Append what ``logger`` emits (at its own level) to ``train.log`` for the block, timestamped.
        Nested use adds nothing: the command line holds it around the whole command, the trainer
        around its run, and each line is written once."""
        path = (self.path / LOG).resolve()
        if any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
            yield
            return
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            handler.close()

    # ------------------------------------------------------------------ writing
    def save(self, cfg: Config, epoch: int, score: Optional[float], is_best: bool, *,
             model: torch.nn.Module, optimizer, scheduler, scaler, memory=None, camera_memory=None,
             pseudo_labels: Optional[np.ndarray] = None, best_score: float, best_epoch: int,
             history: Sequence[EpochRecord], world_size: int = 1) -> None:
        """checkpoint_last.pt, then metrics.jsonl, then model_best.pt when ``is_best``.
        ``epoch`` is 1-based (the number of finished epochs); ``score`` its mAP or None."""
        state = model.state_dict()
        model_config = to_dict(cfg)["model"]
        size = [cfg.data.height, cfg.data.width]
        payload = ckpt.model_payload(state, model_config, epoch, score, size)
        payload.update({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "memory": memory.centroids.detach().cpu() if memory is not None else None,
            "camera_memory": ({k: v.detach().cpu() for k, v in camera_memory.state_dict().items()}
                              if camera_memory is not None else None),
            "pseudo_labels": torch.as_tensor(pseudo_labels) if pseudo_labels is not None else None,
            "best_score": best_score,
            "best_epoch": best_epoch,
            "history": [r.to_dict() for r in history],
            "rng": ckpt.rng_state(),
            "config": to_dict(cfg),
            "world_size": world_size,
        })
        ckpt.save(self.last, payload)
        self.write_metrics(history)
        if is_best:
            ckpt.save(self.best, ckpt.model_payload(state, model_config, epoch, score, size))

    def write_labels(self, epoch: int, labels: np.ndarray, paths: Sequence[str], camids: np.ndarray,
                     features=None) -> Path:
        """Record the pseudo-labels (N,) of 1-based ``epoch`` for the training images ``paths`` (N)
        with cameras ``camids`` (N) in ``labels/`` (features (N, D), when given, yield the
        inside/between distance samples). The image list is written once (again when it changed).
        Returns the epoch's file."""
        folder = self.path / LABELS
        labels = np.asarray(labels)
        if not (len(labels) == len(paths) == len(camids)):
            raise ValueError(f"{len(labels)} labels, {len(paths)} paths and {len(camids)} camids")
        abs_paths = np.array([str(Path(p).resolve()) for p in paths])
        images = folder / LABEL_IMAGES
        if not images.exists() or not _same_paths(images, abs_paths):
            with atomic_path(images, suffix=".tmp.npz") as tmp:
                np.savez(tmp, paths=abs_paths, camids=np.asarray(camids, dtype=np.int32))
        inside, between = (cluster_distances(features, labels) if features is not None
                           else (np.zeros(0, np.float32), np.zeros(0, np.float32)))
        path = folder / f"epoch_{int(epoch):03d}.npz"
        with atomic_path(path, suffix=".tmp.npz") as tmp:
            np.savez(tmp, labels=labels.astype(np.int32), inside=inside, between=between)
        return path

    def write_metrics(self, history: Sequence[EpochRecord]) -> None:
        atomic_write_text(self.path / METRICS, "".join(r.to_json() + "\n" for r in history))

    def remove_stale_temp_files(self) -> None:
        """``.*.tmp`` files are what a kill during an atomic write leaves."""
        if self.path.is_dir():
            for stale in [*self.path.glob(".*.tmp"), *self.path.glob(f"{LABELS}/.*.tmp.npz")]:
                stale.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading
    def read_last(self, cfg: Config) -> Optional[dict[str, Any]]:
        """The contents of checkpoint_last.pt, or None when the folder has none. CheckpointError
        when it belongs to a run with different settings in :data:`RESUME_MUST_MATCH`."""
        path = self.last
        if not path.exists():
            return None
        state = ckpt.load(path)
        saved_cfg = state.get("config", {})
        current = to_dict(cfg)
        for section in RESUME_MUST_MATCH:
            if saved_cfg.get(section) != current[section]:
                diff = sorted(k for k in current[section]
                              if saved_cfg.get(section, {}).get(k) != current[section][k])
                keys = ", ".join(f"{section}.{k}" for k in diff)
                raise CheckpointError(
                    f"{path} belongs to a run with different {section} settings ({keys}); "
                    "use a new --output-dir or the original settings"
                )
        return state

    def load_into(self, state: dict, *, model: torch.nn.Module, optimizer, scheduler, scaler) -> None:
        """Restore the model, optimizer, scheduler and scaler states of ``state`` (from read_last)."""
        try:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot resume from {self.last}: {first_line(e)}") from None

    @staticmethod
    def history(state: dict) -> list[EpochRecord]:
        """The records of the epochs ``state`` finished (lines of a later, unfinished epoch dropped)."""
        return [EpochRecord.from_dict(r) for r in state["history"][: int(state["epoch"])]]

    def repair(self, state: dict) -> None:
        """Make the files agree with ``state`` (from read_last) after a kill between two writes:
        rewrite a stale model_best.pt and metrics.jsonl."""
        self._repair_best(state)
        self.write_metrics(self.history(state))

    def _repair_best(self, state: dict) -> None:
        """A kill between writing checkpoint_last.pt and model_best.pt leaves a stale best file."""
        best_epoch = int(state["best_epoch"])
        if best_epoch != int(state["epoch"]):
            return
        current_epoch = None
        if self.best.exists():
            try:
                current_epoch = ckpt.load(self.best).get("epoch")
            except CheckpointError:
                current_epoch = None
        if current_epoch != best_epoch:
            ckpt.save(self.best, ckpt.model_payload(state["state_dict"], state["model_config"], state["epoch"],
                                                    state.get("mAP"), state.get("input_size")))


def _same_paths(images: Path, paths: np.ndarray) -> bool:
    try:
        with np.load(images, allow_pickle=False) as data:
            return np.array_equal(data["paths"], paths)
    except (OSError, ValueError, KeyError):
        return False

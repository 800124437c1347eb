"""A training run's folder: what it saves after each epoch and how a re-run continues from it.

    checkpoint_last.pt   everything needed to continue (model, optimizer, scheduler, scaler, memories,
                         pseudo-labels, best score, RNG states, the epoch records, the config)
    metrics.jsonl        one EpochRecord a line, rewritten from the checkpoint's records on resume
    model_best.pt        the model of the epoch with the best mAP (the latest one without a test split); with
                         optim.average_from, the averaged weights once the average has begun
    labels/images.npz    the training images in pseudo-label order: paths (absolute), camids (int32)
    train.log            the run's log lines, timestamped (:meth:`RunFolder.log_file`)
    labels/epoch_NNN.npz the pseudo-labels of epoch NNN (1-based): labels (int32, -1 = outlier), and
                         inside/between, sampled distances to the nearest image of the same / another
                         cluster (index.cluster_distances), from which `isereid serve` suggests a
                         "no match" threshold; written when the epoch clusters, before it trains

:meth:`RunFolder.save_state` writes a :class:`~isereid.engine.training_state.TrainingState` and
:meth:`RunFolder.load_state` reads it back; :func:`payload` and :func:`parse_state` are the one owner
of the format of checkpoint_last.pt, and every read error is a CheckpointError naming file and key.

Every file is written atomically, in that order, so a kill at any moment leaves complete files;
what a kill between two writes leaves behind (a metrics line too many or too few, a stale best
file, ``.*.tmp`` files) is repaired by :meth:`RunFolder.load_state` / :meth:`RunFolder.repair`.
Only rank 0 touches the folder; the callers decide who calls.
"""
from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ..camera_memory import CameraProxyMemory
from ..config import Config, to_dict
from ..errors import CheckpointError, first_line
from ..index import cluster_distances
from ..memory import ClusterMemory
from ..utils import atomic_path, atomic_write_text
from . import checkpoint as ckpt
from .records import EpochRecord
from .training_state import TrainingState, camera_memory_kwargs, cluster_memory_kwargs

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
    def save_state(self, cfg: Config, state: TrainingState, is_best: bool) -> None:
        """checkpoint_last.pt (the :func:`payload` of ``state``), then metrics.jsonl, then
        model_best.pt when ``is_best``."""
        ckpt.save(self.last, payload(cfg, state))
        self.write_metrics(state.history)
        if is_best:
            ckpt.save(self.best, _model_payload(cfg, state.evaluated_weights(), state.epoch, state.score))

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
        """The raw contents of checkpoint_last.pt, or None when the folder has none. CheckpointError
        when it belongs to a run with different settings in :data:`RESUME_MUST_MATCH`."""
        path = self.last
        if not path.exists():
            return None
        raw = ckpt.load(path)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} is not a training checkpoint (it holds a {type(raw).__name__})")
        saved_cfg = raw.get("config")
        if not isinstance(saved_cfg, dict):
            raise CheckpointError(f"{path} has no usable key 'config'; it was not written by `isereid train`")
        current, defaults = to_dict(cfg), to_dict(Config())
        for section in RESUME_MUST_MATCH:
            saved = saved_cfg.get(section) if isinstance(saved_cfg.get(section), dict) else {}
            # A key the saved run did not know yet (an option added since) ran at its default.
            saved = {k: saved.get(k, defaults[section][k]) for k in current[section]}
            if saved != current[section]:
                diff = sorted(k for k in current[section] if saved.get(k) != current[section][k])
                keys = ", ".join(f"{section}.{k}" for k in diff)
                raise CheckpointError(
                    f"{path} belongs to a run with different {section} settings ({keys}); "
                    "use a new --output-dir or the original settings"
                )
        return raw

    def load_state(self, cfg: Config) -> Optional[TrainingState]:
        """The state saved in checkpoint_last.pt (memories on the CPU, history cut to its epoch), or None
        when the folder has none. CheckpointError naming the file and the key for a missing or bad part."""
        raw = self.read_last(cfg)
        return None if raw is None else parse_state(raw, cfg, str(self.last))

    def repair(self, cfg: Config, state: TrainingState) -> None:
        """Make the files agree with ``state`` (from load_state) after a kill between two writes:
        rewrite a stale model_best.pt and metrics.jsonl."""
        self._repair_best(cfg, state)
        self.write_metrics(state.history)

    def _repair_best(self, cfg: Config, state: TrainingState) -> None:
        """A kill between writing checkpoint_last.pt and model_best.pt leaves a stale best file."""
        if state.best_epoch != state.epoch:
            return
        current_epoch = None
        if self.best.exists():
            try:
                current_epoch = ckpt.load(self.best).get("epoch")
            except (CheckpointError, AttributeError):
                current_epoch = None
        if current_epoch != state.best_epoch:
            ckpt.save(self.best, _model_payload(cfg, state.evaluated_weights(), state.epoch, state.score))


# ---------------------------------------------------------------------- the checkpoint format
def _model_payload(cfg: Config, model_state: dict, epoch: int, score: Optional[float]) -> dict:
    """model_best.pt, also the model part of checkpoint_last.pt."""
    return ckpt.model_payload(model_state, to_dict(cfg)["model"], epoch, score, [cfg.data.height, cfg.data.width])


def payload(cfg: Config, state: TrainingState) -> dict[str, Any]:
    """The contents of checkpoint_last.pt: tensors and builtins only (``weights_only`` loads them).
    The keys are those of the format before TrainingState ("memory" the (M, D) centroids,
    "camera_memory" the proxy memory's state_dict), so files of earlier runs still resume."""
    out = _model_payload(cfg, state.model, state.epoch, state.score)
    memory = state.memory.state_dict()["centroids"].detach().cpu() if state.memory is not None else None
    camera = ({k: v.detach().cpu() for k, v in state.camera_memory.state_dict().items()}
              if state.camera_memory is not None else None)
    out.update({
        "optimizer": state.optimizer, "scheduler": state.scheduler, "scaler": state.scaler,
        "memory": memory, "camera_memory": camera,
        "pseudo_labels": torch.as_tensor(state.pseudo_labels) if state.pseudo_labels is not None else None,
        "best_score": state.best_score, "best_epoch": state.best_epoch,
        "history": [r.to_dict() for r in state.history], "rng": state.rng,
        "config": to_dict(cfg), "world_size": state.world_size,
    })
    if state.averaged is not None:  # only with cluster.ema: earlier files and runs without it lack the key
        out["averaged_state_dict"] = state.averaged
    if state.tail_average is not None:  # only with optim.average_from
        out["tail_average_state_dict"] = state.tail_average
    return out


def _get(raw: dict, key: str, kinds: tuple, source: str, optional: bool = False) -> Any:
    """``raw[key]`` when it is one of ``kinds`` (or None when ``optional``), else CheckpointError."""
    if key not in raw:
        raise CheckpointError(f"{source} has no key {key!r}; it was not written by `isereid train` or is damaged")
    value = raw[key]
    if (value is None and optional) or (isinstance(value, kinds) and not isinstance(value, bool)):
        return value
    raise CheckpointError(f"{source}: key {key!r} holds a {type(value).__name__}, not "
                          f"{' or '.join(k.__name__ for k in kinds)}")


def _memory(raw: dict, key: str, source: str, build) -> Any:
    """``build(raw[key])`` (a memory's from_state), or None; CheckpointError naming the key."""
    value = _get(raw, key, (torch.Tensor, dict), source, optional=True)
    if value is None:
        return None
    try:
        return build(value)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        what = f"{key}.{e.args[0]}" if isinstance(e, KeyError) and e.args else key
        raise CheckpointError(f"{source}: key {what!r} is missing or unusable: {first_line(e)}") from None


def _python_rng_ok(state) -> bool:
    """Whether ``random.setstate`` accepts ``state`` (checked on a private generator, so a bad state
    is reported as a CheckpointError before anything is restored)."""
    try:
        random.Random().setstate(ckpt.python_rng_state(state))
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    return True


def parse_state(raw: dict, cfg: Config, source: str) -> TrainingState:
    """The :class:`TrainingState` of checkpoint contents ``raw`` (read from ``source``) for a run of ``cfg``."""
    mcfg = cfg.memory
    epoch = _get(raw, "epoch", (int,), source)
    rng = _get(raw, "rng", (dict,), source)
    for part, kind in (("python", (tuple, list)), ("torch", torch.Tensor)):
        if not isinstance(rng.get(part), kind):
            raise CheckpointError(f"{source}: key 'rng.{part}' is missing or unusable")
    if not _python_rng_ok(rng["python"]):
        raise CheckpointError(f"{source}: key 'rng.python' is not a state of Python's random module")
    labels = _get(raw, "pseudo_labels", (torch.Tensor,), source, optional=True)
    try:
        history = [EpochRecord.from_dict(r) for r in _get(raw, "history", (list,), source)[:epoch]]
    except TypeError as e:
        raise CheckpointError(f"{source}: key 'history' holds a bad record: {first_line(e)}") from None
    return TrainingState(
        epoch=epoch, score=_get(raw, "mAP", (float, int), source, optional=True),
        model=_get(raw, "state_dict", (dict,), source), optimizer=_get(raw, "optimizer", (dict,), source),
        scheduler=_get(raw, "scheduler", (dict,), source), scaler=_get(raw, "scaler", (dict,), source),
        # an old file holds the bare (M, D) centroids under "memory"
        memory=_memory(raw, "memory", source, lambda v: ClusterMemory.from_state(
            v if isinstance(v, dict) else {"centroids": v}, **cluster_memory_kwargs(mcfg))),
        camera_memory=_memory(raw, "camera_memory", source,
                              lambda v: CameraProxyMemory.from_state(v, **camera_memory_kwargs(mcfg))),
        pseudo_labels=labels.numpy().astype(np.int64) if labels is not None else None,
        best_score=float(_get(raw, "best_score", (float, int), source)),
        best_epoch=_get(raw, "best_epoch", (int,), source), history=history, rng=rng,
        world_size=int(raw.get("world_size", 1)),
        averaged=_get(raw, "averaged_state_dict", (dict,), source) if "averaged_state_dict" in raw else None,
        tail_average=(_get(raw, "tail_average_state_dict", (dict,), source)
                      if "tail_average_state_dict" in raw else None),
        source=source)


def _same_paths(images: Path, paths: np.ndarray) -> bool:
    try:
        with np.load(images, allow_pickle=False) as data:
            return np.array_equal(data["paths"], paths)
    except (OSError, ValueError, KeyError):
        return False

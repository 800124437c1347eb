"""What a training run reports as it goes: the progress line in the log and the TensorBoard scalars.

The per-epoch scalars are read off the :class:`EpochRecord` itself (every numeric field, dict fields
flattened to ``<field>/<key>``), so a new field of the record shows up in TensorBoard without an edit here.
``metrics.jsonl`` is written by the run folder (engine/run_state.py), not by this module.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

from .records import EpochRecord

log = logging.getLogger("isereid")

# Fields that are not curves: the epoch is the x axis of every epoch scalar.
NOT_SCALARS = frozenset({"epoch", "extra"})


def tensorboard_writer(output_dir: Path):
    """A SummaryWriter logging to ``output_dir/tensorboard``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed; curves go to metrics.jsonl only (pip install isereid[tensorboard])")
        return None
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


def _is_scalar(value: Any) -> bool:
    # bool is an int to Python but not a curve; NaN/inf would only spoil the plot's axis range.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(prefix: str, values: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    for key, value in values.items():
        if isinstance(value, Mapping):
            yield from _flatten(f"{prefix}/{key}", value)
        elif _is_scalar(value):
            yield f"{prefix}/{key}", value


def epoch_scalars(record: EpochRecord) -> list[tuple[str, float]]:
    """``(tag, value)`` of each number in ``record``: ``epoch/<field>`` for a numeric field (or unknown
    key kept in ``extra``), ``<field>/<key>`` for the numbers of a dict field such as ``cluster``;
    ``None`` fields, text, booleans and non-finite numbers are left out."""
    items = [(f.name, getattr(record, f.name)) for f in dataclasses.fields(record) if f.name not in NOT_SCALARS]
    items += [(k, v) for k, v in record.extra.items() if k not in NOT_SCALARS]
    out: list[tuple[str, float]] = []
    for name, value in items:
        if isinstance(value, Mapping):
            out.extend(_flatten(name, value))
        elif _is_scalar(value):
            out.append((f"epoch/{name}", value))
    return out


def progress_line(record: EpochRecord, epochs: int) -> str:
    """The one-line summary of an epoch that the log shows (``epochs``: the run's total)."""
    parts = [f"epoch {record.epoch}/{epochs}",
             f"clusters {record.num_clusters}", f"outliers {record.num_outliers}",
             f"loss {record.loss:.4f}"]
    if record.evaluated:
        parts.append(f"mAP {100 * record.mAP:.1f}%  rank-1 {100 * record.rank1:.1f}%")
        if record.unaveraged:
            parts.append(f"(weight average; the network's own {100 * record.unaveraged['mAP']:.1f}% / "
                         f"{100 * record.unaveraged['rank1']:.1f}%)")
    cluster = record.cluster or {}
    if isinstance(cluster.get("eps"), (int, float)):
        scale = cluster.get("scale") or {}
        core = f", {100 * scale['core_share']:.0f}% core" if "core_share" in scale else ""
        parts.append(f"eps {cluster['eps']:.3f}" + (f" (auto{core})" if scale else ""))
    cross = cluster.get("cross_camera_clusters")
    if cross is not None:
        parts.append(f"cross-camera clusters {100 * cross:.0f}%")
    pairs = cluster.get("association")
    if isinstance(pairs, Mapping) and "merged" in pairs:
        gate = pairs.get("threshold")
        parts.append(f"associated {pairs['merged']}/{pairs['mutual_pairs']} mutual pairs"
                     + (f" at cosine >= {gate:.2f}" if isinstance(gate, (int, float)) else ""))
    mutual = cluster.get("mutual_cross_camera")
    if mutual is not None:
        parts.append(f"mutual cross-camera neighbours {100 * mutual:.0f}%")
    agreement = cluster.get("previous_agreement")
    if agreement is not None:
        parts.append(f"ARI with last epoch's labels {agreement:.2f}")
    nmi = cluster.get("nmi")
    if nmi is not None:
        parts.append(f"NMI {nmi:.3f}")
    parts.append(f"{record.seconds:.0f}s")
    return "  ".join(parts)


class RunLogger:
    """The log lines and TensorBoard scalars of one run; silent on ranks other than 0."""

    def __init__(self, writer=None, *, epochs: int, log_every: int = 1, is_main: bool = True):
        """writer: a SummaryWriter (anything with ``add_scalar``/``flush``/``close``) or None for the
        log only. epochs: the run's total, for the progress line. log_every: iteration scalars every
        this many steps."""
        self.writer = writer
        self.epochs = epochs
        self.log_every = log_every
        self.is_main = is_main

    def iteration(self, step: int, losses: Mapping[str, float], interpolation_weight: float) -> None:
        """The ``train/*`` scalars of global ``step`` (0-based), every ``log_every`` steps (on any rank
        given a writer: only rank 0 gets one from :meth:`Trainer.from_config`)."""
        if self.writer is None or step % self.log_every:
            return
        for key, value in losses.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.add_scalar("train/interpolation_weight", interpolation_weight, step)

    def epoch(self, record: EpochRecord) -> None:
        """The progress line of ``record`` and its scalars (:func:`epoch_scalars`) at step ``record.epoch``."""
        if not self.is_main:
            return
        log.info(progress_line(record, self.epochs))
        if self.writer is not None:
            for tag, value in epoch_scalars(record):
                self.writer.add_scalar(tag, value, record.epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


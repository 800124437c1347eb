"""One epoch of a training run: the schema of a run folder's ``metrics.jsonl`` (one record a line).

A field that is ``None`` is left out of the JSON line (``loss_intra``/``loss_inter`` exist only
with the camera-aware memory, ``mAP``… only on evaluated epochs, ``cluster`` only on epochs that
re-clustered). Keys this version does not know are kept in :attr:`EpochRecord.extra` and written
back unchanged, so an older or newer ``metrics.jsonl`` still loads and survives a resume.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    num_clusters: int
    num_outliers: int
    loss: float  # epoch means of the per-iteration losses
    loss_cc: float
    loss_lp: float
    lr: float  # learning rate during the epoch
    seconds: float  # wall time of the epoch
    interpolation_weight: float  # the ISE weight at the epoch's last iteration
    loss_intra: Optional[float] = None
    loss_inter: Optional[float] = None
    mAP: Optional[float] = None
    rank1: Optional[float] = None
    rank5: Optional[float] = None
    rank10: Optional[float] = None
    # With optim.average_from, once the average has begun the scores above are the averaged weights' and
    # these ({"mAP", "rank1", "rank5", "rank10"}) the network's own, from the same run and epoch
    unaveraged: Optional[dict] = None
    # ClusteringReport.to_dict() of the epoch's pseudo-labels, with "eps" (the radius used) and, under
    # cluster.eps=auto, "scale" (ScaleChoice.to_dict(): the statistic behind it, docs/auto_eps.md) and,
    # under cluster.associate, "association" (Association.summary(): mutual pairs found and merged)
    cluster: Optional[dict] = None
    # Wall seconds of the epoch's phases: extract (training features for clustering), cluster,
    # train (the iterations, of which data_wait is time spent waiting for the loader), evaluate.
    phases: Optional[dict] = None
    extra: dict = field(default_factory=dict)  # keys not listed above, as read

    @property
    def evaluated(self) -> bool:
        return self.mAP is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this epoch (``None`` fields left out, unknown keys kept)."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochRecord:
        """The record of one JSON object; TypeError names a missing required key."""
        if not isinstance(data, dict):
            raise TypeError(f"an epoch record is a JSON object, not {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name in names and f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise TypeError(f"epoch record without {', '.join(repr(k) for k in missing)}")
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_json(self) -> str:
        """One ``metrics.jsonl`` line (sorted keys, no newline)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> EpochRecord:
        """The record of one ``metrics.jsonl`` line (json.JSONDecodeError / TypeError when malformed)."""
        return cls.from_dict(json.loads(line))

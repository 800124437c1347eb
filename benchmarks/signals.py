"""Do the label-free diagnostics of a run predict its score? Rank correlations over finished runs.

    python benchmarks/signals.py RUN_DIR [RUN_DIR ...] --output signals.json [--score mAP]

A user without labels can only watch the per-epoch diagnostics that need none (the share of
clusters spanning cameras, mutual cross-camera neighbours, ...). This script asks, on runs that were
scored on a labelled split (e.g. ``benchmarks/accuracy.py --holdout``), whether those diagnostics
would have ranked the runs as their score does: for every diagnostic and every epoch, the Spearman
rank correlation across runs between the diagnostic's value at that epoch and the run's score at its
last epoch. The labelled diagnostics (``cross_camera_nn_accuracy``, ``nmi``, ``purity``, ``ari``)
are reported beside them, marked, as the contrast a labelled set gives.

Each RUN_DIR is a training output folder (``isereid train --output-dir``) or a folder holding one
under ``run/`` (as ``benchmarks/accuracy.py --work-dir`` leaves them); its last record must carry
the score. Output: JSON ``{"score", "runs": [{"run", "score"}], "signals": [{"name",
"label_free", "epochs": [{"epoch", "spearman", "runs"}]}]}`` and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from scipy.stats import spearmanr

from isereid.utils import atomic_write_text

# (name in the record's "cluster" dict, or a dotted path inside it; needs labels?)
SIGNALS = [
    ("mutual_cross_camera", False),
    ("cross_camera_clusters", False),
    ("cross_camera_images", False),
    ("num_clusters", False),
    ("num_outliers", False),
    ("eps", False),
    ("previous_agreement", False),
    ("association.merged", False),
    ("cross_camera_nn_accuracy", True),
    ("nmi", True),
    ("purity", True),
    ("ari", True),
]


class SignalsError(Exception):
    """A run folder that cannot be read; reported as one line, exit 2."""


def read_run(path: Path) -> List[dict]:
    """The records of ``path/metrics.jsonl`` (or ``path/run/metrics.jsonl``), in file order."""
    for candidate in (path / "metrics.jsonl", path / "run" / "metrics.jsonl"):
        if candidate.is_file():
            try:
                return [json.loads(line) for line in candidate.read_text().splitlines() if line.strip()]
            except json.JSONDecodeError as exc:
                raise SignalsError(f"{candidate}: not JSON lines ({exc})") from exc
    raise SignalsError(f"{path}: no metrics.jsonl there or in {path / 'run'}; pass a training output folder")


def signal_value(record: dict, name: str) -> Optional[float]:
    """The diagnostic ``name`` (dotted inside ``record["cluster"]``) or None when absent."""
    value = record.get("cluster") or {}
    for part in name.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return None
        value = value[part]
    return float(value)


def correlate(runs: Dict[str, List[dict]], score: str) -> dict:
    """Spearman correlations of every signal at every epoch with each run's last-epoch ``score``."""
    scores = {}
    for name, records in runs.items():
        if not records or records[-1].get(score) is None:
            raise SignalsError(f"{name}: its last record has no {score!r}; was the run evaluated at its end?")
        scores[name] = float(records[-1][score])
    by_epoch = {name: {int(r["epoch"]): r for r in records if "epoch" in r} for name, records in runs.items()}
    epochs = sorted({epoch for records in by_epoch.values() for epoch in records})
    signals = []
    for signal, needs_labels in SIGNALS:
        rows = []
        for epoch in epochs:
            pairs = []
            for name, records in by_epoch.items():
                value = signal_value(records[epoch], signal) if epoch in records else None
                if value is not None:
                    pairs.append((value, scores[name]))
            rho = None
            if len(pairs) >= 3:
                values, targets = zip(*pairs)
                rho = float(spearmanr(values, targets)[0])
                rho = None if math.isnan(rho) else rho  # a constant signal ranks nothing
            rows.append({"epoch": epoch, "spearman": rho, "runs": len(pairs)})
        signals.append({"name": signal, "label_free": not needs_labels, "epochs": rows})
    return {"score": score, "runs": [{"run": n, "score": s} for n, s in scores.items()], "signals": signals}


def table(result: dict) -> str:
    """Rows of signals, columns of epochs: the rank correlation, '-' where it is undefined."""
    epochs = [row["epoch"] for row in result["signals"][0]["epochs"]] if result["signals"] else []
    lines = [f"Spearman correlation with the last epoch's {result['score']} over {len(result['runs'])} runs"
             " (* needs labels)",
             f"{'epoch':28s}" + "".join(f"{e:>7d}" for e in epochs) + "   runs"]
    for signal in result["signals"]:
        cells = "".join("      -" if r["spearman"] is None else f"{r['spearman']:+7.2f}" for r in signal["epochs"])
        # Runs that recorded the signal (at its best-covered epoch): an older run may lack a newer diagnostic.
        counted = max((r["runs"] for r in signal["epochs"]), default=0)
        lines.append(f"{signal['name'] + ('' if signal['label_free'] else ' *'):28s}{cells}{counted:7d}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training output folders (3 or more)")
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--score", default="mAP", help="the last record's key to predict (default mAP)")
    args = parser.parse_args(argv)
    try:
        if len(args.runs) < 3:
            raise SignalsError(f"{len(args.runs)} run(s) given; a rank correlation needs 3 or more")
        runs = {str(path): read_run(path) for path in args.runs}
        result = correlate(runs, args.score)
    except SignalsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(args.output, json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

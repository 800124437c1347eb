"""Training curves from a run folder's ``metrics.jsonl`` as one PNG."""
from __future__ import annotations

import json
from pathlib import Path

from .engine.records import EpochRecord
from .errors import IsereidError


def read_metrics(run_dir: str | Path) -> list[EpochRecord]:
    """The per-epoch records of ``run_dir/metrics.jsonl`` (ValueError-free: bad lines are an error)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise IsereidError(f"no metrics.jsonl in {run_dir}; is it the output folder of `isereid train`?")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(EpochRecord.from_json(line))
        except json.JSONDecodeError:
            raise IsereidError(f"{path} line {n} is not valid JSON") from None
        except TypeError as e:
            raise IsereidError(f"{path} line {n} is not an epoch record: {e}") from None
    if not records:
        raise IsereidError(f"{path} holds no epochs yet")
    return records


def _series(records: list[EpochRecord], key: str, nested: str | None = None) -> tuple[list[int], list[float]]:
    """Epochs and values of ``key`` (in the dict field ``nested`` if given), where the value is a number."""
    xs, ys = [], []
    for r in records:
        value = (getattr(r, nested) or {}).get(key) if nested else getattr(r, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(r.epoch)
            ys.append(value)
    return xs, ys


def _plot_evaluation(ax, records: list[EpochRecord]) -> None:
    for key, label in (("mAP", "mAP"), ("rank1", "rank-1")):
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    ax.set(title="Evaluation", xlabel="epoch", ylabel="%")
    if ax.lines:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "not evaluated", ha="center", transform=ax.transAxes)


def _plot_losses(ax, records: list[EpochRecord]) -> None:
    for key, label in (("loss", "total"), ("loss_cc", "contrastive"), ("loss_lp", "label-preserving")):
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, marker=".", label=label)
    ax.set(title="Training loss (epoch mean)", xlabel="epoch")
    ax.legend()


def _plot_label_counts(ax, records: list[EpochRecord]) -> None:
    """Clusters on the left axis, outliers on a twin right axis (their scales differ)."""
    xs, ys = _series(records, "num_clusters")
    ax.plot(xs, ys, marker=".", color="tab:blue", label="clusters")
    ax.set(title="Pseudo-labels", xlabel="epoch", ylabel="clusters")
    twin = ax.twinx()
    xs, ys = _series(records, "num_outliers")
    twin.plot(xs, ys, marker=".", color="tab:red", label="outliers")
    twin.set_ylabel("outliers", color="tab:red")


def _plot_label_quality(ax, records: list[EpochRecord]) -> None:
    # Camera shares need no ground truth (dashed); NMI / ARI / purity need the true identities.
    for key, label, style in (("cross_camera_clusters", "clusters spanning >= 2 cameras", "--"),
                              ("cross_camera_images", "images in such clusters", "--"),
                              ("nmi", "NMI", "-"), ("ari", "ARI", "-"), ("purity", "purity", "-")):
        xs, ys = _series(records, key, nested="cluster")
        if xs:
            ax.plot(xs, ys, marker=".", linestyle=style, label=label)
    ax.set(title="Pseudo-label quality", xlabel="epoch", ylim=(0, 1.02))
    if ax.lines:
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no camera ids or identities", ha="center", transform=ax.transAxes)


def plot_metrics(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write a 2×2 figure (accuracy, losses, clusters/outliers, pseudo-label quality) -> PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    output = Path(output) if output else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    _plot_evaluation(axes[0, 0], records)
    _plot_losses(axes[0, 1], records)
    _plot_label_counts(axes[1, 0], records)
    _plot_label_quality(axes[1, 1], records)
    fig.suptitle(f"isereid run: {Path(run_dir).resolve().name} ({len(records)} epochs)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.png")  # written whole, then renamed: no half-drawn PNG
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(output)
    return output

"""EpochRecord is the metrics.jsonl schema: the keys written, optional keys left out, unknown keys kept."""
from __future__ import annotations

import json

import pytest

from isereid.engine.records import EpochRecord
from isereid.errors import IsereidError
from isereid.plotting import plot_metrics, read_metrics

REQUIRED = {"epoch": 2, "num_clusters": 7, "num_outliers": 3, "loss": 1.5, "loss_cc": 1.25, "loss_lp": 2.5,
            "lr": 0.00035, "seconds": 12.5, "interpolation_weight": 0.25}
CLUSTER = {"num_clusters": 7, "num_outliers": 3, "histogram": {"1": 2, "2-3": 5}, "nmi": 0.5, "ari": None,
           "purity": 0.75, "cross_camera_clusters": 0.5, "cross_camera_images": 0.625}


def test_json_keys_are_exactly_the_fields_that_are_set():
    plain = EpochRecord(**REQUIRED)
    assert json.loads(plain.to_json()) == REQUIRED  # no null keys for missing optional values
    full = dict(REQUIRED, loss_intra=0.5, loss_inter=0.75, mAP=0.4, rank1=0.5, rank5=0.75, rank10=0.875,
                cluster=CLUSTER)
    record = EpochRecord.from_dict(full)
    assert record.evaluated and record.cluster["histogram"] == {"1": 2, "2-3": 5}
    assert json.loads(record.to_json()) == full
    assert EpochRecord.from_json(record.to_json()) == record
    line = record.to_json()
    assert "\n" not in line and list(json.loads(line)) == sorted(full)  # sorted keys, as always written


def test_unknown_keys_load_and_are_written_back():
    old = dict(REQUIRED, some_old_key=[1, 2], mAP=0.25)
    record = EpochRecord.from_json(json.dumps(old))
    assert record.extra == {"some_old_key": [1, 2]} and record.mAP == 0.25
    assert json.loads(record.to_json()) == old


def test_a_missing_required_key_is_named():
    broken = {k: v for k, v in REQUIRED.items() if k != "loss"}
    with pytest.raises(TypeError, match="'loss'"):
        EpochRecord.from_dict(broken)
    with pytest.raises(TypeError, match="JSON object"):
        EpochRecord.from_json("[1, 2]")


def test_read_metrics_returns_records(tmp_path):
    lines = [dict(REQUIRED, epoch=1, cluster=CLUSTER), dict(REQUIRED, epoch=2, mAP=0.5, rank1=0.625, extra_key=1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    records = read_metrics(tmp_path)
    assert [r.epoch for r in records] == [1, 2] and records[1].extra == {"extra_key": 1}
    assert [r.to_dict() for r in records] == lines
    assert plot_metrics(tmp_path).is_file()
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(IsereidError, match="line 1 is not an epoch record"):
        read_metrics(tmp_path)

"""The run's log lines and TensorBoard scalars (engine/run_log.py), with a fake writer that records
its calls: the epoch scalars are read off the EpochRecord, so a new field needs no logger edit."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from isereid.engine.records import EpochRecord
from isereid.engine.run_log import RunLogger, epoch_scalars, progress_line


class FakeWriter:
    """Records add_scalar/flush/close as a SummaryWriter would receive them."""

    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []
        self.flushed = 0
        self.closed = False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed = True


def _record(**kw) -> EpochRecord:
    base = dict(epoch=3, num_clusters=12, num_outliers=4, loss=1.5, loss_cc=1.25, loss_lp=0.25, lr=3.5e-4,
                seconds=7.0, interpolation_weight=0.5)
    return EpochRecord(**{**base, **kw})


def test_epoch_scalars_are_the_numbers_of_the_record():
    record = _record(mAP=0.5, rank1=0.75, rank5=0.9, rank10=0.95,
                     cluster={"eps": 0.6, "nmi": float("nan"), "scale": {"core_share": 0.4, "statistic": "otsu"},
                              "flag": True},
                     phases={"extract": 1.0, "train": 5.0})
    tags = dict(epoch_scalars(record))
    assert tags == {
        "epoch/num_clusters": 12, "epoch/num_outliers": 4, "epoch/loss": 1.5, "epoch/loss_cc": 1.25,
        "epoch/loss_lp": 0.25, "epoch/lr": 3.5e-4, "epoch/seconds": 7.0, "epoch/interpolation_weight": 0.5,
        "epoch/mAP": 0.5, "epoch/rank1": 0.75, "epoch/rank5": 0.9, "epoch/rank10": 0.95,
        "cluster/eps": 0.6, "cluster/scale/core_share": 0.4,  # text, bool and NaN left out
        "phases/extract": 1.0, "phases/train": 5.0}
    # None fields (loss_intra/loss_inter, the evaluation of an epoch without one) are left out
    plain = dict(epoch_scalars(_record()))
    assert "epoch/loss_intra" not in plain and "epoch/mAP" not in plain


def test_a_new_record_field_is_logged_without_touching_the_logger():
    @dataclass
    class Wider(EpochRecord):
        grad_norm: Optional[float] = None
        memory: Optional[dict] = None

    base = dict(_record().__dict__)
    record = Wider(**{**base, "grad_norm": 2.5, "memory": {"momentum": 0.2}})
    writer = FakeWriter()
    RunLogger(writer, epochs=5).epoch(record)
    logged = {tag: (value, step) for tag, value, step in writer.scalars}
    assert logged["epoch/grad_norm"] == (2.5, 3) and logged["memory/momentum"] == (0.2, 3)
    # an unknown key read from an older or newer metrics.jsonl (kept in extra) is logged too
    extra = EpochRecord.from_dict({**_record().to_dict(), "loss_new": 0.125})
    assert ("epoch/loss_new", 0.125) in epoch_scalars(extra)


def test_epoch_writes_the_scalars_then_flushes_and_logs_the_progress_line(caplog):
    writer = FakeWriter()
    record = _record(mAP=0.5, rank1=0.75, cluster={"eps": 0.6})
    with caplog.at_level(logging.INFO, logger="isereid"):
        RunLogger(writer, epochs=5).epoch(record)
    assert [(tag, value) for tag, value, _ in writer.scalars] == epoch_scalars(record)
    assert {step for _, _, step in writer.scalars} == {3} and writer.flushed == 1
    assert progress_line(record, 5) in caplog.text
    assert progress_line(record, 5).startswith("epoch 3/5  clusters 12  outliers 4  loss 1.5000  mAP 50.0%")


def test_progress_line_shows_the_cross_camera_association():
    cluster = {"eps": 0.6, "cross_camera_clusters": 0.44,
               "association": {"mutual_pairs": 312, "merged": 307, "below_threshold": 5}}
    line = progress_line(_record(cluster=cluster), 5)
    assert "cross-camera clusters 44%  associated 307/312 mutual pairs" in line
    assert "associated" not in progress_line(_record(cluster={"eps": 0.6}), 5)


def test_other_ranks_log_nothing(caplog):
    writer = FakeWriter()
    with caplog.at_level(logging.INFO, logger="isereid"):
        RunLogger(writer, epochs=5, is_main=False).epoch(_record())
    assert writer.scalars == [] and "epoch 3/5" not in caplog.text


def test_iteration_scalars_every_log_every_steps():
    writer = FakeWriter()
    logger = RunLogger(writer, epochs=1, log_every=10)
    for step in range(25):
        logger.iteration(step, {"loss": 1.0, "loss_cc": 0.5}, 0.1)
    assert {step for _, _, step in writer.scalars} == {0, 10, 20}
    assert [tag for tag, _, step in writer.scalars if step == 10] == ["train/loss", "train/loss_cc",
                                                                      "train/interpolation_weight"]
    logger.close()
    assert writer.closed
    RunLogger(None, epochs=1).iteration(0, {"loss": 1.0}, 0.0)  # no writer: nothing to do

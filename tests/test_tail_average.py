"""The uniform weight average of ``optim.average_from`` (models/averaged.py, docs/method.md#tail-average)
against a mean written out here, and the trainer's use of it: the average only watches (the network, its
losses and its own scores are those of a run without it), the evaluated scores and model_best.pt are the
average's, and a run stopped while averaging resumes bit for bit."""
from __future__ import annotations

import pytest
import torch

from isereid.config import load_config
from isereid.engine.checkpoint import load as load_checkpoint
from isereid.engine.run_state import RunFolder
from isereid.errors import CheckpointError, ConfigError
from isereid.models.averaged import averaged_weights, has_updates, tail_average
from test_trainer import _records, _trainer
from test_weight_average import _net, _new_weights


def test_the_average_is_the_mean_of_the_weights_it_saw():
    net = _net()
    average = tail_average(net)
    assert not has_updates(average)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in net.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        _new_weights(net, gen)
        average.update_parameters(net)
        for name, p in net.named_parameters():
            seen[name].append(p.detach().double().clone())
    assert has_updates(average) and int(average.n_averaged) == 6
    averaged = dict(average.module.named_parameters())
    for name, values in seen.items():
        torch.testing.assert_close(averaged[name].double(), sum(values) / len(values), rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in average.parameters())
    # buffers are not averaged: they are the network's last
    assert torch.equal(average.module[1].running_mean, net[1].running_mean)
    # a model file of the average holds the network's keys, without the counter
    weights = averaged_weights(average.state_dict())
    assert weights.keys() == net.state_dict().keys()
    assert torch.equal(weights["0.weight"], averaged["0.weight"])


@pytest.mark.parametrize("value", ["-2", "2"])
def test_config_refuses_an_average_start_outside_the_run(value):
    with pytest.raises(ConfigError, match="optim.average_from"):
        load_config("demo", ["optim.epochs=2", f"optim.average_from={value}"])
    load_config("demo", ["optim.epochs=2", "optim.average_from=1"])  # the last epoch is a valid start


def _watched(trainer) -> list[dict[str, torch.Tensor]]:
    """Wrap ``trainer.tail_average.update_parameters`` to keep a copy of every network it is given."""
    seen: list[dict[str, torch.Tensor]] = []
    update = trainer.tail_average.update_parameters

    def update_and_keep(model):
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        update(model)

    trainer.tail_average.update_parameters = update_and_keep
    return seen


def test_the_average_only_watches_and_is_what_is_evaluated_and_saved(tiny_demo, tmp_path):
    plain = _trainer(tiny_demo, tmp_path / "plain", "optim.epochs=3", "eval.every=0")
    plain.run()
    run = _trainer(tiny_demo, tmp_path / "average", "optim.epochs=3", "eval.every=0", "optim.average_from=1")
    seen = _watched(run)
    run.run()
    # updates after every step of epochs 2-3 (0-based 1-2), with the network's weights after that step
    assert len(seen) == 2 * run.cfg.optim.iters
    for name, p in run.tail_average.module.named_parameters():
        torch.testing.assert_close(p, sum(s[name] for s in seen) / len(seen), rtol=1e-6, atol=1e-7)
    for name, tensor in plain.model.state_dict().items():  # the network trained exactly as without the average
        assert torch.equal(run.model.state_dict()[name], tensor), name
    ours, theirs = _records(tmp_path / "average"), _records(tmp_path / "plain")
    assert ours[:2] == theirs[:2]
    last, reference = dict(ours[2]), theirs[2]
    assert last.pop("unaveraged") == {k: reference[k] for k in ("mAP", "rank1", "rank5", "rank10")}
    scores = ("mAP", "rank1", "rank5", "rank10")
    assert {k: v for k, v in last.items() if k not in scores} == {k: v for k, v in reference.items() if k not in scores}
    # the scores are the average's (two steps of a tiny net: they differ from the network's somewhere)
    evaluated = run.evaluate()
    assert {k: evaluated[k] for k in scores} == {k: last[k] for k in scores}
    # model_best.pt holds the averaged weights with the network's buffers; checkpoint_last.pt the network
    best = load_checkpoint(run.out / "model_best.pt")["state_dict"]
    for name, tensor in run.tail_average.module.state_dict().items():
        assert torch.equal(best[name], tensor), name
    for name, tensor in run.model.named_buffers():
        assert torch.equal(best[name], tensor), name
    last_state = load_checkpoint(run.out / "checkpoint_last.pt")["state_dict"]
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(last_state[name], tensor), name
    assert any(not torch.equal(best[name], tensor) for name, tensor in run.model.named_parameters())


def _stopped_after_epoch_2(root, out):
    """The folder of a 3-epoch run averaging from epoch 2 (0-based 1), stopped right after epoch 2's save."""
    first = _trainer(root, out, "optim.epochs=3", "optim.average_from=1")
    save = first.save

    def save_then_stop(epoch, record):
        save(epoch, record)
        if epoch == 1:
            raise KeyboardInterrupt

    first.save = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        first.run()
    return out


def test_a_run_stopped_while_averaging_resumes_bit_identical(tiny_demo, tmp_path):
    whole = _trainer(tiny_demo, tmp_path / "whole", "optim.epochs=3", "optim.average_from=1")
    whole.run()
    out = _stopped_after_epoch_2(tiny_demo, tmp_path / "stopped")
    saved = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert int(saved["tail_average_state_dict"]["n_averaged"]) == whole.cfg.optim.iters
    again = _trainer(tiny_demo, out, "optim.epochs=3", "optim.average_from=1")
    again.run()
    assert _records(out) == _records(tmp_path / "whole")
    assert "unaveraged" in _records(out)[1]  # eval.every=1: epoch 2 already scored the average
    for name, tensor in whole.tail_average.state_dict().items():
        assert torch.equal(again.tail_average.state_dict()[name], tensor), name


def test_a_checkpoint_without_the_average_is_refused_when_resuming_with_it(tiny_demo, tmp_path):
    out = _stopped_after_epoch_2(tiny_demo, tmp_path / "run")
    raw = torch.load(out / "checkpoint_last.pt", weights_only=True)
    del raw["tail_average_state_dict"]
    torch.save(raw, out / "checkpoint_last.pt")
    again = _trainer(tiny_demo, out, "optim.epochs=3", "optim.average_from=1")
    with pytest.raises(CheckpointError, match="tail_average_state_dict"):
        again.resume()
    assert RunFolder(out).last.exists()

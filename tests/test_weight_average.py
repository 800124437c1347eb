"""The weight average of ``cluster.ema`` (models/averaged.py) against a loop written out here, and the
trainer's use of it: the clustering's features come from the average, and a run stopped after epoch 1
resumes with the average bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from isereid.config import load_config
from isereid.data.transforms import build_test_transform
from isereid.errors import ConfigError
from isereid.features import extract_features
from isereid.models.averaged import weight_average
from test_trainer import _records, _Stop, _stop_after_first_save, _trainer


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


def _new_weights(net: nn.Module, gen: torch.Generator) -> None:
    """Arbitrary new weights and BN statistics for a :func:`_net`, as an optimizer step and BN would make."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        net[1].running_mean.copy_(torch.randn(4, generator=gen))


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.99])
def test_the_average_follows_the_ema_rule(decay):
    net = _net()
    average = weight_average(net, decay)
    oracle = {k: v.detach().clone().double() for k, v in net.named_parameters()}  # starts at the network
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        _new_weights(net, gen)
        average.update_parameters(net)
        for name, p in net.named_parameters():
            oracle[name] = decay * oracle[name] + (1 - decay) * p.detach().double()
    averaged = dict(average.module.named_parameters())
    for name, expected in oracle.items():
        torch.testing.assert_close(averaged[name].double(), expected, rtol=1e-6, atol=1e-7)
        if decay > 0:
            assert not torch.equal(averaged[name], dict(net.named_parameters())[name])
    # buffers are the network's, not averaged
    assert torch.equal(average.module[1].running_mean, net[1].running_mean)
    assert not any(p.requires_grad for p in average.parameters())


def test_a_new_average_equals_the_network_and_bad_decays_are_refused():
    net = _net()
    average = weight_average(net, 0.9)
    for (name, a), b in zip(average.module.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), name
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            weight_average(net, bad)


@pytest.mark.parametrize("value", ["1.0", "-0.5"])
def test_config_refuses_an_ema_outside_0_1(value):
    with pytest.raises(ConfigError, match="cluster.ema"):
        load_config("demo", [f"cluster.ema={value}"])


def test_the_clustering_features_come_from_the_average(tiny_demo, tmp_path):
    trainer = _trainer(tiny_demo, tmp_path / "run", "cluster.ema=0.5", "optim.epochs=1")
    trainer.run()
    paths = [s.path for s in trainer.train_samples]
    transform = build_test_transform(trainer.cfg.data)
    got = trainer._extract_train(paths, 1)
    torch.testing.assert_close(got, extract_features(trainer.averaged.module, paths, transform, progress=False))
    network = extract_features(trainer.model, paths, transform, progress=False)
    assert (got - network).abs().max() > 1e-4  # two steps moved the network away from its average
    assert int(trainer.averaged.n_averaged) == 1 + trainer.cfg.optim.iters  # the copy, then one per step
    # the clustering was called once, on the (N, 16) features of every training image
    assert [call[0] for call in trainer.cluster_fn.calls] == [(len(paths), 16)]


def _stopped_after_epoch_1(root, out):
    """The run folder of a 2-epoch run with ``cluster.ema=0.5`` stopped right after epoch 1's save."""
    first = _trainer(root, out, "cluster.ema=0.5")
    _stop_after_first_save(first)
    with pytest.raises(_Stop):
        first.run()
    return out


def test_a_run_with_the_average_resumes_bit_identical(tiny_demo, tmp_path):
    whole = _trainer(tiny_demo, tmp_path / "whole", "cluster.ema=0.5")
    whole.run()
    out = _stopped_after_epoch_1(tiny_demo, tmp_path / "stopped")
    saved = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert "averaged_state_dict" in saved
    again = _trainer(tiny_demo, out, "cluster.ema=0.5")
    again.run()
    assert _records(out) == _records(tmp_path / "whole")
    for name, tensor in whole.averaged.state_dict().items():
        assert torch.equal(again.averaged.state_dict()[name], tensor), name
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    # the average changes the run: its records differ from a run without it
    plain = _trainer(tiny_demo, tmp_path / "plain")
    plain.run()
    assert not np.allclose([r["loss"] for r in _records(out)], [r["loss"] for r in _records(tmp_path / "plain")])


def test_a_checkpoint_without_the_average_is_refused_when_resuming_with_it(tiny_demo, tmp_path):
    from isereid.engine.run_state import RunFolder
    from isereid.errors import CheckpointError

    out = _stopped_after_epoch_1(tiny_demo, tmp_path / "run")
    raw = torch.load(out / "checkpoint_last.pt", weights_only=True)
    del raw["averaged_state_dict"]
    torch.save(raw, out / "checkpoint_last.pt")
    again = _trainer(tiny_demo, out, "cluster.ema=0.5")
    with pytest.raises(CheckpointError, match="averaged_state_dict"):
        again.resume()
    assert RunFolder(out).last.exists()

"""Averages of a network's weights: an exponential moving average (``cluster.ema``,
docs/camera_aware.md#weight-average) and a uniform average of the last epochs (``optim.average_from``,
:func:`tail_average`, docs/method.md#tail-average).

The clustering can take its features from the average instead of the network being trained: the
pseudo-labels of an epoch then reflect the last steps (about 1 / (1 - decay) of them) rather than the
last one, which moves them less between epochs when single steps are noisy. The average is PyTorch's own
``torch.optim.swa_utils.AveragedModel`` with its EMA rule; buffers (BatchNorm statistics)
are copied from the network, not averaged, so a camera-based BatchNorm network's extraction
re-estimates them just as it does for the network itself.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel:
    """A copy of ``model`` whose parameters follow ``w_avg <- decay * w_avg + (1 - decay) * w`` each
    time ``update_parameters(model)`` is called; it starts equal to ``model`` (one update is made
    here). ``decay`` in [0, 1): 0 copies the network at every update."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    average.requires_grad_(False)
    average.update_parameters(model)  # the first update copies: the average starts at the network
    return average


def tail_average(model: torch.nn.Module) -> AveragedModel:
    """An empty uniform average of ``model``'s parameters (``optim.average_from``, docs/method.md#tail-average):
    after k calls of ``update_parameters(model)`` its parameters are the mean of the k weights seen
    (the first call copies). Buffers (BatchNorm running statistics) are not averaged: each call copies the
    network's. A camera-based BatchNorm network re-estimates its statistics at every extraction anyway;
    plain BatchNorm uses the network's last running statistics with the averaged weights."""
    average = AveragedModel(model, use_buffers=False)
    average.requires_grad_(False)
    return average


def has_updates(average: AveragedModel) -> bool:
    """Whether ``average`` has seen at least one ``update_parameters`` call."""
    return int(average.n_averaged) > 0


def averaged_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network ``state_dict`` inside an AveragedModel's ``state_dict`` ``state`` (keys ``module.*``;
    the ``n_averaged`` counter left out): what a model file of the averaged weights holds."""
    return {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}

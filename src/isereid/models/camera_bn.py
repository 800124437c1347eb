"""Camera-based BatchNorm (``model.bn_mode=camera``; Zhuang et al., ECCV 2020; docs/camera_aware.md#camera-bn).

Every BatchNorm layer normalises the rows of each camera with that camera's own statistics, so a
camera's colour cast and exposure are taken out at every depth of the network, not only in the
embedding. The affine parameters are shared by all cameras.

* **Training.** The train step sorts its batch by camera and calls the network inside
  :func:`camera_groups`; each layer then splits the batch into the consecutive camera groups and
  normalises each with its batch statistics (torch's own ``batch_norm``, one call per group). The
  running statistics are updated by every group in turn, so they end up a mixture over cameras:
  they are what the layer uses when no camera is known (a served query, an exported model).
* **Extraction.** :func:`camera_statistics` estimates each layer's mean and variance for one camera
  from a set of that camera's images (a forward pass with batch statistics, the sums pooled over
  every row and position); extraction of that camera's images then runs inside
  :func:`use_camera_statistics`. A camera never seen in training is handled the same way: its
  statistics come from its own images, no labels needed. ``features.extract_features`` does this
  when it is given camera ids.

Small groups: a camera with fewer than ``min_rows`` rows in a training batch is normalised together
with the neighbouring camera's rows (:func:`camera_group_sizes`); a camera with fewer than two
images at extraction uses the running statistics.

The classes subclass ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``: same parameters, buffers and
state-dict keys as plain BN, so checkpoints move freely between ``bn_mode`` settings. The
per-camera statistics are transient (recomputed before every extraction) and never saved.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _CameraMixin:
    """Camera-group behaviour shared by the 1d and 2d classes (placed before the torch BN class)."""

    def _camera_init(self) -> None:
        self.groups: Optional[list[int]] = None  # train: sizes of the consecutive camera groups
        self.statistics: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # eval: (mean, var) of one camera
        self.accumulator: Optional[list] = None  # calibration: [sum, sum of squares, count]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)  # type: ignore[attr-defined]
        if self.accumulator is not None:
            return self._accumulate(x)
        if self.training and self.groups is not None and len(self.groups) > 1:
            plain = super().forward  # type: ignore[misc]  (zero-argument super() fails inside a comprehension)
            return torch.cat([plain(part) for part in x.split(self.groups)])
        if not self.training and self.statistics is not None:
            mean, var = self.statistics
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)  # type: ignore[attr-defined]
        return super().forward(x)  # type: ignore[misc]

    def _accumulate(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused train-mode kernel normalises x with its batch statistics (biased variance, as in
        # training, so that the next layers see what they see there) and, with momentum 1, leaves that
        # batch's mean and unbiased variance in scratch buffers: one pass, about 2x faster on CPU than a
        # separate var_mean over the non-channel dimensions. Pooled across batches in float64 as
        # count-weighted sums of mean and of biased var + mean², i.e. of x and x².
        channels = x.shape[1]
        mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
        var = torch.ones(channels, dtype=x.dtype, device=x.device)
        out = F.batch_norm(x, mean, var, self.weight, self.bias, True, 1.0, self.eps)  # type: ignore[attr-defined]
        count = x.numel() // channels
        mean, var = mean.double(), var.double() * ((count - 1) / count)
        self.accumulator[0] += count * mean
        self.accumulator[1] += count * (var + mean.square())
        self.accumulator[2] += count
        return out


class CameraBatchNorm1d(_CameraMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` normalising each camera's rows with that camera's statistics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._camera_init()


class CameraBatchNorm2d(_CameraMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` normalising each camera's rows with that camera's statistics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._camera_init()


CAMERA_CLASSES = {nn.BatchNorm1d: CameraBatchNorm1d, nn.BatchNorm2d: CameraBatchNorm2d}


def camera_layers(model: nn.Module) -> list[_CameraMixin]:
    """The camera BN layers of ``model`` (also inside a DDP wrapper), in module order."""
    return [m for m in model.modules() if isinstance(m, _CameraMixin)]


def has_camera_bn(model: nn.Module) -> bool:
    return bool(camera_layers(model))


def camera_group_sizes(sorted_camids: torch.Tensor, min_rows: int = 2) -> list[int]:
    """Sizes of the consecutive camera groups of a batch sorted by camera (B,) -> [n_1, n_2, ...],
    summing to B. A group under ``min_rows`` rows joins the group before it (the first group joins
    the one after it), so every group can be normalised with its own batch statistics."""
    _, counts = torch.unique_consecutive(sorted_camids, return_counts=True)
    sizes: list[int] = []
    for n in counts.tolist():
        if sizes and (n < min_rows or sizes[-1] < min_rows):
            sizes[-1] += n
        else:
            sizes.append(n)
    return sizes


@contextlib.contextmanager
def camera_groups(model: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """Inside, every camera BN layer of ``model`` normalises the consecutive row groups ``sizes``
    separately in train mode."""
    layers = camera_layers(model)
    for layer in layers:
        layer.groups = list(sizes)
    try:
        yield
    finally:
        for layer in layers:
            layer.groups = None


@torch.no_grad()
def camera_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per camera BN layer of ``model``, the (mean, unbiased var) (C,) of its input over every row of
    ``batches`` (tensors of images, each of at least two rows, all of one camera). The model's
    parameters, buffers and train/eval mode are left untouched."""
    layers = camera_layers(model)
    for layer in layers:
        channels = layer.num_features  # type: ignore[attr-defined]
        device = layer.weight.device if layer.weight is not None else None  # type: ignore[attr-defined]
        layer.accumulator = [torch.zeros(channels, dtype=torch.float64, device=device),
                             torch.zeros(channels, dtype=torch.float64, device=device), 0]
    try:
        for images in batches:
            model(images)
        result = []
        for layer in layers:
            total, squares, count = layer.accumulator
            if count < 2:
                raise ValueError("camera statistics need at least two rows")
            mean = total / count
            var = (squares / count - mean.square()).clamp_min(0) * (count / (count - 1))
            dtype = layer.running_mean.dtype if layer.running_mean is not None else torch.float32  # type: ignore[attr-defined]
            result.append((mean.to(dtype), var.to(dtype)))
        return result
    finally:
        for layer in layers:
            layer.accumulator = None


@contextlib.contextmanager
def use_camera_statistics(model: nn.Module, statistics: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Inside, every camera BN layer of ``model`` normalises with ``statistics`` (from
    :func:`camera_statistics`) in eval mode."""
    layers = camera_layers(model)
    if len(layers) != len(statistics):
        raise ValueError(f"{len(statistics)} statistics for {len(layers)} camera BN layers")
    for layer, stats in zip(layers, statistics):
        layer.statistics = stats
    try:
        yield
    finally:
        for layer in layers:
            layer.statistics = None

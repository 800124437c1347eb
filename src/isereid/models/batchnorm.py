"""Ghost batch norm: the reference's 4-GPU DataParallel BatchNorm on any device count
(docs/reference_quirks.md#q14).

``nn.DataParallel`` on 4 GPUs splits the 256-sample batch into 4 consecutive chunks of 64 and
every replica's BatchNorm normalises with the statistics of its own chunk; only the device-0
replica writes its running statistics back, so they are updated from chunk 0 alone
(docs/method.md#multi-gpu-bn). :class:`GhostBatchNorm2d` / :class:`GhostBatchNorm1d` reproduce this in
one process: in train mode a batch larger than ``chunk`` is split along dim 0 into consecutive
chunks of ``chunk`` samples, each normalised with its own (biased) batch statistics; the
running statistics are updated from chunk 0 only, exactly as ``F.batch_norm`` with
``training=True`` on chunk 0 would, and ``num_batches_tracked`` grows by one per call. A batch
of at most ``chunk`` samples, or eval mode, is plain ``BatchNorm`` behaviour.

The ghost classes subclass ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``: same parameters, buffers
and state-dict keys, so checkpoints move freely between ``bn_mode`` settings.

Under DDP with W processes each rank receives B/W *consecutive* samples of the global batch.
Chunking each rank's part with the same ``chunk`` (B/W a multiple of ``chunk``) therefore
yields exactly the chunks of single-process chunking, and DDP's ``broadcast_buffers=True``
broadcasts rank 0's buffers, whose chunk 0 is the global chunk 0: the running statistics
match as well. Gradients are identical because each chunk's normalisation depends only on
its own samples.

Implementation note: a loop over the (few) chunks calling the native ``F.batch_norm``
(cuDNN / oneDNN kernels, one fused backward each) measured faster on CPU than a vectorised
``var_mean`` formulation built from elementwise ops, and needs no extra memory for
intermediate tensors in the backward pass; the only extra cost is one ``torch.cat``.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import BN_MODES
from ..errors import ConfigError
from .camera_bn import CAMERA_CLASSES, CameraBatchNorm1d, CameraBatchNorm2d

log = logging.getLogger("isereid")


class _GhostMixin:
    """Ghost-BN behaviour shared by the 1d and 2d classes (placed before the torch BN class)."""

    chunk: int

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, chunk: int = 64, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,  # type: ignore[call-arg]
                         device=device, dtype=dtype)
        self.chunk = _check_chunk(chunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ghost_forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk={self.chunk}"  # type: ignore[misc]

    def _ghost_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or x.shape[0] <= self.chunk:
            return super().forward(x)  # type: ignore[misc]
        # Same momentum / num_batches_tracked logic as torch's _BatchNorm.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        parts = x.split(self.chunk, dim=0)
        out = [F.batch_norm(parts[0], self.running_mean if self.track_running_stats else None,
                            self.running_var if self.track_running_stats else None,
                            self.weight, self.bias, True, factor, self.eps)]
        out += [F.batch_norm(p, None, None, self.weight, self.bias, True, 0.0, self.eps) for p in parts[1:]]
        return torch.cat(out, dim=0)


class GhostBatchNorm1d(_GhostMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` normalising consecutive chunks of ``chunk`` samples separately in train mode."""


class GhostBatchNorm2d(_GhostMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` normalising consecutive chunks of ``chunk`` samples separately in train mode."""


def _check_chunk(chunk: int) -> int:
    if int(chunk) < 2:
        raise ConfigError(f"model.bn_chunk must be at least 2 (got {chunk})")
    return int(chunk)


_GHOST = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d}
_PLAIN = {GhostBatchNorm1d: nn.BatchNorm1d, GhostBatchNorm2d: nn.BatchNorm2d,
          CameraBatchNorm1d: nn.BatchNorm1d, CameraBatchNorm2d: nn.BatchNorm2d}


def _replace(old: nn.modules.batchnorm._BatchNorm, cls: type, **kwargs) -> nn.Module:
    """A ``cls`` BN sharing ``old``'s parameters (same objects: requires_grad flags and optimizer
    references survive) and buffers."""
    new = cls(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats, **kwargs)
    if old.affine:
        new.weight = old.weight
        new.bias = old.bias
    if old.track_running_stats:
        new.running_mean = old.running_mean
        new.running_var = old.running_var
        new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    return new


def _convert(module: nn.Module, fn) -> nn.Module:
    replaced = fn(module)
    if replaced is not None:
        return replaced
    for name, child in module.named_children():
        new = _convert(child, fn)
        if new is not child:
            setattr(module, name, new)
    return module


def convert_batchnorm(module: nn.Module, mode: str, chunk: int = 64) -> nn.Module:
    """Set the BatchNorm flavour of ``module`` (in place where possible; returns the module).

    * ``"chunk"``: every ``nn.BatchNorm1d/2d`` becomes a ghost BN with ``chunk`` samples per group
      (parameters and buffers are shared, not copied).
    * ``"sync"``: ``nn.SyncBatchNorm`` across the process group when ``torch.distributed`` is
      initialised; in a single process this is plain BN (a log message says so).
    * ``"plain"``: standard BN (ghost BN layers, if any, are turned back into plain ones).
    * ``"camera"``: camera-based BN (models/camera_bn.py): each camera's rows normalised with that
      camera's statistics, in training and at extraction.
    """
    if mode == "chunk":
        _check_chunk(chunk)

        def fn(m):
            if isinstance(m, (GhostBatchNorm1d, GhostBatchNorm2d)):
                m.chunk = int(chunk)
                return m
            cls = _GHOST.get(type(m))
            return _replace(m, cls, chunk=chunk) if cls is not None else None

        return _convert(module, fn)
    if mode in ("plain", "sync", "camera"):
        module = _convert(module, lambda m: _replace(m, _PLAIN[type(m)]) if type(m) in _PLAIN else None)
        if mode == "camera":
            return _convert(module, lambda m: _replace(m, CAMERA_CLASSES[type(m)])
                            if type(m) in CAMERA_CLASSES else None)
        if mode == "sync":
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                return nn.SyncBatchNorm.convert_sync_batchnorm(module)
            log.info("model.bn_mode=sync without a multi-process group: using plain BatchNorm")
        return module
    raise ConfigError(f"unknown model.bn_mode {mode!r}; choose one of {', '.join(BN_MODES)}")

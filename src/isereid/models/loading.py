"""Loading a re-ID network from a file: isereid's own checkpoints and the reference's ``.pth.tar``
(docs/method.md#state-dict, docs/reference_quirks.md#q27). The file is read by
:func:`~isereid.models.state_io.safe_load`, so nothing but tensors, NumPy scalars and plain
Python values is ever unpickled.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError, first_line
from .backbones import ARCHS
from .reid import build_model
from .state_io import extract_state_dict, load_state_strict, safe_load

#: The model file's format (``model_best.pt``; also the model part of ``checkpoint_last.pt``). This
#: module owns its keys: :func:`model_payload` writes them and :func:`load_model_and_meta` reads them.
FORMAT = "isereid-checkpoint"
FORMAT_VERSION = 1


def model_payload(model_state: dict, model_config: dict, epoch: int, score: Optional[float],
                  input_size: Optional[list] = None) -> dict:
    """The contents of a model file: weights, the :class:`ModelConfig` as a dict, the 1-based epoch,
    its evaluation mAP and ``input_size`` = [H, W] the model was trained at (tools default to it)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": model_state,
        "model_config": model_config,
        "epoch": epoch,
        "mAP": score,
        "input_size": input_size,
    }


def _stage_blocks(state: Mapping[str, torch.Tensor], stage: int) -> int:
    pattern = re.compile(rf"^base\.{stage}\.(\d+)\.")
    idx = {int(m.group(1)) for k in state for m in [pattern.match(k)] if m}
    return max(idx) + 1 if idx else 0


def infer_model_config(state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """The :class:`ModelConfig` of a reference-layout state dict (no ``module.`` prefix): arch from
    the block type and counts of ``base.4``-``base.7`` (and widths for ResNeXt / wide ResNets),
    pooling ``gem`` when ``gap.p`` is present.

    A damaged or foreign state dict gets the *nearest* architecture (fewest differing blocks), so
    that the strict load in :func:`load_model` can name the missing and unexpected keys.
    """
    blocks = tuple(_stage_blocks(state, s) for s in (4, 5, 6, 7))
    if "base.0.weight" not in state or 0 in blocks:
        backbone = "" if any(k.startswith("base.") for k in state) else (
            "; it looks like backbone weights, not a trained re-ID model: give it as model.pretrained_path=FILE "
            "(with model.arch=ARCH) instead of --checkpoint, after `isereid weights import FILE --arch ARCH "
            "--output OUT.pt` when it is not in torchvision's layout")
        raise CheckpointError("the state dict is not in the ResNet re-ID layout (keys base.0.weight, "
                              f"base.4.* ... base.7.*, feat_bn.*); first keys: {', '.join(list(state)[:3])}{backbone}")
    kind = "bottleneck" if "base.4.0.conv3.weight" in state else "basic"
    width = groups_in = None
    if kind == "bottleneck" and "base.4.0.conv2.weight" in state:
        w = state["base.4.0.conv2.weight"]
        width, groups_in = int(w.shape[0]), int(w.shape[1])

    def distance(arch: str) -> int:
        block, layers, groups, wpg = ARCHS[arch]
        d = sum(abs(a - b) for a, b in zip(layers, blocks))
        if block != kind:
            d += 1000
        elif kind == "bottleneck" and (width, groups_in) != (groups * wpg, wpg):
            d += 100
        return d

    arch = min(ARCHS, key=distance)  # ties: the first listed (plain ResNets come first)
    return ModelConfig(arch=arch, pretrained=False, pretrained_path=None,
                       pooling="gem" if "gap.p" in state else "avg", bn_mode="plain")


def _config_from_dict(stored: Mapping[str, Any]) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in stored.items() if k in names})
    # A camera-BN network keeps its layers (extraction with camera ids then uses per-camera statistics);
    # every other BN flavour is plain BN at inference.
    return dataclasses.replace(cfg, pretrained=False, pretrained_path=None,
                               bn_mode="camera" if cfg.bn_mode == "camera" else "plain")


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a model file says besides its weights; ``None`` where the file does not say
    (a reference ``.pth.tar`` stores no input size).

    model_config: the network's :class:`ModelConfig` (stored or inferred). input_size: the (H, W)
    the network was trained at. epoch: the (1-based) epoch of the weights. mAP: their evaluation mAP.
    """

    model_config: ModelConfig
    input_size: Optional[tuple[int, int]] = None
    epoch: Optional[int] = None
    mAP: Optional[float] = None


def _input_size(path, obj: Any) -> Optional[tuple[int, int]]:
    stored = obj.get("input_size") if isinstance(obj, Mapping) else None
    if not stored:
        return None
    try:
        height, width = (int(v) for v in stored)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: input_size is {stored!r}, not [height, width]") from None
    return height, width


def load_model_and_meta(path, map_location: Any = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """The re-ID network stored in ``path`` (in eval mode, as :func:`load_model`) and the file's
    :class:`CheckpointMeta`, reading the file once."""
    obj = safe_load(path, map_location=map_location)
    try:
        state = extract_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    stored = obj.get("model_config") if isinstance(obj, Mapping) else None
    try:
        cfg = _config_from_dict(stored) if isinstance(stored, Mapping) else infer_model_config(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # bad values in a stored model_config
        raise CheckpointError(f"{path}: unusable model_config ({first_line(e)})") from None
    meta = CheckpointMeta(model_config=cfg, input_size=_input_size(path, obj),
                          epoch=_optional(obj, "epoch", int), mAP=_optional(obj, "mAP", float))
    model = build_model(cfg)
    load_state_strict(model, state, str(path), f"{cfg.arch}/{cfg.pooling}")
    device = map_location if isinstance(map_location, (str, torch.device)) else None
    if device is not None:
        model = model.to(device)
    return model.eval(), meta


def _optional(obj: Any, key: str, kind: type):
    value = obj.get(key) if isinstance(obj, Mapping) else None
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError):
        return None  # informational only: a foreign file's odd value is not worth refusing the weights


def load_model(path, map_location: Any = "cpu") -> nn.Module:
    """The re-ID network stored in ``path`` (isereid checkpoint or reference ``.pth.tar``), in eval mode.

    isereid checkpoints are rebuilt from their ``model_config``; other files from the layout of
    their state dict (:func:`infer_model_config`). Loading is strict.
    """
    return load_model_and_meta(path, map_location)[0]

"""ONNX export with a numeric parity check against PyTorch (needs ``pip install isereid[export]``)."""
from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .errors import IsereidError
from .utils import atomic_path


@dataclass
class ExportReport:
    path: Path
    max_abs_diff: float  # between onnxruntime and PyTorch features, over the check batch
    tolerance: float
    batch_sizes: tuple[int, ...]  # batch sizes that were checked (dynamic axis)


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise IsereidError(f"ONNX export needs the {module} package: pip install 'isereid[export]'") from None


def onnx_metadata(height: int, width: int, feature_dim: int, arch: str | None = None) -> dict[str, str]:
    """The metadata an exported file carries (all values strings, as ONNX stores them)."""
    return {"height": str(int(height)), "width": str(int(width)), "mean": json.dumps(list(IMAGENET_MEAN)),
            "std": json.dumps(list(IMAGENET_STD)), "feature_dim": str(int(feature_dim)), "arch": arch or "unknown",
            "input": "images: float32 (batch, 3, height, width), RGB scaled to [0, 1], minus mean, over std",
            "output": "features: float32 (batch, feature_dim), L2-normalised; cosine similarity = dot product"}


def export_onnx(model: nn.Module, output: str | Path, height: int, width: int, opset: int = 17,
                tolerance: float = 1e-4, check_batch_sizes: tuple[int, ...] = (1, 3),
                arch: str | None = None) -> ExportReport:
    """Export ``model`` (images (B, 3, H, W) -> features (B, D)) with a dynamic batch axis, run
    ``onnx.checker``, then compare onnxruntime with PyTorch on random inputs of several batch
    sizes; raises :class:`IsereidError` when the max abs difference exceeds ``tolerance``.

    The model's metadata (``metadata_props``, strings) records what a consumer needs to feed it:
    ``height``, ``width``, ``mean``, ``std`` (JSON lists, RGB, for [0, 1] pixels), ``feature_dim``,
    ``arch``, plus ``input`` / ``output`` descriptions (:func:`onnx_metadata`)."""
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    output = Path(output)
    model = model.cpu().eval()
    not_eval = [name for name, m in model.named_modules() if m.training]
    if not_eval:  # fast-reid's check: a BN in train mode would bake batch statistics in
        raise IsereidError(f"module {not_eval[0]} is in training mode; cannot export")
    example = torch.randn(2, 3, height, width)
    kwargs = dict(input_names=["images"], output_names=["features"], opset_version=opset,
                  dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter needs no onnxscript
    with atomic_path(output) as tmp:  # removed again if any check below fails
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), **kwargs)
        with torch.no_grad():
            dim = int(model(example).shape[1])
        proto = onnx.load(str(tmp))
        for key, value in onnx_metadata(height, width, dim, arch).items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        worst = 0.0
        generator = torch.Generator().manual_seed(0)
        for b in check_batch_sizes:
            images = torch.randn(b, 3, height, width, generator=generator)
            with torch.no_grad():
                expected = model(images).numpy()
            got = session.run(["features"], {"images": images.numpy()})[0]
            if got.shape != expected.shape:
                raise IsereidError(f"ONNX output shape {got.shape} differs from PyTorch {expected.shape}")
            worst = max(worst, float(np.abs(got - expected).max()))
        if worst > tolerance:
            raise IsereidError(f"ONNX and PyTorch features differ by {worst:.2e} (> tolerance {tolerance:.0e})")
    return ExportReport(output, worst, tolerance, tuple(check_batch_sizes))

"""State-dict I/O with no dependency on the network code: :func:`safe_load`, :func:`extract_state_dict`
and :func:`load_state_strict` (docs/method.md#state-dict, docs/reference_quirks.md#q27).

Everything goes through :func:`safe_load`, i.e. ``torch.load(weights_only=True)``: tensors,
plain Python containers and numbers, plus exactly the NumPy globals needed to rebuild NumPy
*scalars* (the reference stores ``best_mAP`` as ``np.float64``). Nothing else is ever
unpickled, so a malicious file cannot run code.
"""
from __future__ import annotations

import contextlib
import pickle
import re
import warnings
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, first_line


def _numpy_scalar_globals() -> list:
    """``numpy.dtype``, the dtype classes of numeric / bool scalars (needed by BUILD on a dtype),
    and the scalar reconstructor under both its NumPy 1 and NumPy 2 module names."""
    allowed: list = [np.dtype]
    core = getattr(np, "_core", None)
    multiarray = getattr(core, "multiarray", None) if core is not None else None
    if multiarray is None:  # NumPy 1.x
        multiarray = np.core.multiarray  # type: ignore[attr-defined]
    scalar = multiarray.scalar
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)  # NumPy >= 1.25
    if dtypes is not None:
        for name in ("Float16DType", "Float32DType", "Float64DType", "LongDoubleDType",
                     "Int8DType", "Int16DType", "Int32DType", "Int64DType", "LongLongDType",
                     "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "ULongLongDType", "BoolDType"):
            cls = getattr(dtypes, name, None)
            if cls is not None:
                allowed.append(cls)
    return allowed


SAFE_NUMPY_GLOBALS = _numpy_scalar_globals()


def _allow_numpy_scalars():
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return safe_globals(SAFE_NUMPY_GLOBALS) if safe_globals is not None else contextlib.nullcontext()


def safe_load(path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with NumPy scalars allowed; any failure ->
    one-line :class:`CheckpointError`."""
    try:
        with _allow_numpy_scalars(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a loadable checkpoint: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is not a loadable checkpoint: it is a directory") from None
    except Exception as e:
        text = str(e)
        glob = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global:?\s*([\w.]+)", text)
        if glob or "allowed global" in text:
            name = f" ({glob.group(1)})" if glob else ""
            reason = (f"it contains objects that are not allowed for safety{name}; only tensors, "
                      "NumPy scalars and plain Python values are loaded")
        elif isinstance(e, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
            detail = next((ln.strip() for ln in text.splitlines()[1:]
                           if ln.strip().startswith(("Unsupported", "Error"))), "")
            reason = f"not a PyTorch checkpoint ({detail})" if detail else "not a PyTorch checkpoint"
        elif isinstance(e, EOFError):
            reason = "not a PyTorch checkpoint (empty or truncated file)"
        elif isinstance(e, (pickle.UnpicklingError, KeyError, ValueError, IndexError, TypeError)):
            reason = f"not a PyTorch checkpoint ({type(e).__name__}: {first_line(e)})"
        else:
            reason = first_line(e)
            if len(reason) > 160 and ". " in reason:  # torch's zip reader appends a paragraph of advice
                reason = reason.split(". ")[0]
        raise CheckpointError(f"{path} is not a loadable checkpoint: {reason}") from None


def extract_state_dict(obj: Any) -> "OrderedDict[str, torch.Tensor]":
    """The model weights in ``obj``: a raw state dict, or one under ``state_dict`` (reference
    ``.pth.tar`` and isereid checkpoints) or ``model``; a leading ``module.`` (DataParallel / DDP)
    or ``_orig_mod.`` (torch.compile) is stripped."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError("the file holds no model state dict (expected a dict of tensors, "
                              "or one under 'state_dict' or 'model')")
    out = OrderedDict()
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _short(keys: list[str], n: int = 4) -> str:
    return f"{', '.join(keys[:n])}{', ...' if len(keys) > n else ''} ({len(keys)})"


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, label: str) -> None:
    """``model.load_state_dict(state)`` with a one-line CheckpointError naming missing and
    unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
              for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{name} {_short(keys, 3 if name == 'shape mismatches' else 4)}"
                 for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if keys]
        raise CheckpointError(f"checkpoint {source} does not match {label}: {'; '.join(parts)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {source} does not match {label}: {first_line(e)}") from None

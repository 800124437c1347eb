"""Small shared helpers: atomic file writes, seeding, device selection."""
from __future__ import annotations

import contextlib
import json
import numbers
import os
import random
import secrets
import signal
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np
import torch

#: Features, distances or labels: a NumPy array or a torch tensor (on any device).
ArrayLike = Union[np.ndarray, torch.Tensor]

FAILPOINT_ENV = "ISEREID_FAILPOINT"


def counts_to_indptr(counts: np.ndarray) -> np.ndarray:
    """CSR row pointer of per-row entry ``counts`` (n,) -> (n + 1,): ``[0, c0, c0 + c1, ...]``."""
    return np.concatenate([[0], np.cumsum(counts)])


# ---------------------------------------------------------------- tensor argument checks
def as_ids(values, count: int, name: str, device: torch.device) -> torch.Tensor:
    """``values`` as a (count,) int64 tensor on ``device``; TypeError/ValueError otherwise."""
    ids = torch.as_tensor(values)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integers, got dtype {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != count:
        raise ValueError(f"{name} must have shape ({count},), got {tuple(ids.shape)}")
    return ids.to(device=device, dtype=torch.long)


def check_feature_tensor(features: torch.Tensor, name: str = "features") -> None:
    """TypeError/ValueError unless ``features`` is a floating-point (N, D) torch tensor."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name} must be an (N, D) tensor, got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {features.dtype}")


def is_real_number(value) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` to Python)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32/half/bfloat16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def failpoint(name: str) -> None:
    """Crash-test hook: with ``ISEREID_FAILPOINT=name:N`` in the environment the process
    kills itself (SIGKILL, as ``kill -9``) the N-th time it reaches ``failpoint(name)``.
    Points: ``iteration``, ``clustering``, ``checkpoint_write``. A no-op otherwise."""
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec or not spec.startswith(name + ":"):
        return
    counter = f"_ISEREID_FAILPOINT_HITS_{name}"
    hits = int(os.environ.get(counter, "0")) + 1
    os.environ[counter] = str(hits)
    if hits >= int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path next to ``path`` for a writer that wants a file name (``torch.onnx.export``,
    ``savefig``); on a clean exit the file is fsynced and ``os.replace``-d onto ``path``, on any
    exception it is removed. A reader never sees a half-written file, and no temp file is left.

    ``suffix`` ends the temp name (e.g. ``".tmp.png"`` for writers that infer the format from it).
    The temp file is created by the writer, so it gets the usual permissions (umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write a file atomically: ``write(fileobj)`` into a temp file in the same folder, then
    replace ``path`` with it (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        write(f)
        failpoint("checkpoint_write")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, NumPy and torch RNGs; optionally request deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

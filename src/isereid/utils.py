"""Small shared helpers: atomic file writes, seeding, device selection."""
from __future__ import annotations

import json
import os
import random
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


FAILPOINT_ENV = "ISEREID_FAILPOINT"


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


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write a file atomically: ``write(fileobj)`` into a temp file in the same folder,
    fsync, then ``os.replace`` it onto ``path``. A reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            failpoint("checkpoint_write")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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

"""Every DataLoader of isereid, with its worker count capped at the CPUs this process may use.

More workers than CPUs only adds processes that wait for each other, and PyTorch warns about
it each time a loader is built; the cap is reported once per process instead.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from torch.utils.data import DataLoader, Dataset

log = logging.getLogger("isereid")

_reported: set[tuple[int, int]] = set()  # (requested, cap) pairs already logged


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as PyTorch counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def capped_workers(requested: int, name: str = "data.workers") -> int:
    """``requested`` worker processes, at most :func:`available_cpus`; logs the cap once."""
    cpus = available_cpus()
    if requested <= cpus:
        return requested
    if (requested, cpus) not in _reported:
        _reported.add((requested, cpus))
        log.info("%s=%d capped at %d (CPUs available)", name, requested, cpus)
    return cpus


def make_loader(dataset: Dataset, workers: int, **kwargs: Any) -> DataLoader:
    """``DataLoader(dataset, num_workers=capped_workers(workers), **kwargs)``."""
    return DataLoader(dataset, num_workers=capped_workers(workers), **kwargs)

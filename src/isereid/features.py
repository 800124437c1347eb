"""Batched feature extraction on any device (sharded across ranks when distributed)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .data.images import ImageDataset
from .data.loader import make_loader
from .distributed import DistContext


@torch.no_grad()
def extract_features(
    model: nn.Module,
    paths: Sequence[str],
    transform,
    batch_size: int = 256,
    workers: int = 0,
    device: Optional[torch.device] = None,
    progress: bool = True,
    desc: str = "features",
    dist_ctx: Optional[DistContext] = None,
    channels_last: bool = False,
    amp: bool = False,
) -> torch.Tensor:
    """Run ``model`` in eval mode over ``paths`` -> (N, D) float32 CPU tensor, rows in input order.

    Under torch.distributed each rank extracts a contiguous shard and the shards are
    gathered, so every rank returns the full matrix.
    """
    ctx = dist_ctx or DistContext(device=device or torch.device("cpu"))
    device = device or ctx.device
    shard = ctx.shard(len(paths))
    dataset = ImageDataset([paths[i] for i in shard], transform)
    loader = make_loader(dataset, workers, batch_size=batch_size, shuffle=False,
                         pin_memory=device.type == "cuda", persistent_workers=False)
    was_training = model.training
    model.eval()
    chunks = []
    bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and ctx.is_main), unit="batch")
    for images, _, _ in bar:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            feats = model(images)
        chunks.append(feats.float())
    model.train(was_training)
    if chunks:
        local = torch.cat(chunks)
    else:
        dim = getattr(model, "num_features", None) or getattr(getattr(model, "module", None), "num_features", 0)
        local = torch.zeros((0, dim), device=device)
    return ctx.all_gather_uneven(local).cpu()

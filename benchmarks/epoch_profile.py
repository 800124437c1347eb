"""Where one training epoch's time goes, against the bare backbone step (issue: more learning per CPU minute).

    python benchmarks/epoch_profile.py --config cpu --data-root ../shared/data/cuhk03-dev \\
        --output profile.json model.pretrained_path=mnv2.pt

Runs ONE epoch of the real trainer (``Trainer.from_config``, the configured preset with
``optim.epochs=1``, evaluation included) in a temporary run folder, reads the phase timers the
trainer records in each epoch's ``phases`` (extract: the training features for clustering;
cluster; train: the ``optim.iters`` iterations, of which data_wait is time the loop waited for
the DataLoader; evaluate), then times the bare backbone step in the same process: forward +
backward of the same network on a batch of the same shape (``data.batch_size`` x 3 x H x W),
median of ``--bare-steps`` after ``--warmup``. ``train_ratio`` = train ÷ (iters × bare step):
1.0 means every second of the training phase is the network's own forward/backward.

Writes ``{"phases": {...}, "train_ratio", "bare_step_seconds", "iters", "epoch_seconds", ...}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def bare_step_seconds(model: torch.nn.Module, batch: int, height: int, width: int, steps: int, warmup: int,
                      channels_last: bool = False) -> float:
    """Median wall time of forward + backward of ``model`` on a random (batch, 3, height, width) batch."""
    device = next(model.parameters()).device
    images = torch.randn(batch, 3, height, width, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    model.train()
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(images).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="preset name or YAML (e.g. cpu, demo)")
    p.add_argument("--data-root", required=True, help="dataset folder")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--bare-steps", type=int, default=10, help="timed bare steps (median; default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed bare steps first (default 2)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)

    from isereid.config import load_config
    from isereid.data.datasets import build_dataset
    from isereid.distributed import DistContext
    from isereid.engine.trainer import Trainer
    from isereid.errors import IsereidError
    from isereid.utils import atomic_write_text, resolve_device

    try:
        cfg = load_config(args.config, [*args.overrides, f"data.root={args.data_root}", "optim.epochs=1",
                                        "train.progress=false", "train.tensorboard=false"])
        dataset = build_dataset(cfg.data.dataset, cfg.data.root)
        ctx = DistContext(device=resolve_device(cfg.device))
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer.from_config(cfg, dataset, Path(tmp) / "run", ctx)  # seeds, as `isereid train`
            started = time.perf_counter()
            record = trainer.run()[-1]
            epoch_seconds = time.perf_counter() - started
            bare = bare_step_seconds(trainer.model, cfg.data.batch_size, cfg.data.height, cfg.data.width,
                                     args.bare_steps, args.warmup, cfg.model.channels_last)
    except IsereidError as e:
        print(f"epoch_profile.py: {e}", file=sys.stderr)
        return 2
    phases = dict(record.phases or {})
    iters = cfg.optim.iters
    payload = {
        "phases": phases, "train_ratio": phases["train"] / (iters * bare), "bare_step_seconds": bare,
        "iters": iters, "epoch_seconds": epoch_seconds, "config": args.config, "overrides": args.overrides,
        "batch_size": cfg.data.batch_size, "workers": cfg.data.workers, "device": str(ctx.device),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"{name:>10}: {seconds:8.1f} s")
    print(f"bare step: {bare:.3f} s x {iters} iterations = {bare * iters:.1f} s; "
          f"train / bare = {payload['train_ratio']:.2f}")
    atomic_write_text(args.output, json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

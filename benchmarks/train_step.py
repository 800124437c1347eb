"""ISE iteration overhead: one full ISE step vs the same backbone trained with plain cross-entropy.

Both variants run the same forward/backward/Adam step on the same batch; ISE adds the
support samples, the memory contrastive loss over 2B rows, the label-preserving loss and
the memory update. Prints the ratio (target on a GPU at batch 256 / ResNet-50: at most 1.15).

    python benchmarks/train_step.py                       # CPU-sized default
    python benchmarks/train_step.py --arch resnet50 --batch 256 --height 256 --width 128   # GPU
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from isereid.config import ISEConfig, MemoryConfig, ModelConfig
from isereid.distributed import DistContext
from isereid.engine.step import StepParts, train_step
from isereid.ise import interpolation_weight
from isereid.memory import ClusterMemory
from isereid.models import build_model, trainable_parameters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=700)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=args.arch, pretrained=False, bn_chunk=64)).to(device)
    opt = torch.optim.Adam(trainable_parameters(model), lr=3.5e-4, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, args.height, args.width, device=device)
    labels = torch.arange(args.batch // args.instances, device=device).repeat_interleave(args.instances)
    centroids = F.normalize(torch.randn(args.clusters, model.num_features, device=device), dim=1)
    memory = ClusterMemory(centroids, temperature=0.05, momentum=0.2, mode="hard")
    classifier = torch.nn.Linear(model.num_features, args.clusters, bias=False).to(device)
    opt_ce = torch.optim.Adam(list(trainable_parameters(model)) + list(classifier.parameters()), lr=3.5e-4)
    ise_cfg, mem_cfg = ISEConfig(), MemoryConfig()

    parts = StepParts(net=model, model=model, optimizer=opt, memory=memory, ise=ise_cfg, memory_cfg=mem_cfg,
                      scaler=torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda"),
                      ctx=DistContext(device=device), amp=args.amp)

    def ise_step():  # the trainer's own iteration
        train_step(parts, images, labels, None, interpolation_weight(500, 1000))

    def ce_step():
        with torch.autocast(device.type, enabled=args.amp):
            f = model(images)
        loss = F.cross_entropy(classifier(f.float()) / 0.05, labels)
        opt_ce.zero_grad(set_to_none=True)
        loss.backward()
        opt_ce.step()

    def timed(step) -> list[float]:
        for _ in range(args.warmup):
            step()
        _sync(device)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t)
        return times

    # interleave to share the machine's noise
    ce, ise = [], []
    for _ in range(2):
        ce += timed(ce_step)
        ise += timed(ise_step)
    ce_med, ise_med = statistics.median(ce), statistics.median(ise)
    print(f"device {device}, {args.arch}, batch {args.batch} ({args.batch // args.instances}x{args.instances}), "
          f"input {args.height}x{args.width}, {args.clusters} clusters, amp={args.amp}")
    print(f"plain cross-entropy step : {1000 * ce_med:8.1f} ms (median of {len(ce)})")
    print(f"ISE step                 : {1000 * ise_med:8.1f} ms (median of {len(ise)})")
    print(f"ISE / plain ratio        : {ise_med / ce_med:8.3f}   (target <= 1.15 at batch 256, ResNet-50, GPU)")


if __name__ == "__main__":
    main()

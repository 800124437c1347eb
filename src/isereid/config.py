"""Typed configuration: dataclass schema, YAML presets and ``key=value`` overrides.

The schema below is the single source of truth. A run's config is
``schema <- preset YAML (or user YAML) <- dotted overrides``, merged with OmegaConf, which
rejects unknown keys and ill-typed values; :func:`load_config` turns those rejections into a
one-line :class:`~isereid.errors.ConfigError` that names the key and suggests close matches.
The merged result is converted back to plain dataclass objects, so the rest of the code
never touches OmegaConf.

Defaults equal the reference (Market-1501 ISE run) wherever they change numbers; each option
that departs from the reference names its entry in docs/reference_quirks.md (Q1-Q32).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .clustering.knn import KNN_BACKENDS
from .clustering.pseudo_labels import OUTLIER_MODES
from .data.datasets import DATASET_NAMES
from .data.sampler import SAMPLERS
from .errors import ConfigError, first_line
from .ise import FOREIGN
from .losses import NEGATIVES
from .memory import CLUSTER_ONLINE
from .memory import MODES as MEMORY_MODES
from .presets import preset_names


@dataclass
class DataConfig:
    dataset: str = "market1501"  # market1501 | msmt17 | dukemtmc | folder | demo
    root: str = "data"  # dataset folder or its parent
    height: int = 256
    width: int = 128
    batch_size: int = 256  # global batch (all ranks together)
    num_instances: int = 16  # images per pseudo-identity in a batch (Z)
    # cluster: Z images per pseudo-identity (the reference); proxy: Z per (cluster, camera) proxy (CAP)
    sampler: str = "cluster"
    workers: int = 4
    test_batch_size: int = 256
    flip_prob: float = 0.5
    pad: int = 10
    erasing_prob: float = 0.5
    # The reference fills erased boxes with these values in *normalised* space (docs/reference_quirks.md#q16).
    erasing_value: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    # Fraction of unreadable images tolerated (skipped with a warning) before failing.
    max_bad_fraction: float = 0.01
    # Augmentation against camera colour casts (docs/camera_aware.md, section 2d): probability of
    # turning a training image grey, and the strength of a random brightness/contrast/saturation jitter.
    grayscale_prob: float = 0.0
    color_jitter: float = 0.0
    # Keep the training images decoded and resized in memory (the train transform's first step),
    # so an epoch decodes each JPEG once instead of once per draw (docs/development.md, the epoch profile).
    cache_images: bool = False


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | ...
    pretrained: bool = True  # torchvision ImageNet weights (downloads when online)
    pretrained_path: Optional[str] = None  # local file with backbone weights (overrides download)
    last_stride: int = 1
    pooling: str = "avg"  # avg | gem (docs/reference_quirks.md#q13)
    # The reference's 4-GPU DataParallel normalises each 64-sample chunk separately (docs/reference_quirks.md#q14);
    # camera: each camera's rows with that camera's statistics (docs/camera_aware.md#camera-bn).
    bn_mode: str = "chunk"  # chunk (ghost BN, GPU-count independent) | sync | plain | camera
    bn_chunk: int = 64
    # bn_mode=camera: images per camera whose statistics normalise that camera's rows at extraction.
    camera_bn_images: int = 512
    channels_last: bool = False
    # Leading children of the trunk whose weights stay at their pretrained values (their BatchNorm
    # statistics still follow the data): the backward pass then stops before the high-resolution
    # layers, where a CPU step spends much of its time. MobileNetV2: child 0 is the stem, 1-17 the
    # inverted residuals; ResNets: conv1, bn1, relu, maxpool, layer1..layer4. 0 trains everything.
    freeze_blocks: int = 0


@dataclass
class ClusterConfig:
    # DBSCAN radius on the Jaccard distance (Market 0.4, MSMT 0.7), or "auto": chosen every epoch from
    # the features' core distances, without labels (docs/auto_eps.md).
    eps: Any = 0.4  # a number or "auto" (OmegaConf's Union[float, str] would reject an integer 1)
    min_samples: int = 4
    # What training does with DBSCAN's outliers: "drop" leaves them out of the epoch (the reference);
    # "singletons" gives each its own pseudo-identity in the memories, the sampler and the supports,
    # as SpCL's un-clustered instances (docs/method.md#outliers). Reports count DBSCAN's clusters either way.
    outliers: str = "drop"
    k1: int = 30
    k2: int = 6
    knn_backend: str = "torch"  # torch | faiss
    every: int = 1  # re-cluster every N epochs
    # Subtract each camera's mean feature (then re-normalise) before the Jaccard distance, so that
    # one person's views from different cameras can fall into one cluster (docs/camera_aware.md).
    camera_norm: bool = False
    # Merge clusters from disjoint cameras that are each other's most similar foreign cluster, at
    # cosine similarity >= associate_min_similarity (docs/camera_aware.md#association), a number or
    # "auto": closer than the median cluster is to its nearest same-camera cluster (a gate that
    # stays shut while the camera gap dominates, docs/camera_aware.md#association-gate).
    associate: bool = False
    associate_min_similarity: Any = 0.5  # a number or "auto" (as cluster.eps)
    # CA-Jaccard (docs/camera_aware.md#ca-jaccard): k-reciprocal sets from each image's k1_intra nearest
    # of its own camera (itself included) and k1_inter nearest of the other cameras, query expansion
    # over k2_intra + k2_inter of them; k1, k2 and knn_backend are then unused (exact torch search
    # per camera). Defaults: the CA-Jaccard paper's.
    camera_jaccard: bool = False
    k1_intra: int = 5
    k1_inter: int = 20
    k2_intra: int = 2
    k2_inter: int = 4
    # First epoch (0-based) clustered with CA-Jaccard; the plain Jaccard before it. The ImageNet
    # features match a person across cameras at chance, so early other-camera lists are noise.
    camera_jaccard_start: int = 0
    # Colour cue (docs/camera_aware.md#colour-cue): striped HSV histograms blended into the features
    # that the clustering sees, with weight colour_weight in the first epoch, fading linearly to 0
    # at epoch colour_epochs (0-based): epoch e uses colour_weight * max(0, 1 - e / colour_epochs).
    colour_weight: float = 0.0
    colour_epochs: int = 2
    # The weight never falls below colour_floor: epoch e uses max(colour_floor, the faded weight), so a
    # small share of the cue stays in every epoch's clustering (docs/camera_aware.md#colour-floor). 0: off.
    colour_floor: float = 0.0
    # Cluster on flip-averaged features: each image's and its mirror image's embeddings summed and
    # re-normalised, so a person walking left in one camera and right in another looks alike
    # (docs/camera_aware.md#flip-features). Twice the extraction time of the clustering pass.
    flip: bool = False
    # Cluster on the features of an exponential moving average of the network's weights with this
    # decay, updated after every optimizer step (0 = the network itself; 0.99 averages over about the
    # last 100 steps). docs/camera_aware.md#weight-average.
    ema: float = 0.0


@dataclass
class MemoryConfig:
    temperature: float = 0.05
    momentum: float = 0.2  # weight of the OLD centroid (docs/reference_quirks.md#q7)
    mode: str = "hard"  # hard | ori (Market hard, MSMT ori; docs/reference_quirks.md#q6)
    update_with_supports: bool = True  # docs/reference_quirks.md#q5
    # Weight of the camera-blind cluster-memory loss L_cc (1 in the reference). With camera-pure
    # clusters it treats a person's other view as a negative; camera-aware runs may lower it.
    cluster_weight: float = 1.0
    # Camera-aware proxies (docs/camera_aware.md): one proxy per (cluster, camera), an intra-camera
    # and an inter-camera contrastive term on the real samples, next to the cluster memory.
    camera_aware: bool = False
    camera_temperature: float = 0.07
    camera_momentum: float = 0.2  # weight of the OLD proxy, as momentum above
    camera_hard_negatives: int = 50
    camera_intra_weight: float = 1.0
    camera_inter_weight: float = 0.5
    # O2CAP's online association (docs/camera_aware.md#online-association): in the inter-camera term,
    # each row's N most similar proxies of cameras its cluster has none in count as positives, with
    # weight camera_online_weight; N is capped at the cameras minus one. 0 = off. Unlike
    # cluster.associate it never changes the labels, the supports or the sampler.
    camera_online: int = 0
    camera_online_weight: float = 1.0
    # First epoch (0-based) with the online association; the epochs before it train without it. Starting it
    # at epoch 1 lost on CUHK03: even wrong first-epoch positives align the cameras (docs/camera_aware.md#online-start).
    camera_online_start: int = 0
    # The same idea in the camera-blind cluster-memory loss L_cc (docs/camera_aware.md#cluster-online): a row's
    # partner is the cluster nearest to it among those seen by none of its own cluster's cameras (detached cosine to
    # the centroids). negative: the reference (the partner is a negative like any other cluster); ignore: the
    # partner leaves the row's softmax; positive: a second positive with weight cluster_online_weight. Rows of
    # clusters that span every camera have none.
    cluster_online: str = "negative"
    cluster_online_weight: float = 1.0


@dataclass
class ISEConfig:
    pil: bool = True  # supports enter the contrastive loss and the memory
    lp: bool = True  # label-preserving loss on the supports
    lambda_base: float = 1.0  # effective weight 0.25*lambda_base*ln(1+(e-1)t/T), docs/reference_quirks.md#q3
    topk: int = 1  # nearest foreign centroids per sample
    lp_temperature: float = 0.6
    lp_weight: float = 0.1  # Market 0.1, MSMT 0.01
    lp_negatives: str = "per_identity"  # per_identity | all (docs/reference_quirks.md#q9)
    # any: nearest foreign centroid of all clusters (reference); same_camera: among the clusters that
    # hold images of the sample's camera (docs/camera_aware.md#camera-aware-ise).
    foreign: str = "any"


@dataclass
class OptimConfig:
    lr: float = 3.5e-4
    weight_decay: float = 5e-4  # coupled L2, as torch.optim.Adam
    epochs: int = 70
    iters: int = 400  # iterations per epoch
    # "step": StepLR (x gamma every step_size epochs), the reference's; "linear": the rate falls
    # linearly from lr in the first epoch to lr / epochs in the last (gamma, step_size unused),
    # the budget-aware schedule for short runs (docs/method.md#schedule).
    scheduler: str = "step"
    step_size: int = 30
    gamma: float = 0.1
    # Evaluate and save a uniform average of the weights after every iteration from the start of epoch
    # average_from (0-based, as step_size) to the end instead of the last weights; -1: off. Training,
    # clustering and checkpoint_last.pt's network are unchanged: the average only watches
    # (docs/method.md#tail-average). The last evaluation also records the network's own scores.
    average_from: int = -1


@dataclass
class TrainConfig:
    # Mixed precision (autocast + gradient scaling) for training steps; off by default because the
    # reference trains in fp32. Feature extraction for clustering and evaluation is always fp32.
    amp: bool = False
    # Train on the true identities from the file names instead of pseudo-labels (same trainer and
    # budget): the ceiling that pseudo-labels can reach, used by benchmarks/accuracy.py.
    supervised: bool = False
    log_every: int = 50
    tensorboard: bool = True
    progress: bool = True
    grad_clip: Optional[float] = None


@dataclass
class EvalConfig:
    every: int = 1  # evaluate every N epochs (0: only at the end)
    rerank: bool = False
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    max_rank: int = 50
    # Query and gallery features flip-averaged as cluster.flip does for clustering (twice the extraction time).
    flip: bool = False
    # Unused: kept so that config.yaml files written by older versions still load; pictures of the
    # best and worst queries come from `isereid test --visualize N`.
    visualize: int = 0


@dataclass
class Config:
    name: str = "custom"
    seed: int = 1
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "logs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    ise: ISEConfig = field(default_factory=ISEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# The model's lists live here because isereid.models imports this module (the pure modules own theirs).
POOLINGS = ("avg", "gem")
BN_MODES = ("chunk", "sync", "plain", "camera")

# Each list has one source: the module that implements the choice (or the lines above).
SCHEDULERS = ("step", "linear")

CHOICES = {
    "data.dataset": DATASET_NAMES,
    "model.pooling": POOLINGS,
    "model.bn_mode": BN_MODES,
    "data.sampler": SAMPLERS,
    "cluster.knn_backend": KNN_BACKENDS,
    "cluster.outliers": OUTLIER_MODES,
    "memory.mode": MEMORY_MODES,
    "memory.cluster_online": CLUSTER_ONLINE,
    "ise.lp_negatives": NEGATIVES,
    "ise.foreign": FOREIGN,
    "optim.scheduler": SCHEDULERS,
}


def _read_yaml(name_or_path: str) -> Any:
    path = Path(name_or_path)
    # A preset name wins over a same-named folder (e.g. the `demo` dataset folder).
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {name_or_path}")
        text = path.read_text()
    else:
        preset = resources.files("isereid") / "configs" / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise ConfigError(
                f"unknown config preset {name_or_path!r}; choose one of {', '.join(preset_names())} "
                "or give a path to a .yaml file"
            )
        text = preset.read_text()
    try:
        loaded = OmegaConf.create(text)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse config {name_or_path}: {e}") from None
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"cannot parse config {name_or_path}: {first_line(e)}") from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(f"config {name_or_path} must be a YAML mapping of keys to values")
    return loaded


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if OmegaConf.is_dict(v):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _config_error(e: OmegaConfBaseException, schema: Any, source: str, written: Sequence[str] = ()) -> ConfigError:
    """One-line ConfigError for an OmegaConf failure; ``written`` are the dotted keys the user typed."""
    key = getattr(e, "full_key", None) or ""
    msg = first_line(e)
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        # OmegaConf names only the first unknown part ('no' for no.such.key): report the key as typed.
        key = next((k for k in written if k == key or k.startswith(key + ".")), key)
        known = _all_keys(schema)
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        if not close:
            leaf = key.rsplit(".", 1)[-1]
            close = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:3] or difflib.get_close_matches(
                leaf, [k.rsplit(".", 1)[-1] for k in known], n=3, cutoff=0.6
            )
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return ConfigError(f"unknown config key {key!r} in {source}{hint}")
    if key:
        return ConfigError(f"bad value for config key {key!r} in {source}: {msg}")
    return ConfigError(f"invalid config in {source}: {msg}")


def load_config(name_or_path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from a preset name or YAML path plus ``key=value`` overrides.

    Raises :class:`ConfigError` naming the offending key for unknown keys, bad types and
    values outside the allowed choices.
    """
    schema = OmegaConf.structured(Config)
    merged = schema
    if name_or_path:
        try:
            merged = OmegaConf.merge(merged, _read_yaml(name_or_path))
        except OmegaConfBaseException as e:
            raise _config_error(e, schema, name_or_path) from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. optim.epochs=10)")
    if overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as e:
            raise _config_error(e, schema, "command-line overrides",
                                [o.split("=", 1)[0].strip() for o in overrides]) from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if isinstance(cfg.cluster.eps, int) and not isinstance(cfg.cluster.eps, bool):
        cfg.cluster.eps = float(cfg.cluster.eps)
    sim = cfg.cluster.associate_min_similarity
    if isinstance(sim, int) and not isinstance(sim, bool):
        cfg.cluster.associate_min_similarity = float(sim)
    validate(cfg)
    return cfg


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Check values that types alone cannot (choices, ranges)."""
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key {key!r} is {value!r}; choose one of {', '.join(choices)}")
    positive = ["data.batch_size", "data.num_instances", "data.height", "data.width", "optim.epochs",
                "optim.iters", "optim.step_size", "cluster.k1", "cluster.k2", "cluster.min_samples",
                "ise.topk", "model.bn_chunk", "data.test_batch_size", "cluster.every"]
    for key in positive:
        if _get(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be at least 1, got {_get(cfg, key)}")
    if cfg.data.batch_size % cfg.data.num_instances:
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) must be a multiple of data.num_instances "
            f"({cfg.data.num_instances})"
        )
    for key in ("memory.momentum", "memory.camera_momentum", "data.grayscale_prob", "data.color_jitter"):
        if not 0 <= _get(cfg, key) <= 1:
            raise ConfigError(f"{key} must be in [0, 1], got {_get(cfg, key)}")
    sim = cfg.cluster.associate_min_similarity
    if sim != "auto" and (not isinstance(sim, (int, float)) or isinstance(sim, bool) or not -1 <= sim <= 1):
        raise ConfigError(f"cluster.associate_min_similarity must be a number in [-1, 1] or 'auto', got {sim!r}")
    for key in ("memory.cluster_weight", "memory.camera_intra_weight", "memory.camera_inter_weight",
                "memory.cluster_online_weight"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {_get(cfg, key)}")
    if cfg.memory.camera_hard_negatives < 1:
        raise ConfigError(f"memory.camera_hard_negatives must be at least 1, got {cfg.memory.camera_hard_negatives}")
    eps = cfg.cluster.eps
    if eps != "auto" and (not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < math.inf):
        raise ConfigError(f"config key 'cluster.eps' must be a positive number or 'auto', got {eps!r}")
    for key in ("memory.temperature", "ise.lp_temperature", "optim.lr", "memory.camera_temperature"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {_get(cfg, key)}")
    if cfg.memory.camera_online and not cfg.memory.camera_aware:
        raise ConfigError(f"memory.camera_online={cfg.memory.camera_online} needs memory.camera_aware=true (it acts "
                          "on the camera proxies); add memory.camera_online=0 to turn both off")
    if cfg.memory.camera_aware and cfg.data.num_instances < 2:
        raise ConfigError("memory.camera_aware=true needs data.num_instances >= 2, so that a batch can hold one "
                          f"pseudo-identity's images from two cameras (got {cfg.data.num_instances})")
    if len(cfg.data.erasing_value) != 3:
        raise ConfigError("data.erasing_value must hold 3 numbers (one per RGB channel)")


    _validate_ranges(cfg)


# Ranges that types alone cannot express, checked before any work (a bad value must not surface as a
# traceback after the first epoch): key -> (low, high, what), None for an open end.
RANGES = {
    "train.log_every": (1, None, "an integer >= 1"),
    "eval.max_rank": (1, None, "an integer >= 1"),
    "eval.rerank_k1": (1, None, "an integer >= 1"),
    "eval.rerank_k2": (1, None, "an integer >= 1"),
    "eval.rerank_lambda": (0.0, 1.0, "a number in [0, 1]"),
    "eval.every": (0, None, "an integer >= 0 (0: only after the last epoch)"),
    "eval.visualize": (0, None, "an integer >= 0"),
    "model.bn_chunk": (2, None, "an integer >= 2 (BatchNorm needs two rows per chunk)"),
    "model.camera_bn_images": (2, None, "an integer >= 2 (a camera's statistics need two images)"),
    "model.last_stride": (1, 2, "1 or 2"),
    "data.workers": (0, None, "an integer >= 0"),
    "data.pad": (0, None, "an integer >= 0"),
    "data.flip_prob": (0.0, 1.0, "a number in [0, 1]"),
    "data.erasing_prob": (0.0, 1.0, "a number in [0, 1]"),
    "data.max_bad_fraction": (0.0, 1.0, "a number in [0, 1]"),
    "optim.weight_decay": (0.0, None, "a number >= 0"),
    "optim.gamma": (0.0, None, "a number >= 0"),
    "ise.lambda_base": (0.0, None, "a number >= 0"),
    "ise.lp_weight": (0.0, None, "a number >= 0"),
    "memory.camera_online": (0, None, "an integer >= 0 (0 = off)"),
    "cluster.k1_intra": (1, None, "an integer >= 1 (the image itself counts)"),
    "cluster.k1_inter": (1, None, "an integer >= 1"),
    "cluster.k2_intra": (1, None, "an integer >= 1 (the image itself counts; 1 with k2_inter=0: no query expansion)"),
    "cluster.k2_inter": (0, None, "an integer >= 0"),
    "cluster.camera_jaccard_start": (0, None, "an integer >= 0 (the first epoch, 0-based, that uses it)"),
    "cluster.colour_weight": (0.0, 1.0, "a number in [0, 1] (0 = off)"),
    "cluster.colour_epochs": (1, None, "an integer >= 1 (the epoch, 0-based, from which the cue is off)"),
    "cluster.colour_floor": (0.0, 1.0, "a number in [0, 1] (0 = off)"),
    "memory.camera_online_weight": (0.0, None, "a number >= 0"),
    "memory.camera_online_start": (0, None, "an integer >= 0 (the first epoch, 0-based, that uses it)"),
    "optim.average_from": (-1, None, "-1 (off) or the first epoch, 0-based, whose weights are averaged"),
}


def _validate_ranges(cfg: Config) -> None:
    for key, (low, high, what) in RANGES.items():
        value = _get(cfg, key)
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"config key {key!r} must be {what}, got {value}")
    if cfg.optim.average_from >= cfg.optim.epochs:
        raise ConfigError(f"config key 'optim.average_from' ({cfg.optim.average_from}) must be below optim.epochs "
                          f"({cfg.optim.epochs}): it is the first epoch, 0-based, whose weights are averaged (-1: off)")
    if not 0.0 <= cfg.cluster.ema < 1.0:
        raise ConfigError(f"config key 'cluster.ema' must be a number in [0, 1) (0 = off), got {cfg.cluster.ema}")
    if cfg.train.grad_clip is not None and cfg.train.grad_clip <= 0:
        raise ConfigError(f"config key 'train.grad_clip' must be positive (or null for no clipping), "
                          f"got {cfg.train.grad_clip}")


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written to ``config.yaml`` in a run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]

"""What ``isereid serve`` shows, read once from a run folder (and an index): the epoch records,
the recorded pseudo-labels, the crops, the search model and index. No web framework here.

Every image has an integer id: the run's training images first (in pseudo-label order), then the
rows of the gallery index. Ids are the only way a request names an image, so no request
parameter is ever used as a path.
"""
from __future__ import annotations

import io
import json
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..data.datasets import images_in_folder, parse_image_name
from ..embedding import Preprocessing, embed_pil, load_embedder
from ..engine.run_state import LABEL_IMAGES, LABELS, METRICS
from ..errors import DatasetError, InvalidArgument, IsereidError, first_line
from ..index import GalleryIndex, file_sha256, label_free_threshold, load_index

EPOCH_FILE = re.compile(r"^epoch_(\d+)\.npz$")
CHECKPOINTS = ("model_best.pt", "checkpoint_last.pt")
SORTS = ("size", "cameras")


class NotFound(IsereidError):
    """An unknown image id or epoch (HTTP 404)."""


class BadImage(IsereidError):
    """Uploaded bytes that are not a complete image (HTTP 400)."""


@dataclass
class EpochClusters:
    """The clusters of one epoch, ordered for paging: ``order_<sort>`` (C,) cluster ids, ``members``
    (image ids sorted by cluster, then camera, then id), ``starts`` (C + 1,) offsets into it."""

    labels: np.ndarray
    members: np.ndarray
    starts: np.ndarray
    num_cameras: np.ndarray
    order_size: np.ndarray
    order_cameras: np.ndarray
    outliers: np.ndarray


def group_clusters(labels: np.ndarray, camids: np.ndarray) -> EpochClusters:
    """Group image ids by cluster (then camera) and order the clusters by size and by camera spread
    (ties: larger first, then lower id)."""
    labels = np.asarray(labels, dtype=np.int64)
    num = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    clustered = np.flatnonzero(labels >= 0)
    members = clustered[np.lexsort((clustered, camids[clustered], labels[clustered]))]
    sizes = np.bincount(labels[clustered], minlength=num)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    pairs = np.unique(np.stack([labels[clustered], camids[clustered]]), axis=1) if len(clustered) else np.zeros((2, 0))
    num_cameras = np.bincount(pairs[0].astype(np.int64), minlength=num)
    ids = np.arange(num)
    return EpochClusters(labels, members, starts, num_cameras, np.lexsort((ids, -sizes)),
                         np.lexsort((ids, -sizes, -num_cameras)), np.flatnonzero(labels < 0))


class RunView:
    """A run folder (and optional index) opened for serving; read-only and safe to share between threads."""

    def __init__(self, run_dir: str | Path, index_path: Optional[str | Path] = None, backend: str = "auto",
                 max_upload_bytes: int = 8 << 20):
        self.run_dir = Path(run_dir)
        self.max_upload_bytes = max_upload_bytes
        if not self.run_dir.is_dir():
            raise DatasetError(f"run folder not found: {self.run_dir}")
        checkpoint = next((self.run_dir / c for c in CHECKPOINTS if (self.run_dir / c).is_file()), None)
        if checkpoint is None:
            raise DatasetError(f"{self.run_dir} has no {' or '.join(CHECKPOINTS)}: not a training run folder")
        self.label_dir = self.run_dir / LABELS
        self.epoch_files = {int(m.group(1)): p for p in sorted(self.label_dir.glob("epoch_*.npz"))
                            for m in [EPOCH_FILE.match(p.name)] if m}
        if not self.epoch_files or not (self.label_dir / LABEL_IMAGES).is_file():
            raise DatasetError(f"{self.run_dir} has no recorded pseudo-labels ({LABELS}/epoch_NNN.npz); "
                               "train it with this isereid version")
        with np.load(self.label_dir / LABEL_IMAGES, allow_pickle=False) as data:
            self.train_paths = data["paths"].astype(str)
            self.train_camids = data["camids"].astype(np.int64)
        self.records = _read_records(self.run_dir / METRICS)
        self._lock = threading.Lock()
        if index_path is not None:
            self.index = load_index(index_path, backend=backend)
            search_checkpoint = Path(self.index.meta.get("checkpoint", ""))
            if not search_checkpoint.is_file() or file_sha256(search_checkpoint) != self.index.meta.get(
                    "checkpoint_sha256"):
                raise DatasetError(f"{index_path} was built with {search_checkpoint}, which is gone or has changed")
            self.model, prep = load_embedder(search_checkpoint)
            self.prep = Preprocessing(**{**prep.to_dict(), "height": self.index.meta["height"],
                                         "width": self.index.meta["width"]})
            self.gallery_source = f"index {index_path} ({len(self.index)} images)"
        else:
            self.model, self.prep = load_embedder(checkpoint)
            self.index = self._test_gallery_index(backend)
        self.model = self.model.cpu().eval()
        self.checkpoint = checkpoint
        n_train = len(self.train_paths)
        self.paths = np.concatenate([self.train_paths, self.index.paths])
        self.camids = np.concatenate([self.train_camids, self.index.camids])
        train_pids = np.array([(parse_image_name(Path(p).name) or (-1, 0))[0] for p in self.train_paths],
                              dtype=np.int64)
        self.pids = np.concatenate([train_pids, self.index.pids])
        self.gallery_offset = n_train
        self.threshold, self.threshold_epoch = self._threshold()

    # ------------------------------------------------------------------ loading
    def _test_gallery_index(self, backend: str) -> GalleryIndex:
        """Without --index: the run's test gallery (config data.root/bounding_box_test), extracted now."""
        import yaml  # omegaconf's dependency

        root = None
        config = self.run_dir / "config.yaml"
        if config.is_file():
            root = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("root")
        folder = Path(str(root)) / "bounding_box_test" if root else None
        if folder is None or not folder.is_dir():
            self.gallery_source = "none"
            return GalleryIndex(np.zeros((0, self.prep.feature_dim or 1), np.float32), [], [], [], backend=backend)
        samples = images_in_folder(folder)
        paths = [str(Path(s.path).resolve()) for s in samples]
        from ..features import extract_features

        feats = extract_features(self.model, paths, self.prep.transform(), batch_size=128, workers=0,
                                 progress=False)
        self.gallery_source = f"test gallery {folder} ({len(paths)} images)"
        return GalleryIndex(feats.numpy(), paths, [s.camid for s in samples], [s.pid for s in samples],
                            backend=backend)

    def _threshold(self) -> tuple[Optional[float], Optional[int]]:
        """The "no match" distance suggested by the latest epoch that recorded distance samples."""
        for epoch in sorted(self.epoch_files, reverse=True):
            with np.load(self.epoch_files[epoch], allow_pickle=False) as data:
                if "inside" in data.files and len(data["inside"]) and len(data["between"]):
                    return round(label_free_threshold(data["inside"], data["between"]), 4), epoch
        return None, None

    # ------------------------------------------------------------------ questions
    @property
    def epochs(self) -> list[int]:
        return sorted(self.epoch_files)

    def summary(self) -> dict:
        return {
            "run": self.run_dir.name, "checkpoint": self.checkpoint.name, "records": self.records,
            "epochs": self.epochs, "train_images": int(len(self.train_paths)),
            "gallery": {"source": self.gallery_source, "size": len(self.index), "first_id": self.gallery_offset,
                        "backend": self.index.backend_for(1)},  # the page searches one query at a time
            "model": {"arch": self.prep.arch, "height": self.prep.height, "width": self.prep.width},
            "threshold": self.threshold, "threshold_epoch": self.threshold_epoch,
            "max_upload_bytes": self.max_upload_bytes,
        }

    @lru_cache(maxsize=8)
    def clusters_of(self, epoch: int) -> EpochClusters:
        if epoch not in self.epoch_files:
            raise NotFound(f"no pseudo-labels recorded for epoch {epoch}")
        with np.load(self.epoch_files[epoch], allow_pickle=False) as data:
            labels = data["labels"].astype(np.int64)
        if len(labels) != len(self.train_camids):
            raise DatasetError(f"{self.epoch_files[epoch].name} has {len(labels)} labels for "
                               f"{len(self.train_camids)} images")
        return group_clusters(labels, self.train_camids)

    def clusters(self, epoch: int, sort: str = "size", offset: int = 0, limit: Optional[int] = None,
                 outlier_offset: int = 0, outlier_limit: Optional[int] = None) -> dict:
        """The API's clusters object for one epoch: a page of clusters in ``sort`` order, each with its
        image ids per camera, and a page of the outliers."""
        if sort not in SORTS:
            raise InvalidArgument(f"sort must be one of {', '.join(SORTS)}")
        if offset < 0 or outlier_offset < 0 or (limit is not None and limit < 0) or (
                outlier_limit is not None and outlier_limit < 0):
            raise InvalidArgument("offsets and limits must be >= 0")
        ec = self.clusters_of(epoch)
        order = ec.order_size if sort == "size" else ec.order_cameras
        page = order[offset:None if limit is None else offset + limit]
        out = []
        for c in page.tolist():
            ids = ec.members[ec.starts[c]:ec.starts[c + 1]]
            cams: dict[str, list[int]] = {}
            for i in ids.tolist():
                cams.setdefault(str(int(self.train_camids[i])), []).append(i)
            out.append({"id": c, "size": len(ids), "cameras": cams})
        outliers = ec.outliers[outlier_offset:None if outlier_limit is None else outlier_offset + outlier_limit]
        return {"epoch": epoch, "sort": sort, "total": len(order), "offset": offset, "clusters": out,
                "num_outliers": len(ec.outliers), "outlier_offset": outlier_offset, "outliers": outliers.tolist()}

    def image_path(self, image_id: int) -> Path:
        if not 0 <= image_id < len(self.paths):
            raise NotFound(f"no image with id {image_id}")
        return Path(self.paths[image_id])

    def image_info(self, image_id: int) -> dict:
        path = self.image_path(image_id)
        return {"image_id": image_id, "name": path.name, "camera": int(self.camids[image_id]),
                "pid": int(self.pids[image_id]), "gallery": image_id >= self.gallery_offset}

    def decode_upload(self, data: bytes) -> Image.Image:
        """The RGB image of uploaded bytes; BadImage when they are not a complete image."""
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            reason = first_line(e)
            raise BadImage(f"not a readable image ({reason})") from None

    def _embed(self, image: Image.Image) -> np.ndarray:
        with self._lock, torch.no_grad():
            return embed_pil(self.model, [image], self.prep).numpy()

    def search(self, *, image: Optional[Image.Image] = None, filename: str = "", image_id: Optional[int] = None,
               topk: int = 10, other_cameras_only: bool = False) -> dict:
        """Top-k of the gallery for an uploaded ``image`` (its camera and identity read from
        ``filename`` when Market-style) or for the image ``image_id`` (a gallery image is searched
        with its indexed features and left out of its own results)."""
        if not 1 <= topk <= 100:
            raise InvalidArgument("topk must be between 1 and 100")
        exclude_row = -1
        if image_id is not None:
            info = self.image_info(image_id)
            camera, pid = info["camera"], info["pid"]
            if image_id >= self.gallery_offset:
                exclude_row = image_id - self.gallery_offset
                query = self.index.features[exclude_row:exclude_row + 1]
            else:
                query = self._embed(self.decode_upload(self.image_path(image_id).read_bytes()))
        elif image is not None:
            pid, camera = parse_image_name(Path(filename).name) or (-1, -1)
            query = self._embed(image)
        else:
            raise InvalidArgument("give an image file or an image_id")
        if len(self.index) == 0:
            return {"query": {"camera": camera, "pid": pid}, "results": [], "threshold": self.threshold}
        use_camera = other_cameras_only and camera >= 0
        found = self.index.search(query, topk, exclude_camids=[camera if use_camera else -1],
                                  exclude_rows=[exclude_row])
        results = []
        for row, score in zip(found.indices[0].tolist(), found.scores[0].tolist()):
            if row < 0:
                continue
            gid = row + self.gallery_offset
            gpid = int(self.pids[gid])
            results.append({"image_id": gid, "name": Path(self.paths[gid]).name, "camera": int(self.camids[gid]),
                            "score": round(float(score), 6),
                            "match": None if pid < 0 or gpid < 0 else bool(gpid == pid)})
        return {"query": {"camera": camera, "pid": pid, "other_cameras_only": use_camera}, "results": results,
                "threshold": self.threshold}


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run: the run view shows the rest
    return records

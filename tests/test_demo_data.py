"""isereid.data.demo: the synthetic Market-style dataset."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isereid.data import build_dataset
from isereid.data.demo import generate_demo_data
from isereid.errors import DatasetError

SPLITS = ("bounding_box_train", "query", "bounding_box_test")
NAME = re.compile(r"^(\d{4})_c(\d)s1_(\d{6})_(\d{2})\.jpg$")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "d"
    summary = generate_demo_data(root, identities=16, cameras=3, seed=5)
    return root, summary


def files(root: Path) -> dict:
    return {f"{s}/{p.name}": p.read_bytes() for s in SPLITS for p in sorted((root / s).iterdir())}


def test_layout_names_and_counts(demo):
    root, summary = demo
    names = {s: sorted(p.name for p in (root / s).iterdir()) for s in SPLITS}
    assert all(NAME.match(n) for s in SPLITS for n in names[s])
    assert summary["train_images"] == len(names["bounding_box_train"])
    assert summary["query_images"] == len(names["query"])
    assert summary["gallery_images"] == len(names["bounding_box_test"])
    pids = {s: {int(NAME.match(n).group(1)) for n in names[s]} for s in SPLITS}
    assert len(pids["bounding_box_train"]) == 8 and len(pids["query"]) == 8
    assert not pids["bounding_box_train"] & pids["query"]  # disjoint train / test identities
    assert pids["bounding_box_test"] == pids["query"] | {0}  # plus distractors
    assert pids["bounding_box_train"] | pids["query"] == set(range(1, 17))
    assert all(1 <= int(NAME.match(n).group(2)) <= 3 for s in SPLITS for n in names[s])
    # one query per (identity, camera), each test identity seen by >= 2 cameras
    qkeys = [NAME.match(n).group(1, 2) for n in names["query"]]
    assert len(qkeys) == len(set(qkeys))
    cams = defaultdict(set)
    for pid, cam in qkeys:
        cams[pid].add(cam)
    assert all(len(c) >= 2 for c in cams.values())
    per_id = (summary["train_images"] + summary["query_images"] + summary["gallery_images"]
              - summary["distractors"]) / 16
    assert 8 <= per_id <= 30
    ds = build_dataset("demo", root)
    assert ds.has_test and len(ds.train) == summary["train_images"]
    assert {s.camid for s in ds.train} <= {0, 1, 2}


def test_images_are_people_not_blank(demo):
    root, _ = demo
    for p in sorted((root / "query").iterdir())[:5]:
        im = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        assert im.shape == (128, 64, 3)
        assert im.std() > 15
        assert np.abs(np.diff(im, axis=1)).mean() > 2  # structure, not a flat colour


def test_same_identity_looks_alike(demo):
    root, _ = demo
    feats, pids = [], []
    for s in SPLITS:
        for p in sorted((root / s).iterdir()):
            pid = int(p.name[:4])
            if pid == 0:
                continue
            im = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)[24:110, 16:48]  # body region
            feats.append(im.reshape(-1, 3).mean(0) / (im.mean() + 1e-6))  # chromaticity, gain removed
            pids.append(pid)
    feats, pids = np.array(feats), np.array(pids)
    dist = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
    same = pids[:, None] == pids[None]
    off = ~np.eye(len(pids), dtype=bool)
    assert dist[same & off].mean() < 0.7 * dist[~same].mean()


def test_seed_determinism(tmp_path, demo):
    root, _ = demo
    again = tmp_path / "again"
    generate_demo_data(again, identities=16, cameras=3, seed=5)
    assert files(again) == files(root)
    other = tmp_path / "other"
    generate_demo_data(other, identities=16, cameras=3, seed=6)
    assert files(other) != files(root)


def test_existing_root(tmp_path, demo):
    root, summary = demo
    reused = generate_demo_data(root, identities=16, cameras=3, seed=5)
    assert reused["reused"] and reused["train_images"] == summary["train_images"]
    with pytest.raises(DatasetError, match="other parameters"):
        generate_demo_data(root, identities=16, cameras=3, seed=9)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        generate_demo_data(busy)
    with pytest.raises(DatasetError, match="cameras"):
        generate_demo_data(tmp_path / "x", cameras=12)
    with pytest.raises(DatasetError, match="identities"):
        generate_demo_data(tmp_path / "y", identities=1)

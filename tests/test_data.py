"""isereid.data: dataset parsing, image reading, transforms and the identity sampler."""
from __future__ import annotations

import dataclasses
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from isereid.config import DataConfig
from isereid.data import (
    BatchListSampler,
    ImageDataset,
    ReferenceRandomErasing,
    ReidDataset,
    Sample,
    build_dataset,
    build_test_transform,
    build_train_transform,
    check_images,
    drop_unreadable,
    epoch_batches,
    images_in_folder,
    parse_image_name,
    sample_pass,
)
from isereid.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from isereid.errors import ClusteringError, DatasetError


def touch(path: Path, data: bytes = b"") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def expected(entries, folder: Path):
    """Oracle: samples from the (name, pid, cam) truth recorded when the files were made."""
    return sorted((Sample(str(folder / n), pid, cam - 1) for n, pid, cam in entries if pid != -1),
                  key=lambda s: s.path)


# name, true pid (None: not a sample name), 1-based camera
MARKET = {
    "bounding_box_train": [("0002_c1s1_000451_03.jpg", 2, 1), ("0002_c3s2_000111_01.jpg", 2, 3),
                           ("-1_c1s1_000001_00.jpg", -1, 1), ("0007_c6s4_002202_00.jpg", 7, 6),
                           ("0010_c5s3_015240_04.jpg", 10, 5)],
    "query": [("0003_c2s1_000001_00.jpg", 3, 2), ("0007_c1s1_000201_00.jpg", 7, 1)],
    "bounding_box_test": [("0000_c2s1_000002_00.jpg", 0, 2), ("-1_c3s1_000003_00.jpg", -1, 3),
                          ("0003_c4s1_000004_00.jpg", 3, 4), ("0007_c2s3_070201_02.jpg", 7, 2)],
}
NOT_SAMPLES = ["Thumbs.db", "readme.txt", "notaname.jpg", ".hidden_0001_c1s1.jpg"]


def make_market(folder: Path) -> Path:
    for split, entries in MARKET.items():
        for name, _, _ in entries:
            touch(folder / split / name)
        for name in NOT_SAMPLES:
            touch(folder / split / name)
    return folder


def assert_market(ds: ReidDataset, folder: Path):
    assert Path(ds.root) == folder
    assert ds.train == expected(MARKET["bounding_box_train"], folder / "bounding_box_train")
    assert ds.query == expected(MARKET["query"], folder / "query")
    assert ds.gallery == expected(MARKET["bounding_box_test"], folder / "bounding_box_test")


# ---------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("sub", ["", "Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15"])
def test_market_parsing_root_or_parent(tmp_path, sub):
    folder = make_market(tmp_path / sub if sub else tmp_path)
    ds = build_dataset("market1501", tmp_path)
    assert_market(ds, folder)
    assert ds.has_test and all(isinstance(s, Sample) for s in ds.train)
    assert any(s.pid == 0 for s in ds.gallery)  # distractors kept, junk dropped
    assert all(s.pid != -1 for s in ds.train + ds.query + ds.gallery)
    text = ds.summary()
    assert "train" in text and "gallery" in text


def test_parsing_uses_the_basename_not_the_path(tmp_path):
    # a parent folder that itself looks like a Market name must not change the parse (docs/reference_quirks.md#q18)
    folder = make_market(tmp_path / "9999_c9s9_data")
    assert_market(build_dataset("market1501", folder), folder)


def test_demo_and_duke_use_market_layout(tmp_path):
    folder = make_market(tmp_path / "d")
    assert_market(build_dataset("demo", folder), folder)
    duke = make_market(tmp_path / "duke" / "DukeMTMC-reID")
    assert_market(build_dataset("dukemtmc", tmp_path / "duke"), duke)


def test_dataset_replace_keeps_other_splits(tmp_path):
    ds = build_dataset("market1501", make_market(tmp_path))
    small = dataclasses.replace(ds, train=ds.train[:1])
    assert small.train == ds.train[:1] and small.query == ds.query and small.name == "market1501"


MSMT_REORG = {
    "bounding_box_train": [("0001_c12s1_000001_00.jpg", 1, 12), ("0001_c3_0002.jpg", 1, 3),
                           ("-1_c2_0003.jpg", -1, 2)],
    "query": [("0005_c15_0009.jpg", 5, 15)],
    "bounding_box_test": [("0005_c1_0010.jpg", 5, 1), ("0000_c10_0011.jpg", 0, 10)],
}


@pytest.mark.parametrize("sub", ["", "MSMT17_V1", "MSMT17_V2"])
def test_msmt17_reorganised(tmp_path, sub):
    folder = tmp_path / sub if sub else tmp_path
    for split, entries in MSMT_REORG.items():
        for name, _, _ in entries:
            touch(folder / split / name)
    ds = build_dataset("msmt17", tmp_path)
    for split, attr in [("bounding_box_train", "train"), ("query", "query"), ("bounding_box_test", "gallery")]:
        assert getattr(ds, attr) == expected(MSMT_REORG[split], folder / split)


def official_name(pid: int, cam: int, k: int) -> str:
    return f"{pid:04d}_{k:03d}_{cam:02d}_0303morning_{k + 15:04d}_0.jpg"


@pytest.mark.parametrize("version, train_dir, test_dir", [("V1", "train", "test"),
                                                          ("V2", "mask_train_v2", "mask_test_v2")])
@pytest.mark.parametrize("nested", [False, True])
def test_msmt17_official_lists(tmp_path, version, train_dir, test_dir, nested):
    folder = tmp_path / f"MSMT17_{version}" if nested else tmp_path
    lists = {
        "list_train.txt": (train_dir, [(0, 1, 0), (0, 12, 1), (1, 3, 2)]),
        "list_val.txt": (train_dir, [(0, 15, 3), (2, 7, 4)]),
        "list_query.txt": (test_dir, [(0, 2, 0)]),
        "list_gallery.txt": (test_dir, [(0, 9, 1), (0, 2, 2), (1, 4, 3)]),
    }
    truth = {}
    for list_name, (image_dir, rows) in lists.items():
        lines, samples = [], []
        for pid, cam, k in rows:
            rel = f"{pid:04d}/{official_name(pid, cam, k)}"
            touch(folder / image_dir / rel)
            lines.append(f"{rel} {pid}")
            samples.append(Sample(str(folder / image_dir / rel), pid, cam - 1))
        (folder / list_name).write_text("\n".join(lines) + "\n")
        truth[list_name] = samples
    ds = build_dataset("msmt17", tmp_path)
    assert ds.train == sorted(truth["list_train.txt"] + truth["list_val.txt"], key=lambda s: s.path)
    assert ds.query == truth["list_query.txt"]
    assert ds.gallery == sorted(truth["list_gallery.txt"], key=lambda s: s.path)
    assert {s.camid for s in ds.train} == {0, 11, 2, 14, 6}


def test_msmt17_official_missing_list(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "list_train.txt").write_text("")
    with pytest.raises(DatasetError, match="list_query.txt"):
        build_dataset("msmt17", tmp_path)


def test_folder_labeled_and_unlabeled(tmp_path):
    labeled = make_market(tmp_path / "lab")
    assert_market(build_dataset("folder", labeled), labeled)
    train_only = tmp_path / "trainonly"
    touch(train_only / "bounding_box_train" / "0004_c11s1_000001_00.jpg")
    ds = build_dataset("folder", train_only)
    assert ds.train == [Sample(str(train_only / "bounding_box_train" / "0004_c11s1_000001_00.jpg"), 4, 10)]
    assert not ds.has_test

    root = tmp_path / "unlab"
    files = {"a/img1.png": 0, "b/c/cam_0001_c3.jpg": 2, "z.JPEG": 0, "b/x.bmp": 0}
    for rel in files:
        touch(root / rel)
    touch(root / "notes.txt")
    touch(root / ".cache" / "0001_c2.jpg")
    ds = build_dataset("folder", root)
    assert ds.train == sorted((Sample(str(root / rel), -1, cam) for rel, cam in files.items()), key=lambda s: s.path)
    assert ds.query == [] and ds.gallery == [] and not ds.has_test
    assert "train" in ds.summary()


def test_images_in_folder(tmp_path):
    touch(tmp_path / "q" / "0012_c4s1_000001_00.jpg")
    touch(tmp_path / "q" / "sub" / "photo.png")
    touch(tmp_path / "q" / "x.txt")
    assert images_in_folder(tmp_path / "q") == [Sample(str(tmp_path / "q" / "0012_c4s1_000001_00.jpg"), 12, 3),
                                                Sample(str(tmp_path / "q" / "sub" / "photo.png"), -1, 0)]
    with pytest.raises(DatasetError, match="nothere"):
        images_in_folder(tmp_path / "nothere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        images_in_folder(tmp_path / "empty")


# ---------------------------------------------------------------------------- errors
def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name", ["market1501", "msmt17", "dukemtmc", "folder", "demo"])
def test_missing_root_names_the_folder(tmp_path, name):
    with pytest.raises(DatasetError) as exc:
        build_dataset(name, tmp_path / "no" / "such")
    assert str(tmp_path / "no" / "such") in one_line(exc)


@pytest.mark.parametrize("name, needle", [("market1501", "bounding_box_train"), ("dukemtmc", "DukeMTMC-reID"),
                                          ("msmt17", "list_"), ("demo", "bounding_box_test")])
def test_wrong_layout_says_what_was_expected(tmp_path, name, needle):
    touch(tmp_path / "something" / "else.jpg")
    with pytest.raises(DatasetError) as exc:
        build_dataset(name, tmp_path)
    msg = one_line(exc)
    assert str(tmp_path) in msg and needle in msg


def test_missing_split_and_empty_split(tmp_path):
    folder = make_market(tmp_path / "m")
    for f in (folder / "query").iterdir():
        f.unlink()
    with pytest.raises(DatasetError) as exc:
        build_dataset("market1501", folder)
    assert str(folder / "query") in one_line(exc)
    (folder / "query").rmdir()
    with pytest.raises(DatasetError) as exc:
        build_dataset("market1501", folder)
    assert "query" in one_line(exc)


def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(DatasetError) as exc:
        build_dataset("cuhk03", tmp_path)
    msg = one_line(exc)
    assert "cuhk03" in msg and all(n in msg for n in ["market1501", "msmt17", "dukemtmc", "folder", "demo"])


def test_empty_unlabeled_folder(tmp_path):
    touch(tmp_path / "readme.txt")
    with pytest.raises(DatasetError) as exc:
        build_dataset("folder", tmp_path)
    assert str(tmp_path) in one_line(exc)


# ---------------------------------------------------------------------------- hypothesis
@settings(max_examples=200, deadline=None)
@given(pid=st.integers(-1, 99999), cam=st.integers(1, 15), seq=st.integers(0, 9), frame=st.integers(0, 999999),
       det=st.integers(0, 99), ext=st.sampled_from([".jpg", ".png", ".jpeg"]), folder=st.booleans())
def test_parse_image_name_round_trip(pid, cam, seq, frame, det, ext, folder):
    name = f"{pid:04d}_c{cam}s{seq}_{frame:06d}_{det:02d}{ext}"
    path = f"/data/0001_c1s1_x/{name}" if folder else name
    assert parse_image_name(path) == (pid, cam - 1)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_image_name_never_raises(text):
    result = parse_image_name(text)
    if not re.search(r"[-\d]+_c\d+", text):
        assert result is None
    else:
        assert result is None or (result[0] >= -1 and result[1] >= 0)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcxyz_-.cs ", max_size=30))
def test_names_without_digits_are_not_parsed(text):
    assert parse_image_name(text) is None


# ---------------------------------------------------------------------------- images
def write_image(path: Path, colour=(200, 30, 60), size=(20, 40), fmt="JPEG") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return str(path)


def test_image_dataset(tmp_path):
    paths = [write_image(tmp_path / f"{i}.jpg") for i in range(3)]
    ds = ImageDataset(paths, build_test_transform(DataConfig(height=32, width=16)), labels=[5, 6, 7])
    image, label, index = ds[1]
    assert image.shape == (3, 32, 16) and label == 6 and index == 1 and isinstance(label, int)
    assert ImageDataset(paths, None)[2][1:] == (-1, 2)
    images, labels, idx = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert images.shape == (3, 3, 32, 16) and labels.tolist() == [5, 6, 7] and idx.tolist() == [0, 1, 2]
    bad = touch(tmp_path / "bad.jpg", b"not an image")
    with pytest.raises(DatasetError, match="bad.jpg"):
        ImageDataset([bad], None)[0]


def test_check_images_detects_truncated_and_non_images(tmp_path):
    good = [Sample(write_image(tmp_path / f"{i:04d}_c1s1_000000_00.jpg", size=(64, 128)), i, 0) for i in range(6)]
    full = Path(good[0].path).read_bytes()
    truncated = Sample(touch(tmp_path / "trunc.jpg", full[: len(full) // 2]), 9, 0)
    text = Sample(touch(tmp_path / "text.jpg", b"hello"), 10, 0)
    samples = good[:3] + [truncated] + good[3:] + [text]
    kept, bad = check_images(samples, max_bad_fraction=0.25)
    assert kept == good and bad == [truncated.path, text.path]
    with pytest.raises(DatasetError) as exc:
        check_images(samples, max_bad_fraction=0.1)
    msg = str(exc.value)
    assert "data.max_bad_fraction" in msg and "trunc.jpg" in msg and "2 of 8" in msg
    assert check_images(good, 0.0) == (good, [])
    assert check_images([], 0.0) == ([], [])


def test_drop_unreadable_filters_train_only(tmp_path):
    good = [Sample(write_image(tmp_path / "train" / f"{i:04d}_c1s1_000000_00.jpg", size=(64, 128)), i, 0)
            for i in range(5)]
    full = Path(good[0].path).read_bytes()
    truncated = Sample(touch(tmp_path / "train" / "trunc.jpg", full[: len(full) // 2]), 9, 1)
    broken_query = Sample(touch(tmp_path / "query" / "q.jpg", b"not an image"), 3, 0)
    gallery = [Sample(write_image(tmp_path / "gallery" / "g.jpg"), 3, 1)]
    ds = ReidDataset("folder", str(tmp_path), train=good[:2] + [truncated] + good[2:], query=[broken_query],
                     gallery=gallery)
    kept, bad = drop_unreadable(ds, max_bad_fraction=0.2)
    assert bad == [truncated.path] and kept.train == good
    # the test splits and the name are untouched, and the input dataset is not modified
    assert (kept.name, kept.root, kept.query, kept.gallery) == ("folder", str(tmp_path), [broken_query], gallery)
    assert ds.train[2] == truncated and len(ds.train) == 6
    assert drop_unreadable(ReidDataset("folder", str(tmp_path), train=good), 0.0) == (
        ReidDataset("folder", str(tmp_path), train=good), [])
    with pytest.raises(DatasetError) as exc:  # 1 of 6 > 0.1
        drop_unreadable(ds, max_bad_fraction=0.1)
    msg = str(exc.value)
    assert "trunc.jpg" in msg and "1 of 6" in msg and "data.max_bad_fraction" in msg and "\n" not in msg


# ---------------------------------------------------------------------------- transforms
def test_test_transform_normalises():
    cfg = DataConfig(height=16, width=8)
    out = build_test_transform(cfg)(Image.new("RGB", (30, 50), (255, 128, 0)))
    assert out.shape == (3, 16, 8)
    want = (torch.tensor([255, 128, 0]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out.mean(dim=(1, 2)), want.float(), atol=1e-5, rtol=0)


def test_train_transform_shape_and_identity_without_augmentation():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8))
    cfg = DataConfig(height=32, width=16)
    assert build_train_transform(cfg)(img).shape == (3, 32, 16)
    plain = DataConfig(height=32, width=16, flip_prob=0.0, pad=0, erasing_prob=0.0)
    torch.testing.assert_close(build_train_transform(plain)(img), build_test_transform(plain)(img))
    # padding is zeros in pixel space: with pad > 0 the crop may show black borders
    names = [type(t).__name__ for t in build_train_transform(cfg).transforms]
    assert names == ["Resize", "RandomHorizontalFlip", "Pad", "RandomCrop", "ToTensor", "Normalize",
                     "ReferenceRandomErasing"]


def test_train_transform_colour_augmentation():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (50, 30, 3), dtype=np.uint8))
    grey = DataConfig(height=32, width=16, flip_prob=0.0, pad=0, erasing_prob=0.0, grayscale_prob=1.0)
    names = [type(t).__name__ for t in build_train_transform(grey).transforms]
    assert names == ["Resize", "RandomHorizontalFlip", "RandomGrayscale", "Pad", "RandomCrop", "ToTensor",
                     "Normalize", "ReferenceRandomErasing"]
    out = build_train_transform(grey)(img)
    # A grey image is equal in R, G and B before normalisation.
    pixels = out * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[1], pixels[2], atol=1e-5, rtol=0)
    plain = DataConfig(height=32, width=16, flip_prob=0.0, pad=0, erasing_prob=0.0)
    assert not torch.allclose(build_train_transform(plain)(img), out)
    jitter = DataConfig(height=32, width=16, color_jitter=0.4)
    assert "ColorJitter" in [type(t).__name__ for t in build_train_transform(jitter).transforms]


def erasing_oracle(img: np.ndarray, rng: random.Random, p=0.5, sl=0.02, sh=0.4, r1=0.3, value=IMAGENET_MEAN):
    """Straight transcription of the reference class (docs/method.md#transforms, item 5)."""
    img = img.copy()
    if rng.uniform(0, 1) >= p:
        return img
    for _ in range(100):
        area = img.shape[1] * img.shape[2]
        target = rng.uniform(sl, sh) * area
        aspect = rng.uniform(r1, 1 / r1)
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if w < img.shape[2] and h < img.shape[1]:
            x1 = rng.randint(0, img.shape[1] - h)
            y1 = rng.randint(0, img.shape[2] - w)
            for c in range(3):
                img[c, x1:x1 + h, y1:y1 + w] = value[c]
            return img
    return img


def test_random_erasing_matches_reference():
    erased = 0
    for seed in range(60):
        base = torch.randn(3, 24, 12)
        ours = ReferenceRandomErasing(0.5, rng=random.Random(seed))(base.clone()).numpy()
        ref = erasing_oracle(base.numpy(), random.Random(seed))
        np.testing.assert_array_equal(ours, ref)
        erased += not np.array_equal(ours, base.numpy())
    assert 10 < erased < 50  # about half
    # default: python's global `random`, as the reference
    random.seed(4)
    base = torch.randn(3, 24, 12)
    ours = ReferenceRandomErasing(0.5)(base.clone()).numpy()
    np.testing.assert_array_equal(ours, erasing_oracle(base.numpy(), random.Random(4)))


def test_random_erasing_box_properties():
    erase = ReferenceRandomErasing(probability=1.0, value=[7.0, 8.0, 9.0], rng=random.Random(3))
    for _ in range(50):
        out = erase(torch.zeros(3, 64, 32))
        mask = out[0] != 0
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert mask.sum() == h * w and 0 < h < 64 and 0 < w < 32  # one solid box
        for c, v in enumerate([7.0, 8.0, 9.0]):
            assert (out[c][mask] == v).all()
        assert 0.02 * 2048 - 64 <= h * w <= 0.4 * 2048 + 64
    never = ReferenceRandomErasing(probability=0.0)
    x = torch.randn(3, 8, 4)
    assert torch.equal(never(x.clone()), x)


# ---------------------------------------------------------------------------- sampler
def blocks_of(flat, labels, z):
    """Split a pass into per-cluster blocks (consecutive runs of one label)."""
    out, i = [], 0
    while i < len(flat):
        j = i
        while j < len(flat) and labels[flat[j]] == labels[flat[i]] and j - i < z:
            j += 1
        out.append(flat[i:j])
        i = j
    return out


def test_sampler_pass_structure_and_camera_rule():
    rng = np.random.default_rng(0)
    z = 4
    # cluster 0: 3 cameras, many images; 1: one image in another camera (companions repeat);
    # 2: single camera (fallback to same camera); 3: singleton; 4: exactly z images in other cameras
    labels = np.array([0] * 9 + [1] * 5 + [2] * 3 + [3] + [4] * 5)
    camids = np.array([0, 1, 2] * 3 + [0, 0, 0, 0, 1] + [2, 2, 2] + [4] + [0, 1, 1, 1, 1])
    for _ in range(30):
        flat = sample_pass(labels, camids, z, rng)
        assert flat.dtype == np.int64 and len(flat) == 4 * z + 1
        blocks = blocks_of(flat, labels, z)
        assert sorted(labels[b[0]] for b in blocks) == [0, 1, 2, 3, 4]
        for b in blocks:
            k, anchor, rest = labels[b[0]], b[0], b[1:]
            assert (labels[b] == k).all()
            if k == 3:
                assert len(b) == 1
                continue
            assert len(b) == z
            if k == 2:
                # one camera: the other images of the cluster, 2 < z of them, so drawn with replacement
                assert anchor not in rest and set(rest) <= {14, 15, 16} - {anchor}
            else:
                assert (camids[rest] != camids[anchor]).all()  # companions only from other cameras
            if k == 1 and camids[anchor] == 0:
                assert set(rest) == {13}  # a single other-camera image, repeated
    # with-replacement vs without-replacement threshold (>= Z)
    labels = np.zeros(6, dtype=np.int64)
    camids = np.array([0, 1, 1, 1, 1, 1])
    no_repeat = [sample_pass(labels, camids, 5, np.random.default_rng(s)) for s in range(40)]
    # anchor 0 has exactly 5 = Z other-camera images: drawn without replacement
    for flat in no_repeat:
        if flat[0] == 0:
            assert len(set(flat[1:])) == 4
    repeats = 0
    for s in range(40):
        flat = sample_pass(np.zeros(5, dtype=np.int64), np.array([0, 1, 1, 1, 1]), 5, np.random.default_rng(s))
        if flat[0] == 0:
            assert set(flat[1:]) <= {1, 2, 3, 4}
            repeats += len(set(flat[1:])) < 4
    assert repeats > 0  # 4 < Z other-camera images: drawn with replacement


def test_sampler_fallback_same_camera_with_and_without_replacement():
    rng = np.random.default_rng(1)
    labels, camids = np.zeros(10, dtype=np.int64), np.zeros(10, dtype=np.int64)
    for _ in range(10):
        flat = sample_pass(labels, camids, 4, rng)  # 9 others >= 4: no replacement
        assert len(set(flat)) == 4
    seen_repeat = False
    for _ in range(30):
        flat = sample_pass(np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64), 4, rng)
        assert flat[0] not in flat[1:]
        seen_repeat |= len(set(flat[1:])) < 3
    assert seen_repeat


def test_sampler_cluster_order_is_random_and_all_clusters_appear():
    labels = np.repeat(np.arange(20), 4)
    camids = np.tile(np.arange(4), 20)
    firsts = set()
    for s in range(10):
        flat = sample_pass(labels, camids, 4, np.random.default_rng(s))
        order = labels[flat[::4]]
        assert sorted(order) == list(range(20))
        firsts.add(order[0])
    assert len(firsts) > 1


def test_epoch_batches_shape_determinism_and_passes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, 300)
    camids = rng.integers(0, 4, 300)
    b = epoch_batches(labels, camids, batch_size=32, num_instances=4, iters=25, seed=7)
    assert b.shape == (25, 32) and b.dtype == np.int64
    assert np.array_equal(b, epoch_batches(labels, camids, 32, 4, 25, seed=7))
    assert not np.array_equal(b, epoch_batches(labels, camids, 32, 4, 25, seed=8))
    # 30 clusters * 4 = 120 entries per pass -> 3 batches per pass (drop_last), new pass after that
    first = sample_pass(labels, camids, 4, np.random.default_rng(7))
    assert np.array_equal(b[:3].reshape(-1), first[:96])
    for row in b:  # whole blocks of 4 with one label each
        assert (labels[row.reshape(8, 4)] == labels[row.reshape(8, 4)][:, :1]).all()
    assert epoch_batches(labels, camids, 32, 4, 0, seed=1).shape == (0, 32)


def test_epoch_batches_too_few_images():
    with pytest.raises(ClusteringError) as exc:
        epoch_batches(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), batch_size=64, num_instances=4, iters=10, seed=0)
    msg = str(exc.value)
    assert "\n" not in msg and "data.batch_size" in msg and "cluster.eps" in msg and "4 images" in msg


@pytest.mark.parametrize("world", [1, 2, 4])
def test_batch_list_sampler_slices(world):
    batches = np.arange(5 * 8).reshape(5, 8)
    samplers = [BatchListSampler(batches, rank=r, world_size=world) for r in range(world)]
    assert all(len(s) == 5 for s in samplers)
    rows = list(zip(*[list(s) for s in samplers]))
    for row, parts in zip(batches, rows):
        assert all(isinstance(v, int) for p in parts for v in p)
        assert sum(parts, []) == row.tolist()
    resumed = BatchListSampler(batches, rank=0, world_size=world, start=3)
    assert len(resumed) == 2 and list(resumed)[0] == batches[3, : 8 // world].tolist()
    with pytest.raises(ValueError):
        BatchListSampler(batches, world_size=3)


# ---------------------------------------------------------------------------- decoded-image cache
def test_resized_image_cache_is_bit_identical_to_decoding(tmp_path):
    from isereid.data.images import ImageDataset, ResizedImageCache, load_rgb

    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate([(50, 30), (32, 16), (90, 41)]):  # one already at the target size
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    cfg = DataConfig(height=32, width=16)
    cache = ResizedImageCache((32, 16)).fill(paths, workers=1)
    assert len(cache) == 3 and all(cache(p).size == (16, 32) for p in paths)
    test_t = build_test_transform(cfg)
    for p in paths:
        torch.testing.assert_close(test_t(cache(p)), test_t(load_rgb(p)), rtol=0, atol=0)
        # the train transform with the same random draws
        torch.manual_seed(7)
        random.seed(7)
        a = build_train_transform(cfg)(cache(p))
        torch.manual_seed(7)
        random.seed(7)
        b = build_train_transform(cfg)(load_rgb(p))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cached = ImageDataset(paths, test_t, loader=cache)
    plain = ImageDataset(paths, test_t)
    for i in range(3):
        torch.testing.assert_close(cached[i][0], plain[i][0], rtol=0, atol=0)
    # A path not filled is read on demand and kept.
    extra = tmp_path / "x.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)).save(extra)
    assert cache(str(extra)).size == (16, 32) and len(cache) == 4
    with pytest.raises(DatasetError):
        cache(str(tmp_path / "missing.jpg"))


def test_proxy_sampler_draws_num_instances_per_cluster_and_camera():
    """data.sampler=proxy: every (cluster, camera) pair is one group of Z images of that camera per
    pass (oracle: counting the pairs by hand); outliers never drawn; deterministic given the seed."""
    from isereid.data.sampler import proxy_labels

    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, -1, 2, 2, 2, 2, 2, 2])
    camids = np.array([0, 0, 1, 1, 1, 0, 2, 2, 1, 5, 5, 5, 5, 5, 5])
    proxies = proxy_labels(labels, camids)
    pairs = {(int(a), int(c)) for a, c in zip(labels, camids) if a >= 0}
    assert proxies[8] == -1 and len(set(proxies[proxies >= 0])) == len(pairs) == 5
    for i in range(len(labels)):  # same proxy <=> same (cluster, camera)
        for j in range(len(labels)):
            if labels[i] >= 0 and labels[j] >= 0:
                assert (proxies[i] == proxies[j]) == ((labels[i], camids[i]) == (labels[j], camids[j]))
    z = 2
    batches = epoch_batches(labels, camids, batch_size=4, num_instances=z, iters=30, seed=3, by="proxy")
    # A pass: 4 proxies of >= 2 images give Z each, the singleton proxy (cluster 1, camera 0) gives 1.
    assert batches.shape == (30, 4) and 8 not in batches
    # One pass per row (batch_size = pass length 4 * Z + 1): each proxy once, as one block of its images.
    for row in epoch_batches(labels, camids, batch_size=9, num_instances=z, iters=20, seed=4, by="proxy"):
        cut = np.flatnonzero(np.diff(proxies[row])) + 1
        blocks = np.split(row, cut)
        assert sorted(int(proxies[b[0]]) for b in blocks) == list(range(5))
        assert sorted(len(b) for b in blocks) == [1, 2, 2, 2, 2]
    np.testing.assert_array_equal(
        batches, epoch_batches(labels, camids, batch_size=4, num_instances=z, iters=30, seed=3, by="proxy"))
    # Over many passes each proxy is drawn equally often (the by-cluster sampler draws cluster 2's
    # single camera as often as cluster 0's two cameras together).
    many = epoch_batches(labels, camids, batch_size=3, num_instances=z, iters=3000, seed=1, by="proxy").reshape(-1)
    counts = np.bincount(proxies[many], minlength=5)
    singleton = proxies[5]
    others = np.delete(counts, singleton)
    assert others.min() / others.max() > 0.95 and abs(counts[singleton] / others.mean() - 0.5) < 0.05
    with pytest.raises(ValueError, match="one of 'cluster', 'proxy'"):
        epoch_batches(labels, camids, 4, 2, 1, 0, by="camera")

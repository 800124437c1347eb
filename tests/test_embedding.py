"""isereid.embed: paths, PIL images and HWC uint8 arrays give the same features, equal to batched
extraction with the checkpoint's own preprocessing; the ONNX export records that preprocessing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import isereid
from isereid.embedding import load_embedder
from isereid.errors import DatasetError, InvalidArgument
from isereid.features import extract_features
from serve_fixtures import shared_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def crops(run_dir):
    return [str(p) for p in sorted((run_dir.parent / "demo" / "query").glob("*.jpg"))[:5]]


def test_paths_pil_and_arrays_agree_with_extraction(run_dir, crops):
    checkpoint = run_dir / "model_best.pt"
    by_path = isereid.embed(str(checkpoint), crops)  # preprocessing from the checkpoint
    pils = [Image.open(p) for p in crops]
    arrays = [np.asarray(im.convert("RGB")) for im in pils]
    assert by_path.shape == (5, 512) and by_path.dtype == torch.float32
    model, prep = load_embedder(checkpoint)
    size = {"height": 64, "width": 32}
    torch.testing.assert_close(isereid.embed(model, pils, **size), by_path)
    torch.testing.assert_close(isereid.embed(model, arrays, batch_size=2, **size), by_path)
    torch.testing.assert_close(isereid.embed(model, arrays[2], **size), by_path[2:3])  # one array: one image
    torch.testing.assert_close(isereid.embed(model, np.stack(arrays), **size), by_path)  # (N, H, W, 3)
    assert (prep.height, prep.width, prep.feature_dim, prep.arch) == (64, 32, 512, "resnet18")
    expected = extract_features(model, crops, prep.transform(), progress=False)
    torch.testing.assert_close(by_path, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(by_path.norm(dim=1), torch.ones(5))
    # the stored input size matters: another size gives other features
    assert not torch.allclose(isereid.embed(model, crops[:1], height=128, width=64), by_path[:1], atol=1e-3)


def test_bad_inputs(run_dir, tmp_path):
    checkpoint = run_dir / "model_best.pt"
    with pytest.raises(InvalidArgument):
        isereid.embed(checkpoint, [np.zeros((8, 4, 3), np.float32)])
    with pytest.raises(InvalidArgument):
        isereid.embed(checkpoint, [123])
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="x.jpg"):
        isereid.embed(checkpoint, [tmp_path / "x.jpg"])
    with pytest.raises(DatasetError, match="not found"):
        isereid.embed(tmp_path / "none.pt", [tmp_path / "x.jpg"])


def test_onnx_export_records_the_preprocessing(run_dir, crops, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from isereid.cli import main

    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(run_dir / "model_best.pt"), "--output", str(out)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert (meta["height"], meta["width"], meta["feature_dim"], meta["arch"]) == ("64", "32", "512", "resnet18")
    mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])
    # what docs/serve.md tells a tracker to do, from the metadata alone, gives isereid.embed's features
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    h, w = int(meta["height"]), int(meta["width"])
    batch = []
    for path in crops:
        im = Image.open(path).convert("RGB").resize((w, h), Image.BICUBIC)
        x = (np.asarray(im, np.float32) / 255 - np.array(mean, np.float32)) / np.array(std, np.float32)
        batch.append(x.transpose(2, 0, 1))
    got = session.run(None, {"images": np.stack(batch).astype(np.float32)})[0]
    np.testing.assert_allclose(got, isereid.embed(run_dir / "model_best.pt", crops).numpy(), atol=2e-3)


def test_extraction_is_float32_and_has_no_dead_options(run_dir, crops):
    """``amp=`` was never passed (extraction is float32 by design) and ``all_reduce_mean`` never called."""
    import inspect

    from isereid.distributed import DistContext

    assert "amp" not in inspect.signature(extract_features).parameters
    assert not hasattr(DistContext, "all_reduce_mean")
    model, prep = load_embedder(run_dir / "model_best.pt")
    plain = extract_features(model, crops[:2], prep.transform(), progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast does not leak in
        inside = extract_features(model, crops[:2], prep.transform(), progress=False)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain)

"""Every bad input is a one-line message and exit status 2 (``--debug`` shows the traceback)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from isereid.cli import main

QUICK = ["optim.epochs=1", "optim.iters=2", "data.workers=0", "train.progress=false", "train.tensorboard=false",
         "data.batch_size=16", "model.bn_chunk=16"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_err")
    assert main(["demo-data", str(root), "--identities", "16", "--seed", "9"]) == 0
    return root


def one_line_error(argv, capsys) -> str:
    """The error is exactly one line (log lines before it are progress, not the error)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    return errors[0]


def test_wrong_layout_names_expected_folders(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"")
    msg = one_line_error(["train", "--config", "demo", "--data-root", str(tmp_path), *QUICK], capsys)
    assert "bounding_box_train" in msg


def test_empty_dataset_folder(tmp_path, capsys):
    for split in ("bounding_box_train", "bounding_box_test", "query"):
        (tmp_path / split).mkdir()
    msg = one_line_error(["train", "--config", "demo", "--data-root", str(tmp_path), *QUICK], capsys)
    assert str(tmp_path) in msg


def test_unreadable_images_above_tolerated_fraction(tiny_demo, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(tiny_demo, root)
    train = sorted((root / "bounding_box_train").iterdir())
    for path in train[:5]:  # truncated JPEGs
        path.write_bytes(path.read_bytes()[:60])
    msg = one_line_error(["train", "--config", "demo", "--data-root", str(root), "--output-dir",
                          str(tmp_path / "out"), *QUICK, "data.max_bad_fraction=0.001"], capsys)
    assert "data.max_bad_fraction" in msg and "5" in msg
    assert sum(path.name in msg for path in train[:5]) == 3 and "and 2 more" in msg  # names the files


def test_clustering_with_no_clusters_gives_eps_advice(tiny_demo, tmp_path, capsys):
    msg = one_line_error(["train", "--config", "demo", "--data-root", str(tiny_demo), "--output-dir",
                          str(tmp_path / "out"), *QUICK, "cluster.eps=0.0001"], capsys)
    assert "cluster.eps" in msg


def test_ill_typed_config_value(capsys):
    msg = one_line_error(["train", "--config", "demo", "optim.epochs=many"], capsys)
    assert "optim.epochs" in msg


def test_checkpoint_of_another_architecture(tiny_demo, tmp_path, capsys):
    from isereid.config import ModelConfig
    from isereid.models import build_model

    state = build_model(ModelConfig(arch="resnet18", pretrained=False)).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("base.7.1.")}  # drop a block
    path = tmp_path / "other.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    msg = one_line_error(["test", "--config", "demo", "--data-root", str(tiny_demo), "--checkpoint", str(path),
                          "data.workers=0", "train.progress=false"], capsys)
    assert "missing" in msg and "base.7.1" in msg


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


def test_malicious_checkpoint_is_refused(tiny_demo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Exploit()}, path)
    msg = one_line_error(["test", "--config", "demo", "--data-root", str(tiny_demo), "--checkpoint", str(path)],
                         capsys)
    assert "evil.pt" in msg
    assert not (tmp_path / "EXPLOITED").exists()


def test_out_of_memory_gives_batch_size_advice(tiny_demo, tmp_path, capsys, monkeypatch):
    import isereid.engine.trainer as trainer

    def boom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer.Trainer, "run", boom)
    msg = one_line_error(["train", "--config", "demo", "--data-root", str(tiny_demo), "--output-dir",
                          str(tmp_path / "out"), *QUICK], capsys)
    assert "data.batch_size" in msg


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception):
        main(["train", "--config", "nosuchpreset", "--debug"])


# ---------------------------------------------------------------------------- messages seen from outside
def test_unknown_dotted_override_names_the_whole_key(capsys):
    msg = one_line_error(["train", "--config", "demo", "no.such.key=1"], capsys)
    assert "'no.such.key'" in msg
    msg = one_line_error(["train", "--config", "demo", "data.hieght.px=1"], capsys)
    assert "'data.hieght.px'" in msg and "data.height" in msg  # a close key is suggested


def test_skipped_training_images_are_named(tiny_demo, tmp_path, capsys, monkeypatch):
    import isereid.engine.trainer as trainer

    root = tmp_path / "broken"
    shutil.copytree(tiny_demo, root)
    train = sorted((root / "bounding_box_train").iterdir())
    for path in train[:4]:
        path.write_bytes(path.read_bytes()[:60])

    def stop(self):  # the warning comes before training: no need to train
        raise torch.OutOfMemoryError("stop here")

    monkeypatch.setattr(trainer.Trainer, "run", stop)
    assert main(["train", "--config", "demo", "--data-root", str(root), "--output-dir", str(tmp_path / "out"),
                 *QUICK, "data.max_bad_fraction=0.5"]) == 2
    warning = [line for line in capsys.readouterr().err.splitlines() if "unreadable" in line]
    assert len(warning) == 1 and "skipping 4 unreadable training image(s)" in warning[0]
    assert [path.name in warning[0] for path in train[:4]] == [True, True, True, False]
    assert warning[0].endswith("and 1 more")


def test_workers_are_capped_at_the_cpus_once(monkeypatch, tmp_path):
    import logging
    import warnings

    from PIL import Image

    from isereid.config import DataConfig
    from isereid.data import loader
    from isereid.data.transforms import build_test_transform
    from isereid.features import extract_features

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    monkeypatch.setattr(loader, "_reported", set())
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("isereid").addHandler(handler)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.new("RGB", (16, 32), (40 * i, 0, 0)).save(paths[-1])
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # e.g. clustering then evaluation: still one message
                feats = extract_features(net, paths, build_test_transform(DataConfig(height=32, width=16)),
                                         batch_size=2, workers=4, progress=False)
            assert loader.make_loader(torch.utils.data.TensorDataset(torch.zeros(2)), 0).num_workers == 0
    finally:
        logging.getLogger("isereid").removeHandler(handler)
    assert feats.shape == (3, 3)
    assert [r.getMessage() for r in records if "capped" in r.getMessage()] == [
        "data.workers=4 capped at 1 (CPUs available)"]
    assert not [w for w in caught if "worker" in str(w.message)]  # no PyTorch warning either


# ---------------------------------------------------------------------------- library errors
def test_library_errors_are_value_errors_not_the_clis_config_error():
    """Tensor-level code raises ValueError (the CLI still shows it as one line: an IsereidError)."""
    import numpy as np

    from isereid.clustering import exact_knn, jaccard_dbscan
    from isereid.errors import ConfigError, IsereidError
    from isereid.memory import ClusterMemory

    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    calls = [lambda: ClusterMemory(torch.eye(3), mode="median"), lambda: ClusterMemory(torch.eye(3), momentum=2.0),
             lambda: exact_knn(x, 3, backend="annoy"), lambda: jaccard_dbscan(x, eps=0.0),
             lambda: jaccard_dbscan(x[:, :1] * np.nan, eps=0.5), lambda: exact_knn(x, 0)]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        assert isinstance(err.value, IsereidError) and not isinstance(err.value, ConfigError)
    assert issubclass(ConfigError, ValueError)


def test_failed_export_leaves_no_temp_file(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx

    from isereid.errors import IsereidError
    from isereid.export import export_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(IsereidError, match="differ"):  # parity check fails
        export_onnx(net, out, 16, 8, tolerance=-1.0)
    assert list(out.parent.iterdir()) == []

    def broken(path):
        raise onnx.checker.ValidationError("bad graph")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(net, out, 16, 8)
    assert list(out.parent.iterdir()) == []
    monkeypatch.undo()
    report = export_onnx(net, out, 16, 8)
    assert report.path == out and [p.name for p in out.parent.iterdir()] == ["model.onnx"]


def test_first_line_of_an_exception():
    from isereid.errors import first_line

    assert first_line(ValueError("bad value\nsecond line")) == "bad value"
    assert first_line(OSError("\n  \n  real reason  \nmore")) == "real reason"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("   \n\n")) == "RuntimeError"


def test_exception_with_an_empty_message_is_still_one_line(tmp_path, monkeypatch):
    """``str(e).splitlines()[0]`` raised IndexError here when PIL gave an OSError with no message."""
    from PIL import Image

    from isereid.embedding import to_pil
    from isereid.errors import DatasetError
    from isereid.features import read_npz

    def fail(*args, **kwargs):
        raise OSError()

    monkeypatch.setattr(Image, "open", fail)
    with pytest.raises(DatasetError, match="cannot read image .*: OSError$"):
        to_pil(tmp_path / "x.jpg")
    monkeypatch.setattr("numpy.load", fail)
    with pytest.raises(DatasetError, match=r"cannot read features file .*: OSError$"):
        read_npz(tmp_path / "f.npz", ["a"], "features file")

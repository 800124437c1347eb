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

"""TrainingState and the checkpoint format: memories round-trip exactly through state_dict /
from_state, RunFolder writes and restores a state, the keys on disk are those of the format
before TrainingState, and a missing or bad key is a one-line CheckpointError naming file and key."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from isereid.camera_memory import CameraProxyMemory
from isereid.config import load_config
from isereid.engine import checkpoint as ckpt
from isereid.engine.records import EpochRecord
from isereid.engine.run_state import RunFolder
from isereid.engine.training_state import TrainingState
from isereid.errors import CheckpointError
from isereid.memory import ClusterMemory

# The keys of checkpoint_last.pt as written before TrainingState: files of earlier runs still resume.
OLD_KEYS = {"format", "format_version", "state_dict", "model_config", "epoch", "mAP", "input_size", "optimizer",
            "scheduler", "scaler", "memory", "camera_memory", "pseudo_labels", "best_score", "best_epoch",
            "history", "rng", "config", "world_size"}


def _memories() -> tuple[ClusterMemory, CameraProxyMemory]:
    """Both memories after an update, so that their rows are no longer freshly normalised."""
    g = torch.Generator().manual_seed(0)
    memory = ClusterMemory(torch.randn(10, 16, generator=g), temperature=0.1, momentum=0.3, mode="ori")
    memory.update(torch.randn(40, 16, generator=g), torch.randint(0, 10, (40,), generator=g))
    labels, cams = torch.arange(60) % 10, torch.arange(60) % 3
    camera = CameraProxyMemory.from_features(torch.randn(60, 16, generator=g), labels, cams, hard_negatives=7)
    camera.update(torch.randn(30, 16, generator=g), labels[:30], cams[:30])
    return memory, camera


def test_memories_round_trip_exactly():
    memory, camera = _memories()
    again = ClusterMemory.from_state(memory.state_dict(), temperature=0.1, momentum=0.3, mode="ori")
    assert torch.equal(again.centroids, memory.centroids) and again.extra_repr() == memory.extra_repr()
    restored = CameraProxyMemory.from_state(camera.state_dict(), hard_negatives=7)
    for name, tensor in camera.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert restored.extra_repr() == camera.extra_repr()
    with pytest.raises(KeyError, match="proxy_cams"):
        CameraProxyMemory.from_state({k: v for k, v in camera.state_dict().items() if k != "proxy_cams"})


def _cfg(tmp_path, *overrides):
    return load_config("demo", [f"data.root={tmp_path}", "memory.camera_aware=true", *overrides])


def _saved(tmp_path) -> tuple[RunFolder, TrainingState]:
    """A run folder whose checkpoint_last.pt holds a hand-built state of epoch 1."""
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    memory, camera = _memories()
    record = EpochRecord(epoch=1, lr=0.1, seconds=1.0, num_clusters=10, num_outliers=0, loss=1.5, loss_cc=1.0,
                         loss_lp=0.5, interpolation_weight=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = TrainingState(epoch=1, score=None, model=model.state_dict(), optimizer=optimizer.state_dict(),
                          scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                          memory=memory, camera_memory=camera, pseudo_labels=np.arange(60) % 10 - 1,
                          best_score=-1.0, best_epoch=1, history=[record], rng=ckpt.rng_state())
    folder = RunFolder(tmp_path)
    folder.save_state(_cfg(tmp_path), state, is_best=True)
    return folder, state


def test_run_folder_restores_what_it_wrote(tmp_path):
    folder, state = _saved(tmp_path)
    raw = torch.load(folder.last, weights_only=True)
    assert set(raw) == OLD_KEYS and isinstance(raw["memory"], torch.Tensor)  # the old format
    assert set(raw["camera_memory"]) == {"proxies", "proxy_labels", "proxy_cams", "index"}
    loaded = folder.load_state(_cfg(tmp_path))
    assert loaded.source == str(folder.last)
    assert torch.equal(loaded.memory.centroids, state.memory.centroids)
    for name, tensor in state.camera_memory.state_dict().items():
        assert torch.equal(loaded.camera_memory.state_dict()[name], tensor), name
    np.testing.assert_array_equal(loaded.pseudo_labels, state.pseudo_labels)
    assert (loaded.epoch, loaded.best_epoch, loaded.best_score, loaded.history) == (1, 1, -1.0, state.history)
    assert all(torch.equal(loaded.model[k], v) for k, v in state.model.items())


@pytest.mark.parametrize("key", ["epoch", "state_dict", "optimizer", "scheduler", "scaler", "memory",
                                 "camera_memory", "pseudo_labels", "best_score", "best_epoch", "history", "rng",
                                 "mAP"])
def test_missing_key_is_a_one_line_error_naming_it(tmp_path, key):
    folder, _ = _saved(tmp_path)
    raw = torch.load(folder.last, weights_only=True)
    del raw[key]
    torch.save(raw, folder.last)
    with pytest.raises(CheckpointError) as err:
        folder.load_state(_cfg(tmp_path))
    message = str(err.value)
    assert "\n" not in message and repr(key) in message and str(folder.last) in message


@pytest.mark.parametrize("key, part, bad", [("camera_memory", "proxy_cams", None), ("rng", "torch", None),
                                            ("memory", None, "not a tensor"), ("history", None, [{"x": 1}]),
                                            ("best_epoch", None, "one")])
def test_bad_part_is_a_one_line_error_naming_it(tmp_path, key, part, bad):
    folder, _ = _saved(tmp_path)
    raw = torch.load(folder.last, weights_only=True)
    if part is None:
        raw[key] = bad
    else:
        del raw[key][part]
    torch.save(raw, folder.last)
    with pytest.raises(CheckpointError) as err:
        folder.load_state(_cfg(tmp_path))
    message = str(err.value)
    assert "\n" not in message and str(folder.last) in message
    assert (f"'{key}.{part}'" if part else repr(key)) in message


def test_parts_that_do_not_fit_name_the_key(tmp_path):
    folder, _ = _saved(tmp_path)
    state = folder.load_state(_cfg(tmp_path))
    model = torch.nn.Linear(5, 2)  # another shape
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(CheckpointError, match=r"'state_dict' does not fit") as err:
        state.restore(model=model, optimizer=optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1),
                      scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert str(folder.last) in str(err.value)


@pytest.mark.parametrize("bad", [(3, (1, 2, 3), None), ("x", [], None), (3,), (3, list(range(624)), None)])
def test_bad_python_rng_state_is_a_one_line_error(tmp_path, bad):
    folder, _ = _saved(tmp_path)
    raw = torch.load(folder.last, weights_only=True)
    raw["rng"]["python"] = bad
    torch.save(raw, folder.last)
    with pytest.raises(CheckpointError, match=r"'rng.python'") as err:
        folder.load_state(_cfg(tmp_path))
    assert "\n" not in str(err.value) and str(folder.last) in str(err.value)


def test_a_checkpoint_from_before_an_option_existed_resumes_at_its_default(tmp_path):
    folder, _ = _saved(tmp_path)
    raw = torch.load(folder.last, weights_only=True)
    for section, key in (("cluster", "camera_jaccard"), ("cluster", "k1_inter"), ("optim", "scheduler")):
        del raw["config"][section][key]  # written by a version without these options
    torch.save(raw, folder.last)
    assert folder.load_state(_cfg(tmp_path)).epoch == 1
    with pytest.raises(CheckpointError, match=r"different cluster settings \(cluster.camera_jaccard\)"):
        folder.load_state(_cfg(tmp_path, "cluster.camera_jaccard=true"))  # a non-default value still differs

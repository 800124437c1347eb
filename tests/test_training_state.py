"""Memories round-trip exactly through state_dict / from_state."""
from __future__ import annotations

import pytest
import torch

from isereid.camera_memory import CameraProxyMemory
from isereid.memory import ClusterMemory


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

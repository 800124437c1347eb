"""Names of the configuration presets shipped in ``isereid/configs`` (a leaf: no torch import, so
that ``isereid --help`` can list them quickly)."""
from __future__ import annotations

from importlib import resources


def preset_names() -> list[str]:
    """Names of the presets shipped in ``isereid/configs``."""
    folder = resources.files("isereid") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))

"""Data robustkit ships beside its code: the attack presets.

The presets are the repository's top-level ``attacks/*.toml``: the one copy users review and edit,
and the one in git. A wheel carries them as package data in ``robustkit/presets/attacks/``:
pyproject.toml maps the data-only package ``robustkit.presets.attacks`` onto ``attacks/`` (setup.py
adds it to the package list), so a build copies the folder in and the source tree holds no second
copy that could drift. A checkout (an editable install, or ``python -m robustkit`` from the
repository) has no such folder inside the package and reads the top-level one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def attack_preset_dir() -> Path:
    """The folder of the attack presets: an installed wheel's package data, else the checkout's."""
    packaged = resources.files(__name__) / "attacks"
    if isinstance(packaged, Path) and packaged.is_dir():  # a wheel installed on a file system
        return packaged
    return Path(__file__).resolve().parents[2] / "attacks"

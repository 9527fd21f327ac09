"""Out-of-tree plug-ins: modules that register models, trainers or attacks when imported.

A plug-in is any importable module whose import calls ``register_model``, ``register_trainer`` or
``register_attack``. robustkit imports, once, before a command runs:

- every module named in ``$ROBUSTKIT_PLUGINS`` (comma-separated), for a quick local experiment;
- every entry point of the ``robustkit.plugins`` group, for an installed package
  (``[project.entry-points."robustkit.plugins"] mine = "my_package.robustkit_plugin"``).
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from robustkit.core.errors import ConfigError

_LOADED: set[str] = set()
_ENTRY_POINTS: list[str] | None = None  # read once a process: the installed packages do not change


def load_plugins() -> list[str]:
    """Import every configured plug-in not imported yet; return the module names imported now.

    Registries call this before every lookup, so it must be cheap when nothing is new: the entry
    points are read once, and the environment variable is split again (a test may change it)."""
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        _ENTRY_POINTS = [ep.value for ep in entry_points(group="robustkit.plugins")]
    names = [n.strip() for n in os.environ.get("ROBUSTKIT_PLUGINS", "").split(",") if n.strip()]
    names += _ENTRY_POINTS
    new = []
    for name in names:
        if name in _LOADED:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"plug-in {name!r} (from $ROBUSTKIT_PLUGINS or an entry point) does not "
                              f"import: {e}") from None
        _LOADED.add(name)
        new.append(name)
    return new

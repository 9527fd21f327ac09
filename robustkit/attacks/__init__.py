"""The attack registry: registered attacks, TOML presets and ``foolbox:<Name>``.

Every module of this package whose name does not start with ``_`` is imported here; an attack file
registers its class with :func:`register_attack` (``robustkit.attacks.base``) as the *kind* that
presets name, and optionally as a name users type. A new attack is therefore one file (plus an
optional preset); out-of-tree plug-ins (:mod:`robustkit.core.plugins`) register theirs when a
name is first looked up.

Names users type (``robustkit list attacks``):
- ``fgsm``, ``pgd``: robustkit's own Linf/L2 attacks (registered in ``pgd.py``);
- presets from ``attacks/*.toml`` (shipped inside the package): ``autoattack``,
  ``autoattack-plus``, ``autoattack-rand``, ``autoattack-adaptive`` (for adaptive-smoothing
  models), ``apgd-ce``, ``apgd-t`` — each names an attack kind
  and its parameters, so the protocol a number was measured with is a reviewable file;
- ``foolbox:<AttackName>``: any fixed-epsilon foolbox 3 attack;
- a path to a preset ``.toml`` file of your own.
"""

from __future__ import annotations

import importlib
import pkgutil
import tomllib
from pathlib import Path
from typing import Any

# The public classes, re-exported (every module registers itself through _import_modules below).
from robustkit.attacks.adaptive import AdaptiveAutoAttack
from robustkit.attacks.autoattack import AutoAttack
from robustkit.attacks.base import ATTACKS, KINDS, Attack, perturbation_norms, project, register_attack
from robustkit.attacks.pgd import FGSM, PGD
from robustkit.core.errors import ConfigError, UnknownNameError
from robustkit.core.threat import ThreatModel
from robustkit.presets import attack_preset_dir

PRESET_DIR = attack_preset_dir()  # attacks/ of a checkout, or the wheel's package data


def _import_modules() -> None:
    """Import every attack module (each registers its kinds), in name order."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def _register_presets() -> None:
    # Parsed without the kind check: that looks the kind up, which would import the plug-ins while
    # robustkit itself is still importing. A shipped preset's kind is checked when it is used (and
    # by tests/test_registries.py, which runs every registered attack).
    for path in sorted(PRESET_DIR.glob("*.toml")):
        preset = _parse_preset(path)
        ATTACKS.register(path.stem, lambda p=preset: p, preset.get("description", ""), path=str(path))


def read_preset(path: str | Path) -> dict[str, Any]:
    """Parse and validate a preset file: ``attack = "<kind>"`` plus a ``[params]`` table."""
    preset = _parse_preset(path)
    if preset["attack"] not in KINDS:
        raise ConfigError(f"attack preset {path}: 'attack' must be one of {', '.join(KINDS.names())}, "
                          f"got {preset['attack']!r}")
    return preset


def _parse_preset(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"attack preset not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"malformed attack preset {p}: {e}") from None
    kind = data.get("attack")
    if not isinstance(kind, str):
        raise ConfigError(f"attack preset {p}: 'attack' must name an attack kind, got {kind!r}")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"attack preset {p}: [params] must be a table")
    return {"attack": kind, "params": params, "description": data.get("description", "")}


def list_attacks() -> list[str]:
    """Registered attack names (``foolbox:<Name>`` is open-ended and listed separately)."""
    return ATTACKS.names()


def create_attack(
    name: str,
    *,
    norm: str = "Linf",
    eps: str | float | None = None,
    dataset: str | None = None,
    **params: Any,
) -> Attack:
    """Build an attack by name, preset file or ``foolbox:<Name>``.

    ``eps`` may be ``"8/255"`` or a float; when None the dataset's conventional budget is used.
    ``params`` override the preset's parameters (e.g. ``steps=50`` for ``pgd``).
    """
    threat = ThreatModel.create(norm, eps, dataset)
    if name.startswith("foolbox:"):
        from robustkit.attacks.foolbox_adapter import FoolboxAttack

        return FoolboxAttack(threat, attack_name=name.split(":", 1)[1], **params)
    if name.endswith(".toml"):
        preset = read_preset(name)
    else:
        try:
            preset = ATTACKS.get(name).factory()
        except UnknownNameError:
            raise UnknownNameError("attack", name, [*ATTACKS.names(), "foolbox:<AttackName>"]) from None
    merged = _merge(preset["params"], params)
    cls = KINDS.get(preset["attack"]).factory
    try:
        return cls(threat, **merged)
    except TypeError as e:
        raise ConfigError(f"bad parameters for attack {name!r}: {e}") from None


def attack_from_config(config: dict[str, Any]) -> Attack:
    """Rebuild an attack from the ``attack_config`` a result recorded (``Attack.config()``).

    A regression re-run must use the protocol the baseline was measured with, not whatever the
    preset of the same name says today, so this reads only the recorded config (which holds the
    norm, eps and every hyperparameter) and checks the rebuilt attack reports the same config.
    ``implementation`` (the pyautoattack version) is not a parameter and may differ.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"attack config must be a JSON object, got {type(config).__name__}")
    missing = [k for k in ("name", "norm", "eps") if k not in config]
    if missing:
        raise ConfigError(f"attack config lacks {', '.join(missing)}")
    kind = config["name"]
    threat = ThreatModel.create(config["norm"], config["eps"])
    params = {k: v for k, v in config.items() if k not in ("name", "norm", "eps", "implementation")}
    if isinstance(kind, str) and kind.startswith("foolbox:"):
        from robustkit.attacks.foolbox_adapter import FoolboxAttack

        cls: Any = FoolboxAttack
    elif isinstance(kind, str) and kind in KINDS:
        cls = KINDS.get(kind).factory
    else:
        raise UnknownNameError("attack kind", str(kind), [*KINDS.names(), "foolbox:<AttackName>"])
    try:
        attack = cls.from_config(threat, params)
    except TypeError as e:
        raise ConfigError(f"attack config for {kind!r} does not fit the attack: {e}") from None
    rebuilt = {k: v for k, v in attack.config().items() if k != "implementation"}
    recorded = {k: v for k, v in config.items() if k != "implementation"}
    if rebuilt != recorded:
        diff = sorted(k for k in rebuilt.keys() | recorded.keys() if rebuilt.get(k) != recorded.get(k))
        raise ConfigError(f"attack config for {kind!r} does not round-trip (differs in {', '.join(diff)})")
    return attack


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


_import_modules()
_register_presets()

__all__ = [
    "ATTACKS", "KINDS", "AdaptiveAutoAttack", "Attack", "AutoAttack", "FGSM", "PGD", "attack_from_config",
    "create_attack", "list_attacks", "perturbation_norms", "project", "read_preset", "register_attack",
]

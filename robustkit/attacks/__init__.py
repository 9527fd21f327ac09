"""The attack registry: built-in attacks, TOML presets and ``foolbox:<Name>``.

Names users type (``robustkit list attacks``):
- ``fgsm``, ``pgd``: robustkit's own Linf/L2 attacks;
- presets from ``attacks/*.toml`` (shipped inside the package): ``autoattack``,
  ``autoattack-plus``, ``autoattack-rand``, ``apgd-ce``, ``apgd-t`` — each names an attack kind
  and its parameters, so the protocol a number was measured with is a reviewable file;
- ``foolbox:<AttackName>``: any fixed-epsilon foolbox 3 attack;
- a path to a preset ``.toml`` file of your own.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustkit.attacks.autoattack import AutoAttack
from robustkit.attacks.base import Attack, perturbation_norms, project
from robustkit.attacks.pgd import FGSM, PGD
from robustkit.errors import ConfigError, UnknownNameError
from robustkit.registry import Registry
from robustkit.threat import ThreatModel

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "attacks"

# Attack kinds a preset may name; each maps (threat, **params) to an Attack.
KINDS: dict[str, Callable[..., Attack]] = {"autoattack": AutoAttack, "pgd": PGD, "fgsm": FGSM}

ATTACKS: Registry[dict[str, Any]] = Registry("attack")


def _register_builtin() -> None:
    ATTACKS.register("fgsm", lambda: {"attack": "fgsm", "params": {}},
                     "FGSM (one signed-gradient step of size eps; --attack-arg random_start=true for FGSM-RS)")
    ATTACKS.register("pgd", lambda: {"attack": "pgd", "params": {}},
                     "PGD, 20 steps of 2.5*eps/20 from a random start (Madry et al.); Linf or L2")
    for path in sorted(PRESET_DIR.glob("*.toml")):
        preset = read_preset(path)
        ATTACKS.register(path.stem, lambda p=preset: p, preset.get("description", ""), path=str(path))


def read_preset(path: str | Path) -> dict[str, Any]:
    """Parse and validate a preset file: ``attack = "<kind>"`` plus a ``[params]`` table."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"attack preset not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"malformed attack preset {p}: {e}") from None
    kind = data.get("attack")
    if kind not in KINDS:
        raise ConfigError(f"attack preset {p}: 'attack' must be one of {', '.join(KINDS)}, got {kind!r}")
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
    try:
        return KINDS[preset["attack"]](threat, **merged)
    except TypeError as e:
        raise ConfigError(f"bad parameters for attack {name!r}: {e}") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


_register_builtin()

__all__ = [
    "ATTACKS", "Attack", "AutoAttack", "FGSM", "PGD", "create_attack", "list_attacks",
    "perturbation_norms", "project", "read_preset",
]

"""The attack registry: built-in attacks, TOML presets and ``foolbox:<Name>``.

Names users type (``robustkit list attacks``):
- ``fgsm``, ``pgd``: robustkit's own Linf/L2 attacks;
- presets from ``attacks/*.toml`` (shipped inside the package): ``autoattack``,
  ``autoattack-plus``, ``autoattack-rand``, ``autoattack-adaptive`` (for adaptive-smoothing
  models), ``apgd-ce``, ``apgd-t`` — each names an attack kind
  and its parameters, so the protocol a number was measured with is a reviewable file;
- ``foolbox:<AttackName>``: any fixed-epsilon foolbox 3 attack;
- a path to a preset ``.toml`` file of your own.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustkit.attacks.adaptive import AdaptiveAutoAttack
from robustkit.attacks.autoattack import AutoAttack
from robustkit.attacks.base import Attack, perturbation_norms, project
from robustkit.attacks.pgd import FGSM, PGD
from robustkit.core.errors import ConfigError, UnknownNameError
from robustkit.core.registry import Registry
from robustkit.core.threat import ThreatModel

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "attacks"

# Attack kinds a preset may name; each maps (threat, **params) to an Attack.
KINDS: dict[str, Callable[..., Attack]] = {"autoattack": AutoAttack, "pgd": PGD, "fgsm": FGSM,
                                           "autoattack-adaptive": AdaptiveAutoAttack}

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
    try:
        if isinstance(kind, str) and kind.startswith("foolbox:"):
            attack = _foolbox_from_config(threat, params)
        elif kind in ("autoattack", "autoattack-adaptive"):
            version = params.get("version", "standard")
            extra = {"w": params["w"]} if kind == "autoattack-adaptive" and "w" in params else {}
            attack = KINDS[kind](threat, version=version, overrides=params.get("overrides"),
                                 attacks=params.get("stages") if version == "custom" else None, **extra)
        elif kind in KINDS:
            attack = KINDS[kind](threat, **params)
        else:
            raise UnknownNameError("attack kind", str(kind), [*KINDS, "foolbox:<AttackName>"])
    except TypeError as e:
        raise ConfigError(f"attack config for {kind!r} does not fit the attack: {e}") from None
    rebuilt = {k: v for k, v in attack.config().items() if k != "implementation"}
    recorded = {k: v for k, v in config.items() if k != "implementation"}
    if rebuilt != recorded:
        diff = sorted(k for k in rebuilt.keys() | recorded.keys() if rebuilt.get(k) != recorded.get(k))
        raise ConfigError(f"attack config for {kind!r} does not round-trip (differs in {', '.join(diff)})")
    return attack


def _foolbox_from_config(threat: ThreatModel, params: dict[str, Any]) -> Attack:
    """foolbox configs list every constructor argument, some as repr() strings; pass back only
    those that differ from the defaults (the config check then catches anything lost)."""
    from robustkit.attacks.foolbox_adapter import FoolboxAttack

    name = params.get("attack_name")
    if not isinstance(name, str):
        raise ConfigError("foolbox attack config lacks attack_name")
    defaults = FoolboxAttack(threat, attack_name=name).config()["attack_kwargs"]
    recorded = params.get("attack_kwargs") or {}
    return FoolboxAttack(threat, attack_name=name,
                         **{k: v for k, v in recorded.items() if defaults.get(k) != v})


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
    "ATTACKS", "AdaptiveAutoAttack", "Attack", "AutoAttack", "FGSM", "PGD", "attack_from_config", "create_attack", "list_attacks",
    "perturbation_norms", "project", "read_preset",
]

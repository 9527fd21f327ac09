"""Run any foolbox 3 attack under the robustkit harness.

foolbox gives us a large, independently written attack zoo to cross-check our own attacks
against. The adapter only translates: it refuses attacks whose norm differs from the threat
model (their "robust accuracy" would be for another ball), seeds foolbox's global-RNG random
starts from the harness seed, and keeps foolbox's ``loss.backward()`` from leaving gradients on
the model's parameters.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn

from robustkit.attacks.base import Attack
from robustkit.core.errors import ConfigError, UnknownNameError
from robustkit.core.threat import ThreatModel

_NORM_P = {"Linf": math.inf, "L2": 2.0}


def _foolbox() -> ModuleType:
    """Import foolbox on first use, so robustkit works without it until a foolbox attack runs."""
    try:
        with warnings.catch_warnings():  # foolbox 3.3 imports a deprecated scipy namespace
            warnings.simplefilter("ignore", DeprecationWarning)
            import foolbox
    except ImportError as exc:
        raise ConfigError(
            "foolbox attacks need the foolbox package; install it with `pip install foolbox`"
        ) from exc
    return foolbox


def _attack_classes() -> dict[str, type]:
    """Concrete attack classes exported by ``foolbox.attacks``, by class name."""
    fb = _foolbox()
    base = fb.attacks.base.Attack
    return {
        name: obj
        for name, obj in vars(fb.attacks).items()
        if inspect.isclass(obj) and issubclass(obj, base) and not inspect.isabstract(obj)
    }


def foolbox_attack_names() -> list[str]:
    """Names of the foolbox fixed-epsilon attacks (those that search within a given eps)."""
    fixed = _foolbox().attacks.base.FixedEpsilonAttack
    return sorted(name for name, cls in _attack_classes().items() if issubclass(cls, fixed))


def _json_value(value: Any) -> Any:
    """A JSON-friendly rendering of a foolbox hyperparameter (repr for anything exotic)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    return repr(value)


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on the model's parameters for the duration of the block.

    eagerpy computes input gradients with ``loss.backward()``, which would otherwise accumulate
    into every parameter's ``.grad`` (and cost a weight-gradient pass we do not need).
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class FoolboxAttack(Attack):
    """A foolbox attack chosen by class name, e.g. ``FoolboxAttack(threat, "LinfPGD", steps=50)``.

    Keyword arguments go to the foolbox constructor. Minimisation attacks are accepted too:
    foolbox clips their result to eps. The returned examples are foolbox's ``clipped`` output.
    """

    def __init__(self, threat: ThreatModel, attack_name: str = "LinfPGD", **attack_kwargs: Any) -> None:
        super().__init__(threat)
        classes = _attack_classes()
        if attack_name not in classes:
            raise UnknownNameError("foolbox attack", attack_name, classes)
        cls = classes[attack_name]
        try:
            attack = cls(**attack_kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad options for foolbox attack {attack_name}: {exc}") from exc
        self.attack_name = attack_name
        self.attack_kwargs = dict(attack_kwargs)
        self.name = f"foolbox:{attack_name}"
        self._attack = attack
        self._check_norm()

    def _check_norm(self) -> None:
        """Refuse an attack whose distance is not the threat model's norm."""
        fb = _foolbox()
        try:
            distance = self._attack.distance
        except (AttributeError, ValueError, NotImplementedError) as exc:
            raise ConfigError(
                f"foolbox attack {self.attack_name} has no Lp distance, so it cannot be run "
                f"under a {self.norm} threat model ({exc})"
            ) from exc
        p = getattr(distance, "p", None)
        if not isinstance(distance, fb.distances.LpDistance) or p != _NORM_P[self.norm]:
            raise ConfigError(
                f"foolbox attack {self.attack_name} works in the {distance} but the threat model "
                f"is {self.norm}; pick a foolbox attack for {self.norm}"
            )

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, stage: str, seed: int
    ) -> torch.Tensor:
        if stage != self.name:
            raise ValueError(f"{self.name} has the single stage {self.name!r}, got {stage!r}")
        x = x.detach()
        if x.shape[0] == 0:
            return x.clone()
        fb = _foolbox()
        # foolbox draws random starts from the global RNG; the harness shields the caller's state.
        torch.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
        with _frozen_parameters(model), torch.enable_grad():
            _raw, clipped, _success = self._attack(fmodel, x, y.detach(), epsilons=self.eps)
        return clipped.detach().to(dtype=x.dtype)

    @classmethod
    def from_config(cls, threat: ThreatModel, params: dict[str, Any]) -> Attack:
        """The config lists every constructor argument, some as repr() strings: pass back only those
        that differ from the defaults (the caller's round-trip check then catches anything lost)."""
        name = params.get("attack_name")
        if not isinstance(name, str):
            raise ConfigError("foolbox attack config lacks attack_name")
        defaults = cls(threat, attack_name=name).config()["attack_kwargs"]
        recorded = params.get("attack_kwargs") or {}
        return cls(threat, attack_name=name, **{k: v for k, v in recorded.items() if defaults.get(k) != v})

    def config(self) -> dict[str, Any]:
        """Every constructor argument of the foolbox attack, defaults included."""
        params: dict[str, Any] = {}
        for pname, param in inspect.signature(type(self._attack).__init__).parameters.items():
            if pname == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if pname in self.attack_kwargs:
                value = self.attack_kwargs[pname]
            else:
                value = getattr(self._attack, pname, param.default)
            if value is inspect.Parameter.empty:
                continue
            params[pname] = _json_value(value)
        return {**super().config(), "attack_name": self.attack_name, "attack_kwargs": params}

"""AutoAttack through the reference implementation (PyPI ``pyautoattack``).

robustkit does not re-implement APGD, FAB or Square: numbers must agree with the reference.
What it replaces is the *driver* (``AutoAttack.run_standard_evaluation``): the harness runs the
same survivor cascade with the same batching and the same per-call seeding, so per-example
results are identical to calling pyautoattack directly, while adding what the reference lacks —
working resume, per-stage records, budget checks, pass counts and an untouched caller RNG.

This module mirrors the per-stage dispatch of ``pyautoattack.autoattack.AutoAttack`` (0.2.0):
which attacker object runs each stage and which attributes are set before ``perturb``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustkit.attacks.base import Attack, register_attack
from robustkit.core.errors import ConfigError
from robustkit.core.threat import ThreatModel

VERSIONS: dict[str, list[str]] = {
    "standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
    "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
    "rand": ["apgd-ce", "apgd-dlr"],
}
SUB_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
# Attribute prefixes accepted in overrides, e.g. {"apgd.n_restarts": 1, "square.n_queries": 500}.
OVERRIDE_TARGETS = ("apgd", "apgd_targeted", "fab", "square")
# Every stage of every version reduced to a couple of iterations, one restart and one target
# class: what the registry tests run (the presets' own overrides are merged under these).
SMOKE_OVERRIDES: dict[str, Any] = {
    "apgd.n_iter": 2, "apgd.n_restarts": 1, "apgd.eot_iter": 1,
    "apgd_targeted.n_iter": 2, "apgd_targeted.n_restarts": 1, "apgd_targeted.n_target_classes": 1,
    "fab.n_iter": 2, "fab.n_restarts": 1, "fab.n_target_classes": 1,
    "square.n_queries": 5, "square.n_restarts": 1,
}


# The user-facing names (autoattack, autoattack-plus, apgd-ce, ...) are presets: attacks/*.toml.
@register_attack("autoattack", smoke={"overrides": SMOKE_OVERRIDES},
                 description="AutoAttack through pyautoattack, stage by stage (standard/plus/rand/custom)")
class AutoAttack(Attack):
    """Standard/plus/rand/custom AutoAttack (Croce & Hein, 2020) run stage by stage.

    Args:
        threat: Linf or L2 ball.
        version: ``standard`` (the RobustBench protocol), ``plus``, ``rand`` or ``custom``.
        attacks: stage list for ``custom`` (subset of apgd-ce, apgd-dlr, fab, square, apgd-t, fab-t).
        overrides: attributes set on pyautoattack's attacker objects after the version is
            applied, as ``{"apgd.n_restarts": 1}``. ``custom`` keeps pyautoattack's constructor
            defaults (5 APGD restarts!), so presets state restarts explicitly.
    """

    name = "autoattack"
    engine = "reference"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        version: str = "standard",
        attacks: list[str] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(threat)
        if version not in (*VERSIONS, "custom"):
            raise ConfigError(
                f"unknown AutoAttack version {version!r}; use standard, plus, rand or custom"
            )
        if version == "custom":
            if not attacks:
                raise ConfigError("AutoAttack version 'custom' needs a non-empty attacks list")
            bad = [a for a in attacks if a not in SUB_ATTACKS]
            if bad:
                raise ConfigError(
                    f"unknown AutoAttack sub-attack(s) {bad}; choose from {', '.join(SUB_ATTACKS)}"
                )
            self._stages = list(attacks)
        else:
            if attacks:
                raise ConfigError("an attacks list needs version='custom'")
            self._stages = list(VERSIONS[version])
        self.version = version
        self.overrides = dict(overrides or {})
        for key in self.overrides:
            target, _, attr = key.partition(".")
            if target not in OVERRIDE_TARGETS or not attr:
                raise ConfigError(
                    f"bad AutoAttack override {key!r}; write '<obj>.<attribute>' with obj in "
                    f"{', '.join(OVERRIDE_TARGETS)}"
                )
        self._aa: Any = None
        self._seed = 0

    def stages(self) -> list[str]:
        return list(self._stages)

    @classmethod
    def from_config(cls, threat: ThreatModel, params: dict[str, Any]) -> Attack:
        """The config records the stages every version runs; only ``custom`` takes them back."""
        params = dict(params)
        version = params.pop("version", "standard")
        stages = params.pop("stages", None)
        return cls(threat, version=version, attacks=stages if version == "custom" else None, **params)

    def config(self) -> dict[str, Any]:
        import pyautoattack

        return {
            "name": self.name,
            "norm": self.norm,
            "eps": self.eps,
            "version": self.version,
            "stages": self.stages(),
            "overrides": dict(self.overrides),
            "implementation": f"pyautoattack {pyautoattack.__version__}",
        }

    def prepare(self, model: nn.Module, device: torch.device, *, seed: int = 0) -> None:
        try:
            import pyautoattack
        except ImportError:  # pragma: no cover - a declared dependency
            raise ConfigError("AutoAttack needs the 'pyautoattack' package: pip install pyautoattack") from None
        self._seed = int(seed)
        aa = pyautoattack.AutoAttack(
            model,
            attacks=self._stages if self.version == "custom" else None,
            device=device,
            eps=self.eps,
            norm=self.norm,
            seed=self._seed,
            version=self.version,
        )
        for key, value in self.overrides.items():
            target, _, attr = key.partition(".")
            obj = getattr(aa, target)
            if not hasattr(obj, attr):
                raise ConfigError(f"AutoAttack override {key!r}: {type(obj).__name__} has no {attr!r}")
            setattr(obj, attr, value)
        self._aa = aa

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, stage: str, seed: int
    ) -> torch.Tensor:
        # AutoAttack seeds every perturb call with the same run seed (not the per-batch one), and
        # runs its attackers under no_grad (they enable grad where they need it): reproducing
        # both is what makes our per-example flags equal the reference's.
        if self._aa is None:
            raise RuntimeError("AutoAttack.prepare() must be called before perturb()")
        with torch.no_grad():
            return self._dispatch(x, y, stage)

    def _dispatch(self, x: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
        aa = self._aa
        if stage in ("apgd-ce", "apgd-dlr"):
            aa.apgd.loss = "ce" if stage == "apgd-ce" else "dlr"
            aa.apgd.seed = self._seed
            return aa.apgd.perturb(x, y)
        if stage == "apgd-t":
            aa.apgd_targeted.seed = self._seed
            return aa.apgd_targeted.perturb(x, y)
        if stage == "fab":
            aa.fab.targeted = False
            aa.fab.seed = self._seed
            return aa.fab.perturb(x, y)
        if stage == "fab-t":
            aa.fab.targeted = True
            aa.fab.n_restarts = 1
            aa.fab.seed = self._seed
            return aa.fab.perturb(x, y)
        if stage == "square":
            aa.square.seed = self._seed
            return aa.square.perturb(x, y)
        raise ConfigError(f"unknown AutoAttack stage {stage!r}")


def bare_autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
                    version: str, seed: int, batch_size: int, device: torch.device) -> list[bool]:
    """Per-example robust flags from pyautoattack's own driver (the reference)."""
    import pyautoattack

    adversary = pyautoattack.AutoAttack(model, norm=norm, eps=eps, version=version, seed=seed, device=device)
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    with torch.no_grad():
        flags = []
        for lo in range(0, len(y), batch_size):
            pred = model(x_adv[lo:lo + batch_size].to(device)).max(dim=1)[1].cpu()
            flags.extend((pred == y[lo:lo + batch_size]).tolist())
    return flags

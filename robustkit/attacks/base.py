"""The attack protocol the harness drives.

An attack is split into *stages* (AutoAttack has four: apgd-ce, apgd-t, fab-t, square; a PGD
attack has one). The harness, not the attack, owns batching, the survivor cascade (a stage only
sees points every earlier stage failed to break), the budget check, re-prediction, records and
resume. That keeps every attack — ours, pyautoattack's, foolbox's — checked the same way.

Attacks register themselves in their own file with :func:`register_attack` (every module of
:mod:`robustkit.attacks` is imported, so a new attack is one file, plus an optional preset).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from robustkit.core.plugins import load_plugins
from robustkit.core.registry import Registry
from robustkit.core.threat import ThreatModel, format_eps


class Attack(abc.ABC):
    """Base class of all registered attacks.

    Subclasses set ``name`` and implement :meth:`perturb`. Hyperparameters go into the
    constructor and are reported by :meth:`config` so a result JSON records every one of them.
    """

    name: str = "attack"
    # True when an example's result does not depend on which examples share its batch: the harness
    # then also passes ``example_seeds`` (one seed per example, from the run seed, the stage and the
    # example's index) and the attack draws each example's randomness from its own seed only. Its
    # flags are then the same at any batch size, order or sharding (``--shard`` + ``merge``).
    batch_invariant: bool = False
    # Which AutoAttack engine produced a number, for the AutoAttack family only (None otherwise):
    # "reference" (pyautoattack, RobustBench-comparable), "rk" (the standard protocol on robustkit's
    # engine), "fast" (the screening version) or "custom". Recorded in the result JSON; what
    # `leaderboard add` and `regress` key on.
    engine: str | None = None

    def __init__(self, threat: ThreatModel) -> None:
        self.threat = threat

    @property
    def norm(self) -> str:
        return self.threat.norm

    @property
    def eps(self) -> float:
        return self.threat.eps

    def stages(self) -> list[str]:
        """Names of the stages, in the order the survivor cascade runs them."""
        return [self.name]

    def prepare(self, model: nn.Module, device: torch.device, *, seed: int = 0) -> None:  # noqa: B027
        """Bind to the model once before the first stage (AutoAttack builds its attackers here).

        ``seed`` is the run seed; attacks that must reproduce another implementation's seeding
        (AutoAttack seeds every batch with the same value) use it instead of the per-batch one.
        """

    @abc.abstractmethod
    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, stage: str, seed: int
    ) -> torch.Tensor:
        """Return adversarial examples for one batch of one stage.

        ``seed`` is derived by the harness from the run seed, the stage and the batch, so a
        resumed run replays exactly the randomness it would have used. Implementations must take
        randomness only from it (or from a generator seeded with it); the harness shields the
        caller's global RNG state around the call. A ``batch_invariant`` attack also takes the
        keyword ``example_seeds`` (int64, one per example) and uses those instead.
        """

    def config(self) -> dict[str, Any]:
        """Every hyperparameter, JSON-serialisable (recorded in the result)."""
        return {"name": self.name, "norm": self.norm, "eps": self.eps}

    @classmethod
    def from_config(cls, threat: ThreatModel, params: dict[str, Any]) -> Attack:
        """Rebuild the attack a result recorded: ``params`` is :meth:`config` less name, norm and eps.

        The default passes them back to the constructor, which fits any attack whose config keys
        are its keyword arguments; override it where they differ (AutoAttack records ``stages``)."""
        return cls(threat, **params)

    def __repr__(self) -> str:
        extra = ", ".join(
            f"{k}={v!r}" for k, v in self.config().items() if k not in ("name", "norm", "eps")
        )
        sep = ", " if extra else ""
        return f"{type(self).__name__}({self.norm}, eps={format_eps(self.eps)}{sep}{extra})"


# Attack kinds: the classes a preset's ``attack = "<kind>"`` (and a result's recorded config) names.
KINDS: Registry[Attack] = Registry("attack kind", before_lookup=load_plugins)
# Names users type (``--attack NAME``), each a kind plus parameters: an attack's own name
# (``register_attack(..., name=...)``) or a preset file. Lookups import the plug-ins first.
ATTACKS: Registry[dict[str, Any]] = Registry("attack", before_lookup=load_plugins)

A = TypeVar("A", bound=type[Attack])


def register_attack(kind: str, *, name: str | None = None, description: str = "",
                    smoke: dict[str, Any] | None = None) -> Callable[[A], A]:
    """Class decorator: register an :class:`Attack` subclass as ``kind``.

    ``name``: also offer it as ``--attack NAME`` with its constructor defaults (leave it out when
    presets name the kind's configurations, as AutoAttack's do). ``description``: what
    ``robustkit list attacks`` shows (default: the class docstring's first line). ``smoke``:
    parameters that make a run take well under a second on a tiny model (the registry tests run
    every registered attack with them, so a new attack is tested without a test file naming it)."""

    def wrap(cls: A) -> A:
        text = description or ((cls.__doc__ or "").strip().splitlines() or [""])[0]
        KINDS.register(kind, cls, text, smoke=dict(smoke or {}))
        if name is not None:
            ATTACKS.register(name, lambda: {"attack": kind, "params": {}}, text)
        return cls

    return wrap


def project(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Project ``x_adv`` onto the threat ball around ``x`` and then onto [0, 1]."""
    delta = x_adv - x
    if threat.norm == "Linf":
        delta = delta.clamp(-threat.eps, threat.eps)
    else:
        norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        factor = (threat.eps / norms).clamp(max=1.0)
        delta = delta * factor.view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


def perturbation_norms(x_adv: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example Linf and L2 norms of ``x_adv - x`` (computed in float64 for the budget check)."""
    d = (x_adv.detach().double() - x.detach().double()).flatten(1)
    return d.abs().amax(dim=1) if d.shape[1] else d.new_zeros(d.shape[0]), d.norm(p=2, dim=1)

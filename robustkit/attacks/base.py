"""The attack protocol the harness drives.

An attack is split into *stages* (AutoAttack has four: apgd-ce, apgd-t, fab-t, square; a PGD
attack has one). The harness, not the attack, owns batching, the survivor cascade (a stage only
sees points every earlier stage failed to break), the budget check, re-prediction, records and
resume. That keeps every attack — ours, pyautoattack's, foolbox's — checked the same way.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from robustkit.core.threat import ThreatModel, format_eps


class Attack(abc.ABC):
    """Base class of all registered attacks.

    Subclasses set ``name`` and implement :meth:`perturb`. Hyperparameters go into the
    constructor and are reported by :meth:`config` so a result JSON records every one of them.
    """

    name: str = "attack"

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
        caller's global RNG state around the call.
        """

    def config(self) -> dict[str, Any]:
        """Every hyperparameter, JSON-serialisable (recorded in the result)."""
        return {"name": self.name, "norm": self.norm, "eps": self.eps}

    def __repr__(self) -> str:
        extra = ", ".join(
            f"{k}={v!r}" for k, v in self.config().items() if k not in ("name", "norm", "eps")
        )
        sep = ", " if extra else ""
        return f"{type(self).__name__}({self.norm}, eps={format_eps(self.eps)}{sep}{extra})"


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

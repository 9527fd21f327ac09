"""AutoAttack that also attacks the mixing network of an adaptive-smoothing model.

Against a ``MixedClassifier`` (Bai et al., arXiv 2301.12554) standard AutoAttack only sees the
mixed output; the adversary can do better by also pushing the mixing weight alpha = sigmoid(gamma)
towards the non-robust model. The paper's adaptive APGD therefore maximises
``base loss + w * BCEWithLogits(gamma, 1)`` (a larger BCE means a smaller gamma).

We keep the reference APGD (its step-size schedule, restarts, targets and seeding) and only swap
the loss, through pyautoattack's documented hook for foreign models: with ``is_tf_model=True`` APGD
calls ``model.predict(x)`` and ``model.get_logits_loss_grad_{xent,dlr,target}`` which return
``(logits, per-example loss, input gradient)``. :class:`GammaLossModel` implements that hook on a
torch model with ``forward_with_gamma``. With ``w = 0`` its losses are CE, DLR and targeted DLR
exactly as pyautoattack defines them, so the attack reproduces standard AutoAttack per example.
FAB-T and Square are unchanged and attack the plain forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attacks.autoattack import SMOKE_OVERRIDES, AutoAttack
from robustkit.attacks.base import register_attack
from robustkit.core.errors import ConfigError
from robustkit.core.threat import ThreatModel


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (APGD-CE's loss)."""
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, eq. 3), APGD-DLR's loss.

    The operations mirror the reference's order (a masked sum, not a ``where``) so the input
    gradient is bitwise the same: that is what makes ``w = 0`` reproduce standard AutoAttack.
    """
    z, order = logits.sort(dim=1)
    y_on_top = (order[:, -1] == y).float()
    rows = torch.arange(logits.shape[0], device=logits.device)
    margin = logits[rows, y] - z[:, -2] * y_on_top - z[:, -1] * (1.0 - y_on_top)
    return -margin / (z[:, -1] - z[:, -3] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (APGD-T's loss): push the target's logit above the true class's."""
    z, _ = logits.sort(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    margin = logits[rows, y] - logits[rows, y_target]
    return -margin / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


def gamma_bce(gamma: torch.Tensor) -> torch.Tensor:
    """``BCEWithLogits(gamma, 1)`` per example: large when the mixer favours the standard model."""
    gamma = gamma.reshape(gamma.shape[0], -1)[:, 0] if gamma.dim() > 1 else gamma
    return F.binary_cross_entropy_with_logits(gamma, torch.ones_like(gamma), reduction="none")


def has_gamma(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_with_gamma", None))


def require_gamma(model: nn.Module, attack_name: str = "autoattack-adaptive") -> None:
    """Fail early and clearly on a model the adaptive attack cannot read gamma from."""
    if not has_gamma(model):
        raise ConfigError(
            f"attack {attack_name!r} needs a model with forward_with_gamma(x) -> (logits, gamma), "
            f"i.e. an adaptive-smoothing MixedClassifier; {type(model).__name__} has none "
            "(use --attack autoattack for other models)"
        )


class GammaLossModel:
    """pyautoattack's foreign-model interface on a torch model with ``forward_with_gamma``.

    Each call is one forward and one backward through ``model`` (so a ``PassCounter`` counts it
    like the standard path does); the gradient is of the summed per-example loss, as in APGD.
    """

    def __init__(self, model: nn.Module, w: float) -> None:
        require_gamma(model)
        self.model = model
        self.w = float(w)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    def loss(self, logits: torch.Tensor, gamma: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``base + w * BCE(gamma, 1)``; with ``w = 0`` the base loss untouched (bitwise)."""
        return base + self.w * gamma_bce(gamma) if self.w != 0.0 else base

    def _run(self, x: torch.Tensor, base: Callable[[torch.Tensor], torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits, gamma = self.model.forward_with_gamma(xg)
            loss = self.loss(logits, gamma, base(logits))
            grad = torch.autograd.grad(loss.sum(), [xg])[0]
        return logits.detach(), loss.detach(), grad.detach()

    def get_logits_loss_grad_xent(self, x: torch.Tensor, y: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._run(x, lambda z: ce_loss(z, y))

    def get_logits_loss_grad_dlr(self, x: torch.Tensor, y: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._run(x, lambda z: dlr_loss(z, y))

    def get_logits_loss_grad_target(self, x: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._run(x, lambda z: targeted_dlr_loss(z, y, y_target))


# Offered to users as the preset attacks/autoattack-adaptive.toml (w = 0.5, the paper's value).
@register_attack("autoattack-adaptive", smoke={"overrides": SMOKE_OVERRIDES},
                 description="AutoAttack whose APGD losses add w*BCE(gamma, 1) on an adaptive-smoothing mixer")
class AdaptiveAutoAttack(AutoAttack):
    """AutoAttack whose APGD stages maximise ``loss + w * BCEWithLogits(gamma, 1)``.

    Same versions, stages, overrides, batching and seeding as :class:`AutoAttack`; only the APGD
    losses (apgd-ce, apgd-dlr, apgd-t) change. Needs a model with ``forward_with_gamma``.

    Args:
        w: weight of the mixing-network term (0.5 in the paper; 0 is standard AutoAttack).
    """

    name = "autoattack-adaptive"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        w: float = 0.5,
        version: str = "standard",
        attacks: list[str] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(threat, version=version, attacks=attacks, overrides=overrides)
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"autoattack-adaptive: w must be a finite number >= 0, got {w!r}")
        self.w = float(w)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "w": self.w}

    def check_model(self, model: nn.Module) -> None:
        """Called by the CLI before data loads, so a wrong model fails at once."""
        require_gamma(model, self.name)

    def prepare(self, model: nn.Module, device: torch.device, *, seed: int = 0) -> None:
        require_gamma(model, self.name)
        super().prepare(model, device, seed=seed)
        adapter = GammaLossModel(model, self.w)
        for apgd in (self._aa.apgd, self._aa.apgd_targeted):
            apgd.model = adapter
            apgd.is_tf_model = True

"""Our own white-box gradient attacks: FGSM (optionally with a random start) and PGD.

They exist so robustkit has a dependency-free baseline whose every hyperparameter is recorded,
and so results can be cross-checked against foolbox and AutoAttack. Randomness comes only from a
``torch.Generator`` seeded with the harness seed, and input gradients come from
``torch.autograd.grad`` so no gradient is ever accumulated into model parameters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attacks.base import Attack, project, register_attack
from robustkit.core.errors import ConfigError
from robustkit.core.threat import ThreatModel

LOSSES = ("ce", "margin")


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A private generator, so the caller's global RNG stream is never consumed."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)  # any int maps to a valid 64-bit seed
    return gen


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-example objective the attack *maximises*.

    ``ce`` is cross-entropy. ``margin`` is the Carlini-Wagner logit margin
    ``max_{j != y} z_j - z_y``: it is positive exactly when the example is misclassified and does
    not saturate like cross-entropy does on over-confident models.
    """
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        true_mask = F.one_hot(y, num_classes=logits.shape[1]).bool()
        other = logits.masked_fill(true_mask, float("-inf")).amax(dim=1)
        return other - logits.gather(1, y.unsqueeze(1)).squeeze(1)
    raise ConfigError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")


def random_start(x: torch.Tensor, threat: ThreatModel, gen: torch.Generator) -> torch.Tensor:
    """A random point of the threat ball around ``x``, clipped to [0, 1].

    Linf: uniform in the cube. L2: uniform in the ball, drawn as a Gaussian direction (uniform on
    the sphere) scaled to radius ``eps * U**(1/d)`` with ``U ~ U(0, 1)`` and ``d`` the input
    dimension; in image dimensions that radius is almost always close to ``eps``.
    """
    n = x.shape[0]
    if threat.norm == "Linf":
        u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        delta = (2.0 * u - 1.0) * threat.eps
    else:
        d = x[0].numel()
        direction = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        norms = direction.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        u = torch.rand(n, generator=gen, device=x.device, dtype=x.dtype)
        radius = threat.eps * u.pow(1.0 / d)
        delta = direction * (radius / norms).view(-1, *([1] * (x.dim() - 1)))
    return project(x + delta, x, threat)


def random_start_per_example(x: torch.Tensor, threat: ThreatModel, seeds: torch.Tensor,
                             restart: int = 0) -> torch.Tensor:
    """:func:`random_start` with each example's draw from its own seed (and the restart): the start
    of an example is the same whatever batch it is in. Drawn on the CPU (one small generator per
    example, a cost paid once per restart, not per step) and moved to ``x``'s device."""
    draws = []
    for s in seeds.tolist():
        gen = _generator(torch.device("cpu"), s + restart * 0x9E3779B97F4A7C15)  # _generator keeps 64 bits
        if threat.norm == "Linf":
            draws.append((2.0 * torch.rand(x.shape[1:], generator=gen, dtype=torch.float64) - 1.0) * threat.eps)
        else:
            direction = torch.randn(x.shape[1:], generator=gen, dtype=torch.float64)
            u = torch.rand((), generator=gen, dtype=torch.float64)
            radius = threat.eps * u.pow(1.0 / x[0].numel())
            draws.append(direction * (radius / direction.norm(p=2).clamp_min(1e-12)))
    delta = torch.stack(draws).to(device=x.device, dtype=x.dtype) if draws else torch.zeros_like(x)
    return project(x + delta, x, threat)


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign for Linf, L2-normalised gradient for L2.

    A zero gradient gives a zero step instead of NaNs (the clamp on the norm).
    """
    if norm == "Linf":
        return grad.sign()
    norms = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return grad / norms.view(-1, *([1] * (grad.dim() - 1)))


def _input_gradient(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, per-example loss and d(loss)/d(input) at ``x_adv`` (model params untouched)."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    losses = per_example_loss(logits, y, loss)
    # Summing keeps each example's gradient independent of the batch size.
    (grad,) = torch.autograd.grad(losses.sum(), x_adv)
    return logits.detach(), losses.detach(), grad


def _validate_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _validate_step_size(step_size: Any) -> float | None:
    if step_size is None:
        return None
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
        raise ConfigError(f"step_size must be a positive number, got {step_size!r}")
    value = float(step_size)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"step_size must be a positive finite number, got {step_size!r}")
    return value


def _validate_loss(loss: Any) -> str:
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    return str(loss)


def _validate_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


class _GradientAttack(Attack):
    """Shared option handling of FGSM and PGD."""

    def __init__(self, threat: ThreatModel, *, loss: str) -> None:
        super().__init__(threat)
        self.loss = _validate_loss(loss)

    def _start(self, x: torch.Tensor, seed: int, example_seeds: torch.Tensor | None, restart: int,
               gen: torch.Generator | None = None) -> torch.Tensor:
        """A random start: each example's own (the harness's ``example_seeds``) or, called
        directly without them, one draw for the batch from ``seed``."""
        if example_seeds is not None:
            return random_start_per_example(x, self.threat, example_seeds, restart)
        return random_start(x, self.threat, gen if gen is not None else _generator(x.device, seed))

    def _check_stage(self, stage: str) -> None:
        if stage != self.name:
            raise ValueError(f"{type(self).__name__} has the single stage {self.name!r}, got {stage!r}")


@register_attack("fgsm", name="fgsm", description="FGSM (one signed-gradient step of size eps; "
                 "--attack-arg random_start=true for FGSM-RS)")
class FGSM(_GradientAttack):
    """Fast gradient sign method (Goodfellow et al.); L2 uses the normalised gradient (FGM).

    With ``random_start`` it is FGSM-RS (Wong et al.): a uniform start in the ball, then one step.
    The step defaults to ``eps`` (Wong et al. use ``1.25 * eps`` with a random start; pass
    ``step_size`` to reproduce that) and the result is always projected back onto ball ∩ [0, 1].
    """

    name = "fgsm"
    batch_invariant = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        step_size: float | None = None,
        random_start: bool = False,
        loss: str = "ce",
    ) -> None:
        super().__init__(threat, loss=loss)
        given = _validate_step_size(step_size)
        self.step_size = given if given is not None else float(threat.eps)
        self.random_start = _validate_bool("random_start", random_start)

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, stage: str, seed: int,
        example_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_stage(stage)
        x = x.detach()
        if x.shape[0] == 0 or self.eps == 0:
            return x.clone()
        start = self._start(x, seed, example_seeds, 0) if self.random_start else x
        with torch.enable_grad():
            _, _, grad = _input_gradient(model, start, y, self.loss)
        step = self.step_size * ascent_direction(grad, self.norm)
        return project(start + step, x, self.threat).detach()

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "step_size": self.step_size,
            "random_start": self.random_start,
            "loss": self.loss,
        }


@register_attack("pgd", name="pgd", smoke={"steps": 2},
                 description="PGD, 20 steps of 2.5*eps/20 from a random start (Madry et al.); Linf or L2")
class PGD(_GradientAttack):
    """Projected gradient descent (Madry et al.) with restarts and best-point tracking.

    Each example keeps the first adversarial iterate found by any step of any restart; an example
    never broken keeps its highest-loss iterate. Later restarts only run on examples still
    unbroken, so restarts cost little on weak models. ``step_size`` defaults to
    ``2.5 * eps / steps`` (Madry et al.), enough to cross the ball from a random start.
    """

    name = "pgd"
    batch_invariant = True

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 20,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
    ) -> None:
        super().__init__(threat, loss=loss)
        self.steps = _validate_int("steps", steps, 1)
        given = _validate_step_size(step_size)
        self.step_size = given if given is not None else 2.5 * float(threat.eps) / self.steps
        self.random_start = _validate_bool("random_start", random_start)
        self.restarts = _validate_int("restarts", restarts, 1)
        if self.restarts > 1 and not self.random_start:
            raise ConfigError(
                "restarts > 1 needs random_start=True: without a random start every restart "
                "repeats the same deterministic run"
            )

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, stage: str, seed: int,
        example_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_stage(stage)
        x = x.detach()
        n = x.shape[0]
        if n == 0 or self.eps == 0:
            return x.clone()
        gen = _generator(x.device, seed)
        best = x.clone()
        best_loss = torch.full((n,), float("-inf"), device=x.device)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        with torch.enable_grad():
            for restart in range(self.restarts):
                pending = (~found).nonzero().squeeze(1)
                if pending.numel() == 0:
                    break
                own = None if example_seeds is None else example_seeds[pending.cpu()]
                start = (self._start(x[pending], seed, own, restart, gen) if self.random_start
                         else x[pending].clone())
                adv, loss, success = self._run_once(model, x[pending], y[pending], start)
                take = success | (loss > best_loss[pending])
                best[pending[take]] = adv[take]
                best_loss[pending[take]] = loss[take]
                found[pending[success]] = True
        return best

    def _run_once(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One PGD run from ``x_adv``: each example's kept point, its loss and whether it is adversarial."""
        best = x_adv.clone()
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        # steps + 1 evaluations: the start point and the point after every step are all candidates.
        for t in range(self.steps + 1):
            last = t == self.steps
            if last:
                with torch.no_grad():
                    logits = model(x_adv)
                    losses = per_example_loss(logits, y, self.loss)
                grad = None
            else:
                logits, losses, grad = _input_gradient(model, x_adv, y, self.loss)
            success = logits.argmax(dim=1) != y
            take = (success & ~found) | (~found & ~success & (losses > best_loss))
            best[take] = x_adv[take]
            best_loss[take] = losses[take].to(best_loss.dtype)
            found |= success
            if grad is None or bool(found.all()):
                break
            x_adv = project(x_adv + self.step_size * ascent_direction(grad, self.norm), x, self.threat)
        return best, best_loss, found

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "restarts": self.restarts,
            "loss": self.loss,
        }

"""Auto-PGD (Croce and Hein, ICML 2020), Linf and L2, on per-example randomness, with early exit.

One run (one restart) of APGD on the cross-entropy, DLR or targeted-DLR loss, with the algorithmic
details of the reference (pyautoattack's ``APGDAttack.attack_single_run``):

- start: Linf ``x + eps * t / max|t|`` with ``t`` uniform in [-1, 1]; L2 ``x + eps * t / ||t||``
  with ``t`` standard normal; clipped to [0, 1];
- step size ``2 eps``; a step goes along ``sign(grad)`` (Linf) or ``grad / ||grad||`` (L2), is
  projected onto the eps-ball and [0, 1], then mixed with the previous move (momentum 0.75, none at
  the first step) and projected again;
- checkpoints: the first after ``n_iter_2 = max(int(0.22 n_iter), 1)`` iterations, each later one
  ``size_decr = max(int(0.03 n_iter), 1)`` iterations sooner than the last, never sooner than
  ``n_iter_min = max(int(0.06 n_iter), 1)``. At a checkpoint spanning ``k`` iterations the step
  halves where the loss went up in at most ``rho * k`` of them, or where the step was not halved
  at the last checkpoint and the best loss has not risen since; a halved example jumps back to its
  highest-loss point and that point's gradient. The first checkpoint compares its first loss with
  the zero the reference's loss record is initialised with (its index ``-1`` wraps to the unused end);
  kept here, because it decides whether the step halves there;
- the highest loss seen (strictly higher replaces) is tracked per example.

What differs from the reference, on purpose:

- the random start of an example comes from :mod:`~robustkit.attacks.engine.rng`, keyed by its
  seed and the caller's ``stream`` (one per restart or target), not from a global RNG re-seeded per
  batch, so its result does not depend on its batch;
- an example leaves the working batch the moment it is misclassified and costs no more gradient
  passes; its result is that first misclassified iterate (the reference keeps iterating and returns
  the last misclassified one). An example never broken gets its highest-loss point (the reference
  returns the start there, or the clean image from ``perturb``): the most useful start for whatever
  attack comes next. Robust flags are the same as the reference's for the same start;
- an example misclassified at the start point leaves after that one pass, clean-misclassified
  ones included: the caller filters those out beforehand, as AutoAttack does;
- no warning on zero gradients (the harness has its own masking checks), no EOT, no L1, no
  ``use_largereps``; it computes in the input's dtype (the reference casts to float32).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

# The module, not its names: robustkit.attacks imports adaptive while it initialises, and an
# attack module that imports this engine at that time must not find adaptive half-built.
from robustkit.attacks import adaptive
from robustkit.attacks.engine import rng
from robustkit.core.errors import ConfigError

__all__ = ["LOSSES", "NORMS", "apgd", "apgd_targets", "checkpoints"]

NORMS = ("Linf", "L2")
LOSSES = ("ce", "dlr", "dlr-targeted")
_MIN_CLASSES = {"ce": 2, "dlr": 3, "dlr-targeted": 4}  # DLR reads the 3rd, targeted DLR the 4th logit
MOMENTUM = 0.75

# objective(x_adv, y, target) -> (logits, per-example loss to maximise), differentiable in x_adv.
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def checkpoints(n_iter: int) -> dict[int, int]:
    """``{iteration: k}``: the 0-based iterations after which the step size is checked, and how
    many iterations each check looks back over (the reference's ``counter3 == k`` rule)."""
    first, shrink, shortest = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    found, i, k = {}, first - 1, first
    while i < n_iter:
        found[i] = k
        k = max(k - shrink, shortest)
        i += k
    return found


def apgd_targets(logits: torch.Tensor, n_target_classes: int) -> torch.Tensor:
    """``[n, n_target_classes]`` target classes by logit rank of the clean logits: column k is the
    (k+2)-th largest logit (the reference: sort(...)[1][:, -target_class], target_class = 2..)."""
    n_classes = logits.shape[1]
    if isinstance(n_target_classes, bool) or not isinstance(n_target_classes, int) \
            or not 1 <= n_target_classes < n_classes:
        raise ConfigError(f"n_target_classes must be an integer in [1, {n_classes - 1}] for {n_classes} classes, "
                          f"got {n_target_classes!r}")
    # The reference's ascending sort, read from the top: ties rank exactly as they do there.
    return logits.sort(dim=1)[1].flip(1)[:, 1:n_target_classes + 1]


# --------------------------------------------------------------------------- pieces


def _check(x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor, norm: object, eps: object, loss: object,
           target: torch.Tensor | None, n_iter: object, rho: object, gamma_weight: object) -> None:
    """A ConfigError (one line) naming the first bad option; a ValueError for mis-shaped tensors."""
    if norm not in NORMS:
        raise ConfigError(f"apgd: unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    if loss not in LOSSES:
        raise ConfigError(f"apgd: unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    if (loss == "dlr-targeted") != (target is not None):
        raise ConfigError("apgd: loss 'dlr-targeted' needs target (one class per example), and only it takes one")
    for name, value, low in (("eps", eps, 0.0), ("rho", rho, 0.0), ("gamma_weight", gamma_weight, 0.0)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < low:
            raise ConfigError(f"apgd: {name} must be a finite number >= {low:g}, got {value!r}")
    if rho > 1:
        raise ConfigError(f"apgd: rho must be in [0, 1], got {rho!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ConfigError(f"apgd: n_iter must be an integer >= 1, got {n_iter!r}")
    n = x.shape[0]
    if x.dim() < 2 or y.shape != (n,) or seeds.shape != (n,) or (target is not None and target.shape != (n,)):
        raise ValueError(f"apgd needs x [n, ...], y [n], seeds [n] (and target [n]); got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(seeds.shape)}"
                         + ("" if target is None else f", {tuple(target.shape)}"))


def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[n]`` viewed as ``[n, 1, 1, ...]`` against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example Linf or L2 norm as ``[n, 1, ...]`` (L2 as the reference writes it: sqrt of a sum)."""
    flat = v.flatten(1)
    size = flat.abs().amax(dim=1) if norm == "Linf" else (flat**2).sum(dim=1).sqrt()
    return _per_example(size, v)


def _unit(v: torch.Tensor, norm: str) -> torch.Tensor:
    """``v`` over its norm (+1e-12, so a zero stays zero)."""
    return v / (_norm(v, norm) + 1e-12)


def _start(x: torch.Tensor, streams: rng.Streams, norm: str, eps: float, stream: int) -> torch.Tensor:
    """The random start: a uniform Linf direction or a Gaussian L2 one, at norm ``eps``, in [0, 1]."""
    if norm == "Linf":
        t = 2.0 * streams.uniform(0, x.shape[1:], stream=stream, dtype=x.dtype) - 1.0
    else:
        t = streams.normal(0, x.shape[1:], stream=stream, dtype=x.dtype)
    return (x + eps * _unit(t, norm)).clamp(0.0, 1.0)


def _project(x: torch.Tensor, z: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``z`` onto the eps-ball around ``x``, then onto [0, 1] (the reference's operations: a Linf
    clip, or an L2 rescale of ``z - x`` to norm ``min(eps, ||z - x||)``)."""
    if norm == "Linf":
        return torch.min(torch.max(z, x - eps), x + eps).clamp(0.0, 1.0)
    delta = z - x
    size = _norm(delta, "L2")
    return (x + delta / (size + 1e-12) * size.clamp(max=eps)).clamp(0.0, 1.0)


def _objective(model: nn.Module, loss: str, gamma_weight: float) -> Objective:
    """The per-example loss APGD maximises; with ``gamma_weight > 0`` plus ``gamma_weight *
    BCE(gamma, 1)`` from the mixer of an adaptive-smoothing model (the adaptive attack)."""
    def base(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        if logits.shape[1] < _MIN_CLASSES[loss]:  # DLR would index past the last logit
            raise ConfigError(f"apgd: loss {loss!r} needs at least {_MIN_CLASSES[loss]} classes, "
                              f"the model has {logits.shape[1]}")
        if loss == "ce":
            return adaptive.ce_loss(logits, y)
        if loss == "dlr":
            return adaptive.dlr_loss(logits, y)
        return adaptive.targeted_dlr_loss(logits, y, target)

    if gamma_weight == 0.0:
        def plain(x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(x_adv)
            return logits, base(logits, y, target)
        return plain
    adaptive.require_gamma(model, "apgd with gamma_weight > 0")

    def mixed(x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, gamma = model.forward_with_gamma(x_adv)
        return logits, base(logits, y, target) + gamma_weight * adaptive.gamma_bce(gamma)
    return mixed


def _gradient(objective: Objective, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One gradient pass: ``(logits, loss, d loss / d x_adv)``, all detached. Only the input's
    gradient is asked for, so no parameter ``.grad`` is computed or written."""
    with torch.enable_grad():
        xg = x_adv.detach().requires_grad_(True)
        logits, value = objective(xg, y, target)
        grad = torch.autograd.grad(value.sum(), [xg])[0]
    return logits.detach(), value.detach(), grad.detach()


@dataclasses.dataclass
class _Batch:
    """The working batch: per-example state of the examples not yet broken, row r being example
    ``alive[r]`` of the call. Every field is indexed on dim 0, so :meth:`select` compacts them all."""

    alive: torch.Tensor      # positions in the caller's batch
    x: torch.Tensor          # clean images
    y: torch.Tensor
    target: torch.Tensor | None
    x_adv: torch.Tensor      # current iterate
    x_prev: torch.Tensor     # the iterate before it (the momentum term is their difference)
    grad: torch.Tensor       # gradient at x_adv (or at x_best after a jump back)
    step: torch.Tensor       # [m, 1, ...] step size
    x_best: torch.Tensor     # highest-loss point so far, its gradient and loss
    grad_best: torch.Tensor
    loss_best: torch.Tensor
    losses: torch.Tensor     # [m, n_iter]: the loss of every iteration, zeros ahead (see _halve)
    best_at_check: torch.Tensor  # loss_best at the last checkpoint
    halved_at_check: torch.Tensor  # bool: the step halved at the last checkpoint

    def select(self, rows: torch.Tensor) -> _Batch:
        return _Batch(**{f.name: None if (v := getattr(self, f.name)) is None else v[rows]
                         for f in dataclasses.fields(self)})


def _halve(b: _Batch, i: int, k: int, rho: float) -> torch.Tensor:
    """Which examples halve their step at the checkpoint after iteration ``i`` (spanning ``k``):
    the loss rose in at most ``rho * k`` of the last ``k`` iterations, or the step did not halve
    last time and the best loss has not risen since. Index ``-1`` wraps to the last column, as in
    the reference: at the first checkpoint iteration 0 is compared with a zero still unwritten."""
    now = torch.arange(i - k + 1, i + 1, device=b.losses.device)
    rises = (b.losses[:, now] > b.losses[:, (now - 1) % b.losses.shape[1]]).sum(dim=1).to(b.losses.dtype)
    oscillating = rises <= k * rho
    stalled = ~b.halved_at_check & (b.best_at_check >= b.loss_best)
    return oscillating | stalled


def _take_step(b: _Batch, eps: float, norm: str, momentum: float) -> torch.Tensor:
    """The next iterate: a projected gradient step, mixed with the last move, projected again."""
    direction = b.grad.sign() if norm == "Linf" else _unit(b.grad, "L2")
    z = _project(b.x, b.x_adv + b.step * direction, eps, norm)
    return _project(b.x, b.x_adv + (z - b.x_adv) * momentum + (b.x_adv - b.x_prev) * (1 - momentum), eps, norm)


# --------------------------------------------------------------------------- the run


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, *, norm: str, eps: float,
         loss: str, target: torch.Tensor | None, n_iter: int, rho: float, gamma_weight: float
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """APGD from the given start point (already in the ball and in [0, 1]); :func:`apgd` without
    the random draw, so a test can give it the start it gives the reference."""
    objective = _objective(model, loss, gamma_weight)
    n = x.shape[0]
    out = start.detach().clone()
    passes = torch.ones(n, dtype=torch.int64, device=x.device)  # the start's pass, made for everyone
    logits, value, grad = _gradient(objective, out, y, target)
    b = _Batch(alive=torch.arange(n, device=x.device), x=x, y=y, target=target, x_adv=out, x_prev=out, grad=grad,
               step=torch.full((n,) + (1,) * (x.dim() - 1), 2.0 * eps, dtype=x.dtype, device=x.device),
               x_best=out, grad_best=grad, loss_best=value, losses=value.new_zeros(n, n_iter),
               best_at_check=value, halved_at_check=torch.ones(n, dtype=torch.bool, device=x.device))
    b = b.select((logits.argmax(dim=1) == y).nonzero().squeeze(1))  # broken at the start: done
    checks = checkpoints(n_iter)
    for i in range(n_iter):
        if b.alive.numel() == 0:
            break
        x_new = _take_step(b, eps, norm, MOMENTUM if i > 0 else 1.0)
        logits, value, grad = _gradient(objective, x_new, b.y, b.target)
        passes[b.alive] += 1
        broken = logits.argmax(dim=1) != b.y
        if bool(broken.any()):  # leaves now, with this first misclassified iterate
            out[b.alive[broken]] = x_new[broken]
            keep = (~broken).nonzero().squeeze(1)
            b, x_new, value, grad = b.select(keep), x_new[keep], value[keep], grad[keep]
        b.x_prev, b.x_adv, b.grad = b.x_adv, x_new, grad
        b.losses[:, i] = value
        better = value > b.loss_best
        b.x_best = torch.where(_per_example(better, x_new), x_new, b.x_best)
        b.grad_best = torch.where(_per_example(better, grad), grad, b.grad_best)
        b.loss_best = torch.where(better, value, b.loss_best)
        if i in checks:
            halve = _halve(b, i, checks[i], rho)
            b.best_at_check, b.halved_at_check = b.loss_best, halve
            back = _per_example(halve, x_new)
            b.step = torch.where(back, b.step / 2.0, b.step)
            b.x_adv = torch.where(back, b.x_best, b.x_adv)  # x_prev stays: the next momentum starts there
            b.grad = torch.where(back, b.grad_best, b.grad)
    out[b.alive] = b.x_best
    return out, passes


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, seeds: torch.Tensor,
         loss: str = "ce", target: torch.Tensor | None = None, n_iter: int = 100, rho: float = 0.75,
         gamma_weight: float = 0.0, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run (one restart) in the ``norm`` ball of radius ``eps`` around ``x`` (``[n, c, h, w]``
    in [0, 1]), labels ``y``; ``loss`` "ce", "dlr" or "dlr-targeted" (with ``target``, one class per
    example, e.g. a column of :func:`apgd_targets`).

    ``seeds``: int64, one per example; the random start of example e comes from its seed and
    ``stream`` only (pass a distinct stream per restart or target), so its result is the same at
    any batch size or order. ``gamma_weight > 0``: the adaptive attack, adding ``gamma_weight *
    BCE(gamma, 1)`` from ``model.forward_with_gamma``. The model's train/eval mode is left alone.

    Returns ``(x_adv, passes)``: x_adv [n,c,h,w] (the first misclassified iterate where one was
    found, else the highest-loss point, like the reference's x_best_adv), passes int64 [n] =
    gradient evaluations (forward+backward) spent on each example: at most ``n_iter + 1``.
    """
    _check(x, y, seeds, norm, eps, loss, target, n_iter, rho, gamma_weight)
    n = x.shape[0]
    if n == 0 or eps == 0:
        return x.clone(), torch.zeros(n, dtype=torch.int64, device=x.device)
    x, y = x.detach(), y.to(device=x.device, dtype=torch.int64)
    target = None if target is None else target.to(device=x.device, dtype=torch.int64)
    start = _start(x, rng.Streams(seeds.to(device=x.device)), norm, float(eps), stream)
    return _run(model, x, y, start, norm=norm, eps=float(eps), loss=loss, target=target, n_iter=n_iter,
                rho=float(rho), gamma_weight=float(gamma_weight))

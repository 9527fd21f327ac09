"""Auto-PGD with per-sample radii, and the randomized attack that trains Adaptive Smoothing.

These are building blocks (the Adaptive Smoothing trainer calls them), not registered attacks:
evaluation goes through the harness and AutoAttack. Two things differ from an evaluation APGD:

- everything is **per sample** — radius, step size, checkpoint decisions — because the
  training attack draws a different eps for every image;
- :func:`apgd` returns the **highest-loss** point seen for every sample rather than the first
  misclassified one: the trainer wants the strongest points it can find, and its loss may have
  extra terms (the mixing network's gamma) that have nothing to do with misclassification.

Randomness comes only from the ``torch.Generator`` passed in, and input gradients from
``torch.autograd.grad``, so no ``.grad`` is ever left on model parameters. Train/eval mode of the
model is the caller's business (the Adaptive Smoothing trainer attacks with eval-mode BN).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robustkit.attacks.adaptive import gamma_bce, targeted_dlr_loss
from robustkit.core.errors import ConfigError

__all__ = ["AttackDraw", "apgd", "apgd_ce_batches", "apgd_checkpoints", "dlr_targeted_loss", "randomized_attack"]

NORMS = ("Linf", "L2")

LossFn = Callable[[torch.Tensor], torch.Tensor]
ModelFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- helpers


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An (N,) tensor viewed as (N, 1, 1, ...) so it scales one sample of ``like`` each."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Project onto each sample's own ball around ``x``, then onto [0, 1].

    Clipping to [0, 1] after the ball projection cannot leave the ball: ``x`` is in [0, 1], so
    clipping only shrinks each coordinate of the perturbation.
    """
    delta = x_adv - x
    if norm == "Linf":
        e = _bcast(eps, x)
        delta = torch.maximum(torch.minimum(delta, e), -e)
    else:
        norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        delta = delta * _bcast((eps / norms).clamp(max=1.0), x)
    return (x + delta).clamp(0.0, 1.0)


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Unit steepest-ascent direction; a zero gradient gives a zero step, not NaN."""
    if norm == "Linf":
        return grad.sign()
    norms = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return grad / _bcast(norms, grad)


def _rand(shape: Sequence[int], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """U(0, 1) drawn on the generator's device (so a CPU generator works for GPU inputs)."""
    return torch.rand(tuple(shape), generator=gen, device=gen.device).to(like.device, like.dtype)


def _random_start(x: torch.Tensor, eps: torch.Tensor, norm: str, gen: torch.Generator) -> torch.Tensor:
    """A uniform point of each sample's ball (Linf cube; L2 ball via Gaussian direction)."""
    if norm == "Linf":
        delta = (2.0 * _rand(x.shape, gen, x) - 1.0) * _bcast(eps, x)
    else:
        direction = torch.randn(tuple(x.shape), generator=gen, device=gen.device).to(x.device, x.dtype)
        norms = direction.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        radius = eps * _rand((x.shape[0],), gen, x).pow(1.0 / max(x[0].numel(), 1))
        delta = direction * _bcast(radius / norms, x)
    return _project(x + delta, x, eps, norm)


def _loss_and_grad(loss_fn: LossFn, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss and its input gradient (summing keeps samples independent)."""
    x_req = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = _check_loss(loss_fn(x_req), x_adv.shape[0])
        if not loss.requires_grad:
            raise ConfigError("loss_fn(x) does not depend differentiably on x (was it run under no_grad?)")
        (grad,) = torch.autograd.grad(loss.sum(), x_req, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x_req)
    return loss.detach(), grad.detach()


def _check_loss(loss: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.shape != (n,):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigError(f"loss_fn must return a per-sample loss of shape ({n},), got {shape}")
    return loss


def _eps_tensor(eps: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    if isinstance(eps, torch.Tensor):
        if eps.dim() == 0:
            eps = eps.expand(n)
        if eps.shape != (n,):
            raise ConfigError(f"per-sample eps must have shape ({n},), got {tuple(eps.shape)}")
        e = eps.detach().to(x.device, x.dtype)
    elif isinstance(eps, (int, float)) and not isinstance(eps, bool):
        e = torch.full((n,), float(eps), device=x.device, dtype=x.dtype)
    else:
        raise ConfigError(f"eps must be a number or an (N,) tensor, got {eps!r}")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ConfigError("eps must be finite and >= 0")
    return e


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_norm(norm: object) -> str:
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    return str(norm)


# ----------------------------------------------------------------------------- APGD


def apgd_checkpoints(n_iter: int) -> list[int]:
    """Iteration counts after which APGD may halve its step (Croce & Hein 2020, Sec. 3.2).

    ``w_j = ceil(p_j * n_iter)`` with ``p_0 = 0, p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``. Duplicates (small ``n_iter``) are merged
    and the end of the run dropped, since a decision there would never be used.
    """
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # The tiny offset keeps float noise (0.22 * 100 = 22.000000000000004) from rounding up.
    ws = {math.ceil(pj * n_iter - 1e-9) for pj in p[1:]}
    return sorted(w for w in ws if 0 < w < n_iter)


def apgd(
    loss_fn: LossFn,
    x: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    n_iter: int,
    norm: str = "Linf",
    generator: torch.Generator,
    rho: float = 0.75,
    momentum: float = 0.75,
) -> torch.Tensor:
    """Auto-PGD maximising ``loss_fn`` per sample; returns each sample's highest-loss point.

    ``loss_fn(x_adv) -> (N,)`` is the loss to *maximise* (close over labels, targets, model).
    ``eps`` is a float or an (N,) tensor of per-sample radii. The run starts uniformly inside
    each ball; the step starts at ``2 * eps`` and is halved per sample at the checkpoints of
    :func:`apgd_checkpoints` when fewer than ``rho`` of the steps since the last checkpoint
    raised the loss, or when the step was not halved last time and the best loss has not
    improved since; a halving restarts that sample from its best point (with no momentum, as
    the momentum belongs to the abandoned path). The clean point is a candidate too (one extra
    forward pass), so the result's loss is never below the clean loss.
    """
    norm = _check_norm(norm)
    n_iter = _check_int("n_iter", n_iter, 1)
    if not 0.0 < float(rho) <= 1.0:
        raise ConfigError(f"rho must be in (0, 1], got {rho!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ConfigError(f"momentum must be in [0, 1], got {momentum!r}")
    x = x.detach()
    n = x.shape[0]
    e = _eps_tensor(eps, x)
    if n == 0:
        return x.clone()

    with torch.no_grad():
        best_loss = _check_loss(loss_fn(x), n).detach().clone()
    best = x.clone()

    x_cur = _random_start(x, e, norm, generator)
    loss_cur, grad = _loss_and_grad(loss_fn, x_cur)
    take = loss_cur > best_loss
    best[take], best_loss[take] = x_cur[take], loss_cur[take]
    grad_best = grad.clone()  # gradient at ``best`` for restarts; clean point: reuse the start's

    step = 2.0 * e
    x_prev = x_cur
    checkpoints = set(apgd_checkpoints(n_iter))
    last_ckpt = 0
    n_up = torch.zeros(n, device=x.device)  # steps since the last checkpoint that raised the loss
    best_at_ckpt = best_loss.clone()
    halved_last = torch.zeros(n, dtype=torch.bool, device=x.device)

    for t in range(1, n_iter + 1):
        with torch.no_grad():
            z = _project(x_cur + _bcast(step, x) * _direction(grad, norm), x, e, norm)
            if t == 1:
                x_new = z
            else:
                x_new = x_cur + momentum * (z - x_cur) + (1.0 - momentum) * (x_cur - x_prev)
                x_new = _project(x_new, x, e, norm)
        loss_new, grad_new = _loss_and_grad(loss_fn, x_new)
        with torch.no_grad():
            n_up += (loss_new > loss_cur).to(n_up.dtype)
            take = loss_new > best_loss
            best[take], best_loss[take], grad_best[take] = x_new[take], loss_new[take], grad_new[take]
            x_prev, x_cur, loss_cur, grad = x_cur, x_new, loss_new, grad_new
            if t in checkpoints:
                few_ups = n_up < rho * (t - last_ckpt)
                stalled = ~halved_last & (best_loss <= best_at_ckpt)
                halve = few_ups | stalled
                step = torch.where(halve, step / 2.0, step)
                if bool(halve.any()):
                    x_cur, x_prev, loss_cur, grad = (
                        x_cur.clone(), x_prev.clone(), loss_cur.clone(), grad.clone()
                    )
                    x_cur[halve] = best[halve]
                    x_prev[halve] = best[halve]
                    loss_cur[halve] = best_loss[halve]
                    grad[halve] = grad_best[halve]
                halved_last = halve
                best_at_ckpt = best_loss.clone()
                n_up.zero_()
                last_ckpt = t
    return best.detach()


# ----------------------------------------------------------------------------- randomized attack


def apgd_ce_batches(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
                    eps: float, steps: int, seed: int, batch_size: int = 250
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x_batch, y_batch, adversarial batch)`` of APGD-CE (Linf) on ``model``, batch by batch: the
    quick attack of the analysis tools (deployed-constant selection, confidence gap), one seeded
    generator for the whole pass so the result does not depend on how it is consumed."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        yield xb, yb, apgd(lambda z, yb=yb: F.cross_entropy(model(z), yb, reduction="none"), xb, eps,
                           n_iter=steps, generator=gen)


def dlr_targeted_loss(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020), AutoAttack's definition, with a clear error below 4 classes.

    Shift- and scale-invariant in ``z``, so log-probabilities work as logits.
    """
    if z.shape[1] < 4:
        raise ConfigError(f"targeted DLR needs at least 4 classes, got {z.shape[1]}")
    return targeted_dlr_loss(z, y, target)


@dataclass(frozen=True)
class AttackDraw:
    """The random parameters one sub-attack of :func:`randomized_attack` ran with."""

    name: str
    n_iter: int
    eps: torch.Tensor  # (N,) per-sample radius
    w: torch.Tensor  # (N,) per-sample weight of the BCE(gamma, 1) term


def _draw_n_iter(gen: torch.Generator, iter_range: tuple[int, int], iter_df: int | None) -> int:
    if iter_df is not None:
        chi2 = torch.randn(iter_df, generator=gen, device=gen.device).pow(2).sum()
        return max(1, round(float(chi2)))
    lo, hi = iter_range
    return int(torch.randint(lo, hi + 1, (1,), generator=gen, device=gen.device).item())


def randomized_attack(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    generator: torch.Generator,
    n_targets: int = 1,
    iter_range: tuple[int, int] = (2, 5),
    iter_df: int | None = None,
    eps_range: tuple[float, float] = (0.4, 1.1),
    w_max: float = 0.4,
    norm: str = "Linf",
    draws: list[AttackDraw] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """The Adaptive Smoothing training attack (Bai et al. 2023), run through the composite model.

    ``model_fn(x) -> (log_probs (N, C), gamma (N,))``, e.g. ``MixedClassifier.forward_with_gamma``;
    the log-probabilities serve as logits. Runs one untargeted APGD-CE and ``n_targets``
    targeted-DLR APGD attacks (targets: the 2nd, 3rd, ... highest classes of the clean
    prediction, as in AutoAttack; a target that equals ``y`` only leaves the BCE term), each
    with its own draws: per-sample ``eps * U(eps_range)``, per-sample ``w ~ U(0, w_max)`` in the
    loss ``(1 - w) * base + w * BCEWithLogits(gamma, 1)`` (the BCE term rewards pushing gamma
    down, i.e. fooling the mixing net into trusting g), and an iteration count.

    Iteration counts: the paper draws ``chi^2(df=75)`` (about 75 +- 12); pass ``iter_df=75`` for
    that. By default they are uniform integers in ``iter_range`` (inclusive), so a CPU budget
    of a few steps works; ``iter_df`` takes precedence when given. If ``draws`` is a list, the
    parameters of every sub-attack are appended to it (for logging and tests).
    Returns ``[("apgd-ce", x_adv), ("apgd-t1", x_adv), ...]``.
    """
    norm = _check_norm(norm)
    n_targets = _check_int("n_targets", n_targets, 0)
    if iter_df is not None:
        _check_int("iter_df", iter_df, 1)
    lo, hi = iter_range
    _check_int("iter_range[0]", lo, 1)
    _check_int("iter_range[1]", hi, lo)
    e_lo, e_hi = (float(v) for v in eps_range)
    if not 0.0 <= e_lo <= e_hi:
        raise ConfigError(f"eps_range must be (lo, hi) with 0 <= lo <= hi, got {eps_range!r}")
    if not 0.0 <= float(w_max) <= 1.0:
        raise ConfigError(f"w_max must be in [0, 1], got {w_max!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
    x, y = x.detach(), y.detach()
    n = x.shape[0]

    with torch.no_grad():
        log_probs, _ = model_fn(x)
    n_classes = log_probs.shape[1]
    if n_targets > 0 and n_classes < 4:
        raise ConfigError(f"targeted DLR needs at least 4 classes, got {n_classes}")
    if n_targets > n_classes - 1:
        raise ConfigError(f"n_targets must be <= n_classes - 1 = {n_classes - 1}, got {n_targets}")
    ranked = log_probs.argsort(dim=1, descending=True)

    out: list[tuple[str, torch.Tensor]] = []
    for k in range(n_targets + 1):
        name = "apgd-ce" if k == 0 else f"apgd-t{k}"
        n_iter = _draw_n_iter(generator, (lo, hi), iter_df)
        eps_k = eps * (e_lo + (e_hi - e_lo) * _rand((n,), generator, x))
        w = float(w_max) * _rand((n,), generator, x)
        target = ranked[:, k] if k > 0 else None

        def loss_fn(xa: torch.Tensor, w: torch.Tensor = w, target: torch.Tensor | None = target) -> torch.Tensor:
            z, gamma = model_fn(xa)
            base = F.cross_entropy(z, y, reduction="none") if target is None else dlr_targeted_loss(z, y, target)
            bce = gamma_bce(gamma)
            return (1.0 - w) * base + w * bce

        x_adv = apgd(loss_fn, x, eps_k, n_iter=n_iter, norm=norm, generator=generator)
        if draws is not None:
            draws.append(AttackDraw(name=name, n_iter=n_iter, eps=eps_k, w=w))
        out.append((name, x_adv))
    return out

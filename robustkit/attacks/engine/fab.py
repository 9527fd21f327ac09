"""Targeted FAB (FAB-T; Croce and Hein, "Minimally distorted adversarial examples with a fast
adaptive boundary attack", ICML 2020), Linf and L2, as AutoAttack's standard version runs it.

One run attacks each example towards one target class. An iteration linearises the target's margin
``f(x) = z_target(x) - z_y(x)`` at the current point ``x1``: the decision boundary becomes the
hyperplane ``w . z = b`` with ``w = grad f(x1)`` and ``b = w . x1 - f(x1)``. Both ``x1`` and the
original ``x0`` are projected onto it inside the box [0, 1]^D (minimal-norm steps ``d1``, ``d2``);
the next point mixes the two overshot steps, ``((x1 + eta d1)(1 - alpha) + (x0 + eta d2) alpha)``
clipped to [0, 1], with ``alpha = min(|d1| / (|d1| + |d2|), alpha_max)``. Where it is misclassified
it is a candidate (the smallest so far is kept) and ``x1`` steps back towards ``x0`` by ``beta``.

The projection (the smallest ``d`` in the norm with ``w . (t + d) = b`` and ``t + d`` in the box)
reduces, for both norms, to one scalar equation per row. Every coordinate moves towards the plane
(against the sign of ``w_i`` where ``w . t > b``, with it otherwise): Linf by ``min(lambda, p_i)``,
``p_i`` its room to the box's edge; L2 by ``|w_i| min(lambda, p_i)``, ``p_i`` that room over
``|w_i|`` (the lambda at which it reaches the edge); and lambda solves
``sum_i a_i min(lambda, p_i) = |w . t - b|`` with ``a = |w|`` (Linf) or ``w**2`` (L2). The left
side is concave, increasing and piecewise linear in lambda, so Newton's method started at 0 climbs
monotonically to the root and stops exactly once a step crosses no breakpoint: a few masked sums
per row (3 or 4 steps in FAB runs on the test CNN, up to 9 on random rows) instead of the
reference's full sort and binary search. Where even
the box's far corner does not reach the plane (``|w . t - b| >= sum a p``) every coordinate moves
to its edge, as in the reference.

What differs from the reference (pyautoattack's ``FABAttack_PT``, ``fab_base.py`` and
``fab_projections.py``), on purpose:

- the projections solve the same problem by the Newton iteration above (same optimum up to
  float rounding), not by sorting;
- input gradients only (``torch.autograd.grad``), no parameter ``.grad``; the target is given
  (AutoAttack ranks targets by the clean logits outside a run) and no random start is made;
- with ``early_exit`` an example leaves the working batch the moment it has an adversarial
  within ``eps`` (the reference's verdict, and the best norm only falls), so the verdict is the
  same as running all ``n_iter`` iterations; ``early_exit=False`` runs them all (the min-norm FAB);
- an example misclassified at ``x`` is returned as its own adversarial (norm 0) without
  iterating, as the reference's ``perturb`` judges it; the reference's L2 projection also lets
  coordinates with ``|w_i| < 1e-8`` weigh ``w_i**2`` in its sums before zeroing their step, we
  leave them out of the sums (a difference below 1e-16 per coordinate).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robustkit.core.errors import ConfigError

__all__ = ["NORMS", "fab_targeted", "project_l2", "project_linf"]

NORMS = ("Linf", "L2")
# Coordinates whose weight is at most this take no part in an L2 projection (the reference's cut).
_L2_TINY = 1e-8


# --------------------------------------------------------------------------- projections


def _step_scale(dtype: torch.dtype) -> float:
    """``K`` for the step function ``clamp((p - lam) K, 0, 1)``: exactly 1 where ``p - lam >= 1 / K``
    (``2**-100`` in float32, ``2**-996`` in float64), exactly 0 where ``p <= lam``, while ``p K``
    stays finite for ``p < 2**28``. Scaling by a power of two is exact, so ``p K - lam K`` is
    ``(p - lam) K``. ``(p > lam)`` and a ``where`` would do the same, but on CPU the bool tensor
    and the ``where`` cost about five times this clamp (measured)."""
    return 2.0 ** (math.frexp(torch.finfo(dtype).max)[1] - 28)


def _water_level(a: torch.Tensor, p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per row the smallest ``lam >= 0`` with ``sum_i a_i min(lam, p_i) = c`` (``a >= 0``,
    ``0 <= p < 2**28``, ``c >= 0``: ``[m, D]``, ``[m, D]``, ``[m]``); ``+inf`` where
    ``c >= sum_i a_i p_i``.

    Newton from 0: over the coordinates above the level (``p_i > lam``) the equation is linear,
    ``lam' = (c - sum_below a p) / sum_above a``; ``lam'`` is a lower bound of the root (the left
    side is concave) and, where it crosses no breakpoint, the root itself, so the next step
    repeats it bit for bit and the row is done. Levels only rise and the set above only shrinks:
    at most D + 1 steps (the loop's bound, also against NaN inputs), a handful in practice. Rows
    that are done leave the computation once they are half of it.
    """
    scale = _step_scale(a.dtype)
    ap = a * p
    total = ap.sum(dim=1)
    level = torch.full_like(c, float("inf"))
    rows = (c < total).nonzero().squeeze(1)  # the others cannot reach the plane
    a, ap, pk, c = a[rows], ap[rows], p[rows] * scale, c[rows]
    lam = torch.zeros_like(c)
    for _ in range(p.shape[1] + 1 if rows.numel() else 0):
        above = torch.sub(pk, lam[:, None] * scale).clamp_(0.0, 1.0)  # 1 where p > lam, else 0
        # sum_below a p directly, not total - sum_above: c is often small next to both sums
        below = torch.addcmul(ap, ap, above, value=-1.0).sum(dim=1)
        new = (c - below) / (a * above).sum(dim=1)
        new = torch.maximum(new, lam)  # a rounding error never moves a level back
        moving = new != lam
        level[rows] = new
        if not bool(moving.any()):
            break
        lam = new
        if 2 * int(moving.sum()) <= rows.numel():  # compact once half the rows are done
            rows, a, ap, pk, c, lam = (v[moving] for v in (rows, a, ap, pk, c, lam))
    return level


def _project(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """The minimal-``norm`` step ``d`` onto ``w . (t + d) = b`` inside [0, 1]^D (see the module)."""
    if torch.finfo(t.dtype).bits < 32:  # half precision: too narrow for the sums (and the step scale)
        return _project(t.float(), w.float(), b.float(), norm).to(t.dtype)
    gap = (w * t).sum(dim=1) - b
    # v: w turned so that moving along +v reaches the plane; coordinate i moves by sign(v_i) (Linf)
    # or v_i (L2) times min(lam, p_i). The reference leaves weights |w_i| <= 1e-8 out of L2 steps.
    v = w * torch.where(gap >= 0, -1.0, 1.0).to(w.dtype)[:, None]
    if norm == "L2":
        v = torch.nn.functional.hardshrink(v, _L2_TINY)
    direction = v.sign()
    # Room to the box's edge along the direction: 1 - t up, t down, 0 where the weight is 0.
    room = torch.clamp(direction, min=-t, max=1.0 - t).abs_()
    if norm == "Linf":
        a, p = v.abs(), room
    else:
        a, p = v * v, room / v.abs().clamp_min_(_L2_TINY)
    lam = _water_level(a, p, gap.abs())[:, None]
    step = torch.minimum(p, lam)
    return direction * step if norm == "Linf" else v * step


def _check_rows(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    if t.dim() != 2 or w.shape != t.shape or b.shape != t.shape[:1]:
        raise ValueError(f"projection needs x [m, D], w [m, D] and b [m]; got {tuple(t.shape)}, "
                         f"{tuple(w.shape)}, {tuple(b.shape)}")


def project_linf(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The minimal-Linf step ``d`` (rows: points ``x`` [m, D] in [0, 1], hyperplane normals ``w``
    [m, D], offsets ``b`` [m]) with ``w . (x + d) = b`` and ``x + d`` in [0, 1]^D: FAB's Linf
    projection. Where the box cannot reach the hyperplane, the step to the box's corner nearest
    to it. Batched, in ``x``'s dtype (half precision in float32); each row's result depends on
    that row only."""
    _check_rows(x, w, b)
    return _project(x, w, b, "Linf")


def project_l2(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The minimal-L2 step ``d`` with ``w . (x + d) = b`` and ``x + d`` in [0, 1]^D, arguments and
    unreachable planes as :func:`project_linf`: FAB's L2 projection."""
    _check_rows(x, w, b)
    return _project(x, w, b, "L2")


# --------------------------------------------------------------------------- the attack


def _norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Row norms of ``[m, D]``."""
    return delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(dim=1)


def _margin_and_gradient(model: nn.Module, x1: torch.Tensor, shape: tuple[int, ...], y: torch.Tensor,
                         target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f = z_target - z_y`` at the rows of ``x1`` ([m, D]) and its input gradient, flattened
    (one forward and one backward; the rows' sum has each row's own gradient)."""
    point = x1.detach().view(-1, *shape).requires_grad_(True)
    with torch.enable_grad():
        logits = model(point)
        f = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(f.sum(), [point])
    return f.detach(), grad.flatten(1)


def _step(x1: torch.Tensor, x0: torch.Tensor, f: torch.Tensor, w: torch.Tensor, norm: str, *,
          alpha_max: float, eta: float) -> torch.Tensor:
    """FAB's update: project ``x1`` and ``x0`` onto the linearised boundary ``w . z = w . x1 - f``,
    mix the two overshot steps (weight of the step from ``x0``: ``|d1| / (|d1| + |d2|)``, at
    most ``alpha_max``) and clip to the box."""
    m = x1.shape[0]
    b = (w * x1).sum(dim=1) - f
    d = _project(torch.cat((x1, x0)), torch.cat((w, w)), torch.cat((b, b)), norm)
    size = _norms(d, norm).clamp_min(1e-8)
    alpha = (size[:m] / (size[:m] + size[m:])).clamp(0.0, alpha_max)[:, None]
    return ((x1 + eta * d[:m]) * (1.0 - alpha) + (x0 + eta * d[m:]) * alpha).clamp(0.0, 1.0)


def _check(x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, norm: object, eps: object,
           n_iter: object) -> None:
    if norm not in NORMS:
        raise ConfigError(f"FAB-T supports norm {' or '.join(NORMS)}, got {norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ConfigError(f"eps must be a number >= 0, got {eps!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ConfigError(f"n_iter must be an integer >= 0, got {n_iter!r}")
    if x.dim() < 2 or y.shape != x.shape[:1] or target.shape != x.shape[:1]:
        raise ValueError(f"fab_targeted needs x [n, ...], y [n] and target [n]; got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(target.shape)}")


@torch.no_grad()
def fab_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, *, norm: str,
                 eps: float, n_iter: int = 100, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 early_exit: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One FAB-T run (no random start) of images ``x`` ([n, ...] in [0, 1]) with labels ``y``
    towards classes ``target`` ([n] int64; AutoAttack makes 9 runs, towards the classes ranked
    2nd to 10th by the clean logits, each on the examples still robust).

    Returns ``(x_adv, broken, passes)``: ``x_adv`` the smallest misclassified point found (``x``
    where none; with ``early_exit`` the first one within ``eps``, where the example stops);
    ``broken`` (bool) an adversarial within ``eps`` in the ``norm`` was found, AutoAttack's
    verdict, the same with or without ``early_exit``; ``passes`` (int64) the gradient evaluations
    (forward + backward) spent on each example, one per iteration it took part in. Not counted: the
    forward-only passes, one on all of ``x`` first and then one after every gradient evaluation
    (the check of the new point). An example misclassified at ``x`` is broken at norm 0 and costs
    no gradient. An example's result depends on its own inputs only, not on its batch (up to the
    model's own batch-dependent rounding).
    """
    _check(x, y, target, norm, eps, n_iter)
    n, shape = x.shape[0], tuple(x.shape[1:])
    flat = x.detach().flatten(1)
    best, passes = flat.clone(), torch.zeros(n, dtype=torch.int64, device=x.device)
    best_norm = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    with torch.inference_mode():
        wrong = model(x.detach()).argmax(dim=1) != y
    best_norm[wrong] = 0.0
    # The working batch: examples still running, compacted whenever some are done.
    alive = (~wrong).nonzero().squeeze(1)
    x0, ys, ts = flat[alive], y[alive], target[alive]
    x1, lowest, kept = x0.clone(), best_norm[alive], best[alive]
    for _ in range(n_iter):
        if alive.numel() == 0:
            break
        f, w = _margin_and_gradient(model, x1, shape, ys, ts)
        passes[alive] += 1
        x1 = _step(x1, x0, f, w, norm, alpha_max=alpha_max, eta=eta)
        with torch.inference_mode():
            adv = model(x1.view(-1, *shape)).argmax(dim=1) != ys
        if not bool(adv.any()):
            continue
        # Keep the smallest adversarial so far; from an adversarial point, step back towards x0.
        size = _norms(x1 - x0, norm)
        better = adv & (size < lowest)
        kept = torch.where(better[:, None], x1, kept)
        lowest = torch.where(better, size, lowest)
        x1 = torch.where(adv[:, None], x0 + (x1 - x0) * beta, x1)
        done = lowest <= eps
        if early_exit and bool(done.any()):  # the verdict is in: the best norm only falls
            best[alive[done]], best_norm[alive[done]] = kept[done], lowest[done]
            keep = ~done
            alive, x0, ys, ts, x1, lowest, kept = (t[keep] for t in (alive, x0, ys, ts, x1, lowest, kept))
    best[alive], best_norm[alive] = kept, lowest
    return best.view_as(x), best_norm <= eps, passes

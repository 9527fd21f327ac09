"""robustkit's own FAB-T (issue 17): projections, batch invariance, strength and cost against pyautoattack.

The projections are checked against the reference's ``projection_linf`` / ``projection_l2`` on rows
built to hit their special cases; the attack against ``FABAttack_PT`` (targeted) on a tiny trained
CNN: the same points broken within eps in AutoAttack's 9-target flow, the same minimal norms without
early exit, the same verdict at any batch size or order, and gradient passes that the model's own
counter confirms.
"""

from __future__ import annotations

import copy

import pytest
import torch
from pyautoattack.fab_projections import projection_l2, projection_linf
from pyautoattack.fab_pt import FABAttack_PT

from robustkit.attacks.engine.fab import fab_targeted, project_l2, project_linf
from robustkit.core.errors import ConfigError
from robustkit.eval.counting import PassCounter

PROJECTIONS = {"Linf": (project_linf, projection_linf), "L2": (project_l2, projection_l2)}
# Budgets at which the tiny model keeps some points and loses most (measured: 6 and 14 of 64 robust).
EPS = {"Linf": 8 / 255, "L2": 1.0}

pytestmark = pytest.mark.usefixtures("one_thread")


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    d = d.flatten(1)
    return d.abs().amax(dim=1) if norm == "Linf" else d.norm(dim=1)


# --------------------------------------------------------------------------- projections


def _rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """48 random rows (planes either side of the point, near and far) and the degenerate ones."""
    g = torch.Generator().manual_seed(0)
    m, dim = 60, 300
    t = torch.rand(m, dim, generator=g, dtype=torch.float64)
    w = torch.randn(m, dim, generator=g, dtype=torch.float64)
    scale = torch.logspace(-4, 0, m, dtype=torch.float64)  # distance to the plane, in units of sum |w|
    b = (w * t).sum(1) + torch.randn(m, generator=g, dtype=torch.float64) * scale * w.abs().sum(1) * 0.3
    w[48] = 0.0                                       # no plane at all, b = 0 ...
    b[48] = 0.0
    w[49] = 0.0                                       # ... and b != 0: unreachable
    b[49] = 2.0
    w[50, ::2] = 0.0                                  # half the weights zero
    b[51] = (w[51] * t[51]).sum()                     # already on the plane
    b[52] = (w[52] * t[52]).sum() + 1e3               # beyond the box's far corner
    b[53] = (w[53] * t[53]).sum() - 1e3
    t[54] = (t[54] > 0.5).to(t.dtype)                 # a corner of the box: half the moves have no room
    b[54] = (w[54] * t[54]).sum() - 0.2 * w[54].abs().sum()
    w[55, 1:] = 0.0                                   # one live coordinate, plane within reach
    b[55] = w[55, 0] * 0.5
    w[56, : dim // 2] *= 1e-9                         # weights under L2's 1e-8 cut
    t[57, : dim // 2] = 0.0                           # points on the box's faces
    t[57, dim // 2:] = 1.0
    return t.to(dtype), w.to(dtype), b.to(dtype)


@pytest.mark.parametrize("norm", PROJECTIONS)
def test_projection_is_the_references_optimum(norm) -> None:
    ours, reference = PROJECTIONS[norm]
    t, w, b = _rows(torch.float64)
    d = ours(t, w, b)
    d_ref = reference(t.clone(), w.clone(), b.clone())
    # float64: the same step (the same optimum, and the same choice among Linf's optimal steps).
    assert torch.allclose(d, d_ref, rtol=0, atol=1e-9), float((d - d_ref).abs().max())
    reached = ((w * (t + d_ref)).sum(1) - b).abs() <= 1e-9 * w.abs().sum(1)
    assert int(reached.sum()) >= 50 and not bool(reached[[49, 52, 53]].any())  # both kinds are tested
    assert bool((((w * (t + d)).sum(1) - b).abs()[reached] <= 1e-9 * w.abs().sum(1)[reached]).all())
    assert float((t + d).min()) >= -1e-12 and float((t + d).max()) <= 1 + 1e-12
    assert bool((d[48] == 0).all()) and bool((d[51] == 0).all())
    # float32: against the float64 optimum, at least as close as the reference's own float32 result.
    t32, w32, b32 = t.float(), w.float(), b.float()
    size, size_ref = _norm(ours(t32, w32, b32), norm).double(), _norm(d_ref, norm)
    size_ref32 = _norm(reference(t32.clone(), w32.clone(), b32.clone()), norm).double()
    error, error_ref = (size - size_ref).abs(), (size_ref32 - size_ref).abs()
    assert bool((error <= torch.maximum(2 * error_ref, 1e-5 * size_ref + 1e-7)).all())
    # Half precision is solved in float32 and returned in half.
    half = ours(t.half(), w.half(), b.half())
    assert half.dtype == torch.float16 and torch.allclose(half.float(), ours(t.half().float(), w.half().float(),
                                                                              b.half().float()).half().float())


@pytest.mark.parametrize("norm", PROJECTIONS)
def test_projection_rows_are_independent(norm) -> None:
    ours, _ = PROJECTIONS[norm]
    t, w, b = _rows(torch.float32)
    full = ours(t, w, b)
    order = torch.randperm(len(b), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours(t[order], w[order], b[order]), full[order])
    assert all(torch.equal(ours(t[i:i + 7], w[i:i + 7], b[i:i + 7]), full[i:i + 7]) for i in range(0, len(b), 7))


# --------------------------------------------------------------------------- the attack


def _own_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy for the reference, which back-propagates into the weights (``.grad``): the session's
    tiny model stays clean."""
    return copy.deepcopy(model)


def _clean_correct(model, x, y, n):
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok][:n].contiguous(), y[ok][:n]


def _target(model, x, rank):
    with torch.no_grad():
        return model(x).sort(dim=1)[1][:, -rank]


def _autoattack_flow(model, x, y, norm, eps, n_iter):
    """Robust flags of AutoAttack's FAB-T: targets ranked 2nd..10th by the clean logits, each run
    on the points still robust."""
    robust = torch.ones(len(y), dtype=torch.bool)
    for rank in range(2, 11):
        idx = robust.nonzero().squeeze(1)
        target = _target(model, x[idx], rank)
        _, broken, _ = fab_targeted(model, x[idx], y[idx], target, norm=norm, eps=eps, n_iter=n_iter)
        robust[idx[broken]] = False
    return robust


def _batched(model, x, y, target, norm, eps, n_iter, batch_size, order=None):
    order = torch.arange(len(y)) if order is None else order
    x_adv, broken = torch.empty_like(x), torch.empty(len(y), dtype=torch.bool)
    passes = torch.empty(len(y), dtype=torch.long)
    for lo in range(0, len(y), batch_size):
        j = order[lo:lo + batch_size]
        x_adv[j], broken[j], passes[j] = fab_targeted(model, x[j], y[j], target[j], norm=norm, eps=eps, n_iter=n_iter)
    return x_adv, broken, passes


@pytest.mark.parametrize("norm", EPS)
def test_same_result_at_batch_sizes_1_7_64_and_in_any_order(norm, tiny_model, synthetic_test) -> None:
    """In float64 every example's point is the same to rounding at any batch size and order, its
    verdict and cost exactly. (The float32 CNN's gradients differ by ~1e-7 between batch sizes: oneDNN
    blocks the batch, and FAB's continuous steps carry that, so float32 is checked on the verdict.)"""
    x, y = _clean_correct(tiny_model, *synthetic_test, 40)
    model64, x64 = copy.deepcopy(tiny_model).double(), x.double()
    target = _target(tiny_model, x, 2)
    eps, n_iter = EPS[norm] * 0.6, 20
    shuffled = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    ref64 = _batched(model64, x64, y, target, norm, eps, n_iter, 64)
    ref32 = _batched(tiny_model, x, y, target, norm, eps, n_iter, 64)
    assert 0 < int(ref64[1].sum()) < len(y) and int(ref64[2].min()) < n_iter  # some left early, some stayed
    for batch_size, order in [(1, None), (7, None), (64, shuffled), (7, shuffled)]:
        x_adv, broken, passes = _batched(model64, x64, y, target, norm, eps, n_iter, batch_size, order)
        assert torch.allclose(x_adv, ref64[0], rtol=0, atol=1e-9), (batch_size, float((x_adv - ref64[0]).abs().max()))
        assert torch.equal(broken, ref64[1]) and torch.equal(passes, ref64[2])
        _, broken, passes = _batched(tiny_model, x, y, target, norm, eps, n_iter, batch_size, order)
        assert torch.equal(broken, ref32[1]) and torch.equal(passes, ref32[2])


@pytest.mark.parametrize("norm", EPS)
def test_breaks_the_points_pyautoattack_breaks(norm, tiny_model, synthetic_test) -> None:
    """AutoAttack's FAB-T flow (9 targets, 1 restart, 20 iterations to keep it fast) on 64 points:
    the same robust set as pyautoattack's FABAttack_PT, up to a couple of points (measured: identical
    at 20, 40 and 100 iterations, both norms)."""
    x, y = _clean_correct(tiny_model, *synthetic_test, 64)
    eps, n_iter = EPS[norm], 20
    robust = _autoattack_flow(tiny_model, x, y, norm, eps, n_iter)
    adv = FABAttack_PT(_own_copy(tiny_model), norm=norm, n_restarts=1, n_iter=n_iter, eps=eps, targeted=True,
                       n_target_classes=9, device="cpu").perturb(x, y)
    with torch.no_grad():
        robust_ref = ~((tiny_model(adv).argmax(1) != y) & (_norm(adv - x, norm) <= eps))
    assert 0 < int(robust_ref.sum()) < len(y) // 2  # a real comparison: most broken, some not
    assert int((robust != robust_ref).sum()) <= 2, (robust.nonzero().tolist(), robust_ref.nonzero().tolist())


@pytest.mark.parametrize("norm", EPS)
def test_min_norm_without_early_exit_is_the_references(norm, tiny_model, synthetic_test) -> None:
    """Every point all iterations towards its 2nd class: the smallest adversarial found has the norm
    pyautoattack's finds (measured within 0.02 % on every point at 100 iterations), and the
    verdict at any eps equals the early-exit run's."""
    x, y = _clean_correct(tiny_model, *synthetic_test, 32)
    target, n_iter = _target(tiny_model, x, 2), 30
    x_adv, found, passes = fab_targeted(tiny_model, x, y, target, norm=norm, eps=1e9, n_iter=n_iter,
                                        early_exit=False)
    adv_ref = FABAttack_PT(_own_copy(tiny_model), norm=norm, n_restarts=1, n_iter=n_iter, eps=1e9, targeted=True,
                           n_target_classes=1, device="cpu").perturb(x, y)
    with torch.no_grad():
        assert torch.equal(tiny_model(x_adv).argmax(1) != y, found) and bool(found.all())
        assert bool((tiny_model(adv_ref).argmax(1) != y).all())
    size, size_ref = _norm(x_adv - x, norm), _norm(adv_ref - x, norm)
    ratio = size / size_ref
    assert float(ratio.median()) == pytest.approx(1.0, abs=1e-3) and int(((ratio - 1).abs() > 0.01).sum()) <= 2
    assert bool((passes == n_iter).all())
    for eps in (EPS[norm] * 0.5, EPS[norm]):
        _, broken, early = fab_targeted(tiny_model, x, y, target, norm=norm, eps=eps, n_iter=n_iter)
        assert torch.equal(broken, size <= eps)
        assert bool((early <= passes).all()) and bool((early[broken] < n_iter).any())


@pytest.mark.parametrize("norm", EPS)
def test_passes_are_the_counted_backward_passes_and_broken_points_stop(norm, tiny_model, synthetic_test) -> None:
    x, y = synthetic_test[0][:40], synthetic_test[1][:40]  # misclassified points included
    model = _own_copy(tiny_model)
    for p in model.parameters():
        p.grad = None
    counted = PassCounter(model)
    target = _target(tiny_model, x, 3)
    n_iter = 25
    x_adv, broken, passes = fab_targeted(counted, x, y, target, norm=norm, eps=EPS[norm], n_iter=n_iter)
    # One gradient per pass; one forward for it and one check of the new point, plus the clean check.
    assert int(passes.sum()) == counted.backward_passes
    assert counted.forward_passes == len(y) + 2 * counted.backward_passes
    with torch.no_grad():
        wrong = tiny_model(x).argmax(1) != y
        now_wrong = tiny_model(x_adv).argmax(1) != y
    assert bool(wrong.any()) and bool((passes[wrong] == 0).all()) and bool(broken[wrong].all())
    assert torch.equal(x_adv[wrong], x[wrong])
    # A robust point used every iteration; a broken one stopped at the iteration that broke it: one
    # iteration fewer leaves it robust.
    attacked = ~wrong
    assert bool(broken[attacked].any()) and bool((~broken[attacked]).any())
    assert bool((passes[attacked & ~broken] == n_iter).all()) and bool((passes[attacked & broken] < n_iter).any())
    for k in passes[attacked & broken].unique().tolist():
        j = (attacked & broken & (passes == k)).nonzero().squeeze(1)
        assert not bool(fab_targeted(tiny_model, x[j], y[j], target[j], norm=norm, eps=EPS[norm], n_iter=k - 1)[1].any())
    assert bool(now_wrong[broken].all()) and bool((_norm(x_adv - x, norm)[broken] <= EPS[norm]).all())
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # Without early exit the verdict is the same and every attacked point pays for every iteration.
    _, broken_all, passes_all = fab_targeted(tiny_model, x, y, target, norm=norm, eps=EPS[norm], n_iter=n_iter,
                                             early_exit=False)
    assert torch.equal(broken_all, broken) and bool((passes_all[attacked] == n_iter).all())
    assert int(passes.sum()) < int(passes_all.sum())
    assert all(p.grad is None for p in model.parameters())  # input gradients only


def test_dtype_and_empty_batches(tiny_model, synthetic_test) -> None:
    x, y = synthetic_test[0][:6].double(), synthetic_test[1][:6]
    x_adv, broken, passes = fab_targeted(copy.deepcopy(tiny_model).double(), x, y, _target(tiny_model, x.float(), 2),
                                         norm="L2", eps=1.0, n_iter=3)
    assert x_adv.dtype == torch.float64 and x_adv.shape == x.shape and broken.dtype == torch.bool
    assert passes.dtype == torch.int64 and int(passes.max()) <= 3
    empty = fab_targeted(tiny_model, x[:0].float(), y[:0], y[:0], norm="Linf", eps=0.1)
    assert empty[0].shape == (0, *x.shape[1:]) and empty[1].numel() == 0 and empty[2].numel() == 0


def test_errors(tiny_model, synthetic_test) -> None:
    x, y = synthetic_test[0][:4], synthetic_test[1][:4]
    for bad in ({"norm": "L1"}, {"norm": "linf"}, {"eps": -0.1}, {"eps": "8/255"}, {"n_iter": -1}):
        kwargs = {"norm": "Linf", "eps": 0.03, **bad}
        with pytest.raises(ConfigError) as info:
            fab_targeted(tiny_model, x, y, y, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        fab_targeted(tiny_model, x, y[:3], y, norm="Linf", eps=0.03)
    with pytest.raises(ValueError):
        project_linf(x.flatten(1), x.flatten(1)[:, :5], y.float())

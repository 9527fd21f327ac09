"""APGD with per-sample eps and the Adaptive Smoothing training attack, on tiny CPU stand-ins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attacks.apgd import AttackDraw, apgd, apgd_checkpoints, dlr_targeted_loss, randomized_attack
from robustkit.core.errors import ConfigError

N_CLASSES = 10


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, N_CLASSES)
    ).eval()


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, N_CLASSES)).eval()


def _data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


def _ce(model: nn.Module, y: torch.Tensor):
    return lambda xa: F.cross_entropy(model(xa), y, reduction="none")


class _StandIn(nn.Module):
    """A composite-like model: (log-probs, gamma), gamma a linear function of x."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = _linear(seed)
        torch.manual_seed(seed + 100)
        self.v = nn.Parameter(torch.randn(3 * 8 * 8))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return F.log_softmax(self.net(x), dim=1), x.flatten(1) @ self.v * 0.1


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_apgd_stays_in_per_sample_ball(norm: str) -> None:
    model = _cnn()
    x, y = _data()
    scale = 1.0 if norm == "Linf" else 20.0
    eps = torch.tensor([0.0, 0.01, 0.03, 0.1, 0.3, 0.0, 0.05, 1.0]) * scale
    x_adv = apgd(_ce(model, y), x, eps, n_iter=6, norm=norm, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).flatten(1)
    dist = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert bool((dist <= eps + 1e-5).all()), (dist, eps)
    assert torch.equal(x_adv[eps == 0], x[eps == 0])
    assert bool((dist[eps > 0] > 0).all())


@pytest.mark.parametrize("make", [_linear, _cnn])
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_apgd_raises_the_loss(make, norm: str) -> None:
    model = make()
    x, y = _data(16)
    loss_fn = _ce(model, y)
    eps = 8 / 255 if norm == "Linf" else 0.5
    x_adv = apgd(loss_fn, x, eps, n_iter=8, norm=norm, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = loss_fn(x), loss_fn(x_adv)
    assert bool((after >= before).all())
    assert after.mean() > before.mean() + 1e-3


@pytest.mark.parametrize("n_iter", [1, 2, 3, 5])
def test_apgd_small_n_iter_and_no_param_grad(n_iter: int) -> None:
    model = _cnn()
    x, y = _data(4)
    x_adv = apgd(_ce(model, y), x, 0.05, n_iter=n_iter, generator=torch.Generator().manual_seed(3))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_apgd_is_deterministic_given_the_seed() -> None:
    model = _cnn()
    x, y = _data()

    def run(seed: int) -> torch.Tensor:
        return apgd(_ce(model, y), x, 0.03, n_iter=5, norm="L2", generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_apgd_checkpoints_match_the_paper() -> None:
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1) == []
    for n in range(1, 30):
        ws = apgd_checkpoints(n)
        assert ws == sorted(set(ws)) and all(0 < w < n for w in ws)


def test_apgd_rejects_bad_input() -> None:
    model = _linear()
    x, y = _data(4)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError):
        apgd(_ce(model, y), x, 0.1, n_iter=2, norm="L1", generator=gen)
    with pytest.raises(ConfigError):
        apgd(_ce(model, y), x, torch.ones(3), n_iter=2, generator=gen)
    with pytest.raises(ConfigError):
        apgd(_ce(model, y), x, -0.1, n_iter=2, generator=gen)
    with pytest.raises(ConfigError):
        apgd(_ce(model, y), x, 0.1, n_iter=0, generator=gen)
    with pytest.raises(ConfigError):
        apgd(lambda xa: model(xa).sum(), x, 0.1, n_iter=2, generator=gen)


def test_dlr_targeted_needs_four_classes() -> None:
    z = torch.randn(2, 3)
    with pytest.raises(ConfigError):
        dlr_targeted_loss(z, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(ConfigError):
        randomized_attack(lambda xa: (torch.randn(xa.shape[0], 3), torch.zeros(xa.shape[0])),
                          torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), eps=0.03,
                          generator=torch.Generator().manual_seed(0), n_targets=1)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_randomized_attack_batches_budgets_and_iterations(norm: str) -> None:
    model = _StandIn()
    x, y = _data()
    eps = 8 / 255 if norm == "Linf" else 0.5
    draws: list[AttackDraw] = []
    out = randomized_attack(model, x, y, eps=eps, generator=torch.Generator().manual_seed(0), n_targets=3,
                            iter_range=(2, 4), norm=norm, draws=draws)
    assert [name for name, _ in out] == ["apgd-ce", "apgd-t1", "apgd-t2", "apgd-t3"]
    assert [d.name for d in draws] == [name for name, _ in out]
    for (_, x_adv), d in zip(out, draws, strict=True):
        assert 2 <= d.n_iter <= 4
        assert bool((d.eps >= 0.4 * eps - 1e-7).all()) and bool((d.eps <= 1.1 * eps + 1e-7).all())
        assert bool((d.w >= 0).all()) and bool((d.w <= 0.4).all())
        dist = (x_adv - x).flatten(1)
        dist = dist.abs().amax(1) if norm == "Linf" else dist.norm(dim=1)
        assert bool((dist <= d.eps + 1e-5).all()) and bool((dist <= 1.1 * eps + 1e-5).all())
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    # one clean prediction, then per attack: the clean point plus n_iter + 1 gradient evaluations
    assert model.calls == 1 + sum(d.n_iter + 2 for d in draws)
    assert all(p.grad is None for p in model.parameters())


def test_randomized_attack_is_deterministic_and_chi2_iterations_work() -> None:
    x, y = _data(4)

    def run(seed: int) -> list[tuple[str, torch.Tensor]]:
        return randomized_attack(_StandIn(), x, y, eps=0.03, generator=torch.Generator().manual_seed(seed))

    a, b = run(5), run(5)
    assert all(torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    draws: list[AttackDraw] = []
    model = _StandIn()
    randomized_attack(model, x, y, eps=0.03, generator=torch.Generator().manual_seed(0), n_targets=1,
                      iter_df=20, draws=draws)
    # iter_df overrides the default iter_range (2, 5): the first count is chi^2(20) drawn from the
    # generator's first 20 normals, the second another chi^2(20) draw (20 +- 6), and APGD runs
    # exactly that many steps (one clean call, then n_iter + 2 calls per attack).
    first = round(float(torch.randn(20, generator=torch.Generator().manual_seed(0)).pow(2).sum()))
    assert len(draws) == 2 and draws[0].n_iter == first and all(8 <= d.n_iter <= 40 for d in draws)
    assert model.calls == 1 + sum(d.n_iter + 2 for d in draws)


def test_bce_term_pushes_gamma_down() -> None:
    model = _StandIn()
    x, y = _data(16)

    def mean_gamma(w_max: float) -> float:
        out = randomized_attack(model, x, y, eps=8 / 255, generator=torch.Generator().manual_seed(0),
                                n_targets=1, iter_range=(5, 5), w_max=w_max)
        with torch.no_grad():
            return float(torch.stack([model(xa)[1] for _, xa in out]).mean())

    with torch.no_grad():
        clean = float(model(x)[1].mean())
    base_only, with_bce = mean_gamma(0.0), mean_gamma(1.0)
    assert with_bce < base_only
    assert with_bce < clean

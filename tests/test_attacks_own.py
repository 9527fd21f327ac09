"""Tests of our FGSM/PGD and of the foolbox adapter on tiny seeded models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from robustkit.attacks.base import Attack, perturbation_norms
from robustkit.attacks.foolbox_adapter import FoolboxAttack, foolbox_attack_names
from robustkit.attacks.pgd import FGSM, PGD, per_example_loss
from robustkit.core.errors import ConfigError, UnknownNameError
from robustkit.core.threat import ThreatModel

LINF = ThreatModel("Linf", 8 / 255)
L2 = ThreatModel("L2", 0.5)
SHAPE = (3, 8, 8)


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a model from ``seed`` without disturbing the global RNG other tests may rely on."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _conv_net(seed: int = 0) -> nn.Module:
    return _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
        ),
        seed,
    )


def _data(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes pushed apart along a fixed +-1 pattern, with small pixel noise."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.where(torch.rand(SHAPE, generator=torch.Generator().manual_seed(99)) < 0.5, -1.0, 1.0)
    y = torch.randint(0, 2, (n,), generator=g)
    sign = (2.0 * y - 1.0).view(-1, 1, 1, 1)
    x = 0.5 + 0.02 * sign * pattern + 0.01 * torch.randn(n, *SHAPE, generator=g)
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def linear_model() -> nn.Module:
    """A logistic-regression model trained (a little) on the separable data."""
    model = _seeded(lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), 0)
    x, y = _separable(256, seed=2)
    params = list(model.parameters())
    for _ in range(200):  # plain gradient descent: torch.optim costs seconds of import time
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 0.03 * g
    return model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _make(kind: str, threat: ThreatModel) -> Attack:
    if kind == "fgsm":
        return FGSM(threat)
    if kind == "fgsm-rs":
        return FGSM(threat, random_start=True)
    if kind == "pgd":
        return PGD(threat, steps=5, restarts=2)
    if kind == "pgd-margin":
        return PGD(threat, steps=5, loss="margin")
    if kind == "foolbox:PGD":
        return FoolboxAttack(threat, attack_name=f"{threat.norm}PGD", steps=5)
    if kind == "foolbox:FGSM":
        return FoolboxAttack(threat, attack_name="FGSM" if threat.norm == "Linf" else "FGM")
    raise AssertionError(kind)


KINDS = ["fgsm", "fgsm-rs", "pgd", "pgd-margin", "foolbox:PGD", "foolbox:FGSM"]


def _run(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return attack.perturb(model, x, y, stage=attack.stages()[0], seed=seed)


@pytest.mark.parametrize("threat", [LINF, L2], ids=["Linf", "L2"])
@pytest.mark.parametrize("kind", KINDS)
def test_budget_and_box(kind: str, threat: ThreatModel) -> None:
    model = _conv_net()
    x, y = _data()
    attack = _make(kind, threat)
    adv = _run(attack, model, x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    linf, l2 = perturbation_norms(adv, x)
    norms = linf if threat.norm == "Linf" else l2
    assert norms.max().item() <= threat.eps + 1e-6
    assert norms.max().item() > threat.eps / 4  # it actually moved
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0


def test_foolbox_names_in_budget_test_exist() -> None:
    names = foolbox_attack_names()
    assert {"LinfPGD", "L2PGD", "FGSM", "FGM"} <= set(names)
    assert "L2CarliniWagnerAttack" not in names  # minimisation attacks are not fixed-epsilon


@pytest.mark.parametrize("threat", [LINF, L2], ids=["Linf", "L2"])
@pytest.mark.parametrize("kind", ["fgsm-rs", "pgd", "foolbox:PGD"])
def test_determinism(kind: str, threat: ThreatModel) -> None:
    model = _conv_net()
    x, y = _data()
    attack = _make(kind, threat)
    a = _run(attack, model, x, y, seed=123)
    b = _run(attack, model, x, y, seed=123)
    c = _run(attack, model, x, y, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", ["fgsm", "fgsm-rs", "pgd", "pgd-margin"])
def test_global_rng_untouched(kind: str) -> None:
    model = _conv_net()
    x, y = _data()
    for threat in (LINF, L2):
        state = torch.get_rng_state()
        _run(_make(kind, threat), model, x, y, seed=7)
        assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("kind", KINDS)
def test_no_param_grad_left(kind: str) -> None:
    model = _conv_net()
    x, y = _data()
    flags = [p.requires_grad for p in model.parameters()]
    for threat in (LINF, L2):
        with torch.no_grad():  # the harness may call attacks under no_grad
            _run(_make(kind, threat), model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("threat", [ThreatModel("Linf", 0.05), ThreatModel("L2", 1.0)], ids=["Linf", "L2"])
def test_pgd_beats_random_noise(linear_model: nn.Module, threat: ThreatModel) -> None:
    x, y = _separable(200, seed=3)
    assert _accuracy(linear_model, x, y) >= 0.95
    g = torch.Generator().manual_seed(5)
    if threat.norm == "Linf":
        noise = torch.where(torch.rand(x.shape, generator=g) < 0.5, -threat.eps, threat.eps)
    else:
        noise = torch.randn(x.shape, generator=g)
        noise = noise * threat.eps / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    noisy_acc = _accuracy(linear_model, (x + noise).clamp(0, 1), y)
    adv_acc = _accuracy(linear_model, _run(PGD(threat, steps=10), linear_model, x, y), y)
    assert noisy_acc >= 0.9
    assert adv_acc <= 0.1


@pytest.mark.parametrize("threat", [ThreatModel("Linf", 8 / 255), ThreatModel("L2", 0.3)], ids=["Linf", "L2"])
def test_pgd_at_least_as_strong_as_fgsm(threat: ThreatModel) -> None:
    model = _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        ),
        0,
    )
    x, _ = _data(128, seed=6)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point starts correctly classified
    fgsm_acc = _accuracy(model, _run(FGSM(threat), model, x, y), y)
    pgd_acc = _accuracy(model, _run(PGD(threat), model, x, y), y)
    assert pgd_acc <= fgsm_acc < 1.0


class _Band(nn.Module):
    """Class 1 wins only while the mean pixel is in (lo, hi), more so the higher it is; the gradient always
    says "brighter", so sign-PGD walks every pixel up one step at a time, into the band and out again."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).mean(1)
        inside = (s > self.lo) & (s < self.hi)
        z1 = torch.where(inside, 1.0 + 100.0 * (s - self.lo), torch.full_like(s, -1.0)).detach() + s - s.detach()
        return torch.stack([torch.zeros_like(z1), z1], 1)


def test_pgd_keeps_the_first_adversarial_iterate() -> None:
    """Iterates 2 and 3 of the first example are adversarial (3 with the higher loss), 4-6 are not again;
    the second example keeps the loop running to the last step. PGD must return iterate 2: not the
    last iterate (correct again) and not the highest-loss one."""
    step = 1 / 255
    model = _Band(0.5 + 1.5 * step, 0.5 + 3.5 * step)
    x = torch.stack([torch.full(SHAPE, 0.5), torch.full(SHAPE, 0.3)])
    y = torch.zeros(2, dtype=torch.long)
    iterates = [x[0] + t * step for t in range(7)]
    assert [int(model(it[None]).argmax()) for it in iterates] == [0, 0, 1, 1, 0, 0, 0]
    assert model(iterates[3][None])[0, 1] > model(iterates[2][None])[0, 1]
    adv = _run(PGD(LINF, steps=6, step_size=step, random_start=False), model, x, y)
    torch.testing.assert_close(adv[0], iterates[2], rtol=0, atol=1e-6)
    assert model(adv).argmax(1).tolist() == [1, 0]  # the second example was never broken


def test_margin_loss_sign() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(per_example_loss(logits, y, "margin"), torch.tensor([-2.0, 2.0]))


def test_defaults_and_config() -> None:
    pgd = PGD(LINF, steps=10)
    assert pgd.step_size == pytest.approx(2.5 * LINF.eps / 10)
    assert pgd.config() == {
        "name": "pgd",
        "norm": "Linf",
        "eps": LINF.eps,
        "steps": 10,
        "step_size": pgd.step_size,
        "random_start": True,
        "restarts": 1,
        "loss": "ce",
    }
    fgsm = FGSM(L2)
    assert fgsm.step_size == L2.eps
    assert fgsm.config()["random_start"] is False
    fb = FoolboxAttack(LINF, attack_name="LinfPGD", steps=7)
    assert fb.name == "foolbox:LinfPGD" and fb.stages() == ["foolbox:LinfPGD"]
    assert fb.config()["attack_kwargs"]["steps"] == 7
    assert "rel_stepsize" in fb.config()["attack_kwargs"]


def test_zero_eps_returns_input() -> None:
    model = _conv_net()
    x, y = _data(4)
    for attack in (PGD(ThreatModel("Linf", 0.0)), FGSM(ThreatModel("L2", 0.0))):
        assert torch.equal(_run(attack, model, x, y), x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": -3},
        {"steps": 2.5},
        {"step_size": -0.1},
        {"step_size": 0.0},
        {"step_size": float("nan")},
        {"restarts": 0},
        {"loss": "hinge"},
        {"random_start": "yes"},
        {"restarts": 3, "random_start": False},
    ],
)
def test_pgd_bad_config(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        PGD(LINF, **kwargs)


def test_fgsm_bad_config() -> None:
    with pytest.raises(ConfigError):
        FGSM(LINF, step_size=-1.0)
    with pytest.raises(ConfigError):
        FGSM(LINF, loss="nope")


def test_foolbox_unknown_name_suggests() -> None:
    with pytest.raises(UnknownNameError) as info:
        FoolboxAttack(LINF, attack_name="LinfPDG")
    assert "LinfPGD" in info.value.close_matches
    assert "LinfPGD" in str(info.value)


@pytest.mark.parametrize(
    ("threat", "name"),
    [(LINF, "L2PGD"), (L2, "LinfPGD"), (LINF, "L1PGD"), (L2, "FGSM"), (LINF, "SpatialAttack")],
)
def test_foolbox_norm_mismatch(threat: ThreatModel, name: str) -> None:
    with pytest.raises(ConfigError):
        FoolboxAttack(threat, attack_name=name)


def test_foolbox_bad_kwargs() -> None:
    with pytest.raises(ConfigError):
        FoolboxAttack(LINF, attack_name="LinfPGD", stepz=3)

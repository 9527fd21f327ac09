"""autoattack-adaptive: w = 0 is standard AutoAttack per example; w > 0 adds BCE(gamma, 1).

The stand-in mixed model: two random TinyCNNs mixed in probability space with alpha = sigmoid(gamma),
gamma a linear function of the input, so gamma has an input gradient the attack can exploit.
Labels are the model's own clean predictions, so every example is attacked.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import MixedStandIn
from torch import nn

from robustkit.attacks import AdaptiveAutoAttack, AutoAttack, attack_from_config, create_attack
from robustkit.attacks.adaptive import GammaLossModel, dlr_loss, targeted_dlr_loss
from robustkit.cli import main
from robustkit.core.errors import ConfigError
from robustkit.core.threat import ThreatModel
from robustkit.eval import evaluate
from robustkit.eval.counting import PassCounter
from robustkit.models import create_model

CPU = torch.device("cpu")
SIDE = 12
# version-like reduced settings: 5 iterations, 1 restart, 2 target classes.
SMALL = {"apgd.n_iter": 5, "apgd.n_restarts": 1, "apgd_targeted.n_iter": 5,
         "apgd_targeted.n_restarts": 1, "apgd_targeted.n_target_classes": 2}
STAGES = ["apgd-ce", "apgd-dlr", "apgd-t"]


class StandInMixed(MixedStandIn):
    """Two seeded tiny_cnn models on SIDE x SIDE images, mixed by a seeded linear gamma."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(create_model("tiny_cnn.init", seed=seed), create_model("tiny_cnn.init", seed=seed + 1),
                         3 * SIDE * SIDE, 0.1, seed + 2)


@pytest.fixture(scope="module")
def setup() -> tuple[StandInMixed, torch.Tensor, torch.Tensor]:
    model = StandInMixed().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(12, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _threat() -> ThreatModel:
    return ThreatModel.create("Linf", "8/255")


def _pair(w: float = 0.0) -> tuple[AutoAttack, AdaptiveAutoAttack]:
    kw = {"version": "custom", "attacks": STAGES, "overrides": SMALL}
    return AutoAttack(_threat(), **kw), AdaptiveAutoAttack(_threat(), w=w, **kw)


def _perturb(attack: AutoAttack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, stage: str) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):  # APGD reseeds the global RNG
        attack.prepare(PassCounter(model), CPU, seed=0)
        return attack.perturb(model, x, y, stage=stage, seed=0)


@pytest.mark.parametrize("stage", STAGES)
def test_w0_gives_identical_adversarial_examples(setup, stage):
    model, x, y = setup
    standard, adaptive = _pair(0.0)
    a, b = _perturb(standard, model, x, y, stage), _perturb(adaptive, model, x, y, stage)
    assert not torch.equal(a, x), "the attack did nothing: the comparison would be vacuous"
    assert torch.equal(a, b)


def test_w0_gives_identical_flags_and_pass_counts(setup):
    model, x, y = setup
    standard, adaptive = _pair(0.0)
    rs = evaluate(model, standard, x, y, batch_size=5, device="cpu", progress=False)
    ra = evaluate(model, adaptive, x, y, batch_size=5, device="cpu", progress=False)
    assert rs.robust_flags == ra.robust_flags and "0" in rs.robust_flags
    for s, a in zip(rs.stages, ra.stages, strict=True):
        assert (s.name, s.n_broken, s.forward_passes, s.backward_passes) == \
               (a.name, a.n_broken, a.forward_passes, a.backward_passes)
    apgd = next(s for s in ra.stages if s.name == "apgd-ce")
    assert apgd.forward_passes > 0 and apgd.backward_passes > 0
    assert ra.attack_config["w"] == 0.0 and ra.attack == "autoattack-adaptive"


def test_losses_match_the_reference_definitions(setup):
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    model, x, y = setup
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    yy, yt = torch.arange(8) % 10, (torch.arange(8) + 3) % 10
    ref = APGDAttack(model, eps=0.1)
    assert torch.equal(dlr_loss(logits, yy), ref.dlr_loss(logits, yy))
    ref_t = APGDAttack_targeted(model, eps=0.1)
    ref_t.y_target = yt
    assert torch.equal(targeted_dlr_loss(logits, yy, yt), ref_t.dlr_loss_targeted(logits, yy))


def test_w_positive_adds_bce_on_gamma(setup):
    model, x, y = setup
    w = 0.5
    plain, adaptive = GammaLossModel(model, 0.0), GammaLossModel(model, w)
    with torch.no_grad():
        logits, gamma = model.forward_with_gamma(x)
    bce = F.softplus(-gamma)  # BCEWithLogits(gamma, 1)
    yt = (y + 1) % 10
    for get, base in ((lambda m: m.get_logits_loss_grad_xent(x, y), F.cross_entropy(logits, y, reduction="none")),
                      (lambda m: m.get_logits_loss_grad_dlr(x, y), dlr_loss(logits, y)),
                      (lambda m: m.get_logits_loss_grad_target(x, y, yt), targeted_dlr_loss(logits, y, yt))):
        _, loss0, grad0 = get(plain)
        out, loss, grad = get(adaptive)
        torch.testing.assert_close(out, logits)
        torch.testing.assert_close(loss0, base)
        torch.testing.assert_close(loss, base + w * bce)
        assert not torch.allclose(grad, grad0)
    # ... and the attack with w > 0 ends elsewhere, within the budget.
    a = _perturb(_pair(0.0)[1], model, x, y, "apgd-ce")
    b = _perturb(_pair(w)[1], model, x, y, "apgd-ce")
    assert not torch.equal(a, b) and float((b - x).abs().max()) <= 8 / 255 + 1e-6


def test_passcounter_exposes_and_counts_forward_with_gamma(setup):
    model, x, _ = setup
    counter = PassCounter(model)
    assert hasattr(counter, "forward_with_gamma")
    assert not hasattr(PassCounter(create_model("tiny_cnn.init")), "forward_with_gamma")
    xg = x[:4].clone().requires_grad_(True)
    out, gamma = counter.forward_with_gamma(xg)
    (out.sum() + gamma.sum()).backward()
    assert counter.snapshot() == (4, 4) and gamma.shape == (4,)


def test_config_round_trip():
    attack = create_attack("autoattack-adaptive", eps="8/255", w=0.25)
    assert isinstance(attack, AdaptiveAutoAttack) and attack.config()["w"] == 0.25
    assert attack.stages() == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for a in (attack, _pair(0.5)[1]):
        rebuilt = attack_from_config(json.loads(json.dumps(a.config())))
        assert isinstance(rebuilt, AdaptiveAutoAttack) and rebuilt.config() == a.config()
    assert create_attack("autoattack-adaptive", dataset="cifar10").config()["w"] == 0.5  # the preset's weight
    with pytest.raises(ConfigError, match="w must be"):
        create_attack("autoattack-adaptive", eps=0.1, w=-1)


def test_model_without_gamma_is_a_clear_error(setup):
    _, x, y = setup
    plain = create_model("tiny_cnn.init")
    with pytest.raises(ConfigError, match="autoattack-adaptive.*forward_with_gamma"):
        evaluate(plain, _pair(0.5)[1], x[:4], y[:4], device="cpu", progress=False)


def test_cli_comma_list_writes_one_result_per_attack(capsys, tmp_path):
    out = tmp_path / "r.json"
    code = main(["eval", "--model", "tiny_cnn.init", "--dataset", "synthetic", "--attack", "apgd-ce,pgd",
                 "--n-examples", "8", "--no-progress", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    results = {a: json.loads((tmp_path / f"r__{a}.json").read_text()) for a in ("apgd-ce", "pgd")}
    assert all(results[a]["attack"] == a for a in results) and not out.exists()
    assert (tmp_path / "r__pgd.records.jsonl").exists()
    low = min(r["robust_accuracy"] for r in results.values())
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("robust accuracy by attack: apgd-ce") and f"report {100 * low:.2f}%" in last
    # Each attack's result is the one it gets alone (no RNG state carried over from the attack before
    # it), so a comma list may be run as separate processes, one per core, with the same answer.
    # Square's random search after APGD-CE (eps 0.01 leaves it a few robust examples to get right):
    pair = ["eval", "--model", "tiny_cnn.init", "--dataset", "synthetic", "--eps", "0.01", "--n-examples", "48",
            "--no-progress"]
    assert main([*pair, "--attack", "apgd-ce,square", "--out", str(tmp_path / "p.json")]) == 0
    assert main([*pair, "--attack", "square", "--out", str(tmp_path / "alone.json")]) == 0
    after, alone = (json.loads((tmp_path / f).read_text()) for f in ("p__square.json", "alone.json"))
    assert after["robust_flags"] == alone["robust_flags"] and "1" in alone["robust_flags"]


def test_cli_adaptive_on_plain_model_fails_before_running(capsys):
    code = main(["eval", "--model", "tiny_cnn.init", "--dataset", "synthetic",
                 "--attack", "autoattack,autoattack-adaptive", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "forward_with_gamma" in err and "autoattack-adaptive" in err
    code = main(["eval", "--model", "tiny_cnn.init", "--attack", "pgd,none", "--no-progress"])
    assert code == 2 and "comma list" in capsys.readouterr().err


def test_standard_version_end_to_end(setup):
    """All four stages (FAB-T and Square on the plain forward) run and stay within the budget."""
    model, x, y = setup
    small = {**SMALL, "fab.n_iter": 3, "fab.n_target_classes": 2, "square.n_queries": 10}
    attack = AdaptiveAutoAttack(_threat(), w=0.5, overrides=small)
    r = evaluate(model, attack, x[:6], y[:6], device="cpu", progress=False)
    assert [s.name for s in r.stages] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert r.budget["max_linf"] <= 8 / 255 + 1e-5 and r.passes["backward"] > 0

"""Adaptive Smoothing: the probability-space mixture, feature taps, the mixing network, the
composite's checkpoint and the mixing-network trainer (tiny models, CPU)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from robustkit.core.checkpoint import save_checkpoint
from robustkit.core.config import config_to_dict
from robustkit.core.errors import CheckpointError, ConfigError
from robustkit.models import create_model, load_model
from robustkit.models.adaptive_smoothing import (
    FeatureTaps,
    MixedClassifier,
    MixingConfig,
    MixingNet,
    auto_taps,
    build_adaptive_smoothing,
    mix_log_probs,
)
from robustkit.train import adaptive_smoothing as trainer
from robustkit.train.adaptive_smoothing import AdaptiveSmoothingConfig

RECIPE = Path(__file__).resolve().parents[1] / "defenses" / "adaptive_smoothing.cifar10_partial.toml"
SHIPPED = Path(__file__).resolve().parents[1] / "robustkit" / "weights" / "adaptive_smoothing.cifar10_partial.json"

# Tiny models on a shared CPU: extra OpenMP threads only wait on each other (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int) -> torch.nn.Module:
    return create_model("tiny_cnn.init", seed=seed)


def _composite(config: MixingConfig | None = None, seed: int = 0) -> MixedClassifier:
    g, h = _tiny(seed), _tiny(seed + 1)
    taps = auto_taps(g, (3, 32, 32))
    torch.manual_seed(seed)
    net = MixingNet(2 * 8, 2 * 8, width=8)
    return MixedClassifier(g, h, s_g=1.5, s_h=0.7, mixing_net=net, taps_g=taps, taps_h=taps, config=config).eval()


def test_fixed_alpha_zero_and_one_are_exactly_g_and_h():
    m = _composite()
    x = torch.rand(5, 3, 32, 32)
    g = F.log_softmax(1.5 * m.g(x), 1)
    h = F.log_softmax(0.7 * m.h(x), 1)
    assert torch.equal(m.fixed_alpha(0.0)(x), g)
    assert torch.equal(m.fixed_alpha(1.0)(x), h)
    # The tensor path (what the adaptive mixture uses) too: log(0) drops the other term exactly.
    zg, zh = m.g(x), m.h(x)
    assert torch.allclose(mix_log_probs(zg, zh, torch.zeros(5), 1.5, 0.7), g, atol=0, rtol=0)
    assert torch.allclose(mix_log_probs(zg, zh, torch.ones(5), 1.5, 0.7), h, atol=0, rtol=0)
    # In between it is the probability mixture.
    mid = m.fixed_alpha(0.3)(x).exp()
    assert torch.allclose(mid, 0.7 * g.exp() + 0.3 * h.exp(), atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_output_is_a_log_probability(mode):
    m = _composite()
    m.train(mode == "train")
    out = m(torch.rand(6, 3, 32, 32))
    assert torch.allclose(out.logsumexp(1), torch.zeros(6), atol=1e-5)
    assert bool((out <= 1e-6).all())
    assert m.g.training is False and m.h.training is False  # frozen bases stay in eval mode


def test_gradients_reach_the_input_through_the_mixing_network():
    m = _composite()
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    _, gamma = m.forward_with_gamma(x)
    (grad,) = torch.autograd.grad(gamma.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # ...and the mixture's gradient is not the fixed-alpha one: alpha(x) contributes.
    y = torch.arange(4)
    x2 = x.detach().clone().requires_grad_(True)
    (g_adaptive,) = torch.autograd.grad(F.nll_loss(m(x2), y), x2)
    a = float(m.mixing_weight(x2).mean())
    x3 = x.detach().clone().requires_grad_(True)
    (g_fixed,) = torch.autograd.grad(F.nll_loss(m.fixed_alpha(a)(x3), y), x3)
    assert not torch.allclose(g_adaptive, g_fixed)
    assert all(p.grad is None for p in [*m.g.parameters(), *m.h.parameters()])


def test_eval_alpha_stays_in_the_configured_range():
    m = _composite(MixingConfig(eval_scale=50.0, eval_bias=0.0, alpha_min=0.3, alpha_max=0.6))
    m.train()
    m(torch.rand(32, 3, 32, 32))  # give the BN some statistics
    m.eval()
    for scale in (0.0, 1.0, 30.0):  # saturating inputs push alpha to both ends
        a = m.mixing_weight((torch.rand(64, 3, 32, 32) * scale).clamp(0, 1))
        assert bool(((a >= 0.3 - 1e-6) & (a <= 0.6 + 1e-6)).all())
    # Training mode uses the training constants and no squeeze.
    assert MixingConfig().alpha_min == 0.0 and MixingConfig().alpha_max == 1.0


def test_deployed_floor_holds_where_the_sigmoid_goes_below_it():
    """A configured [0.8, 1] floor (the shipped model's): the same mixer without it gives alphas below 0.8."""
    floored, bare = (_composite(MixingConfig(eval_bias=0.0, alpha_min=lo)) for lo in (0.8, 0.0))
    x = torch.rand(64, 3, 32, 32)
    for m in (floored, bare):
        m.train()
        m(x)  # the same BN statistics for both
        m.eval()
    a_floored, a_bare = floored.mixing_weight(x), bare.mixing_weight(x)
    assert float(a_bare.min()) < 0.8 <= float(a_floored.min()) and float(a_floored.max()) <= 1.0
    torch.testing.assert_close(a_floored, 0.8 + 0.2 * a_bare)
    with pytest.raises(ConfigError):
        MixingConfig(alpha_min=0.7, alpha_max=0.6)


def test_no_underflow_with_a_one_hot_standard_model():
    zg = torch.zeros(3, 10)
    zg[:, 0] = 1e4  # softmax(g) is exactly one-hot in float32
    zh = torch.randn(3, 10, requires_grad=True)
    alpha = torch.full((3,), 0.2, requires_grad=True)
    out = mix_log_probs(zg, zh, alpha)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.logsumexp(1), torch.zeros(3), atol=1e-5)
    # log(0.8 * 0 + 0.2 * p_h) for the classes g rules out: finite, not -inf
    assert torch.allclose(out[:, 1:], (0.2 * F.softmax(zh, 1)[:, 1:]).log(), atol=1e-5)
    out[:, 3].sum().backward()
    assert torch.isfinite(zh.grad).all() and torch.isfinite(alpha.grad).all()


def test_feature_taps_find_stage_ends_and_refuse_tta():
    assert auto_taps(create_model("small_cnn.init"), (3, 32, 32)) == ["features.4", "features.7"]
    assert auto_taps(create_model("airbench94.init", tta_level=0), (3, 32, 32)) == ["groups.0", "groups.1"]
    tta = create_model("airbench94.init", tta_level=2)
    taps = FeatureTaps(tta, ["groups.0"])
    with pytest.raises(RuntimeError, match="fired twice"):
        taps.run(tta, torch.rand(2, 3, 32, 32))
    tta(torch.rand(2, 3, 32, 32))  # the model called on its own is unaffected by the hooks
    with pytest.raises(Exception, match="feature tap"):
        FeatureTaps(tta, ["groups.9"])


def test_checkpoint_stores_only_the_mixer_and_pins_the_bases(tmp_path):
    for i, name in enumerate(("g", "h")):
        save_checkpoint(_tiny(i), tmp_path / name, architecture="tiny_cnn", arch_args={}, dataset="synthetic",
                        num_classes=10)
    m = build_adaptive_smoothing(str(tmp_path / "g.safetensors"), str(tmp_path / "h.safetensors"), width=8)
    m.train()
    m(torch.rand(16, 3, 32, 32))  # move the BN statistics away from their init
    m.eval()
    meta = save_checkpoint(m, tmp_path / "as", architecture="adaptive_smoothing", arch_args=m.arch_args,
                           dataset="synthetic", num_classes=10).metadata
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "as.safetensors"))
    assert keys and not any(k.startswith(("g.", "h.")) for k in keys)
    loaded = load_model(str(tmp_path / "as.safetensors"))
    assert loaded.checkpoint_sha256 == meta["sha256"]
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded.model(x), m(x))
    # A different robust base under the same path: the recorded sha256 refuses it.
    save_checkpoint(_tiny(7), tmp_path / "h", architecture="tiny_cnn", arch_args={}, dataset="synthetic",
                    num_classes=10)
    with pytest.raises(CheckpointError, match="robust model"):
        load_model(str(tmp_path / "as.safetensors"))


def test_comp_loss_labels_and_terms():
    gamma = torch.tensor([-3.0, 3.0])
    logp = F.log_softmax(torch.randn(2, 10), 1)
    y = torch.tensor([1, 2])
    loss, parts = trainer.comp_loss(gamma, torch.tensor([0.0, 1.0]), logp, y, c_bce=1, c_ce=0, c_prod=0)
    assert loss < 0.05  # gamma low on clean (label 0) and high on attacked (label 1): small BCE
    flipped, _ = trainer.comp_loss(gamma, torch.tensor([1.0, 0.0]), logp, y, c_bce=1, c_ce=0, c_prod=0)
    assert flipped > 3.0
    ce = F.nll_loss(logp, y, reduction="none")
    bce = F.binary_cross_entropy_with_logits(gamma, torch.tensor([0.0, 1.0]), reduction="none")
    full, _ = trainer.comp_loss(gamma, torch.tensor([0.0, 1.0]), logp, y, c_bce=1.5, c_ce=0.5, c_prod=0.2)
    assert torch.allclose(full, (1.5 * bce + 0.5 * ce + 0.2 * bce * ce).mean())


def test_trainer_labels_clean_0_attacked_1_and_attacks_the_composite(monkeypatch):
    m = _composite()
    seen = {}
    real_loss = trainer.comp_loss

    def spy(gamma, is_adv, log_probs, y, **kw):
        seen.setdefault("is_adv", is_adv.clone())
        return real_loss(gamma, is_adv, log_probs, y, **kw)

    import robustkit.attacks.apgd as apgd_mod

    real_attack = apgd_mod.randomized_attack

    def attack_spy(model_fn, x, y, **kw):
        seen.setdefault("view", (m.training, m.attack_view))
        seen.setdefault("clean", x.clone())
        return real_attack(model_fn, x, y, **kw)

    monkeypatch.setattr(trainer, "comp_loss", spy)
    monkeypatch.setattr(apgd_mod, "randomized_attack", attack_spy)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    config = AdaptiveSmoothingConfig(eps="8/255", epochs=1, batch_size=8, n_targets=1, iter_lo=1, iter_hi=2)
    trainer.train_mixing(m, x, y, config, progress=False)
    assert seen["view"] == (False, True)  # mixer in eval mode, training constants, during the attack
    assert seen["is_adv"].tolist() == [0.0] * 8 + [1.0] * 16  # clean, APGD-CE copy, targeted copy
    assert m.attack_view is False and m.training is False


def test_training_moves_gamma_up_on_attacks_and_down_on_clean():
    """Toy problem: g is an accurate but fragile model, h a constant-ish one. Training the mixer must
    separate clean from attacked inputs in gamma (attacked -> larger gamma -> trust h)."""
    torch.manual_seed(0)
    from conftest import train_tiny

    from robustkit.data import load_split

    g = train_tiny(steps=60)
    h = _tiny(3)
    taps = auto_taps(g, (3, 32, 32))
    m = MixedClassifier(g, h, mixing_net=MixingNet(16, 16, width=8), taps_g=taps, taps_h=taps,
                        config=MixingConfig(bn_momentum=0.2)).eval()
    x, y = load_split("synthetic", "train").tensors(96)

    def separation() -> float:
        from robustkit.attacks.apgd import apgd

        adv = apgd(lambda z: F.cross_entropy(m(z), y, reduction="none"), x, 16 / 255, n_iter=5,
                   generator=torch.Generator().manual_seed(1))
        m.eval()
        with torch.no_grad():
            return float(m.forward_with_gamma(adv)[1].mean() - m.forward_with_gamma(x)[1].mean())

    before = separation()
    # BN(affine=False) fixes gamma's batch mean and spread in training: the mixer can only learn to
    # *rank* inputs, which on this toy needs a few epochs at a high rate and a visible (16/255) attack.
    config = AdaptiveSmoothingConfig(eps="16/255", epochs=6, batch_size=32, lr=1e-2, n_targets=1, iter_lo=3,
                                     iter_hi=5, warmup_frac=0.0)
    trainer.train_mixing(m, x, y, config, progress=False)
    after = separation()
    assert after > before + 0.1, (before, after)


def _resolve(path: Path, *overrides: str) -> AdaptiveSmoothingConfig:
    from robustkit.core.config import read_recipe, resolve_config

    _meta, fields = read_recipe(path)
    return resolve_config(AdaptiveSmoothingConfig, recipe=fields, overrides=overrides)


def test_recipe_validation(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "x"\nepochs = 2\nn_target = 3\n')
    with pytest.raises(ConfigError, match="n_targets"):
        _resolve(p)
    p.write_text('epochs = 2\n')
    assert _resolve(p) == AdaptiveSmoothingConfig(epochs=2)
    for bad, match in (("epochs = 2.5", "epochs"), ('eps = "8/0"', "eps"), ("iter_hi = 1", "iter_lo <= iter_hi"),
                       ("alpha_min = 1.5", "alpha_min")):
        p.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=match):
            _resolve(p)
    with pytest.raises(ConfigError, match="iter_lo <= iter_hi"):  # --set on top of a valid recipe, too
        _resolve(RECIPE, "iter_lo=9")
    json.dumps(config_to_dict(_resolve(RECIPE)))


def test_shipped_checkpoint_records_the_recipe_config():
    """The shipped sidecar's `config` is the recipe's resolved config, and it agrees with what the file
    recorded when it was made: the re-deploy run's settings, the mixer it re-deployed, and the deployed
    constants the composite is built with."""
    from robustkit.core.config import read_recipe

    meta = json.loads(SHIPPED.read_text())
    config = _resolve(RECIPE)
    assert read_recipe(RECIPE)[0]["trainer"] == meta["trainer"] == "adaptive_smoothing"
    resolved = config_to_dict(config)
    # fields added after the file was made (holdout) are absent from it and must hold their defaults
    later = {k for k in resolved if k not in meta["config"]}
    assert later <= {"holdout"} and all(resolved[k] == getattr(AdaptiveSmoothingConfig(), k) for k in later)
    assert {k: v for k, v in resolved.items() if k not in later} == meta["config"]
    training = meta["training"]
    assert {**training["recipe"], "mixer_from": training["mixer_from"]["path"]} == meta["config"]
    assert meta["arch_args"]["mixing"] == asdict(MixingConfig(**config.mixing()))
    assert (meta["arch_args"]["std"], meta["arch_args"]["robust"]) == (config.std, config.robust)


def test_print_config_reads_back_as_the_same_config(tmp_path, capsys):
    from robustkit.cli import main

    assert main(["train", "--recipe", str(RECIPE), "--print-config"]) == 0
    (tmp_path / "printed.toml").write_text(capsys.readouterr().out)
    assert _resolve(tmp_path / "printed.toml") == _resolve(RECIPE)


def test_shipped_default_model_is_the_recipe_and_reproduces_its_card(real_data_dir):
    """`adaptive_smoothing` (no tag) is the shipped composite: airbench94 tta0 + ltd, both sha256-pinned,
    the recipe's deployed constants, and 111 / 200 clean on the first real test images (the card)."""
    from robustkit.data import load_split
    from robustkit.models.airbench import AirbenchNet
    from robustkit.models.ltd_student import LTDStudent

    loaded = load_model("adaptive_smoothing")
    m = loaded.model
    assert loaded.name == "adaptive_smoothing.cifar10_partial"
    assert isinstance(m, MixedClassifier) and isinstance(m.g, AirbenchNet) and isinstance(m.h, LTDStudent)
    config = _resolve(RECIPE)
    assert (m.config.eval_bias, m.config.alpha_min, m.config.train_bias) == (
        config.eval_bias, config.alpha_min, config.train_bias)
    assert loaded.metadata["arch_args"]["std_pin"] == load_model("airbench94.cifar10_partial_tta0").function_sha256
    assert (m.config.alpha_min, m.config.alpha_max) == (0.8, 1.0)  # the deployed floor
    x, y = load_split("cifar10", "test", data_dir=real_data_dir).tensors(200)
    with torch.no_grad():
        out, gamma = m.forward_with_gamma(x)
        assert int((out.argmax(1) == y).sum()) == 111
        a = m.mixing_weight(x)
    # The floor is doing work: the bare sigmoid falls below 0.8 on some images, the deployed alpha never.
    assert float(torch.sigmoid(gamma).min()) < 0.8 <= float(a.min()) and float(a.max()) <= 1.0
    torch.testing.assert_close(a, 0.8 + 0.2 * torch.sigmoid(gamma))


def test_cli_trains_then_redeploys_the_same_mixer_with_new_constants(tmp_path, capsys):
    from robustkit.cli import main

    for i, name in enumerate(("g", "h")):
        save_checkpoint(_tiny(i), tmp_path / name, architecture="tiny_cnn", arch_args={}, dataset="synthetic",
                        num_classes=10)
    common = ["--set", f"std={tmp_path / 'g.safetensors'}", "--set", f"robust={tmp_path / 'h.safetensors'}",
              "--dataset", "synthetic", "--set", "train_n=16", "--set", "batch_size=16", "--set", "iter_lo=1",
              "--set", "iter_hi=1", "--set", "width=8", "--set", "val_n=8", "--no-progress", "--threads", "1"]
    assert main(["train", "adaptive_smoothing", *common, "--out", str(tmp_path / "a")]) == 0
    redeploy = [*common, "--set", f"mixer_from={tmp_path / 'a.safetensors'}"]
    assert main(["train", "adaptive_smoothing", *redeploy, "--set", "alpha_min=0.6", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["sha256"] == b["sha256"]  # the very same mixing-network weights
    assert a["arch_args"]["mixing"]["alpha_min"] == 0.0 and b["arch_args"]["mixing"]["alpha_min"] == 0.6
    assert b["training"]["mixer_from"]["sha256"] == a["sha256"]
    assert b["training"]["epochs_log"] == a["training"]["epochs_log"]  # the mixer's training, carried over
    assert (a["config"]["mixer_from"], b["config"]["mixer_from"]) == ("", str(tmp_path / "a.safetensors"))
    assert {k: v for k, v in b["config"].items() if k not in ("alpha_min", "mixer_from")} == \
        {k: v for k, v in a["config"].items() if k not in ("alpha_min", "mixer_from")}
    assert load_model(str(tmp_path / "b.safetensors")).model.config.alpha_min == 0.6
    # A re-deploy whose config claims other training settings than the mixer had is refused (exit 2),
    # and so is a source that does not exist, with the way out in the message.
    capsys.readouterr()
    assert main(["train", "adaptive_smoothing", *redeploy, "--set", "lr=0.01", "--out", str(tmp_path / "c")]) == 2
    assert "trained with lr = 0.001" in capsys.readouterr().err
    missing = [*common, "--set", f"mixer_from={tmp_path / 'none.safetensors'}", "--out", str(tmp_path / "d")]
    assert main(["train", "adaptive_smoothing", *missing]) == 2
    assert 'mixer_from = ""' in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "d.json").exists()


def test_deployed_constants_are_chosen_on_held_out_training_images(tmp_path, monkeypatch):
    """``as_constants`` scores a grid of deployed constants on the last N training images, which the
    mixer left out (``holdout``), picks by its rule, and refuses images the mixer trained on."""
    import dataclasses

    from robustkit.cli import main
    from robustkit.core.errors import DataError
    from robustkit.data import load_split
    from robustkit.train import as_constants

    for i, name in enumerate(("g", "h")):
        save_checkpoint(_tiny(i), tmp_path / name, architecture="tiny_cnn", arch_args={}, dataset="synthetic",
                        num_classes=10)
    n_split = len(load_split("synthetic", "train").labels)
    assert main(["train", "adaptive_smoothing", "--set", f"std={tmp_path / 'g.safetensors'}", "--set",
                 f"robust={tmp_path / 'h.safetensors'}", "--dataset", "synthetic", "--set", "holdout=24",
                 "--set", "train_n=16", "--set", "batch_size=16", "--set", "iter_lo=1", "--set", "iter_hi=1", "--set", "width=8",
                 "--set", "val_n=8", "--no-progress", "--threads", "1", "--out", str(tmp_path / "as")]) == 0
    meta = json.loads((tmp_path / "as.json").read_text())
    assert meta["training"]["data"]["n"] == 16 and meta["training"]["data"]["holdout"] == 24
    out = tmp_path / "pick"
    argv = ["--model", str(tmp_path / "as.safetensors"), "--holdout", "24", "--eval-bias", "0,3",
            "--alpha-min", "0,0.9", "--steps", "2", "--eps", "8/255", "--out", str(out)]
    assert as_constants.main(argv) == 0
    report = json.loads((out / "constants.json").read_text())
    rows = report["rows"]
    assert [(r["eval_bias"], r["alpha_min"]) for r in rows] == [(0, 0), (0, 0.9), (3, 0), (3, 0.9)]
    mean = [(r["clean_acc"] + r["apgd_ce_acc"]) / 2 for r in rows]
    assert (report["pick"]["clean_acc"] + report["pick"]["apgd_ce_acc"]) / 2 == max(mean)
    assert all(r["mean_alpha_clean"] >= 0.9 - 1e-6 for r in rows if r["alpha_min"] == 0.9)
    assert report["checked"][0] == "mixer: none of its training images held out"
    # each clean accuracy is that of the composite deployed with those constants, recomputed here
    loaded = load_model(str(tmp_path / "as.safetensors"))
    x, y = load_split("synthetic", "train").tensors()
    for r in rows:
        loaded.model.config = dataclasses.replace(loaded.model.config, eval_bias=r["eval_bias"],
                                                  alpha_min=r["alpha_min"])
        with torch.no_grad():
            assert round(24 * r["clean_acc"]) == int((loaded.model(x[-24:]).argmax(1) == y[-24:]).sum())
    assert "(picked)" in (out / "constants.md").read_text() and (out / "constants.png").stat().st_size > 1000
    # every finished score is kept: a re-run (after a kill) scores nothing again and reports the same rows;
    # a changed attack setting is a different key and is scored afresh
    cache = out / "constants.records.jsonl"
    assert len(cache.read_text().splitlines()) == 4 + 2
    cache.write_text(cache.read_text() + '{"key": {"eval_bias"')  # the half-written line a kill leaves

    def no_scoring(*a, **k):
        raise AssertionError("scored again")

    with monkeypatch.context() as m:
        m.setattr(as_constants, "score", no_scoring)
        assert as_constants.main(argv) == 0
        assert json.loads((out / "constants.json").read_text())["rows"] == rows
        with pytest.raises(AssertionError, match="scored again"):
            as_constants.main([*argv[:-2], "--steps", "3", "--out", str(out)])
    # two processes on one grid (a second core): what one finishes, the other's next lookup sees
    one, other = (as_constants.ScoreCache(tmp_path / "shared.jsonl", {"model": "m"}) for _ in range(2))
    assert one.get({"eval_bias": 1}) is None
    other.put({"eval_bias": 1}, {"clean_acc": 0.5})
    assert one.get({"eval_bias": 1}) == {"clean_acc": 0.5} and one.get({"eval_bias": 2}) is None
    with pytest.raises(DataError, match="mixer trained on 1 of the held-out images"):
        as_constants.main([*argv[:3], str(n_split - 15), *argv[4:]])  # reaches back to its 16th image


class _MaskedLinear(torch.nn.Module):
    """A linear classifier of a quantised image: its input gradient is zero everywhere, the textbook
    gradient masking a gradient attack cannot see through and a black-box one can."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(10, 3 * 32 * 32, generator=torch.Generator().manual_seed(0)) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 8).div(8).flatten(1) @ self.w.t()


def test_deployed_constants_can_be_scored_against_square_too():
    """``--square-queries``: robust is APGD-CE, then Square on its survivors, so it is never above
    APGD-CE's, and on a gradient-masked model it is what exposes the masking; the count equals one
    made by hand (Square from the clean images, seeded by position), whatever the batch size."""
    from robustkit.attacks.apgd import apgd_ce_batches
    from robustkit.attacks.engine import rng
    from robustkit.attacks.engine.square import square_linf
    from robustkit.data import load_split
    from robustkit.train.as_constants import score

    model = _MaskedLinear().eval()
    x, _ = load_split("synthetic", "test").tensors()
    x = x[:24]
    with torch.no_grad():
        y = model(x).argmax(1)  # every image correct: robust accuracy is all the attacks' doing
    kw = {"eps": 4 / 255, "steps": 1, "seed": 0}
    plain = score(model, x, y, **kw)
    assert plain["clean_acc"] == 1.0 and plain["robust_acc"] == plain["apgd_ce_acc"]
    both = score(model, x, y, square_queries=30, **kw)
    assert (both["clean_acc"], both["apgd_ce_acc"]) == (plain["clean_acc"], plain["apgd_ce_acc"])
    assert both["robust_acc"] < both["apgd_ce_acc"] - 0.1  # the masking, exposed
    assert score(model, x, y, square_queries=30, batch_size=7, **kw)["robust_acc"] == both["robust_acc"]
    (_, _, adv), = apgd_ce_batches(model, x, y, eps=4 / 255, steps=1, seed=0)
    sq, _ = square_linf(model, x, y, eps=4 / 255, seeds=rng.derive_seeds(0, 24), n_queries=30)
    assert float((sq - x).abs().max()) <= 4 / 255 + 1e-6
    with torch.no_grad():
        by_hand = (model(adv).argmax(1) == y) & (model(sq).argmax(1) == y)
    assert both["robust_acc"] == float(by_hand.sum()) / 24


def test_the_robust_base_is_chosen_on_held_out_training_images(tmp_path, capsys):
    """``as_base`` scores candidate robust models on the last N training images with the
    ``as_constants`` rule and refuses a candidate that trained on them, or that records no training
    images at all (it could have)."""
    from robustkit.cli import guarded
    from robustkit.data import load_split
    from robustkit.train import as_base
    from robustkit.train.as_constants import score

    n_split = len(load_split("synthetic", "train").labels)
    for i, name in enumerate(("a", "b", "c")):
        seen = f"0-{n_split - 25}" if name != "c" else f"0-{n_split - 1}"  # c trained on everything
        save_checkpoint(_tiny(i), tmp_path / name, architecture="tiny_cnn", arch_args={}, dataset="synthetic",
                        num_classes=10, training={"data": {"dataset": "synthetic", "train_indices": seen}})
    save_checkpoint(_tiny(3), tmp_path / "d", architecture="tiny_cnn", arch_args={}, dataset="synthetic", num_classes=10)
    ck = {n: str(tmp_path / f"{n}.safetensors") for n in "abcd"}
    argv = ["--holdout", "24", "--eps", "2/255", "--steps", "2", "--square-queries", "10", "--out", str(tmp_path / "o")]
    assert as_base.main(["--candidates", f"{ck['a']},{ck['b']}", *argv]) == 0
    report = json.loads((tmp_path / "o" / "bases.json").read_text())
    x, y = load_split("synthetic", "train").tensors()
    for r, name in zip(report["rows"], "ab", strict=True):  # each score is that model's, recomputed here
        expect = score(load_model(ck[name]).model.eval(), x[-24:], y[-24:], eps=2 / 255, steps=2, seed=0,
                       square_queries=10)
        assert (r["clean_acc"], r["apgd_ce_acc"], r["robust_acc"]) == (
            expect["clean_acc"], expect["apgd_ce_acc"], expect["robust_acc"])
    best = max(report["rows"], key=lambda r: ((r["clean_acc"] + r["robust_acc"]) / 2, r["robust_acc"]))
    assert report["pick"] == best["model"] and "(picked)" in (tmp_path / "o" / "bases.md").read_text()
    capsys.readouterr()
    for bad, needle in (("c", "trained on 24 of the held-out images"), ("d", "records no synthetic training images")):
        assert guarded(as_base.main, ["--candidates", f"{ck['a']},{ck[bad]}", *argv]) == 2
        assert needle in capsys.readouterr().err


def test_trains_on_grayscale_28_pixel_images(tmp_path):
    """The feature taps are found at the dataset's own image shape (Fashion-MNIST: 1 x 28 x 28), not
    CIFAR's: a composite of two one-channel models trains, saves and reloads."""
    import numpy as np

    from robustkit.cli import main
    from robustkit.models.small_cnn import TinyCNN

    rng = np.random.default_rng(0)
    (tmp_path / "data" / "fashion_mnist").mkdir(parents=True)
    for split, n in (("train", 40), ("test", 8)):
        np.savez(tmp_path / "data" / "fashion_mnist" / f"{split}.npz",
                 images=rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), labels=np.arange(n) % 10,
                 indices=np.arange(n))
    for i, name in enumerate(("g", "h")):
        torch.manual_seed(i)
        save_checkpoint(TinyCNN(in_channels=1, mean=(0.3,), std=(0.3,)), tmp_path / name, architecture="tiny_cnn",
                        arch_args={"in_channels": 1, "mean": [0.3], "std": [0.3]}, dataset="fashion_mnist",
                        num_classes=10)
    assert main(["train", "adaptive_smoothing", "--set", f"std={tmp_path / 'g.safetensors'}", "--set",
                 f"robust={tmp_path / 'h.safetensors'}", "--dataset", "fashion_mnist", "--set", "eps=0.1",
                 "--set", "holdout=8", "--set", "batch_size=16", "--set", "iter_lo=1", "--set", "iter_hi=1",
                 "--set", "width=8", "--set", "val_n=8", "--data-dir", str(tmp_path / "data"), "--no-download",
                 "--no-progress", "--threads", "1", "--out", str(tmp_path / "as")]) == 0
    meta = json.loads((tmp_path / "as.json").read_text())
    assert meta["arch_args"]["input_shape"] == [1, 28, 28] and meta["training"]["data"]["n"] == 32
    composite = load_model(str(tmp_path / "as.safetensors")).model
    assert composite(torch.rand(3, 1, 28, 28)).shape == (3, 10)


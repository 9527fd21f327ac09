"""The shared adversarial-training loop (robustkit.train._adversarial): losses, inner maximisation
(ball, box, BN mode, no .grad side effects), AWP round trip, reproducibility, fast AT against a
reference of the loop that trained the shipped small_cnn, a toy problem where adversarial training
must buy robustness, and `robustkit train pgd_at/trades/fast_at` (old spellings with a warning)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.models.base import Normalize
from robustkit.train._adversarial import (
    AWP,
    AdversarialConfig,
    Method,
    evaluate_pgd,
    fgsm_rs,
    fit,
    framework_loss,
    inner_max,
    kl_div,
    lr_schedule,
    random_start,
    soft_cross_entropy,
)

REPO = Path(__file__).resolve().parents[1]


# Tiny models on a shared CPU: extra OpenMP threads only wait on each other (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _small_bn_cnn(seed: int = 0) -> nn.Module:
    from robustkit.models import create_model

    return create_model("small_cnn.init", seed=seed, width=4).train()


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from robustkit.data import load_split

    return load_split("synthetic", "train").tensors(n)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------- losses


def test_soft_cross_entropy_indices_onehot_and_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    by_index = soft_cross_entropy(logits, y)
    assert torch.equal(by_index, soft_cross_entropy(logits, F.one_hot(y, 10).float()))  # bit-exact
    torch.testing.assert_close(by_index, F.cross_entropy(logits, y), rtol=1e-6, atol=1e-6)
    p = torch.softmax(torch.randn(16, 10, generator=g), 1)
    torch.testing.assert_close(soft_cross_entropy(logits, p), F.cross_entropy(logits, p), rtol=1e-6, atol=1e-6)
    # A saturated logit must not turn 0 * log(0) into nan.
    assert torch.isfinite(soft_cross_entropy(torch.tensor([[1e4, -1e4]]), torch.tensor([0])))
    q = torch.randn(16, 10, generator=g)
    torch.testing.assert_close(
        kl_div(logits, q), F.kl_div(F.log_softmax(q, 1), F.softmax(logits, 1), reduction="batchmean"))
    assert float(kl_div(logits, logits)) == pytest.approx(0.0, abs=1e-6)


def test_framework_losses() -> None:
    model = _small_bn_cnn()
    x, y = _data(16)
    x_adv = (x + 0.01).clamp(0, 1)
    with torch.no_grad():
        loss, out = framework_loss(model, "pgd_at", x, x_adv, y)
        torch.testing.assert_close(loss, F.cross_entropy(model(x_adv), y))
        loss, _ = framework_loss(model, "trades", x, x_adv, y, beta=6.0)
        zc, za = model(x), model(x_adv)
        ref = F.cross_entropy(zc, y) + 6.0 * F.kl_div(F.log_softmax(za, 1), F.softmax(zc, 1),
                                                      reduction="batchmean")
        torch.testing.assert_close(loss, ref)
    assert out.shape == (16, 10)


# ---------------------------------------------------------------------------------------- inner max


@pytest.mark.parametrize("norm, eps", [("Linf", 8 / 255), ("L2", 0.5)])
@pytest.mark.parametrize("objective, steps, start", [("ce", 3, "uniform"), ("kl", 3, "trades"),
                                                     ("ce", 1, "uniform")])
def test_inner_max_stays_in_ball_and_box(norm: str, eps: float, objective: str, steps: int, start: str) -> None:
    model = _small_bn_cnn()
    x, y = _data(32)
    x[:4] = 0.0  # saturated images: the box constraint binds
    x[4:8] = 1.0
    gen = torch.Generator().manual_seed(1)
    x_adv = inner_max(model, x, y, objective=objective, norm=norm, eps=eps, alpha=2.5 * eps / steps,
                      steps=steps, start=start, gen=gen)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(size.mean()) > 0.3 * eps  # it moved
    if objective == "ce":
        with torch.no_grad():
            model.eval()
            assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_random_start_inside_the_ball() -> None:
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    d = (random_start(x, "L2", 0.5, "uniform", gen) - x).flatten(1).norm(dim=1)
    assert float(d.max()) <= 0.5 + 1e-6 and float(d.min()) > 0.2  # inside, not collapsed to x
    d = (random_start(x, "Linf", 0.1, "uniform", gen) - x).abs().amax((1, 2, 3))
    assert float(d.max()) <= 0.1 + 1e-6
    d = (random_start(x, "Linf", 0.1, "trades", gen) - x).abs()
    assert 0 < float(d.max()) < 0.01  # TRADES: x + 0.001 N(0, 1)


def test_inner_max_runs_bn_in_eval_mode_and_leaves_grads_alone() -> None:
    model = _small_bn_cnn()
    x, y = _data(16)
    modes: list[bool] = []
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [bn.register_forward_hook(lambda m, i, o: modes.append(m.training)) for bn in bns]
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    params = list(model.parameters())
    sentinel = [torch.full_like(p, 7.0) for p in params]
    for p, s in zip(params, sentinel, strict=True):
        p.grad = s.clone()
    for objective in ("ce", "kl"):
        inner_max(model, x, y, objective=objective, steps=2, gen=torch.Generator().manual_seed(0))
    fgsm_rs(model, x, y, gen=torch.Generator().manual_seed(0))
    assert modes and not any(modes)  # every BN forward of the attacks ran in eval mode
    assert model.training and all(m.training for m in model.modules())  # restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())  # stats not updated
    assert all(torch.equal(p.grad, s) for p, s in zip(params, sentinel, strict=True))
    modes.clear()
    fgsm_rs(model, x, y, gen=torch.Generator().manual_seed(0), bn="train")  # fast AT's attack_bn = "train"
    assert modes and all(modes)  # batch statistics ...
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())  # ... and updated
    assert all(torch.equal(p.grad, s) for p, s in zip(params, sentinel, strict=True))
    for h in hooks:
        h.remove()
    model.eval()
    inner_max(model, x, y, steps=1)
    assert not model.training  # a model in eval mode stays in eval mode


@pytest.mark.parametrize("norm, eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_fgsm_rs_stays_in_ball_and_box(norm: str, eps: float) -> None:
    model = _small_bn_cnn()
    x, y = _data(32)
    x[:4] = 0.0
    x[4:8] = 1.0
    x_adv = fgsm_rs(model, x, y, norm=norm, eps=eps, alpha=1.25 * eps, gen=torch.Generator().manual_seed(2))
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-6 and float(size.mean()) > 0.3 * eps
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert torch.equal(fgsm_rs(model, x, y, eps=0.0), x)  # eps 0: clean training, no random draw


# ---------------------------------------------------------------------------------------- AWP


def test_awp_perturbs_then_restores_bit_exactly() -> None:
    model = _small_bn_cnn()
    x, y = _data(32)
    x_adv = inner_max(model, x, y, steps=1, gen=torch.Generator().manual_seed(0))
    before = _state(model)
    awp = AWP(model, gamma=5e-3)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return framework_loss(m, "trades", x, x_adv, y)[0]

    with awp.perturbed(loss_fn):
        during = _state(model)
        for name, p in model.named_parameters():
            if p.ndim > 1:  # conv/linear weights: moved by gamma * ||W||
                rel = float((during[name] - before[name]).norm() / before[name].norm())
                assert rel == pytest.approx(5e-3, rel=1e-3), name
            else:  # BN affine and biases untouched
                assert torch.equal(during[name], before[name]), name
        for k in before:  # the proxy took the extra forward: the model's BN statistics did not move
            if "running" in k or "num_batches" in k:
                assert torch.equal(during[k], before[k]), k
        perturbed_loss = float(loss_fn(copy.deepcopy(model)).detach())  # a copy: BN stats stay put
    assert _same(_state(model), before)  # bit-exact, BN buffers included
    assert perturbed_loss > float(loss_fn(copy.deepcopy(model)).detach())  # the perturbation is an ascent step
    # restored on error as well
    with pytest.raises(RuntimeError, match="boom"), awp.perturbed(loss_fn):
        raise RuntimeError("boom")
    for k in before:
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(model.state_dict()[k], before[k]), k


# ---------------------------------------------------------------------------------------- loop


def test_lr_schedules() -> None:
    one = lr_schedule("onecycle", 0.1, epochs=10, steps_per_epoch=10, lr_peak_frac=0.3)
    assert one(0) == 0.0 and one(30) == pytest.approx(0.1) and one(99) == pytest.approx(0.1 / 70)
    pw = lr_schedule("piecewise", 0.1, epochs=8, steps_per_epoch=5)  # milestones 4 and 6
    assert [pw(5 * e) for e in range(8)] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


@pytest.mark.parametrize("method, awp", [(Method("pgd_at", steps=2), False), (Method("trades", steps=2), True),
                                         (Method("pgd_at", "fgsm-rs", steps=1), True)])
def test_training_is_reproducible_and_one_hot_targets_change_nothing(method: Method, awp: bool) -> None:
    """Same seed -> bit-identical weights; soft targets that are one-hot rows give *exactly* the
    run with class indices (same inner examples, same losses, same updates)."""
    x, y = _data(48)
    config = AdversarialConfig(epochs=2, batch_size=16, awp=awp, awp_warmup=1, val_pgd_n=8, seed=5)
    runs = []
    for targets_fn in (None, lambda xc, xa, yy: F.one_hot(yy, 10).float()):
        model = _small_bn_cnn(seed=3)
        logs = fit(model, x, y, config, method, val=(x[:16], y[:16]), targets_fn=targets_fn, progress=False)
        runs.append((_state(model), logs))
    assert _same(runs[0][0], runs[1][0])
    strip = [{k: v for k, v in log.items() if "seconds" not in k} for log in runs[0][1]]
    assert strip == [{k: v for k, v in log.items() if "seconds" not in k} for log in runs[1][1]]
    assert [log["awp"] for log in runs[0][1]] == ([0.0, 1.0] if awp else [0.0, 0.0])
    assert "val_pgd10_acc" in runs[0][1][0] and runs[0][1][0]["val_n"] == 8
    assert not _same(runs[0][0], _state(_small_bn_cnn(seed=3)))  # it did train


def _reference_fast_at(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, *, epochs: int,
                       batch_size: int, seed: int) -> None:
    """The fast-AT loop that trained the shipped small_cnn.cifar10_partial (robustkit/models/small_cnn.py
    until it was merged into fast_at), written out: Wong et al.'s FGSM-RS in delta space with BN in train
    mode, CE, Nesterov SGD with decay on conv/linear weights, one-cycle lr per step, crop + flip."""
    from robustkit.train._loop import crop_flip

    eps, alpha, lr_max, peak = 8 / 255, 10 / 255, 0.1, 0.3
    gen = torch.Generator().manual_seed(seed)
    model.train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0}],
                          lr=0.0, momentum=0.9, nesterov=True)
    per_epoch = math.ceil(len(x_train) / batch_size)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for b in range(per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            x, y = crop_flip(x_train[idx], 4, gen), y_train[idx]
            delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
            delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
            x = (x + (delta.detach() + alpha * g.sign()).clamp(-eps, eps)).clamp(0, 1)
            t = step / (epochs * per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr_max * t / peak if t < peak else lr_max * (1 - t) / (1 - peak)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()


def test_fast_at_with_train_mode_bn_is_the_loop_of_the_shipped_small_cnn() -> None:
    """defenses/small_cnn.cifar10_partial.toml claims fast_at re-creates the shipped weights: the shared
    loop with attack_bn = "train" must give the old loop's weights bit for bit."""
    x, y = _data(80)
    reference = _small_bn_cnn(seed=1)
    _reference_fast_at(reference, x, y, epochs=2, batch_size=32, seed=7)
    model = _small_bn_cnn(seed=1)
    config = AdversarialConfig(epochs=2, batch_size=32, seed=7, alpha="10/255")
    fit(model, x, y, config, Method("pgd_at", "fgsm-rs", steps=1, attack_bn="train"), progress=False)
    assert _same(_state(model), _state(reference))
    model = _small_bn_cnn(seed=1)
    fit(model, x, y, config, Method("pgd_at", "fgsm-rs", steps=1), progress=False)  # eval-mode BN: another run
    assert not _same(_state(model), _state(reference))


def _toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes on 1x8x8 images: the top row is a robust feature (+-0.25 around 0.5, agreeing
    with the label 80% of the time: margin 0.25 > eps); the other 56 pixels carry a weak signal
    (+-0.05, noise 0.1) that is jointly perfectly predictive but flipped by an eps = 0.1 shift.
    Clean training uses the non-robust pixels (~100% clean, ~0% PGD); adversarial training must
    fall back on the top row (~80% under attack)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    s = (2 * y - 1).float()
    agree = torch.rand(n, generator=g) < 0.8
    x = 0.5 + 0.05 * s.view(-1, 1, 1, 1) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    x[:, :, 0, :] = 0.5 + 0.25 * torch.where(agree, s, -s).view(-1, 1, 1)  # flip-invariant row
    return x.clamp(0, 1), y


def _mlp(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(Normalize([0.5], [0.1]), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                             nn.Linear(16, 2))


@pytest.mark.parametrize("method", [Method("pgd_at", steps=3), Method("trades", steps=3),
                                    Method("pgd_at", "fgsm-rs", steps=1)])
def test_adversarial_training_buys_robustness_on_a_toy_problem(method: Method) -> None:
    x, y = _toy(512, 0)
    xt, yt = _toy(256, 1)
    eps = 0.1
    config = AdversarialConfig(epochs=8, batch_size=64, lr_max=0.05, crop_pad=0, val_pgd_n=0, eps=eps)
    untrained = evaluate_pgd(_mlp(), xt, yt, eps=eps)
    clean_model = _mlp()
    fit(clean_model, x, y, dataclasses.replace(config, eps=0.0), method, progress=False)
    clean = evaluate_pgd(clean_model, xt, yt, eps=eps)
    robust_model = _mlp()
    fit(robust_model, x, y, config, method, progress=False)
    robust = evaluate_pgd(robust_model, xt, yt, eps=eps)
    assert clean["clean_acc"] > 0.95 and clean["pgd_acc"] < 0.1  # accurate, not robust
    assert untrained["pgd_acc"] < 0.1
    # The robust feature's ceiling is ~0.8 (PGD-3 AT reaches it; one FGSM-RS step ~0.56 here).
    assert robust["pgd_acc"] > 0.5 and robust["pgd_acc"] > clean["pgd_acc"] + 0.4, robust


# ---------------------------------------------------------------------------------------- CLI

TINY = ["--dataset", "synthetic", "--set", "arch=tiny_cnn", "--set", "arch_args={ width = 4 }", "--set", "n_train=48",
        "--set", "n_test=24", "--set", "epochs=1", "--set", "batch_size=16", "--set", "val_pgd_n=8", "--threads", "1",
        "--no-progress"]


def test_cli_pgd_at_end_to_end(tmp_path: Path) -> None:
    from robustkit.cli import main
    from robustkit.core.checkpoint import load_checkpoint
    from robustkit.models import load_model

    out = tmp_path / "pgd"
    assert main(["train", "--recipe", str(REPO / "defenses" / "pgd_at.toml"), *TINY, "--set", "steps=2",
                 "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "pgd.json").read_text())
    assert meta["trainer"] == "pgd_at" and meta["architecture"] == "tiny_cnn" and meta["arch_args"]["width"] == 4
    assert meta["arch_args"]["mean"] == [0.5, 0.5, 0.5]  # filled in from the dataset
    config = meta["config"]
    assert config["steps"] == 2 and config["epochs"] == 1 and config["lr_max"] == 0.1  # --set, then the recipe
    assert config["arch_args"] == {"width": 4} and config["dataset"] == "synthetic" and "beta" not in config
    tr = meta["training"]
    assert tr["framework"] == "pgd_at" and tr["inner"] == "pgd" and tr["steps"] == 2
    assert tr["alpha_value"] == pytest.approx(2.5 * (8 / 255) / 2) and tr["seed"] == 0
    assert tr["data"]["n_train"] == 48 and len(tr["epochs_log"]) == 1
    assert meta["metrics"]["n"] == 24 and "pgd10_linf_8_255_acc" in meta["metrics"]
    loaded = load_model(str(out) + ".safetensors")
    x, _ = _data(8)
    state, _ = load_checkpoint(str(out) + ".safetensors")
    reference = load_model("tiny_cnn.init", width=4, mean=[0.5] * 3, std=[0.25] * 3).model
    reference.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference(x))


def test_old_trainer_spellings_still_work_with_a_deprecation_warning(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from robustkit.cli import main

    for old, new in (("pgd-at", "pgd_at"), ("fast-at", "fast_at")):
        assert main(["train", old, *TINY, "--out", str(tmp_path / old)]) == 0
        err = capsys.readouterr().err
        assert f"trainer name {old!r} is deprecated" in err and f"use {new!r}" in err
        meta = json.loads((tmp_path / f"{old}.json").read_text())
        assert meta["trainer"] == new
    assert meta["training"]["inner"] == "fgsm-rs" and meta["training"]["steps"] == 1
    assert meta["training"]["alpha_value"] == pytest.approx(1.25 * 8 / 255)  # alpha "auto" for one step


def test_cli_rejects_bad_configs_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from robustkit.cli import main

    def error(*argv: str) -> str:
        assert main(["train", *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err  # one line
        return err

    assert "unknown key 'steps' for FastATConfig" in error("fast_at", *TINY, "--set", "steps=3")  # one step, fixed
    assert "did you mean 'width'" in error("pgd_at", *TINY, "--set", "arch_args={ widht = 4 }")
    assert "eps: malformed eps '8/'" in error("trades", "--set", "eps=8/")
    assert "alpha" in error("trades", "--set", "alpha=fast")
    assert "did you mean 'Linf'" in error("pgd_at", "--set", "norm=linf")
    assert "did you mean 'pgd_at'" in error("ltd", "--set", "framework=pgd-at")
    assert "tau_s must be a finite number > 0" in error("ltd", "--set", "tau_s=0")
    assert "is for trainer 'ltd'" in error("pgd_at", "--recipe", str(REPO / "defenses" / "ltd.toml"))
    assert "did you mean 'pgd_at'" in error("pgd-ta")
    assert "init" in error("pgd_at", *TINY, "--set", "init=small_cnn.cifar10_partial")  # arch must name it

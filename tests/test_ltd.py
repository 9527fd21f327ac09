"""LTD (Low Temperature Distillation): soft labels, the fixed-temperature student (same function in
train and eval: no defensive-distillation gradient masking), exact reduction to PGD-AT / TRADES
with one-hot labels, the "ltd" checkpoint round trip and `robustkit train ltd` (trainer robustkit.train.ltd)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.models import create_model, load_model
from robustkit.models.ltd_student import LTDStudent
from robustkit.train._adversarial import (
    AdversarialConfig,
    Method,
    build_model,
    fit,
    framework_loss,
    kl_div,
    soft_cross_entropy,
)
from robustkit.train.ltd import LTDConfig, ltd_targets, soft_labels, teacher_stats

REPO = Path(__file__).resolve().parents[1]


# Tiny models on a shared CPU: extra OpenMP threads only wait on each other (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from robustkit.data import load_split

    return load_split("synthetic", "train").tensors(n)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(1)


# ---------------------------------------------------------------------------------------- soft labels


def test_soft_labels_are_distributions_that_sharpen_as_tau_t_falls(tiny_model: nn.Module) -> None:
    x, y = _data(64)
    tiny_model.train()
    taus = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    labels = [soft_labels(tiny_model, x, t) for t in taus]
    assert tiny_model.training  # the caller's mode is restored; the labels were taken in eval mode
    tiny_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(labels[3], torch.softmax(tiny_model(x), 1))  # tau_t = 1: plain softmax
    for p in labels:
        assert not p.requires_grad and (p >= 0).all()
        torch.testing.assert_close(p.sum(1), torch.ones(len(x)))
    entropy = torch.stack([_entropy(p) for p in labels])  # taus x examples
    max_prob = torch.stack([p.max(1).values for p in labels])
    # Every example, every step down in temperature (non-strict only where float32 saturates at 1).
    assert (entropy[1:] <= entropy[:-1]).all() and (max_prob[1:] >= max_prob[:-1]).all()
    assert (entropy.mean(1)[1:] < entropy.mean(1)[:-1]).all()
    assert (max_prob.mean(1)[1:] > max_prob.mean(1)[:-1]).all()
    assert torch.equal(labels[-1].argmax(1), labels[0].argmax(1))  # temperature never changes the argmax
    stats = teacher_stats(tiny_model, x, y, 0.5)
    assert 0.0 <= stats["acc"] <= 1.0 and stats["mean_max_prob"] > 0.1
    with pytest.raises(ValueError, match="tau_t"):
        soft_labels(tiny_model, x, 0.0)


def test_ltd_targets_choose_the_teacher_input(tiny_model: nn.Module) -> None:
    x, y = _data(8)
    x_adv = (1 - x).contiguous()
    clean = ltd_targets(tiny_model, 1.0, "clean")(x, x_adv, y)
    adv = ltd_targets(tiny_model, 1.0, "adv")(x, x_adv, y)
    assert torch.equal(clean, soft_labels(tiny_model, x, 1.0))
    assert torch.equal(adv, soft_labels(tiny_model, x_adv, 1.0))
    with pytest.raises(ValueError, match="teacher_input"):
        ltd_targets(tiny_model, 1.0, "both")


# ---------------------------------------------------------------------------------------- student


@pytest.mark.parametrize("base, base_args", [("tiny_cnn", {"width": 4}), ("small_cnn", {"width": 4})])
def test_student_is_base_over_tau_s_in_both_modes(base: str, base_args: dict) -> None:
    student = create_model("ltd.init", seed=1, base=base, base_args=base_args, tau_s=2.5)
    reference = create_model(f"{base}.init", seed=1, **base_args)
    x, _ = _data(16)
    assert torch.equal(student.base.state_dict()["head.weight"], reference.state_dict()["head.weight"])
    with torch.no_grad():
        for mode in (False, True):  # eval, then train (BN: batch statistics on both sides alike)
            student.train(mode)
            reference.train(mode)
            assert torch.equal(student(x), reference(x) / 2.5)
        if base == "tiny_cnn":  # no BN, no dropout: one function, whatever the mode
            assert torch.equal(student.train()(x), student.eval()(x))
    # The temperature is applied with no reference to the mode at all (unlike defensive distillation,
    # which trains at T and deploys at 1).
    assert "training" not in inspect.getsource(LTDStudent.forward)
    with pytest.raises(ValueError, match="tau_s"):
        LTDStudent("tiny_cnn", {}, tau_s=0.0)
    with pytest.raises(KeyError, match="tiny_cnn"):
        LTDStudent("tiny_cn", {})


def test_student_checkpoint_round_trip(tmp_path: Path) -> None:
    from robustkit.core.checkpoint import save_checkpoint

    args = {"base": "small_cnn", "base_args": {"width": 4}, "tau_s": 3.0}
    student = create_model("ltd.init", seed=2, **args)
    save_checkpoint(student, tmp_path / "s", architecture="ltd", arch_args=json.loads(json.dumps(args)))
    loaded = load_model(str(tmp_path / "s.safetensors"))
    assert isinstance(loaded.model, LTDStudent) and loaded.model.tau_s == 3.0
    x, _ = _data(8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), student.eval()(x))


def test_student_can_start_from_a_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from robustkit.core.checkpoint import save_checkpoint, sha256_file
    from robustkit.core.errors import ConfigError
    from robustkit.data import dataset_info

    info = dataset_info("synthetic")
    config = LTDConfig(arch="tiny_cnn", init=str(tiny_checkpoint), tau_s=2.0)
    built = build_model(config, info, tau_s=config.tau_s)
    assert built.architecture == "ltd" and built.arch_args == {"base": "tiny_cnn", "base_args": {}, "tau_s": 2.0}
    assert built.init is not None and built.init["checkpoint_sha256"] == sha256_file(tiny_checkpoint)
    source = load_model(str(tiny_checkpoint)).model
    x, _ = _data(8)
    with torch.no_grad():
        assert torch.equal(built.model.eval()(x), source(x) / 2.0)
    # an LTD checkpoint as init: its base and weights, this run's temperature
    save_checkpoint(built.model, tmp_path / "s", architecture="ltd", arch_args=built.arch_args)
    again = build_model(LTDConfig(arch="tiny_cnn", init=str(tmp_path / "s.safetensors"), tau_s=4.0), info, tau_s=4.0)
    assert again.arch_args["tau_s"] == 4.0 and again.arch_args["base"] == "tiny_cnn"
    with torch.no_grad():
        assert torch.equal(again.model.eval()(x), source(x) / 4.0)
    # the config must say what is trained: the init's architecture, no arch_args of its own
    for wrong in (LTDConfig(init=str(tiny_checkpoint)), LTDConfig(arch="tiny_cnn", arch_args={"width": 4},
                                                                  init=str(tiny_checkpoint))):
        with pytest.raises(ConfigError, match="the init fixes the architecture"):
            build_model(wrong, info, tau_s=2.0)


# ---------------------------------------------------------------------------------------- the loss


def test_ltd_trades_loss_is_the_formula() -> None:
    """CE(softmax(z_s(x)), p_T) + beta * KL(softmax(z_s(x)) || softmax(z_s(x'))), z_s = f_S / tau_s."""
    student = create_model("ltd.init", seed=0, base="tiny_cnn", base_args={"width": 4}, tau_s=2.0)
    x, _ = _data(16)
    x_adv = (x + 0.02).clamp(0, 1)
    p_t = torch.softmax(torch.randn(16, 10, generator=torch.Generator().manual_seed(0)) / 0.5, 1)
    with torch.no_grad():
        loss, _ = framework_loss(student, "trades", x, x_adv, p_t, beta=6.0)
        zc, za = student.base(x) / 2.0, student.base(x_adv) / 2.0
        ref = -(p_t * F.log_softmax(zc, 1)).sum(1).mean() + 6.0 * (
            F.softmax(zc, 1) * (F.log_softmax(zc, 1) - F.log_softmax(za, 1))).sum(1).mean()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(soft_cross_entropy(zc, p_t), F.cross_entropy(zc, p_t))
    torch.testing.assert_close(kl_div(zc, za), F.kl_div(F.log_softmax(za, 1), F.softmax(zc, 1),
                                                        reduction="batchmean"))


class _ChannelMeanTeacher(nn.Module):
    """Logits from channel means: invariant to the horizontal flips of augmentation, so the teacher
    labels an augmented batch exactly as it labels the original."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x.mean((2, 3)) - 0.5) * 40)


@pytest.mark.parametrize("framework", ["pgd_at", "trades"])
def test_ltd_with_one_hot_soft_labels_is_exactly_the_framework(framework: str) -> None:
    """At tau_t -> 0 the teacher's soft labels are exactly one-hot; LTD training must then be
    bit-identical to the framework trained on the teacher's argmax labels (same inner examples,
    losses, updates): the soft-label path adds nothing else."""
    torch.manual_seed(0)
    teacher = _ChannelMeanTeacher()
    x, _ = _data(48)
    with torch.no_grad():
        y_teacher = teacher(x).argmax(1)
        p = soft_labels(teacher, x, 1e-6)
        flipped = soft_labels(teacher, x.flip(3), 1e-6)
    assert torch.equal(p, F.one_hot(y_teacher, 10).float()) and torch.equal(flipped, p)  # the premise
    config = AdversarialConfig(epochs=1, batch_size=16, crop_pad=0, awp=True, seed=4)
    method = Method(framework, steps=2)
    runs = []
    for targets_fn in (None, ltd_targets(teacher, 1e-6)):
        student = create_model("ltd.init", seed=1, base="small_cnn", base_args={"width": 4}, tau_s=2.0)
        fit(student, x, y_teacher, config, method, targets_fn=targets_fn, progress=False)
        runs.append(_state(student))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    # ... and soft labels that are not one-hot do change the run
    student = create_model("ltd.init", seed=1, base="small_cnn", base_args={"width": 4}, tau_s=2.0)
    fit(student, x, y_teacher, config, method, targets_fn=ltd_targets(teacher, 5.0), progress=False)
    assert not all(torch.equal(runs[0][k], v) for k, v in _state(student).items())


# ---------------------------------------------------------------------------------------- CLI


def test_cli_ltd_end_to_end(tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from robustkit.cli import main
    from robustkit.core.checkpoint import sha256_file

    out = tmp_path / "ltd"
    sets = {"arch": "tiny_cnn", "arch_args": "{ width = 4 }", "teacher": str(tiny_checkpoint), "tau_t": "0.7",
            "tau_s": "2", "n_train": "48", "n_test": "24", "epochs": "1", "batch_size": "16", "steps": "2",
            "val_pgd_n": "8"}
    argv = ["train", "--recipe", str(REPO / "defenses" / "ltd.toml"), "--dataset", "synthetic",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], "--threads", "1", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((tmp_path / "ltd.json").read_text())
    assert meta["architecture"] == "ltd" and meta["trainer"] == "ltd"
    assert meta["arch_args"]["base"] == "tiny_cnn" and meta["arch_args"]["tau_s"] == 2.0
    assert meta["arch_args"]["base_args"]["width"] == 4
    config, tr = meta["config"], meta["training"]
    assert config["tau_t"] == 0.7 and config["teacher_input"] == "clean" and config["framework"] == "trades"
    assert config["beta"] == 6.0 and tr["framework"] == "trades" and tr["inner_objective"] == "KL(p(x) || p(x'))"
    assert tr["teacher"]["model"] == str(tiny_checkpoint)
    assert tr["teacher"]["checkpoint_sha256"] == sha256_file(tiny_checkpoint)
    assert tr["teacher"]["train_stats_at_tau_t"]["acc"] > 0.5  # the trained tiny model, not a random one
    loaded = load_model(str(out) + ".safetensors")
    assert isinstance(loaded.model, LTDStudent) and loaded.model.tau_s == 2.0
    x, _ = _data(8)
    state = {k: v for k, v in loaded.model.state_dict().items()}
    rebuilt = LTDStudent("tiny_cnn", meta["arch_args"]["base_args"], 2.0)
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), rebuilt.eval()(x))
        assert torch.equal(loaded.model(x), rebuilt.base(x) / 2.0)
    # `robustkit eval` evaluates base / tau_s exactly as trained
    capsys.readouterr()
    result = tmp_path / "r.json"
    assert main(["eval", "--model", str(out) + ".safetensors", "--dataset", "synthetic", "--attack", "none",
                 "--n-examples", "24", "--no-progress", "--device", "cpu", "--out", str(result)]) == 0
    assert json.loads(result.read_text())["clean_accuracy"] == pytest.approx(meta["metrics"]["clean_acc"])


def test_recipe_unknown_key_fails_with_close_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from robustkit.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text((REPO / "defenses" / "ltd.toml").read_text().replace("tau_t =", "tau_tt ="))
    assert main(["train", "--recipe", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'tau_tt'" in err and "did you mean 'tau_t'" in err
    bad.write_text('trainer = "ltd"\nbeta = "six"\n')
    assert main(["train", "--recipe", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "beta = 'six': expected a number" in capsys.readouterr().err
    assert main(["train", "pgd_at", "--recipe", str(REPO / "defenses" / "ltd.toml"), "--out", "x"]) == 2
    assert "is for trainer 'ltd'" in capsys.readouterr().err
    bad.write_text('teacher = "small_cnn.cifar10_partial"\n')
    assert main(["train", "trades", "--recipe", str(bad), "--out", "x"]) == 2
    assert "unknown key 'teacher' for TRADESConfig" in capsys.readouterr().err


def test_shipped_ltd_is_the_recipe_and_reproduces_its_accuracy(real_data_dir: Path) -> None:
    """`ltd.cifar10_partial` is base / 2 of a width-16 SmallCNN trained by defenses/ltd.cifar10_partial.toml
    (then defenses/ltd.toml), and its clean accuracy on the first 200 real test images is what the card
    says (94 / 200)."""
    from robustkit.data import load_split

    loaded = load_model("ltd.cifar10_partial")
    assert isinstance(loaded.model, LTDStudent) and loaded.model.tau_s == 2.0
    config, training = loaded.metadata["config"], loaded.metadata["training"]
    assert config["tau_t"] == 0.5 and config["framework"] == "trades" and loaded.metadata["trainer"] == "ltd"
    assert training["recipe"]["tau_t"] == 0.5 and training["framework"] == "trades"  # the record it was derived from
    assert training["data"]["n_train"] == 5438
    x, y = load_split("cifar10", "test", data_dir=real_data_dir).tensors(200)
    with torch.no_grad():
        assert int((loaded.model(x).argmax(1) == y).sum()) == 94

"""Issue 14, findings 2, 6 and 7: data that does not fit the model is refused (or, for another dataset
of the same shape and classes, warned about); ``evaluate()`` checks its inputs up front and converts
only what is unambiguous, with numbers identical to the caller's own conversion; the model's modes,
submodule by submodule, are what they were before the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from robustkit import create_attack, evaluate
from robustkit.cli import main
from robustkit.core.errors import ConfigError
from robustkit.core.modes import kept_modes, module_modes
from robustkit.eval import Subject
from robustkit.models import create_model

EPS = 2 / 255  # breaks some points, not all: flags that can differ


@pytest.fixture
def data(synthetic_test: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic_test[0][:12].clone(), synthetic_test[1][:12].clone()


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw):
    attack = create_attack("pgd", eps=EPS, steps=3)
    return evaluate(model, attack, x, y, batch_size=5, device="cpu", progress=False, **kw)


def _same_numbers(a, b) -> None:
    def numbers(r):
        return (r.clean_flags, r.robust_flags, r.budget, r.passes,
                [(s.name, s.accuracy, s.n_attacked, s.n_broken) for s in r.stages])

    assert numbers(a) == numbers(b)
    assert a.data["fingerprint"] == b.data["fingerprint"]


# --------------------------------------------------------------------------- evaluate(): conversions


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_float_images_are_evaluated_as_float32(tiny_model, data, one_thread, dtype):
    x, y = data
    x_other = x.to(dtype)  # float16 rounds: the reference is the caller's own conversion of the same values
    by_hand = _run(tiny_model, x_other.to(torch.float32), y)
    converted = _run(tiny_model, x_other, y)
    _same_numbers(converted, by_hand)
    assert converted.checks["input_conversions"] == [f"images {str(dtype)[6:]} -> float32"]
    assert "input_conversions" not in by_hand.checks  # correct input: the result is as before
    assert converted.budget["checked"] > 0 and 0 < converted.robust_accuracy < converted.clean_accuracy


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_other_integer_labels_are_int64(tiny_model, data, one_thread, dtype):
    x, y = data
    converted = _run(tiny_model, x, y.to(dtype))
    _same_numbers(converted, _run(tiny_model, x, y))
    assert converted.checks["input_conversions"] == [f"labels {str(dtype)[6:]} -> int64"]


# --------------------------------------------------------------------------- evaluate(): refusals


def _refused(model: nn.Module, x, y, match: str, tmp_path: Path, **kw) -> None:
    """One-line ConfigError before any work: no records file is started."""
    rec = tmp_path / "r.records.jsonl"
    with pytest.raises(ConfigError, match=match) as err:
        evaluate(model, None, x, y, device="cpu", progress=False, records_path=rec, **kw)
    assert "\n" not in str(err.value)
    assert not rec.exists()


def test_labels_beyond_the_models_classes(tiny_model, data, tmp_path):
    x, y = data
    y[3] = 10  # tiny_cnn has 10 logits: label 10 could never be counted correct
    _refused(tiny_model, x, y, r"labels go up to 10 \(example 3\) but the model has 10 logits", tmp_path)


def test_negative_labels(tiny_model, data, tmp_path):
    x, y = data
    y[5] = -1
    _refused(tiny_model, x, y, r">= 0; example 5 has label -1", tmp_path)


@pytest.mark.parametrize("make, match", [
    (lambda y: y % 2 == 0, "labels are bool"),
    (lambda y: y.to(torch.float32), r"labels are float32.*y\.long\(\)"),  # whole-valued, still refused
    (lambda y: y.to(torch.float64) + 0.5, "labels are float64"),
    (lambda y: torch.nn.functional.one_hot(y, 10), r"one-hot.*y\.argmax\(1\)"),
    (lambda y: y.tolist(), "torch.as_tensor"),
])
def test_labels_refused(tiny_model, data, tmp_path, make, match):
    x, y = data
    _refused(tiny_model, x, make(y), match, tmp_path)


@pytest.mark.parametrize("make, match", [
    (lambda x: x.permute(0, 2, 3, 1), r"channels last.*x\.permute\(0, 3, 1, 2\)"),
    (lambda x: (x * 255).round().to(torch.uint8), r"images are uint8.*x\.float\(\) / 255"),
    (lambda x: x > 0.5, "images are bool"),
    (lambda x: x[0], r"4-D.*x\[None\]"),
    (lambda x: x.numpy(), "torch.from_numpy"),
    (lambda x: x[:, :1], r"normalises 3-channel images but these have 1 channel"),  # Normalize would broadcast
])
def test_images_refused(tiny_model, data, tmp_path, make, match):
    x, y = data
    _refused(tiny_model, make(x), y, match, tmp_path)


def test_images_against_the_subjects_input_shape(tiny_model, data, tmp_path):
    """tiny_cnn pools adaptively, so 28x28 images would run: the recorded input shape refuses them."""
    x, y = data
    small = x[:, :, :28, :28].contiguous()
    subject = Subject(model="tiny", model_info={"input_shape": [3, 32, 32]})
    _refused(tiny_model, small, y, r"takes 3x32x32 images \(C x H x W\) but these are 3x28x28", tmp_path,
             subject=subject)
    ok = evaluate(tiny_model, None, x, y, subject=subject, device="cpu", progress=False)
    assert ok.model_info["input_shape"] == [3, 32, 32]


# --------------------------------------------------------------------------- modes


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _frozen_bn_model() -> tuple[nn.Module, list[bool]]:
    torch.manual_seed(0)
    model = _BNNet().train()
    model.body[1].eval()  # frozen: its running statistics must not move in later training steps
    return model, [m.training for m in model.modules()]


def test_evaluate_restores_each_modules_own_mode(data, one_thread):
    x, y = data
    model, before = _frozen_bn_model()
    stats = model.body[1].running_mean.clone()
    _run(model, x, y)
    assert [m.training for m in model.modules()] == before
    assert model.training and not model.body[1].training and model.body[4].training
    assert torch.equal(model.body[1].running_mean, stats)  # evaluated in eval mode throughout


def test_modes_restored_when_evaluate_refuses(data, tmp_path):
    x, y = data
    model, before = _frozen_bn_model()
    y[0] = 10  # found by the probe forward, inside the evaluation mode
    with pytest.raises(ConfigError):
        evaluate(model, None, x, y, device="cpu", progress=False)
    assert [m.training for m in model.modules()] == before


def test_kept_modes_ignores_train_overrides():
    """The restore sets flags, it does not call ``train()``: an override's policy is not re-imposed."""

    class Policy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def train(self, mode: bool = True) -> Policy:
            super().train(mode)
            self.a.eval()  # e.g. a frozen block
            return self

    model = Policy()
    nn.Module.train(model, True)  # a state the override would never produce: a in train mode
    before = [flag for _, flag in module_modes(model)]
    with kept_modes(model, False):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before == [True, True, True]


def test_auto_taps_keeps_modes():
    from robustkit.models.adaptive_smoothing import auto_taps

    model = create_model("small_cnn.init").train()
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()  # a frozen BN
    before = [m.training for m in model.modules()]
    auto_taps(model, (3, 32, 32))
    assert [m.training for m in model.modules()] == before


# --------------------------------------------------------------------------- the CLI's model/data check


def _cli(args: list[str], tmp_path: Path, capsys, name: str = "r") -> tuple[int, list[str], Path]:
    out = tmp_path / f"{name}.json"
    code = main(["eval", *args, "--attack", "none", "--n-examples", "8", "--device", "cpu", "--threads", "1",
                 "--no-progress", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err, out


def _cli_refused(args: list[str], match: str, tmp_path: Path, capsys) -> None:
    code, err, out = _cli(args, tmp_path, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("robustkit: error: ") and match in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("r.")) == []  # nothing written


@pytest.mark.parametrize("model, dataset, match", [
    ("small_cnn", "mnist", "small_cnn.cifar10_partial takes 3x32x32 images (cifar10) but mnist's are 1x28x28"),
    ("lightweight_cnn.mnist_partial", "cifar10", "takes 1x28x28 images (mnist) but cifar10's are 3x32x32"),
    ("small_cnn", "cifar100", "has 10 classes (cifar10) but cifar100 has 100"),
])
def test_cli_refuses_data_the_model_was_not_made_for(model, dataset, match, real_data_dir, tmp_path, capsys):
    _cli_refused(["--model", model, "--dataset", dataset, "--data-dir", str(real_data_dir)], match, tmp_path, capsys)


def test_cli_warns_for_another_dataset_of_the_same_shape_and_classes(real_data_dir, tmp_path, capsys):
    code, err, out = _cli(["--model", "lightweight_cnn.fashion_mnist_partial", "--dataset", "mnist",
                           "--data-dir", str(real_data_dir)], tmp_path, capsys)
    assert code == 0 and out.exists()
    assert len(err) == 1 and err[0].startswith("robustkit: warning: "), err
    assert "trained on fashion_mnist and is evaluated on mnist" in err[0] and "not the same ones" in err[0]
    code, err, _ = _cli(["--model", "lightweight_cnn.fashion_mnist_partial", "--data-dir", str(real_data_dir)],
                        tmp_path, capsys, name="own")
    assert code == 0 and err == []  # its own dataset: no word


def _npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images=images, labels=labels)
    return path


def test_cli_refuses_a_data_file_of_another_shape(tiny_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = np.arange(8) % 10
    grey = _npz(tmp_path / "grey.npz", rng.integers(0, 256, (8, 32, 32), dtype=np.uint8), labels)
    _cli_refused(["--model", str(tiny_checkpoint), "--data-file", str(grey)],
                 "takes 3x32x32 images (synthetic) but grey's are 1x32x32", tmp_path, capsys)
    small = _npz(tmp_path / "small.npz", rng.integers(0, 256, (8, 28, 28, 3), dtype=np.uint8), labels)
    _cli_refused(["--model", str(tiny_checkpoint), "--data-file", str(small)],
                 "but small's are 3x28x28", tmp_path, capsys)
    many = _npz(tmp_path / "many.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), labels + 5)
    _cli_refused(["--model", str(tiny_checkpoint), "--data-file", str(many)],
                 "labels go up to 12 but", tmp_path, capsys)
    fits = _npz(tmp_path / "fits.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), labels)
    code, err, out = _cli(["--model", str(tiny_checkpoint), "--data-file", str(fits)], tmp_path, capsys)
    assert code == 0 and err == [], err  # a file is not a named dataset: nothing to warn about

"""The Isong (2025) lightweight CNN producer: budgets, stage-1 independence, progressive unfreezing
(frozen means bit-identical, BatchNorm buffers included), augmentation, and the checkpoint round trip."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from robustkit.models import list_models, load_model
from robustkit.models.lightweight_cnn import (
    RECIPES,
    WEIGHTS_TAGS,
    AugmentConfig,
    DualInputOutput,
    LightweightCNN,
    ProgressiveUnfreezer,
    Recipe,
    UnifiedModel,
    arch_args_for,
    augment,
    fit,
    n_params,
    run_phase,
    train,
    train_branch,
)

PAPER_PARAMS = 14_862
TINY = Recipe(batch_size=32, stage1_epochs=1, phase_epochs=(1, 1, 1, 1))


# Tiny models on a shared CPU: extra OpenMP threads only wait on each other (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable 1x28x28 stand-in for MNIST: one blocky template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = (torch.rand(10, 1, 7, 7, generator=torch.Generator().manual_seed(123)) > 0.5).float()
    templates = torch.nn.functional.interpolate(templates, scale_factor=4)
    y = torch.arange(n) % 10
    x = (0.75 * templates[y] + 0.25 * torch.rand(n, 1, 28, 28, generator=g)).clamp(0, 1)
    return x, y


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def _unified(seed: int = 0) -> UnifiedModel:
    torch.manual_seed(seed)
    return UnifiedModel.from_branches(LightweightCNN(), LightweightCNN())


# ---------------------------------------------------------------- budgets and registry


def test_parameter_budgets() -> None:
    mnist = n_params(UnifiedModel(**arch_args_for("mnist")))
    assert mnist <= 14_900, f"unified 1x28x28 model has {mnist:,} parameters (> 14,900)"
    assert abs(mnist - PAPER_PARAMS) <= 0.02 * PAPER_PARAMS, f"{mnist:,} vs the paper's {PAPER_PARAMS:,}"
    fashion = n_params(UnifiedModel(**arch_args_for("fashion_mnist")))
    assert fashion == mnist, f"fashion_mnist {fashion:,} != mnist {mnist:,}"
    cifar = n_params(UnifiedModel(**arch_args_for("cifar10")))
    assert cifar < 20_000, f"unified 3x32x32 model has {cifar:,} parameters (>= 20,000)"
    assert n_params(UnifiedModel()) == mnist  # registry defaults are the MNIST model


def test_recipes_are_consistent() -> None:
    for name, recipe in RECIPES.items():
        assert len(recipe.phase_epochs) == len(recipe.phase_lrs) == len(recipe.widths) + 1, name
        assert recipe.stage1_epochs > 0 and all(e > 0 for e in recipe.phase_epochs), name


def test_registered_with_mnist_as_default() -> None:
    assert "lightweight_cnn.init" in list_models()
    assert list(WEIGHTS_TAGS) == ["mnist_partial", "fashion_mnist_partial", "cifar10_partial"]
    assert load_model("lightweight_cnn").name == "lightweight_cnn.mnist_partial"
    loaded = load_model("lightweight_cnn.init")
    assert isinstance(loaded.model, UnifiedModel) and n_params(loaded.model) == PAPER_PARAMS
    assert loaded.model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


# ---------------------------------------------------------------- stage 1


def test_dual_model_concatenates_both_branches() -> None:
    torch.manual_seed(0)
    dual = DualInputOutput(LightweightCNN(), LightweightCNN()).eval()
    x1, x2 = torch.rand(3, 1, 28, 28), torch.rand(3, 1, 28, 28)
    out = dual(x1, x2)
    assert out.shape == (3, 20)
    assert torch.equal(out[:, :10], dual.branch_a(x1)) and torch.equal(out[:, 10:], dual.branch_b(x2))


def test_branches_are_trained_independently() -> None:
    torch.manual_seed(0)
    dual = DualInputOutput(LightweightCNN(), LightweightCNN())
    x, y = _digits(64)
    a0, b0 = _state(dual.branch_a), _state(dual.branch_b)
    train_branch(dual, "a", x, y, TINY)
    assert _same(_state(dual.branch_b), b0), "training branch A moved branch B"
    assert _changed(a0, _state(dual.branch_a)), "branch A did not train"
    a1 = _state(dual.branch_a)
    train_branch(dual, "b", x, y, TINY)
    assert _same(_state(dual.branch_a), a1), "training branch B moved branch A"
    assert _changed(b0, _state(dual.branch_b)), "branch B did not train"


def test_merge_copies_branch_extractors() -> None:
    torch.manual_seed(0)
    a, b = LightweightCNN().eval(), LightweightCNN().eval()
    model = UnifiedModel.from_branches(a, b).eval()
    x = torch.rand(2, 1, 28, 28)
    feats = torch.cat([a.embed(x), b.embed(x)], 1)
    assert torch.equal(model(x), model.head(feats))


# ---------------------------------------------------------------- stage 2


def test_unfreezing_order_is_last_block_to_first() -> None:
    model = _unified()
    unfreezer = ProgressiveUnfreezer(model)
    assert unfreezer.order == [2, 1, 0] and unfreezer.n_phases == 4
    assert [unfreezer.trainable_blocks(i) for i in range(4)] == [[], [2], [1, 2], [0, 1, 2]]
    for phase in range(4):
        params = unfreezer.apply(phase)
        trainable = set(unfreezer.trainable_blocks(phase))
        for i, block in enumerate(model.blocks):
            assert all(p.requires_grad == (i in trainable) for p in block.parameters())
            bns = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert all(bn.training == (i in trainable) for bn in bns), "frozen BN must stay in eval"
        assert all(p.requires_grad for p in model.head.parameters())
        assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    unfreezer.release()
    assert all(p.requires_grad for p in model.parameters()) and model.train().frozen_blocks == ()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("phase", [0, 1, 2])
def test_frozen_blocks_and_bn_buffers_stay_bit_identical(phase: int) -> None:
    model = _unified()
    unfreezer = ProgressiveUnfreezer(model)
    x, y = _digits(64)
    before = [_state(b) for b in model.blocks]
    head0 = _state(model.head)
    log = run_phase(unfreezer, phase, x, y, TINY)
    trainable = unfreezer.trainable_blocks(phase)
    assert log["trainable"] == ["head"] + [f"block{i}" for i in reversed(trainable)]
    assert _changed(head0, _state(model.head)), "the head must train in every phase"
    for i, block in enumerate(model.blocks):
        changed = _changed(before[i], _state(block))
        if i in trainable:
            assert any("running_mean" in k for k in changed), f"block {i} is trainable but its BN stood still"
            assert any(k.endswith("0.weight") for k in changed), f"block {i} weights did not train"
        else:
            assert not changed, f"frozen block {i} changed in phase {phase}: {changed}"


def test_phase_zero_trains_only_the_head() -> None:
    model = _unified()
    x, y = _digits(64)
    before = _state(model)
    run_phase(ProgressiveUnfreezer(model), 0, x, y, TINY)
    changed = _changed(before, _state(model))
    assert changed and all(k.startswith("head.") for k in changed), changed


# ---------------------------------------------------------------- augmentation and learning


def test_augment_changes_images_and_keeps_range() -> None:
    x, _ = _digits(16)
    cfg = AugmentConfig()
    a = augment(x, cfg, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert all(not torch.equal(ai, xi) for ai, xi in zip(a, x, strict=True))
    assert torch.equal(a, augment(x, cfg, torch.Generator().manual_seed(0)))  # seeded
    # With every strength at 0 the warp is the identity: the coordinate conventions are right.
    off = AugmentConfig(rotation_deg=0, zoom=0, translate=0, brightness=0)
    assert torch.allclose(augment(x, off, torch.Generator()), x, atol=1e-5)
    rgb = torch.rand(8, 3, 32, 32)
    flipped = augment(rgb, dataclasses.replace(off, hflip=True), torch.Generator().manual_seed(1))
    assert all(torch.allclose(f, r, atol=1e-5) or torch.allclose(f, r.flip(2), atol=1e-5)
               for f, r in zip(flipped, rgb, strict=True))
    bright = augment(x, dataclasses.replace(cfg, padding_mode="reflection", hflip=True),
                     torch.Generator().manual_seed(2))
    assert bright.min() >= 0 and bright.max() <= 1


def test_loss_falls_on_a_tiny_synthetic_run() -> None:
    torch.manual_seed(0)
    model = LightweightCNN()
    x, y = _digits(256)
    logs = fit(model, list(model.parameters()), x, y, epochs=4, lr=5e-3, batch_size=32)
    losses = [lg["train_loss"] for lg in logs]
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------- end to end


def test_train_writes_a_checkpoint_that_reloads_exactly(tmp_path: Path) -> None:
    out = tmp_path / "lw"
    model, meta = train(
        "synthetic", out=str(out), n_train=64, n_test=32, progress=False, verbose=False, batch_size=32,
        stage1_epochs=1, phase_epochs=(1, 1), phase_lrs=(1e-3, 5e-4),
    )
    assert meta["architecture"] == "lightweight_cnn" and meta["arch_args"]["in_channels"] == 3
    phases = meta["training"]["phases"]
    assert [p["trainable"] for p in phases] == [["head"], ["head", "block2"]]
    assert all(math.isfinite(p["train_loss"]) and 0 <= p["test_acc"] <= 1 for p in phases)
    metrics = meta["metrics"]
    assert metrics["n_parameters"] == n_params(model) < 20_000
    assert metrics["file_bytes"] == (tmp_path / "lw.safetensors").stat().st_size
    assert {"branch_a_acc", "branch_b_acc", "clean_acc"} <= metrics.keys()
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    loaded = load_model(str(out) + ".safetensors")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_cli_dispatches_the_producer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from robustkit.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "lightweight-cnn", "--dataset", "synthetic", "--out", str(out), "--n-train", "32",
               "--n-test", "16", "--batch-size", "32", "--stage1-epochs", "1", "--phase-epochs", "1",
               "--phase-lrs", "1e-3", "--holdout", "8", "--no-progress"])
    assert rc == 0 and (tmp_path / "cli.safetensors").exists()
    meta = load_model(str(out) + ".safetensors").metadata
    assert meta["metrics"]["split"] == "train[-8:]" and meta["metrics"]["n"] == 8
    assert meta["training"]["data"]["n_train"] == 24
    assert main(["train", "no-such-producer"]) == 2
    err = capsys.readouterr().err
    assert "small_cnn" in err and "lightweight-cnn" in err


@pytest.mark.parametrize("tag, dataset, n_params, correct_first200", [
    ("mnist_partial", "mnist", 14_862, 198),
    ("fashion_mnist_partial", "fashion_mnist", 14_862, 174),
    ("cifar10_partial", "cifar10", 19_018, 122),
])
def test_shipped_weights_reproduce_their_card(real_data_dir, tag, dataset, n_params, correct_first200):
    """The shipped checkpoints load (sha256 pinned), fit the budget and re-measure exactly as recorded."""
    from robustkit.data import load_split
    from robustkit.models import load_model

    loaded = load_model(f"lightweight_cnn.{tag}")
    assert sum(p.numel() for p in loaded.model.parameters()) == n_params
    assert loaded.dataset == dataset
    x, y = load_split(dataset, "test", data_dir=real_data_dir).tensors(200)
    with torch.no_grad():
        correct = int((loaded.model(x).argmax(1) == y).sum())
    assert correct == correct_first200 == loaded.metadata["metrics"]["clean_correct_first200"]

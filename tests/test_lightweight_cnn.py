"""The Isong (2025) lightweight CNN and its trainer: budgets, stage-1 independence, progressive
unfreezing (frozen means bit-identical, BatchNorm buffers included), augmentation, the recipes of the
shipped files, a pinned tiny run, and the checkpoint round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

from robustkit.core.config import config_to_dict, read_recipe, resolve_config
from robustkit.models import list_models, load_model
from robustkit.models.lightweight_cnn import (
    WEIGHTS_TAGS,
    DualInputOutput,
    LightweightCNN,
    UnifiedModel,
    n_params,
)
from robustkit.train.base import RunOptions, get_trainer
from robustkit.train.lightweight_cnn import (
    LightweightCNNConfig,
    ProgressiveUnfreezer,
    arch_args_for,
    augment,
    fit,
    run_phase,
    train_branch,
)

REPO = Path(__file__).resolve().parents[1]
PAPER_PARAMS = 14_862
TINY = LightweightCNNConfig(batch_size=32, stage1_epochs=1, phase_epochs=(1, 1, 1, 1))
SHIPPED = {"mnist_partial": "mnist", "fashion_mnist_partial": "fashion_mnist", "cifar10_partial": "cifar10"}


# Tiny models on a shared CPU: extra OpenMP threads only wait on each other (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(tag: str) -> LightweightCNNConfig:
    _, fields = read_recipe(REPO / "defenses" / f"lightweight_cnn.{tag}.toml")
    return resolve_config(LightweightCNNConfig, recipe=fields)


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


# ---------------------------------------------------------------- budgets, registry, recipes


def test_parameter_budgets() -> None:
    mnist = n_params(UnifiedModel(**arch_args_for(_recipe("mnist_partial"))))
    assert mnist <= 14_900, f"unified 1x28x28 model has {mnist:,} parameters (> 14,900)"
    assert abs(mnist - PAPER_PARAMS) <= 0.02 * PAPER_PARAMS, f"{mnist:,} vs the paper's {PAPER_PARAMS:,}"
    fashion = n_params(UnifiedModel(**arch_args_for(_recipe("fashion_mnist_partial"))))
    assert fashion == mnist, f"fashion_mnist {fashion:,} != mnist {mnist:,}"
    cifar = n_params(UnifiedModel(**arch_args_for(_recipe("cifar10_partial"))))
    assert cifar < 20_000, f"unified 3x32x32 model has {cifar:,} parameters (>= 20,000)"
    assert n_params(UnifiedModel()) == mnist  # registry defaults are the MNIST model
    assert arch_args_for(LightweightCNNConfig()) == arch_args_for(_recipe("mnist_partial"))  # defaults = MNIST


@pytest.mark.parametrize("tag", list(SHIPPED))
def test_recipe_reproduces_the_shipped_config(tag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The recipe resolves (through `robustkit train --print-config` too) to exactly the config the
    shipped file records, and that config is consistent with the file's own training record."""
    from robustkit.cli import main

    config = _recipe(tag)
    assert len(config.phase_epochs) == len(config.phase_lrs) == len(config.widths) + 1, tag
    assert config.stage1_epochs > 0 and all(e > 0 for e in config.phase_epochs), tag
    meta = json.loads((REPO / "robustkit" / "weights" / f"lightweight_cnn.{tag}.json").read_text())
    assert meta["trainer"] == "lightweight_cnn" and meta["config"] == config_to_dict(config)
    assert meta["arch_args"] == arch_args_for(config) and config.dataset == SHIPPED[tag] == meta["dataset"]
    assert meta["training"]["recipe"]["phase_epochs"] == list(config.phase_epochs)
    assert main(["train", "--recipe", str(REPO / "defenses" / f"lightweight_cnn.{tag}.toml"), "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed.pop("trainer") == "lightweight_cnn"
    assert printed == {k: v for k, v in meta["config"].items() if v is not None}


def test_registered_with_mnist_as_default() -> None:
    assert "lightweight_cnn.init" in list_models()
    assert list(WEIGHTS_TAGS) == ["mnist_partial", "fashion_mnist_partial", "cifar10_partial"]
    assert load_model("lightweight_cnn").name == "lightweight_cnn.mnist_partial"
    loaded = load_model("lightweight_cnn.init")
    assert isinstance(loaded.model, UnifiedModel) and n_params(loaded.model) == PAPER_PARAMS
    assert loaded.model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_bad_configs_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from robustkit.cli import main

    for sets, needle in ((["phase_epochs=[1, 1]"], "one entry per phase"),
                         (["phase_epochs=[1,1,1,1,1]", "phase_lrs=[1,1,1,1,1]"], "allow 1..4 phases"),
                         (["padding_mode=wrap"], "padding_mode"), (["widths=[8, 0]"], "positive"),
                         (["stage1_epoch=3"], "stage1_epochs")):
        argv = ["train", "lightweight_cnn", "--print-config"] + [a for s in sets for a in ("--set", s)]
        assert main(argv) == 2, sets
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("robustkit: error:") and needle in err[0], err


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
    cfg = LightweightCNNConfig()
    a = augment(x, cfg, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert all(not torch.equal(ai, xi) for ai, xi in zip(a, x, strict=True))
    assert torch.equal(a, augment(x, cfg, torch.Generator().manual_seed(0)))  # seeded
    # With every strength at 0 the warp is the identity: the coordinate conventions are right.
    off = dataclasses.replace(cfg, rotation_deg=0, zoom=0, translate=0, brightness=0)
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


def _smoke(**fields: object) -> LightweightCNNConfig:
    trainer = get_trainer("lightweight_cnn")
    return resolve_config(trainer.config, recipe={**trainer.smoke, **fields})


def test_train_writes_a_checkpoint_that_reloads_exactly(tmp_path: Path) -> None:
    config = _smoke()
    checkpoint = get_trainer("lightweight_cnn")(config, RunOptions(out=tmp_path / "lw", progress=False))
    meta = checkpoint.metadata
    assert checkpoint.path == tmp_path / "lw.safetensors"
    assert meta["architecture"] == "lightweight_cnn" and meta["arch_args"]["in_channels"] == 3
    assert meta["trainer"] == "lightweight_cnn" and meta["config"] == config_to_dict(config)
    phases = meta["training"]["phases"]
    assert [p["trainable"] for p in phases] == [["head"], ["head", "block2"]]
    assert all(math.isfinite(p["train_loss"]) and 0 <= p["test_acc"] <= 1 for p in phases)
    assert "/" not in json.dumps(meta["training"]["data"])  # no machine path
    metrics = meta["metrics"]
    assert metrics["file_bytes"] == checkpoint.path.stat().st_size
    assert {"branch_a_acc", "branch_b_acc", "clean_acc", "dual_sum_logits_acc"} <= metrics.keys()
    loaded = load_model(str(checkpoint.path))
    assert metrics["n_parameters"] == n_params(loaded.model) < 20_000
    from robustkit.data import load_split

    x, y = load_split("synthetic", "test").tensors(32)
    with torch.no_grad():
        acc = (loaded.model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(metrics["clean_acc"])  # the reloaded model is the measured one


def test_tiny_run_is_pinned(tmp_path: Path) -> None:
    """A seeded tiny run's loss trajectory, pinned: any change to what the trainer computes (data
    order, augmentation, schedule, freezing, init order) moves these numbers. The tolerance only
    absorbs float summation order on another CPU. To re-pin after an intended change, print them."""
    from safetensors.torch import load_file

    checkpoint = get_trainer("lightweight_cnn")(_smoke(seed=1), RunOptions(out=tmp_path / "pin", progress=False))
    training = checkpoint.metadata["training"]
    losses = [training["stage1"][b]["epochs_log"][-1]["train_loss"] for b in ("branch_a", "branch_b")]
    losses += [p["train_loss"] for p in training["phases"]]
    assert losses == pytest.approx(PINNED_LOSSES, rel=1e-4), losses
    weights_l1 = float(sum(v.double().abs().sum() for v in load_file(str(checkpoint.path)).values()))
    assert weights_l1 == pytest.approx(PINNED_WEIGHTS_L1, rel=1e-5), weights_l1
    assert checkpoint.metadata["metrics"]["clean_correct_first200"] == PINNED_CORRECT


# Measured with the code that trained the shipped files (bit-identical before and after its move).
PINNED_LOSSES = [2.3699029684066772, 2.336951494216919, 2.312978982925415, 2.3081144094467163]
PINNED_WEIGHTS_L1 = 1016.5977854307421  # sum of |w| over every tensor, BatchNorm buffers included
PINNED_CORRECT = 3  # of the 32 synthetic test images


def test_cli_trains_with_the_old_name_and_a_holdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from robustkit.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "lightweight-cnn", "--dataset", "synthetic", "--out", str(out), "--no-progress",
               "--set", "n_train=32", "--set", "n_test=16", "--set", "batch_size=32", "--set", "stage1_epochs=1",
               "--set", "phase_epochs=[1]", "--set", "phase_lrs=[1e-3]", "--set", "holdout=8"])
    assert rc == 0 and (tmp_path / "cli.safetensors").exists()
    assert "'lightweight-cnn' is deprecated" in capsys.readouterr().err
    meta = load_model(str(out) + ".safetensors").metadata
    assert meta["metrics"]["split"] == "train[-8:]" and meta["metrics"]["n"] == 8
    assert meta["training"]["data"]["n_train"] == 24 and meta["config"]["holdout"] == 8
    assert main(["train", "no-such-producer"]) == 2
    assert "lightweight_cnn" in capsys.readouterr().err


@pytest.mark.parametrize("tag, dataset, n_params, correct_first200", [
    ("mnist_partial", "mnist", 14_862, 198),
    ("fashion_mnist_partial", "fashion_mnist", 14_862, 174),
    ("cifar10_partial", "cifar10", 19_018, 122),
])
def test_shipped_weights_reproduce_their_card(real_data_dir, tag, dataset, n_params, correct_first200):
    """The shipped checkpoints load (sha256 pinned), fit the budget and re-measure exactly as recorded."""
    from robustkit.data import load_split

    loaded = load_model(f"lightweight_cnn.{tag}")
    assert sum(p.numel() for p in loaded.model.parameters()) == n_params
    assert loaded.dataset == dataset
    x, y = load_split(dataset, "test", data_dir=real_data_dir).tensors(200)
    with torch.no_grad():
        correct = int((loaded.model(x).argmax(1) == y).sum())
    assert correct == correct_first200 == loaded.metadata["metrics"]["clean_correct_first200"]

"""The SCoRe trainer: its checkpoint is an ordinary model whose evaluation reports many/medium/few
accuracy; stage 2 touches the classifier only; runs are reproducible without touching the global RNG;
adversarial views stay in the threat model; the comparison pairs every method with its baseline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from robustkit.core.config import resolve_config
from robustkit.eval.harness import evaluate
from robustkit.eval.subject import Subject
from robustkit.models import load_model
from robustkit.models.score import ScoreNet
from robustkit.train import RunOptions, get_trainer
from robustkit.train.score import SMOKE, LTData, ScoreConfig, pgd_views, stage1, stage2
from robustkit.train.score_compare import summarise


def smoke_config(**changes) -> ScoreConfig:
    return resolve_config(ScoreConfig, overrides=[f"{k}={v}" for k, v in {**SMOKE, "dataset": "synthetic",
                                                                           **changes}.items()])


def train(tmp_path, name="m", **changes):
    return get_trainer("score")(smoke_config(**changes), RunOptions(out=tmp_path / name, progress=False))


def test_checkpoint_records_the_view_and_its_evaluation_reports_the_groups(tmp_path):
    ckpt = train(tmp_path, loss="supcon")
    data = ckpt.metadata["training"]["data"]
    counts = data["class_counts"]
    assert counts == data["longtail"]["class_counts"] and sum(counts) == data["n_train"]
    assert counts[0] > counts[-1]
    loaded = load_model(str(ckpt.path))
    assert isinstance(loaded.model, ScoreNet)
    x, y = torch.rand(24, 3, 32, 32), torch.arange(24) % 10
    res = evaluate(loaded.model, None, x, y, subject=Subject.from_loaded(loaded, dataset="synthetic"),
                   device="cpu", progress=False)
    per_class = res.per_class
    assert per_class["train_counts"] == counts
    groups = per_class["groups"]
    assert sum(g["n"] for g in groups.values()) == 24  # every test image is in exactly one group
    assert groups["few"]["n"] == 24  # the smoke view has < 20 images per class


def _random_data(n=48, classes=4) -> LTData:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, 16, 16, generator=g), torch.arange(n) % classes
    info = type("Info", (), {"num_classes": classes})()
    return LTData(info, x, y, x[:8], y[:8], {"class_counts": torch.bincount(y).tolist()})


def test_stage2_trains_the_classifier_on_a_frozen_encoder():
    cfg = dataclasses.replace(smoke_config(), epochs=1, probe_epochs=3, batch_size=16)
    data = _random_data()
    model = ScoreNet(num_classes=4, width=4)
    gen = torch.Generator().manual_seed(0)
    stage1(model, data, cfg, torch.device("cpu"), gen, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage2(model, data, cfg, torch.device("cpu"), gen, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}  # BatchNorm statistics included: nothing else moved
    assert all(p.requires_grad for p in model.parameters())


def test_same_seed_same_weights_and_the_global_rng_untouched(tmp_path):
    state = torch.get_rng_state()
    a, b = train(tmp_path, "a"), train(tmp_path, "b")
    assert torch.equal(state, torch.get_rng_state())
    assert a.metadata["sha256"] == b.metadata["sha256"]
    assert train(tmp_path, "c", seed=1).metadata["sha256"] != a.metadata["sha256"]


def test_adversarial_views_stay_in_the_ball_and_raise_the_loss():
    cfg = dataclasses.replace(smoke_config(), adversarial=True, steps=5, eps="8/255")
    model = ScoreNet(num_classes=4, width=4).eval()
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4

    def loss_of(v):
        return torch.nn.functional.cross_entropy(model(v), y)

    x_adv = pgd_views(loss_of, x, cfg, torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert loss_of(x_adv) > loss_of(x)


def test_adversarial_run_measures_pgd(tmp_path):
    ckpt = train(tmp_path, loss="fl", adversarial="true", steps=1)
    assert ckpt.metadata["training"]["adversarial"] is True
    assert 0.0 <= ckpt.metadata["metrics"]["pgd10_acc"] <= ckpt.metadata["metrics"]["clean_acc"]


def test_config_refuses_a_loss_typo_before_loading_data():
    from robustkit.core.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'fl'"):
        ScoreConfig(loss="fll")


def _row(method, seed, flags, setting="cifar10-lt100"):
    return {"setting": setting, "method": method, "seed": seed, "balanced_acc": flags.count("1") / len(flags),
            "groups": {"many": 0.5}, "train_wall_s": 1.0, "clean_flags": flags}


def test_summary_pairs_each_loss_with_ce_and_the_adversarial_row_with_pgd_at():
    rows = [_row("ce", 0, "1100"), _row("ce", 1, "1000"), _row("score-fl", 0, "1111"), _row("score-fl", 1, "1110"),
            _row("pgd-at", 0, "0000"), _row("score-fl-adv", 0, "0011")]
    by = {s["method"]: s for s in summarise(rows)}
    fl = by["score-fl"]
    assert fl["vs"]["baseline"] == "ce" and fl["vs"]["pairs"] == 8
    assert (fl["vs"]["only_b"], fl["vs"]["only_a"]) == (4, 0)  # seed 0: 2 new, seed 1: 2 new, none lost
    assert fl["balanced_acc_mean"] == pytest.approx(0.875) and fl["best_seed"] == 0
    assert by["score-fl-adv"]["vs"]["baseline"] == "pgd-at" and by["score-fl-adv"]["vs"]["only_b"] == 2
    assert "vs" not in by["ce"] and "vs" not in by["pgd-at"]


@pytest.mark.parametrize("module, argv, needle", [
    ("robustkit.train.score_compare", ["--methods", "supcn"], "did you mean 'supcon'"),
    ("robustkit.train.score_compare", ["--adversarial-settings", "cifar10-lt1000"], "unknown comparison setting"),
    ("robustkit.train.fedloge_compare", ["--settings", "cifar10"], "did you mean 'cifar10-lt100'"),
])
def test_comparison_drivers_refuse_unknown_names_in_one_line(module, argv, needle, capsys, tmp_path):
    import importlib

    from robustkit.cli import guarded

    driver = importlib.import_module(module)
    assert guarded(driver.main, [*argv, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustkit: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing written before the names are checked

"""FAB-T and Square agree with pyautoattack example by example, on points they actually break.

In the standard cascade APGD breaks nearly everything first, so the other fidelity tests never see
FAB-T or Square change a flag: a wrong seed, target setting or batching in their dispatch would pass
them unnoticed (issue 14, finding 12). Here each runs alone (AutoAttack version ``custom``), or behind
a deliberately weak FAB-T, with batches smaller than the data so the per-batch driver is exercised.
"""

from __future__ import annotations

from typing import Any

import pyautoattack
import pytest
import torch

from robustkit import create_attack, evaluate
from robustkit.data import load_split
from robustkit.models import create_model

EPS = 8 / 255
FAB_T = (["fab-t"], {"fab.n_iter": 2, "fab.n_target_classes": 1})
SQUARE = (["square"], {"square.n_queries": 50})

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Square \\(black-box\\) broke:UserWarning")]


def reference_flags(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, stages: list[str],
                    overrides: dict[str, Any], batch_size: int, seed: int) -> list[bool]:
    """Per-example robust flags from pyautoattack's own driver, configured like ``overrides``."""
    aa = pyautoattack.AutoAttack(model, attacks=stages, version="custom", eps=EPS, norm="Linf", seed=seed,
                                 device="cpu")
    for key, value in overrides.items():
        obj, attr = key.split(".")
        setattr(getattr(aa, obj), attr, value)
    # pyautoattack's zero-gradient check fails on a non-contiguous batch
    x_adv, _ = aa.run_standard_evaluation(x.contiguous(), y, batch_size=batch_size)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).tolist()


def ours(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, stages: list[str],
         overrides: dict[str, Any], batch_size: int, seed: int):
    attack = create_attack("autoattack", norm="Linf", eps=EPS, version="custom", attacks=stages,
                           overrides=overrides)
    return evaluate(model, attack, x, y, batch_size=batch_size, seed=seed, device="cpu", progress=False)


@pytest.mark.parametrize(("stages", "overrides"), [FAB_T, SQUARE], ids=["fab-t", "square"])
def test_stage_alone_breaks_points_and_matches_pyautoattack(tiny_model, synthetic_test, stages, overrides):
    x, y = synthetic_test[0][:24], synthetic_test[1][:24]
    res = ours(tiny_model, x, y, stages=stages, overrides=overrides, batch_size=8, seed=3)  # 3 batches
    flags = [c == "1" for c in res.robust_flags]
    n_clean = sum(c == "1" for c in res.clean_flags)
    assert [s.name for s in res.stages] == ["clean", *stages]
    assert 0 < sum(flags) < n_clean  # the stage broke points (and not all of them): a real comparison
    assert flags == reference_flags(tiny_model, x, y, stages=stages, overrides=overrides, batch_size=8, seed=3)


def test_the_comparison_tells_dispatch_mistakes_apart(tiny_model, synthetic_test):
    """On these points the flags change with Square's seed and with FAB's targeted switch, so the
    comparison above catches a dispatch that seeds Square differently or runs FAB untargeted."""
    x, y = synthetic_test[0][:24], synthetic_test[1][:24]

    def ref(stages: list[str], overrides: dict[str, Any], seed: int = 3) -> list[bool]:
        return reference_flags(tiny_model, x, y, stages=stages, overrides=overrides, batch_size=8, seed=seed)

    assert ref(*SQUARE) != ref(*SQUARE, seed=4)
    assert ref(*FAB_T) != ref(["fab"], {**FAB_T[1], "fab.n_restarts": 1})


def test_fab_t_then_square_on_real_cifar10_in_batches(real_data_dir):
    """The shipped lightweight CIFAR-10 model, 48 real test images in batches of 16: a one-step FAB-T
    breaks some points, 150-query Square breaks more of the survivors, flags equal pyautoattack's."""
    model = create_model("lightweight_cnn.cifar10_partial")
    x, y = load_split("cifar10", "test", data_dir=real_data_dir).tensors(48)
    stages = ["fab-t", "square"]
    overrides = {"fab.n_iter": 1, "fab.n_target_classes": 1, "square.n_queries": 150}
    res = ours(model, x, y, stages=stages, overrides=overrides, batch_size=16, seed=0)
    counts = [round(s.accuracy * 48) for s in res.stages]
    assert [s.name for s in res.stages] == ["clean", *stages]
    assert counts[0] > counts[1] > counts[2] > 0, counts  # each stage breaks points; some survive
    assert all(s.n_attacked > 16 for s in res.stages[1:])  # every stage runs more than one batch
    flags = [c == "1" for c in res.robust_flags]
    assert flags == reference_flags(model, x, y, stages=stages, overrides=overrides, batch_size=16, seed=0)

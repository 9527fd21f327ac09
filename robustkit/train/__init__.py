"""Adversarial training: PGD-AT, TRADES, fast AT (FGSM-RS), AWP and LTD on any registered model.

``robustkit train {pgd-at,trades,fast-at,ltd}`` (:mod:`robustkit.train.cli`) runs a recipe
from ``defenses/*.toml`` and saves a robustkit checkpoint; :func:`train` is the loop underneath.
"""

from robustkit.train.adversarial import (
    AWP,
    evaluate_pgd,
    framework_loss,
    inner_max,
    kl_div,
    soft_cross_entropy,
    train,
)
from robustkit.train.ltd import LTDStudent, ltd_targets, soft_labels

__all__ = [
    "AWP", "LTDStudent", "evaluate_pgd", "framework_loss", "inner_max", "kl_div", "ltd_targets",
    "soft_cross_entropy", "soft_labels", "train",
]

"""Trainer ``fast_at``: fast adversarial training (Wong, Rice & Kolter 2020, "Fast is better than free").

PGD-AT with the inner maximisation cut to ONE FGSM step from a uniform random start, alpha
1.25 * eps: adversarial training at about twice the cost of clean training instead of ~11x for
PGD-10. The random start is what makes one step work; larger steps, or none, end in catastrophic
overfitting (PGD accuracy collapsing to ~0 while training accuracy jumps: watch the logged val PGD).
The loop is shared with the other adversarial trainers (:mod:`robustkit.train._adversarial`).

The shipped ``small_cnn.cifar10_partial`` is this trainer with ``attack_bn = "train"``::

    robustkit train fast_at --recipe defenses/small_cnn.cifar10_partial.toml --data-dir ../shared/data/partial
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from robustkit.core.checkpoint import Checkpoint
from robustkit.train._adversarial import SMOKE, AdversarialConfig, Method, train_and_save
from robustkit.train.base import RunOptions, register_trainer


@dataclass(frozen=True)
class FastATConfig(AdversarialConfig):
    """Fast AT: the shared adversarial-training fields (alpha "auto" = 1.25 * eps) and the attack's BN mode."""

    # BatchNorm during the FGSM step: "eval" uses running statistics, like every other trainer here;
    # "train" uses the batch's statistics and lets the attack's forward pass update the running ones,
    # as Wong et al.'s code (and the shipped small_cnn.cifar10_partial run) does.
    attack_bn: Literal["eval", "train"] = "eval"


@register_trainer("fast_at", FastATConfig, description="fast AT (Wong et al. 2020): PGD-AT with one FGSM step "
                  "from a random start", smoke=SMOKE, deprecated_names=("fast-at",))
def train(config: FastATConfig, run: RunOptions) -> Checkpoint:
    return train_and_save("fast_at", config, run, Method("pgd_at", "fgsm-rs", steps=1, attack_bn=config.attack_bn))

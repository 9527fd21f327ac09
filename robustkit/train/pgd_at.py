"""Trainer ``pgd_at``: PGD adversarial training (Madry et al. 2018), CE on PGD examples.

The min-max problem ``min_w E max_{||d|| <= eps} CE(f_w(x + d), y)``, its inner maximisation
solved by PGD from a uniform random start with BatchNorm in eval mode. Everything but the number of
PGD steps is shared with the other adversarial trainers (:mod:`robustkit.train._adversarial`)::

    robustkit train pgd_at --recipe defenses/pgd_at.toml --data-dir ../shared/data/partial --out runs/pgd_at
"""

from __future__ import annotations

from dataclasses import dataclass

from robustkit.core.checkpoint import Checkpoint
from robustkit.train._adversarial import SMOKE, AdversarialConfig, Method, at_least, train_and_save
from robustkit.train.base import RunOptions, register_trainer


@dataclass(frozen=True)
class PGDATConfig(AdversarialConfig):
    """PGD-AT: the shared adversarial-training fields plus the PGD budget."""

    # PGD steps of the inner maximisation (Madry et al.: 7-10); each costs a forward and a backward.
    steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, "steps", 1)


@register_trainer("pgd_at", PGDATConfig, description="PGD adversarial training (Madry et al. 2018)",
                  smoke=SMOKE | {"steps": 1}, deprecated_names=("pgd-at",))
def train(config: PGDATConfig, run: RunOptions) -> Checkpoint:
    return train_and_save("pgd_at", config, run, Method("pgd_at", "pgd", steps=config.steps))

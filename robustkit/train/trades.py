"""Trainer ``trades``: TRADES (Zhang et al. 2019), CE(f(x), y) + beta * KL(f(x) || f(x')).

The clean cross-entropy keeps accuracy, the KL term buys smoothness around each training image; x'
maximises the KL itself (PGD from x + 0.001 N(0, 1), no labels needed), and BatchNorm sees the
clean and the adversarial batch in two separate forward passes, as in the TRADES code. The loop is
shared with the other adversarial trainers (:mod:`robustkit.train._adversarial`)::

    robustkit train trades --recipe defenses/trades.toml --data-dir ../shared/data/partial --out runs/trades
"""

from __future__ import annotations

from dataclasses import dataclass

from robustkit.core.checkpoint import Checkpoint
from robustkit.train._adversarial import SMOKE, AdversarialConfig, Method, at_least, train_and_save
from robustkit.train.base import RunOptions, register_trainer


@dataclass(frozen=True)
class TRADESConfig(AdversarialConfig):
    """TRADES: the shared adversarial-training fields plus the PGD budget and the KL weight."""

    steps: int = 10  # PGD steps maximising the KL (TRADES: 10 of 0.007 at 8/255)
    beta: float = 6.0  # weight of KL(f(x) || f(x')): 6 is TRADES' CIFAR-10 value; larger trades accuracy for robustness

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, "steps", 1)


@register_trainer("trades", TRADESConfig, description="TRADES (Zhang et al. 2019): CE(clean) + beta * KL(clean || adv)",
                  smoke=SMOKE | {"steps": 1})
def train(config: TRADESConfig, run: RunOptions) -> Checkpoint:
    return train_and_save("trades", config, run, Method("trades", "pgd", steps=config.steps, beta=config.beta))

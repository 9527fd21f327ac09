"""``square``: robustkit's own Square Attack (Linf or L2), a black-box check that needs no gradients.

Score-based attacks catch what gradient attacks miss on models whose gradients mislead (masking,
obfuscation); this one runs on the engine (:mod:`robustkit.attacks.engine.square`), so an
example's result is its own: the same at any batch size, order or ``--shard`` split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustkit.attacks.base import Attack, register_attack
from robustkit.attacks.engine import rng
from robustkit.attacks.engine.square import check_square_params, square_l2, square_linf
from robustkit.core.errors import ConfigError
from robustkit.core.threat import ThreatModel


@register_attack("square", name="square", smoke={"n_queries": 20},
                 description="Square Attack (Andriushchenko et al.), Linf or L2, 5,000 queries: black-box "
                             "random search, per-example randomness")
class Square(Attack):
    """Square Attack (Andriushchenko et al., ECCV 2020) in the Linf or L2 ball, AutoAttack's settings by
    default (5,000 queries, ``p_init`` 0.8, margin loss, schedule not rescaled).

    ``n_queries`` counts the iterations after the first query, as the reference does, so an
    example costs at most ``n_queries + 1`` forward passes; a broken one costs none after that.
    """

    name = "square"
    batch_invariant = True

    def __init__(self, threat: ThreatModel, *, n_queries: int = 5000, p_init: float = 0.8,
                 loss: str = "margin", rescale_schedule: bool = False) -> None:
        super().__init__(threat)
        if threat.norm not in ("Linf", "L2"):
            raise ConfigError(f"square supports the Linf and L2 threat models, got {threat.norm}")
        self.n_queries, self.p_init, self.loss = check_square_params(n_queries, p_init, loss)
        if not isinstance(rescale_schedule, bool):
            raise ConfigError(f"rescale_schedule must be true or false, got {rescale_schedule!r}")
        self.rescale_schedule = rescale_schedule

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, stage: str, seed: int,
                example_seeds: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial examples for one batch. Each example draws from its ``example_seeds`` entry
        (the harness's); called without them, the seeds come from ``seed`` and the position in the
        batch (:func:`rng.derive_seeds`), so results then depend on the order, not the batch size."""
        if stage != self.name:
            raise ValueError(f"Square has the single stage {self.name!r}, got {stage!r}")
        if example_seeds is None:
            example_seeds = rng.derive_seeds(seed, x.shape[0], device=x.device)
        run = square_linf if self.norm == "Linf" else square_l2
        x_adv, _ = run(model, x.detach(), y, eps=self.eps, seeds=example_seeds, n_queries=self.n_queries,
                       p_init=self.p_init, loss=self.loss, rescale_schedule=self.rescale_schedule)
        return x_adv

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_queries": self.n_queries, "p_init": self.p_init, "loss": self.loss,
                "rescale_schedule": self.rescale_schedule}

"""The LTD student: any registered architecture whose logits are divided by a fixed temperature.

Low Temperature Distillation (Chen & Lee, arXiv 2111.02331) trains a student on a teacher's soft
labels and divides the student's logits by its own temperature ``tau_s`` *identically in training
and at inference*. That is the difference from defensive distillation (Papernot et al. 2016),
which trains at a high temperature and deploys at T = 1: the deployed logits are then ~T times
larger, the softmax saturates and gradient-based attacks see vanishing gradients (gradient
masking), so the apparent robustness is an artefact. Here the temperature is part of the
model itself, so an attacker differentiates exactly the function that was trained.

The wrapper is registered as architecture ``ltd`` so that a checkpoint stores ``base``,
``base_args`` and ``tau_s`` as plain JSON ``arch_args`` and ``load_checkpoint_model`` rebuilds it;
the training code lives in :mod:`robustkit.train.ltd`. This module imports only
:mod:`robustkit.models.base`, so ``robustkit.models`` can import it without a cycle.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from robustkit.core.errors import ConfigError
from robustkit.models.base import Weights, model_info, register_model

# Function pin of robustkit/weights/ltd.cifar10_partial (tensors + base, base_args, tau_s, normalization,
# dataset, num_classes: robustkit.core.checkpoint.function_pin), verified on every load.
LTD_CIFAR10_PARTIAL_PIN = "f02c41a635c7a7d665bc0b20e2fbfe210f884f2b5a31b2acd5509b455bb4cb2b"
# ... and of robustkit/weights/ltd.fashion_mnist_partial (defenses/ltd.fashion_mnist_partial.toml).
LTD_FASHION_MNIST_PARTIAL_PIN = "b80defc8e697550abf6ae7c271bab3cb591709221e971023727c7d888bfe887f"
# ... and of robustkit/weights/ltd.mnist_trades (defenses/ltd.mnist_trades.toml).
LTD_MNIST_TRADES_PIN = "8469ad008b1b1f7e9a0bf5a5256649f5a2b85e3f95ef6ac809c81c46228b1120"
# ... and of robustkit/weights/ltd.mnist_partial (defenses/ltd.mnist_partial.toml).
LTD_MNIST_PARTIAL_PIN = "6fc9d9b7920dc5c5c1638caab94e477f6ed309220a1c909d94c17837bee2db1c"


class LTDStudent(nn.Module):
    """``base(x) / tau_s``, with ``base`` built from the model registry.

    ``forward`` has no branch on ``self.training``: the same temperature applies in ``train()`` and
    ``eval()``. ``base_args`` are the base architecture's constructor arguments (JSON-serialisable,
    like every registered architecture's), e.g. ``{"width": 16}`` for ``small_cnn``.
    """

    def __init__(
        self, base: str = "small_cnn", base_args: dict[str, Any] | None = None, tau_s: float = 1.0
    ) -> None:
        super().__init__()
        if base == "ltd":
            raise ConfigError("an LTD student cannot wrap another LTD student; give its base architecture")
        tau_s = float(tau_s)
        if not math.isfinite(tau_s) or tau_s <= 0:
            raise ConfigError(f"tau_s must be a finite number > 0, got {tau_s!r}")
        self.base_name = base
        self.base_args = dict(base_args or {})
        self.tau_s = tau_s
        # model_info raises UnknownNameError with close matches for a mistyped base.
        self.base = model_info(base).builder(**self.base_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) / self.tau_s

    def extra_repr(self) -> str:
        return f"base={self.base_name!r}, tau_s={self.tau_s:g}"


def _register() -> None:
    register_model(
        "ltd",
        LTDStudent,
        description="LTD student: a registered base architecture with logits / tau_s in train and eval "
                    "(arch args base, base_args, tau_s); trained by `robustkit train ltd`",
        dataset="cifar10",
        tags={
            "cifar10_partial": Weights(
                file="ltd.cifar10_partial",
                pin=LTD_CIFAR10_PARTIAL_PIN,
                description="LTD-TRADES SmallCNN (width 16, tau_t 0.5, tau_s 2) on the 5,438 real CIFAR-10 "
                            "train images; recipe defenses/ltd.cifar10_partial.toml, card defenses/cards/ltd.cifar10_partial.md",
            ),
            "fashion_mnist_partial": Weights(
                file="ltd.fashion_mnist_partial",
                pin=LTD_FASHION_MNIST_PARTIAL_PIN,
                description="LTD-PGD-AT SmallCNN (width 16, tau_t 0.5, tau_s 2, Linf 0.1) on 7,226 real "
                            "Fashion-MNIST train images; recipe defenses/ltd.fashion_mnist_partial.toml, card "
                            "defenses/cards/ltd.fashion_mnist_partial.md",
            ),
            "mnist_partial": Weights(
                file="ltd.mnist_partial",
                pin=LTD_MNIST_PARTIAL_PIN,
                description="LTD-PGD-AT SmallCNN (width 16, tau_t 0.5, tau_s 2, Linf 0.3) on 23,680 real MNIST "
                            "train images; recipe defenses/ltd.mnist_partial.toml, card defenses/cards/ltd.mnist.md",
            ),
            "mnist_trades": Weights(
                file="ltd.mnist_trades",
                pin=LTD_MNIST_TRADES_PIN,
                description="LTD-TRADES SmallCNN (width 16, tau_t 0.5, tau_s 2, Linf 0.3) on 23,680 real MNIST "
                            "train images; recipe defenses/ltd.mnist_trades.toml, card defenses/cards/ltd.mnist.md",
            ),
        },
        default_tag="cifar10_partial",
    )


_register()

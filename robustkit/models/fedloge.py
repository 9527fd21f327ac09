"""``fedloge``: the models a FedLoGe run produces (Xiao et al., ICLR 2024), a SmallCNN trunk and linear heads.

FedLoGe trains one shared backbone and, on its detached features, an auxiliary global head psi and a
personal head phi_k per client (:mod:`robustkit.federated.fedloge`). What robustkit evaluates is an
ordinary classifier ([0, 1] NCHW in, logits out, normalisation inside):

* the generic model: backbone + ``head`` = psi realigned by GLA-FR (every row the same norm);
* client k's personalised model: backbone + ``head`` = psi with phi_k's row norms and ``head2`` = phi_k,
  whose logits are added (the paper's argmax(phi_k(f) + psi~_k(f)));
* optionally a ``class_mask``: the reference code scores a client's local test set with the classes the
  client never saw pushed to -1e10 (a label prior used at test time), so robustkit can report local
  accuracy with and without it. Here the mask acts on the logits (the reference writes -1e10 into the
  weight rows, which is only very negative because its post-ReLU features are non-negative).

Every head is bias-free: GLA-FR rescales weight rows, and a bias would keep the head-class prior the
realignment exists to remove (the reference's heads carry a bias that its realignment leaves alone).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustkit.core.errors import ConfigError
from robustkit.models.base import Weights, register_model
from robustkit.models.small_cnn import CIFAR10_MEAN, CIFAR10_STD, SmallCNN

MASKED_LOGIT = -1e9  # the logit of a class outside ``class_mask``: below any real logit, finite in float32


class FedLoGeNet(SmallCNN):
    """SmallCNN trunk (``4 * width`` pooled features) + a bias-free ``head``, and optionally ``head2``
    (added logits, the personal head) and a ``class_mask`` (logits of other classes set to -1e9).

    Both options are constructor arguments, so a checkpoint's ``arch_args`` record (and its pin fixes)
    whether a model is personalised and which label prior it uses.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        extra_head: bool = False,
        class_mask: list[int] | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes, width, mean, std)
        d = 4 * width
        self.head = nn.Linear(d, num_classes, bias=False)
        self.head2 = nn.Linear(d, num_classes, bias=False) if extra_head else None
        keep = None
        if class_mask is not None:
            classes = [int(c) for c in class_mask]
            if not classes or len(set(classes)) != len(classes) or not all(0 <= c < num_classes for c in classes):
                raise ConfigError(f"class_mask = {class_mask}: must list distinct classes in [0, {num_classes})")
            keep = torch.zeros(num_classes, dtype=torch.bool)
            keep[classes] = True
        # Not persistent: the mask is an architecture argument, so state dicts of masked and unmasked
        # models have the same keys and one trained state loads into both.
        self.register_buffer("keep", keep, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.embed(x)
        logits = self.head(f)
        if self.head2 is not None:
            logits = logits + self.head2(f)
        if self.keep is not None:
            logits = logits.masked_fill(~self.keep, MASKED_LOGIT)
        return logits


# Function pin of robustkit/weights/fedloge.cifar10_lt100 (robustkit.core.checkpoint.function_pin).
FEDLOGE_CIFAR10_LT100_PIN = "e15390102c56135025cd3cd29f0458e5f813aab58836e86df9fc32507cc730b8"

register_model(
    "fedloge",
    FedLoGeNet,
    description="SmallCNN backbone trained federated through a frozen sparse ETF (FedLoGe) + GLA-FR-realigned head",
    dataset="cifar10",
    tags={"cifar10_lt100": Weights(
        file="fedloge.cifar10_lt100", pin=FEDLOGE_CIFAR10_LT100_PIN,
        description="FedLoGe's generic model, CIFAR-10-LT exp:100 over 10 clients (Dirichlet 0.5), seed 2")},
    default_tag="cifar10_lt100",
)

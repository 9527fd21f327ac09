"""``score``: the SCoRe producer's model, a SmallCNN encoder and a linear classifier.

SCoRe (Majee et al., ICML 2024) trains the encoder with a submodular representation loss and then a
linear classifier on the frozen encoder (:mod:`robustkit.train.score`). What is evaluated is an
ordinary classifier: [0, 1] NCHW in, logits out, normalisation inside. It *is* a :class:`SmallCNN`
(the trunk is the encoder, ``head`` the classifier), so the CE baseline and every loss share one
architecture and the comparison differs in the loss alone; :meth:`ScoreNet.embed` is the encoder's
output that the projection head and the linear probe read.
"""

from __future__ import annotations

import torch

from robustkit.models.base import register_model
from robustkit.models.small_cnn import SmallCNN


class ScoreNet(SmallCNN):
    """SmallCNN whose pooled features (``4 * width`` of them) are the learned representation."""

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's representation of [0, 1] images: normalise, convolve, global-average-pool."""
        return torch.flatten(self.pool(self.features(self.normalize(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


register_model(
    "score",
    ScoreNet,
    description="SmallCNN encoder trained with a SCoRe submodular representation loss + linear classifier",
    dataset="cifar10",
)

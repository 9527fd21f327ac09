"""``score``: the SCoRe producer's model, a SmallCNN encoder and a linear classifier.

SCoRe (Majee et al., ICML 2024) trains the encoder with a submodular representation loss and then a
linear classifier on the frozen encoder (:mod:`robustkit.train.score`). What is evaluated is an
ordinary classifier: [0, 1] NCHW in, logits out, normalisation inside. It *is* a :class:`SmallCNN`
(the trunk is the encoder, ``head`` the classifier), so the CE baseline and every loss share one
architecture and the comparison differs in the loss alone; :meth:`ScoreNet.embed` is the encoder's
output that the projection head and the linear probe read.
"""

from __future__ import annotations

from robustkit.models.base import Weights, register_model
from robustkit.models.small_cnn import SmallCNN


class ScoreNet(SmallCNN):
    """SmallCNN whose pooled features (``4 * width``, :meth:`SmallCNN.embed`) are the learned
    representation; registered under its own name so a SCoRe checkpoint says what produced it."""


# Function pin of robustkit/weights/score.cifar10_lt100 (robustkit.core.checkpoint.function_pin).
SCORE_CIFAR10_LT100_PIN = "0518fe3f4331633177fdc238259e44938dcc07b0dec66c0d5aa633781f1621c0"

register_model(
    "score",
    ScoreNet,
    description="SmallCNN encoder trained with a SCoRe submodular representation loss + linear classifier",
    dataset="cifar10",
    tags={"cifar10_lt100": Weights(
        file="score.cifar10_lt100", pin=SCORE_CIFAR10_LT100_PIN,
        description="the SCoRe comparison's best method on CIFAR-10-LT exp:100 (SupCon, seed 2)")},
    default_tag="cifar10_lt100",
)

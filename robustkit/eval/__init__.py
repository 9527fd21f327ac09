"""Evaluation: the harness, its result format and per-example records.

The eval path reads straight down: a :class:`Subject` (what is evaluated: model, checkpoint,
data) -> :func:`evaluate` (clean pass, then the attack's survivor cascade) -> :class:`EvalResult`
(the JSON). Curves, trade-offs and the masking checks are several ``evaluate`` calls on one subject.
"""

from robustkit.eval.curve import Curve, robustness_curve
from robustkit.eval.harness import evaluate
from robustkit.eval.results import EvalResult, StageResult
from robustkit.eval.subject import Subject

__all__ = ["Curve", "EvalResult", "StageResult", "Subject", "evaluate", "robustness_curve"]

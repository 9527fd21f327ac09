"""Evaluation: the harness, its result format and per-example records."""

from robustkit.eval.curve import Curve, robustness_curve
from robustkit.eval.harness import evaluate
from robustkit.eval.results import EvalResult, StageResult

__all__ = ["Curve", "EvalResult", "StageResult", "evaluate", "robustness_curve"]

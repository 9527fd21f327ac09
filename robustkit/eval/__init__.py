"""Evaluation: the harness, its result format and per-example records."""

from robustkit.eval.harness import evaluate
from robustkit.eval.results import EvalResult, StageResult

__all__ = ["EvalResult", "StageResult", "evaluate"]

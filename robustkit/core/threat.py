"""Threat models: norms, eps parsing and per-dataset defaults.

eps is accepted as a float (``0.5``) or a fraction (``"8/255"``) because papers and RobustBench
write Linf budgets as fractions of 255; we keep the user's spelling for display and compute with
the float.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from robustkit.core.errors import ConfigError, close_matches_hint

NORMS = ("Linf", "L2")

# RobustBench conventions: CIFAR Linf 8/255 and L2 0.5, MNIST-family Linf 0.3 (Madry et al.).
DEFAULT_EPS: dict[tuple[str, str], str] = {
    ("cifar10", "Linf"): "8/255",
    ("cifar10", "L2"): "0.5",
    ("cifar100", "Linf"): "8/255",
    ("cifar100", "L2"): "0.5",
    ("cinic10", "Linf"): "8/255",  # CIFAR-10's classes and image size, so CIFAR-10's budgets
    ("cinic10", "L2"): "0.5",
    ("mnist", "Linf"): "0.3",
    ("mnist", "L2"): "2.0",
    ("fashion_mnist", "Linf"): "0.1",
    ("fashion_mnist", "L2"): "1.5",
    ("synthetic", "Linf"): "8/255",
    ("synthetic", "L2"): "0.5",
}

# A decimal number, scientific notation included (1e-3); an optional sign on the numerator only so
# that "-1" can be called negative rather than malformed.
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_EPS_RE = re.compile(rf"^\s*([-+]?)\s*({_NUMBER})(?:\s*/\s*({_NUMBER}))?\s*$")


def parse_norm(norm: str) -> str:
    """Canonicalise a norm name (``linf``, ``inf``, ``Linf`` -> ``Linf``; ``l2`` -> ``L2``)."""
    key = str(norm).strip().lower()
    if key in ("linf", "inf", "l_inf", "lin"):
        return "Linf"
    if key in ("l2", "2", "l_2"):
        return "L2"
    raise ConfigError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")


def parse_eps(eps: str | float | int) -> float:
    """Parse ``"8/255"``, ``"0.5"``, ``"1e-3"`` or a number into a non-negative finite float.

    The error says what is wrong (malformed, negative, not finite, too large), because "malformed"
    for a well-formed ``-1`` sends the user looking for a typo that is not there.
    """
    if isinstance(eps, bool):
        raise ConfigError(f"malformed eps {eps!r}; write a number like 0.5 or a fraction like 8/255")
    if isinstance(eps, (int, float)):
        value = float(eps)
    else:
        m = _EPS_RE.match(str(eps))
        if not m and str(eps).strip().lstrip("+-").lower() in ("nan", "inf", "infinity"):
            raise ConfigError(f"eps must be a finite number, got {eps!r}")
        if not m:
            raise ConfigError(
                f"malformed eps {eps!r}; write a number like 0.5 or 1e-3, or a fraction like 8/255"
            )
        num = Fraction(m.group(2))
        if m.group(3) is not None:
            den = Fraction(m.group(3))
            if den == 0:
                raise ConfigError(f"malformed eps {eps!r}: division by zero")
            num /= den
        if m.group(1) == "-" and num != 0:
            raise ConfigError(f"eps {eps!r} is negative; a budget is a distance, >= 0")
        try:
            value = float(num)
        except OverflowError:
            raise ConfigError(f"eps {eps!r} is too large: it exceeds any input range") from None
    if not math.isfinite(value):
        raise ConfigError(f"eps must be a finite number, got {eps!r}")
    if value < 0:
        raise ConfigError(f"eps {eps!r} is negative; a budget is a distance, >= 0")
    return value


def check_eps_range(norm: str, eps: float, spelled: object = None) -> None:
    """Refuse a Linf budget above 1: images lie in [0, 1], so eps 1 already allows every image and a
    larger one (``1e9``) is a mistake (a missing ``/255``?), not a stronger threat model."""
    if norm == "Linf" and eps > 1:
        shown = spelled if spelled is not None else eps
        raise ConfigError(f"Linf eps {shown!r} is larger than the input range: images lie in [0, 1], so "
                          "eps 1 already allows every image (did you mean a fraction like 8/255?)")


def format_eps(eps: float) -> str:
    """Render eps the way papers do: ``8/255`` when it is k/255 for an integer k."""
    k = eps * 255
    if eps > 0 and abs(k - round(k)) < 1e-6 and round(k) < 255:
        return f"{round(k)}/255"
    return f"{eps:g}"


@dataclass(frozen=True)
class ThreatModel:
    """An Lp ball of radius ``eps`` intersected with the [0, 1] image box."""

    norm: str
    eps: float

    @classmethod
    def create(cls, norm: str, eps: str | float | None, dataset: str | None = None) -> ThreatModel:
        """Build a threat model, filling eps from the dataset default when it is None."""
        n = parse_norm(norm)
        if eps is None:
            if dataset is None or (dataset, n) not in DEFAULT_EPS:
                known = sorted({d for d, _ in DEFAULT_EPS})
                hint = close_matches_hint(str(dataset), known) if dataset is not None else ""
                raise ConfigError(f"no default eps for dataset {dataset!r} and norm {n}{hint} (defaults exist "
                                  f"for {', '.join(known)}); give the budget (--eps)")
            eps = DEFAULT_EPS[(dataset, n)]
        value = parse_eps(eps)
        check_eps_range(n, value, eps)
        return cls(n, value)

    def __str__(self) -> str:
        return f"{self.norm} eps={format_eps(self.eps)}"

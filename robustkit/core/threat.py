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

from robustkit.core.errors import ConfigError

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

_EPS_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*(\d+(?:\.\d*)?))?\s*$")


def parse_norm(norm: str) -> str:
    """Canonicalise a norm name (``linf``, ``inf``, ``Linf`` -> ``Linf``; ``l2`` -> ``L2``)."""
    key = str(norm).strip().lower()
    if key in ("linf", "inf", "l_inf", "lin"):
        return "Linf"
    if key in ("l2", "2", "l_2"):
        return "L2"
    raise ConfigError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")


def parse_eps(eps: str | float | int) -> float:
    """Parse ``"8/255"``, ``"0.5"`` or a number into a non-negative finite float."""
    if isinstance(eps, bool):
        raise ConfigError(f"malformed eps {eps!r}")
    if isinstance(eps, (int, float)):
        value = float(eps)
    else:
        m = _EPS_RE.match(str(eps))
        if not m:
            raise ConfigError(
                f"malformed eps {eps!r}; write a number like 0.5 or a fraction like 8/255"
            )
        num = Fraction(m.group(1))
        if m.group(2) is not None:
            den = Fraction(m.group(2))
            if den == 0:
                raise ConfigError(f"malformed eps {eps!r}: division by zero")
            num /= den
        value = float(num)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


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
                raise ConfigError(f"no default eps for dataset {dataset!r} and norm {n}; pass --eps")
            eps = DEFAULT_EPS[(dataset, n)]
        return cls(n, parse_eps(eps))

    def __str__(self) -> str:
        return f"{self.norm} eps={format_eps(self.eps)}"

"""Paired statistics on per-example flags: two models (or two mixtures) scored on the same images.

Shared by the comparison drivers (``robustkit.train.*compare``) and ``robustkit tradeoff``: one
implementation of the exact McNemar test, so every "paired p" in a card is computed the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test on paired per-example flags (same images, two models).

    Why paired: on the same 1,000 images most examples are robust (or not) for both models, so the
    unpaired +-2.7-point binomial interval of each accuracy badly overstates the noise of a difference.
    Only the discordant examples carry information: ``only_b`` robust under b alone, ``only_a`` under a.
    """
    if len(a) != len(b):
        raise ValueError("paired flags must have the same length")
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        p = 1.0
    elif n <= 1000:  # exact: integers, one correctly rounded division
        p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    else:  # 2.0**n overflows from n = 1,024 (several seeds of 7,000 images get there): log space
        terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                 for i in range(k + 1)]
        top = max(terms)
        p = min(1.0, 2 * math.exp(top) * sum(math.exp(t - top) for t in terms))
    return {"only_a": only_a, "only_b": only_b, "p_value": p}


def as_bools(flags: str | Sequence[Any]) -> list[bool]:
    """Result JSONs store per-example flags as a '0'/'1' string."""
    return [c == "1" for c in flags] if isinstance(flags, str) else [bool(v) for v in flags]

"""Long-tailed views of a training split: which images a long-tailed experiment trains on.

Long-tailed benchmarks (CIFAR-10-LT and friends, Cao et al. 2019) are not datasets but *views* of a
balanced training split: class c keeps ``n_c`` of its images, with ``n_c`` following a profile of
imbalance ratio ``rho = n_max / n_min``:

* ``exp:rho``: ``n_c = floor(n_max * rho ** (-c / (C - 1)))``, class 0 the head, class C-1 the tail;
* ``step:rho``: the first ``ceil(C / 2)`` classes keep ``n_max``, the rest ``floor(n_max / rho)``.

``n_max`` defaults to the smallest class count of the split, so every class can be filled (the real
CIFAR-10 subset has 508-566 images per class, not 5,000). Which images a class keeps is a seeded draw,
independent of the training seed, so several training seeds see the same view and their results
pair up. The test split stays balanced: accuracy per class and per many/medium/few group is what a
long-tailed result reports (:mod:`robustkit.eval.per_class`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from robustkit.core.errors import ConfigError, close_matches_hint

PROFILES = ("exp", "step")


@dataclass(frozen=True)
class LongTail:
    """A parsed long-tail request: ``profile`` and imbalance ratio ``ratio`` (>= 1; 1 = balanced)."""

    profile: str
    ratio: float

    @classmethod
    def parse(cls, spec: str) -> LongTail:
        """``"exp:100"`` / ``"step:10"``, or a one-line error saying what is wrong."""
        profile, sep, value = str(spec).strip().partition(":")
        if profile not in PROFILES:
            raise ConfigError(f"longtail {spec!r}: unknown profile {profile!r}{close_matches_hint(profile, PROFILES)}; "
                              f"write PROFILE:RATIO with PROFILE one of {', '.join(PROFILES)} (e.g. exp:100)")
        try:
            ratio = float(value) if sep else math.nan
        except ValueError:
            ratio = math.nan
        if not math.isfinite(ratio):
            raise ConfigError(f"longtail {spec!r}: the imbalance ratio must be a number (e.g. {profile}:100)")
        if ratio < 1:
            raise ConfigError(f"longtail {spec!r}: the imbalance ratio n_max/n_min must be >= 1, got {ratio:g}")
        return cls(profile, ratio)

    def __str__(self) -> str:
        return f"{self.profile}:{self.ratio:g}"

    def counts(self, n_max: int, num_classes: int) -> list[int]:
        """Images per class for a head class of ``n_max`` (before checking that none is empty)."""
        c = num_classes
        if self.profile == "exp":
            return [int(n_max * self.ratio ** (-k / max(c - 1, 1))) for k in range(c)]
        head = math.ceil(c / 2)
        return [n_max if k < head else int(n_max / self.ratio) for k in range(c)]


@dataclass(frozen=True)
class LongTailView:
    """The chosen positions into a split and what a checkpoint or result records about them."""

    positions: np.ndarray  # sorted positions into the split's arrays (keeps the split's order)
    class_counts: list[int]
    record: dict[str, Any]


def longtail_view(labels: np.ndarray, spec: str | LongTail, num_classes: int, *, seed: int = 0,
                  n_max: int | None = None, class_names: tuple[str, ...] | None = None) -> LongTailView:
    """The seeded long-tailed view of a split with these ``labels``.

    Each class keeps a uniformly drawn subset of its images (``numpy`` generator seeded with
    ``[seed, class]``: a class's draw does not depend on the other classes' counts). A request that
    leaves a class with no image, or asks a class for more than it has, is a one-line error.
    """
    lt = spec if isinstance(spec, LongTail) else LongTail.parse(spec)
    labels = np.asarray(labels, dtype=np.int64)
    available = np.bincount(labels, minlength=num_classes)[:num_classes]
    names = class_names or tuple(str(k) for k in range(num_classes))
    if n_max is None:
        n_max = int(available.min())
    if n_max < 1:
        empty = int(np.argmin(available))
        raise ConfigError(f"longtail {lt}: class {empty} ({names[empty]}) has no training image to draw from")
    counts = lt.counts(int(n_max), num_classes)
    for k, (want, have) in enumerate(zip(counts, available, strict=True)):
        if want < 1:
            raise ConfigError(f"longtail {lt} leaves class {k} ({names[k]}) with no training image "
                              f"(n_max {n_max} / {lt.ratio:g} < 1); use a ratio of at most {n_max}")
        if want > have:
            raise ConfigError(f"longtail {lt}: class {k} ({names[k]}) needs {want} images but the split has {have}; "
                              f"lower n_max (at most {int(available.min())} fits every class)")
    chosen = []
    for k, want in enumerate(counts):
        members = np.flatnonzero(labels == k)
        pick = np.random.default_rng([seed, k]).permutation(len(members))[:want]
        chosen.append(members[pick])
    positions = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    record = {"longtail": str(lt), "profile": lt.profile, "ratio": lt.ratio, "n_max": int(n_max),
              "seed": seed, "class_counts": counts, "n": int(sum(counts))}
    return LongTailView(positions, counts, record)

"""Long-tailed views (robustkit.longtail): the profiles' counts against their formulas, seeded and nested
draws, the record, and a one-line error for every request that cannot be met."""

from __future__ import annotations

import math

import numpy as np
import pytest

from robustkit.core.errors import ConfigError
from robustkit.longtail import LongTail, longtail_view


def balanced_labels(per_class: int, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


@pytest.mark.parametrize("ratio", [1, 10, 100, 37.5])
def test_exponential_counts_follow_the_formula(ratio):
    counts = LongTail("exp", ratio).counts(500, 10)
    assert counts == [math.floor(500 * ratio ** (-c / 9)) for c in range(10)]
    assert counts[0] == 500 and counts[-1] == math.floor(500 / ratio)
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_step_counts_halve_the_classes():
    assert LongTail("step", 10).counts(200, 10) == [200] * 5 + [20] * 5
    assert LongTail("step", 4).counts(100, 5) == [100] * 3 + [25] * 2  # ceil(C / 2) head classes


def test_view_takes_exactly_the_counts_from_each_class_and_keeps_the_split_order():
    labels = balanced_labels(60)
    view = longtail_view(labels, "exp:10", 10, seed=3)
    assert np.bincount(labels[view.positions], minlength=10).tolist() == view.class_counts
    assert view.class_counts == LongTail("exp", 10).counts(60, 10)
    assert np.all(np.diff(view.positions) > 0)  # sorted, no repeats
    assert view.record["class_counts"] == view.class_counts and view.record["n"] == len(view.positions)
    assert view.record["longtail"] == "exp:10" and view.record["n_max"] == 60


def test_views_are_seeded_and_nested_across_ratios():
    labels = balanced_labels(80)
    a, b = longtail_view(labels, "exp:10", 10, seed=1), longtail_view(labels, "exp:10", 10, seed=1)
    assert np.array_equal(a.positions, b.positions)
    assert not np.array_equal(a.positions, longtail_view(labels, "exp:10", 10, seed=2).positions)
    # A class's draw depends on (seed, class) only: a steeper tail keeps a subset of a milder one's images.
    steep = longtail_view(labels, "exp:50", 10, seed=1)
    assert set(steep.positions.tolist()) <= set(a.positions.tolist())


def test_n_max_defaults_to_the_smallest_class():
    labels = np.concatenate([np.zeros(30, int), np.ones(12, int), np.full(20, 2)])
    view = longtail_view(labels, "exp:4", 3)
    assert view.class_counts == [12, 6, 3]


@pytest.mark.parametrize("spec, needle", [
    ("exp:0.5", "must be >= 1"), ("exp:-3", "must be >= 1"), ("expo:10", "did you mean 'exp'"),
    ("exp", "must be a number"), ("exp:abc", "must be a number"), ("exp:nan", "must be a number"),
    ("linear:10", "unknown profile"),
])
def test_bad_requests_are_one_line_errors(spec, needle):
    with pytest.raises(ConfigError) as e:
        LongTail.parse(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_request_that_empties_a_class_names_it():
    names = tuple(f"c{i}" for i in range(9)) + ("nine",)
    with pytest.raises(ConfigError, match=r"leaves class 9 \(nine\) with no training image.*at most 80"):
        longtail_view(balanced_labels(80), "exp:100", 10, class_names=names)


def test_more_than_a_class_has_is_refused():
    with pytest.raises(ConfigError, match="needs 70 images but the split has 50"):
        longtail_view(balanced_labels(50), "exp:10", 10, n_max=70)

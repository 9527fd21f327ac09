"""Federated split (robustkit.federated.partition): a Dirichlet split that uses every training image
once and keeps class totals, seeded draws, alpha controlling skew, local test sets whose class counts
follow the reference's floor rule, and a one-line error for every split that cannot be made."""

from __future__ import annotations

import numpy as np
import pytest

from robustkit.core.errors import ConfigError
from robustkit.federated.partition import dirichlet_split, federated_split, local_test_sets
from robustkit.longtail import longtail_view


def lt_labels(n_max: int = 200, ratio: str = "exp:20", classes: int = 10, seed: int = 0) -> np.ndarray:
    """Labels of a long-tailed training view of a shuffled balanced split (order not grouped by class)."""
    balanced = np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), n_max))
    return balanced[longtail_view(balanced, ratio, classes, seed=seed).positions]


def test_every_training_position_is_used_exactly_once_and_class_totals_are_kept():
    labels = lt_labels()
    parts = dirichlet_split(labels, 8, 0.5, 10, seed=3)
    assert len(parts) == 8
    merged = np.concatenate(parts)
    assert np.array_equal(np.sort(merged), np.arange(len(labels)))  # a partition: no repeat, no gap
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted
    per_client = np.stack([np.bincount(labels[p], minlength=10) for p in parts])
    assert per_client.sum(0).tolist() == np.bincount(labels, minlength=10).tolist()


def test_split_is_seeded_and_depends_on_nothing_else():
    labels = lt_labels()
    a, b = dirichlet_split(labels, 6, 0.5, 10, seed=1), dirichlet_split(labels, 6, 0.5, 10, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    other = dirichlet_split(labels, 6, 0.5, 10, seed=2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, other, strict=True))
    # The global RNGs play no part.
    np.random.seed(123)
    c = dirichlet_split(labels, 6, 0.5, 10, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_images_of_a_class_are_shuffled_before_the_cut():
    labels = np.repeat(np.arange(2), 200)  # class 0 is positions 0-199: unshuffled cuts would be ranges
    parts = dirichlet_split(labels, 4, 5.0, 2, seed=0)
    pieces = [p[labels[p] == 0] for p in parts]
    assert not all(len(q) == 0 or q[-1] - q[0] + 1 == len(q) for q in pieces)


def _mean_max_share(labels: np.ndarray, alpha: float, seeds: range) -> float:
    shares = []
    for seed in seeds:
        for p in dirichlet_split(labels, 5, alpha, 10, seed=seed):
            counts = np.bincount(labels[p], minlength=10)
            shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


def test_small_alpha_is_more_skewed_than_large_alpha():
    labels = np.repeat(np.arange(10), 100)  # balanced, so skew comes from the split alone
    small, large = _mean_max_share(labels, 0.1, range(5)), _mean_max_share(labels, 100.0, range(5))
    assert small > 0.5  # a few dominant classes per client
    assert large < 0.2  # close to the IID 0.1
    assert small > large + 0.3


def test_tiny_alpha_still_partitions():
    labels = np.repeat(np.arange(10), 300)
    parts = dirichlet_split(labels, 3, 0.01, 10, seed=0)
    assert sum(len(p) for p in parts) == len(labels)


def test_local_test_counts_follow_the_floor_rule_exactly():
    train = lt_labels(ratio="exp:10")
    test = np.random.default_rng(5).permutation(np.repeat(np.arange(10), 30))
    split = federated_split(train, test, 10, clients=6, alpha=0.5, seed=4)
    n_train, n_test = len(train), len(test)
    for k in range(6):
        for c in range(10):
            n_kc = int(np.sum(train[split.clients[k]] == c))
            expect = min((n_test * n_kc) // n_train, 30)  # floor(n_test * n_kc / N_train), capped
            assert split.local_test_counts[k][c] == expect
            assert split.client_counts[k][c] == n_kc
    assert split.record["local_test_counts"] == split.local_test_counts


def test_local_test_sets_draw_only_from_the_right_class_without_repeats():
    train = lt_labels()
    test = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 40))
    split = federated_split(train, test, 10, clients=4, alpha=1.0, seed=0)
    for k, pos in enumerate(split.local_test):
        assert np.all(np.diff(pos) > 0)  # sorted, drawn without replacement
        assert np.bincount(test[pos], minlength=10).tolist() == split.local_test_counts[k]
        # Classes the client never trains on are absent from its local test set.
        absent = [c for c in range(10) if split.client_counts[k][c] == 0]
        assert not np.isin(test[pos], absent).any()


def test_local_test_sets_are_seeded_per_client_and_class():
    test = np.random.default_rng(2).permutation(np.repeat(np.arange(3), 50))
    counts = [[40, 10, 0], [20, 20, 10]]  # N_train 100, n_test 150 -> [[60->50, 15, 0], [30, 30, 15]]
    a = local_test_sets(test, counts, 3, seed=7)
    assert [np.bincount(test[p], minlength=3).tolist() for p in a] == [[50, 15, 0], [30, 30, 15]]
    # Client 1's set depends on its own counts and (seed, client, class) only, not on client 0's
    # classes (N_train kept at 100 so client 1's counts stay the same).
    other = local_test_sets(test, [[0, 0, 50], counts[1]], 3, seed=7)
    assert np.bincount(test[other[0]], minlength=3).tolist() == [0, 0, 50]
    assert np.array_equal(other[1], a[1])
    assert not np.array_equal(local_test_sets(test, counts, 3, seed=8)[1], a[1])
    # Two clients with the same train counts draw their own images (overlap allowed, identity not).
    twins = local_test_sets(test, [counts[1], counts[1]], 3, seed=7)
    assert len(twins[0]) == len(twins[1]) == 75 and not np.array_equal(twins[0], twins[1])


def test_record_is_json_ready_and_counts_empty_local_tests():
    import json

    train = np.repeat(np.arange(2), [300, 3])
    test = np.repeat(np.arange(2), 2)  # n_test 4: a client with < 76 training images floors to 0
    split = federated_split(train, test, 2, clients=6, alpha=1.0, seed=0)
    rec = json.loads(json.dumps(split.record))
    assert rec["clients"] == 6 and rec["alpha"] == 1.0 and rec["seed"] == 0
    assert rec["sizes"] == [len(p) for p in split.clients] and sum(rec["sizes"]) == 303
    empty = [k for k, t in enumerate(split.local_test) if len(t) == 0]
    assert empty and rec["empty_local_tests"] == len(empty) and rec["empty_local_test_clients"] == empty


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("alpha", [0, -0.5, float("nan"), float("inf")])
def test_bad_alpha_is_one_line(alpha):
    with pytest.raises(ConfigError) as exc:
        dirichlet_split(np.arange(20) % 2, 2, alpha, 2, seed=0)
    assert "alpha must be a finite number > 0" in _one_line(exc)


@pytest.mark.parametrize("clients, needle", [(0, "integer >= 1"), (-3, "integer >= 1"),
                                             (21, "21 clients but only 20 training examples")])
def test_bad_client_count_is_one_line(clients, needle):
    with pytest.raises(ConfigError) as exc:
        federated_split(np.arange(20) % 2, np.arange(10) % 2, 2, clients=clients, alpha=0.5, seed=0)
    assert needle in _one_line(exc)


def test_a_client_with_no_training_image_is_one_line():
    labels = np.repeat(np.arange(10), 5)
    with pytest.raises(ConfigError) as exc:
        dirichlet_split(labels, 40, 0.05, 10, seed=0)
    msg = _one_line(exc)
    assert msg.startswith("client ") and " of 40 gets no training image with alpha 0.05 (seed 0); " in msg
    assert "use a larger alpha or fewer clients" in msg
    assert 0 <= int(msg.split()[1]) < 40


def test_labels_outside_the_classes_are_one_line():
    with pytest.raises(ConfigError) as exc:
        federated_split(np.array([0, 1, 5]), np.array([0, 1]), 3, clients=2, alpha=1.0, seed=0)
    assert "label 5 is outside [0, 3)" in _one_line(exc)

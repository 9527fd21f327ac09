"""Federated long-tailed data: which training images each client holds, and its local test set.

FedLoGe (Xiao et al., ICLR 2024), like most federated long-tailed work, splits a *globally*
long-tailed training set non-IID over K clients: for every class, a Dirichlet(alpha * 1_K) draw
apportions that class's images among all K clients (reference ``util/sampling.py`` with
``non_iid_prob_class = 1``). Small alpha gives each client a few dominant classes; large alpha
approaches an IID split. A client's personalised accuracy is measured on a *local test set*
mirroring its training label distribution, drawn from the balanced test split (reference
``util/dataset.py``): ``floor(n_test * n_kc / N_train)`` images of class c for client k.

Seeding. Every draw has its own numpy generator seeded from explicit integers, so a split never
depends on the global RNG, on other classes or clients, or on call order:

* class c's Dirichlet draw and shuffle: ``[seed, c, 1]``;
* client k's local test images of class c: ``[seed, k, c, 2]``.

The trailing non-zero tag is deliberate: numpy's ``SeedSequence`` pads short entropy with zeros,
so ``[seed, c]`` (what :func:`robustkit.longtail.longtail_view` uses for its own draw of class c)
equals ``[seed, c, 0]``. Without the tags, the long-tail view, the Dirichlet split and the local
tests would reuse one stream whenever they share a seed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from robustkit.core.errors import ConfigError

_SPLIT_TAG = 1  # stream tag of the per-class Dirichlet draw (see the module docstring)
_LOCAL_TEST_TAG = 2  # stream tag of the per-(client, class) local test draw


@dataclass(frozen=True)
class FederatedSplit:
    """Per-client training and local test positions, their class counts, and a JSON-ready record."""

    clients: list[np.ndarray]  # per client: sorted positions into the training arrays given
    client_counts: list[list[int]]  # per client, training images per class
    local_test: list[np.ndarray]  # per client: sorted positions into the test arrays given
    local_test_counts: list[list[int]]  # per client, local test images per class
    record: dict[str, Any]


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"federated split seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ConfigError(f"{what} labels must be a 1-D integer array, got shape {labels.shape} {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise ConfigError(f"{what} label {bad} is outside [0, {num_classes}) for {num_classes} classes")
    return labels


def _check_alpha(alpha: float) -> float:
    ok = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0
    if not ok:
        raise ConfigError(f"Dirichlet alpha must be a finite number > 0, got {alpha!r} "
                          f"(FedLoGe uses 0.5 or 1.0; smaller is more non-IID)")
    return float(alpha)


def _check_clients(num_clients: int, n_train: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 1:
        raise ConfigError(f"the number of clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > n_train:
        raise ConfigError(f"{num_clients} clients but only {n_train} training examples: "
                          f"every client needs at least one; use at most {n_train} clients")
    return int(num_clients)


def _cut_points(proportions: np.ndarray, n: int) -> np.ndarray:
    """Where to cut ``n`` shuffled images so piece k gets about ``proportions[k] * n`` of them.

    Rounding the *cumulative* proportions (not each share) makes the pieces sum to exactly ``n``
    and never go negative: the cut points are non-decreasing and the last one is ``n``.
    """
    cuts = np.rint(np.cumsum(proportions) * n).astype(np.int64)
    cuts = np.clip(cuts, 0, n)
    cuts[-1] = n
    return cuts[:-1]


def dirichlet_split(labels: np.ndarray, num_clients: int, alpha: float, num_classes: int,
                    seed: int) -> list[np.ndarray]:
    """Per client, the sorted positions into ``labels`` of its training images.

    For each class c, a Dirichlet(alpha * 1_K) draw (generator ``[seed, c, 1]``) gives the clients'
    shares of the class; the class's images, shuffled by the same generator, are cut at the rounded
    cumulative shares. Every position goes to exactly one client and per-class totals are kept.
    A client left with no image is a one-line error: FedAvg weights it by 0 and its local test set
    would be empty, so a run with it would silently have fewer clients than asked.
    """
    labels = _check_labels(labels, num_classes, "training")
    alpha, seed = _check_alpha(alpha), _check_seed(seed)
    num_clients = _check_clients(num_clients, len(labels))
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, c, _SPLIT_TAG])
        shares = rng.dirichlet(np.full(num_clients, alpha))
        if not np.all(np.isfinite(shares)):  # guards a numpy that returns NaN for tiny alpha
            raise ConfigError(f"Dirichlet alpha {alpha:g} is too small to sample (class {c}); use a larger alpha")
        for k, part in enumerate(np.split(rng.permutation(members), _cut_points(shares, len(members)))):
            pieces[k].append(part)
    clients = [np.sort(np.concatenate(parts)) for parts in pieces]
    empty = [k for k, pos in enumerate(clients) if len(pos) == 0]
    if empty:
        more = f" ({len(empty)} clients are empty)" if len(empty) > 1 else ""
        raise ConfigError(f"client {empty[0]} of {num_clients} gets no training image with alpha {alpha:g} "
                          f"(seed {seed}); use a larger alpha or fewer clients{more}")
    return clients


def local_test_counts(client_counts: list[list[int]], n_test: int, test_available: np.ndarray) -> np.ndarray:
    """Local test images per (client, class): ``min(floor(n_test * n_kc / N_train), available_c)``.

    The reference computes ``int(n_kc / N_train * n_test)`` in floating point; integer arithmetic
    gives the exact floor. The reference draws without replacement and fails (CIFAR-10) or repeats
    images (CIFAR-100) when a client's share of a head class exceeds the class's test images; we cap
    at the number of test images of the class instead.
    """
    counts = np.asarray(client_counts, dtype=np.int64)
    n_train = int(counts.sum())
    want = (n_test * counts) // max(n_train, 1)
    return np.minimum(want, np.asarray(test_available, dtype=np.int64)[None, :])


def local_test_sets(test_labels: np.ndarray, client_counts: list[list[int]], num_classes: int,
                    seed: int) -> list[np.ndarray]:
    """Per client, sorted positions into ``test_labels`` of a test set mirroring its train labels.

    Class c of client k holds :func:`local_test_counts` images drawn without replacement from the
    test images of class c (generator ``[seed, k, c, 2]``). Sets of different clients may overlap,
    as in the reference; a client whose counts all floor to 0 gets an empty set.
    """
    test_labels = _check_labels(test_labels, num_classes, "test")
    seed = _check_seed(seed)
    counts = np.asarray(client_counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] != num_classes or (counts.size and counts.min() < 0):
        raise ConfigError(f"client_counts must be clients x {num_classes} non-negative counts, "
                          f"got shape {counts.shape}")
    by_class = [np.flatnonzero(test_labels == c) for c in range(num_classes)]
    available = np.array([len(m) for m in by_class], dtype=np.int64)
    take = local_test_counts(counts.tolist(), len(test_labels), available)
    sets = []
    for k in range(len(counts)):
        parts = [np.random.default_rng([seed, k, c, _LOCAL_TEST_TAG]).permutation(by_class[c])[:n]
                 for c, n in enumerate(take[k].tolist()) if n > 0]
        sets.append(np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64))
    return sets


def federated_split(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int, *, clients: int,
                    alpha: float, seed: int) -> FederatedSplit:
    """The Dirichlet split of ``train_labels`` over ``clients`` and each client's local test set.

    ``train_labels`` are the labels of the (already long-tailed) training images; positions refer
    to these arrays, so a caller holding a :class:`robustkit.longtail.LongTailView` maps them back
    with ``view.positions[split.clients[k]]``. ``test_labels`` is the balanced test split.
    """
    train_labels = _check_labels(train_labels, num_classes, "training")
    test_labels = _check_labels(test_labels, num_classes, "test")
    parts = dirichlet_split(train_labels, clients, alpha, num_classes, seed)
    counts = [np.bincount(train_labels[p], minlength=num_classes).tolist() for p in parts]
    tests = local_test_sets(test_labels, counts, num_classes, seed)
    test_counts = [np.bincount(test_labels[t], minlength=num_classes).tolist() for t in tests]
    available = np.bincount(test_labels, minlength=num_classes)
    wanted = (len(test_labels) * np.asarray(counts, dtype=np.int64)) // len(train_labels)
    empty_tests = [k for k, t in enumerate(tests) if len(t) == 0]
    record = {
        "clients": len(parts), "alpha": float(alpha), "seed": int(seed), "num_classes": num_classes,
        "partition": "dirichlet per class over all clients", "n_train": len(train_labels),
        "n_test": len(test_labels), "sizes": [len(p) for p in parts], "client_counts": counts,
        "local_test_sizes": [len(t) for t in tests], "local_test_counts": test_counts,
        "local_test_rule": "min(floor(n_test * n_kc / N_train), test images of class c)",
        "local_test_capped": int((wanted > available[None, :]).sum()),
        "empty_local_tests": len(empty_tests), "empty_local_test_clients": empty_tests,
        "seeding": "class c split: numpy [seed, c, 1]; client k local test class c: [seed, k, c, 2]",
    }
    return FederatedSplit(parts, counts, tests, test_counts, record)

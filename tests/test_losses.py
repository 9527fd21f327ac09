"""robustkit.losses against independent references: submodlib, brute-force formulas, per-anchor loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from robustkit.core.errors import ConfigError
from robustkit.losses import (
    FORMS,
    KERNELS,
    LOSSES,
    LossSpec,
    facility_location,
    graph_cut,
    log_det,
    representation_loss,
    similarity_kernel,
)

torch.set_num_threads(1)
N_SET = 12


def _kernel(kernel: str, seed: int = 0, n: int = N_SET, d: int = 5) -> torch.Tensor:
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return similarity_kernel(z, kernel, width=0.8)


def _sets(n: int = N_SET, seed: int = 1) -> list[list[int]]:
    """The empty set, the ground set, singletons and random subsets of several sizes."""
    rng = np.random.default_rng(seed)
    return [[], list(range(n)), [3], [0, 11]] + [sorted(rng.choice(n, size, replace=False).tolist())
                                                 for size in (2, 4, 5, 7, 9)]


def _masks(sets: list[list[int]], n: int = N_SET) -> torch.Tensor:
    members = torch.zeros(len(sets), n, dtype=torch.bool)
    for row, idx in enumerate(sets):
        members[row, idx] = True
    return members


# --------------------------------------------------------------------- hard set functions
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # submodlib's own scipy.sparse.csr import
@pytest.mark.parametrize("kernel", ["rbf", "euclidean"])
def test_set_functions_match_submodlib(kernel):
    submodlib = pytest.importorskip("submodlib", reason="submodlib-py (test extra) is the reference")
    S = _kernel(kernel)
    dense = S.numpy()
    sets = _sets()
    lam = 0.6
    # submodlib clips FL's max at 0, so it is compared on these non-negative kernels.
    refs = {
        "fl": submodlib.FacilityLocationFunction(N_SET, mode="dense", sijs=dense, separate_rep=False),
        "gc": submodlib.GraphCutFunction(N_SET, mode="dense", lambdaVal=lam, ggsijs=dense,
                                         separate_rep=False),
        "logdet": submodlib.LogDeterminantFunction(N_SET, mode="dense", lambdaVal=lam, sijs=dense),
    }
    ours = {"fl": facility_location(S, _masks(sets)), "gc": graph_cut(S, _masks(sets), lam),
            "logdet": log_det(S, _masks(sets), lam)}
    for name, ref in refs.items():
        expected = np.array([ref.evaluate(set(idx)) for idx in sets])
        np.testing.assert_allclose(ours[name].numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("kernel", KERNELS)
def test_set_functions_match_brute_force(kernel):
    S = _kernel(kernel, seed=2)
    dense = S.numpy()
    sets = _sets(seed=3)
    lam = 0.3
    fl, gc, ld = [], [], []
    for idx in sets:
        fl.append(sum(max(dense[i, j] for j in idx) for i in range(N_SET)) if idx else 0.0)
        gc.append(sum(dense[i, j] for i in range(N_SET) for j in idx)
                  - lam * sum(dense[i, j] for i in idx for j in idx))
        sign, value = np.linalg.slogdet(dense[np.ix_(idx, idx)] + lam * np.eye(len(idx)))
        assert sign > 0
        ld.append(value)
    members = _masks(sets)
    np.testing.assert_allclose(facility_location(S, members).numpy(), fl, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(graph_cut(S, members, lam).numpy(), gc, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(log_det(S, members, lam).numpy(), ld, rtol=1e-10, atol=1e-10)
    # a batch of kernels broadcasts against a batch of masks
    stacked = torch.stack([S, 2 * S])
    np.testing.assert_allclose(graph_cut(stacked, members[:2], lam).numpy(),
                               [gc[0], 2 * gc[1]], rtol=1e-10, atol=1e-10)


def test_set_functions_index_rows_by_v_and_columns_by_a():
    """On a non-symmetric matrix the definitions' i in V (rows) and j in A (columns) are distinguishable."""
    S = torch.rand(N_SET, N_SET, generator=torch.Generator().manual_seed(9), dtype=torch.float64) - 0.3
    dense = S.numpy()
    for idx in _sets(seed=10)[2:]:
        members = _masks([idx])
        assert facility_location(S, members).item() == pytest.approx(dense[:, idx].max(1).sum(), rel=1e-12)
        expected = dense[:, idx].sum() - 0.4 * dense[np.ix_(idx, idx)].sum()
        assert graph_cut(S, members, 0.4).item() == pytest.approx(expected, rel=1e-12)


def test_kernels_match_their_definitions():
    z = torch.randn(7, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    zh = (z / z.norm(dim=1, keepdim=True)).numpy()
    cos = np.array([[zh[i] @ zh[j] for j in range(7)] for i in range(7)])
    d2 = np.array([[np.sum((zh[i] - zh[j]) ** 2) for j in range(7)] for i in range(7)])
    np.testing.assert_allclose(similarity_kernel(z, "cosine").numpy(), cos, atol=1e-12)
    np.testing.assert_allclose(similarity_kernel(z, "rbf", 0.7).numpy(), np.exp(-d2 / (2 * 0.49)), atol=1e-12)
    np.testing.assert_allclose(similarity_kernel(z, "euclidean").numpy(), 1 - d2 / 4, atol=1e-12)


# --------------------------------------------------------------------- the training losses
def _batch(labels: list[int], views: int = 2, dim: int = 6, seed: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(labels), views, dim, generator=g, dtype=torch.float64), torch.tensor(labels)


def _flat(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    b, v, d = features.shape
    return features.reshape(b * v, d), labels.repeat_interleave(v).numpy()


@pytest.mark.parametrize("kernel", KERNELS)
def test_gc_total_correlation_is_lam_times_the_cross_class_sum(kernel):
    features, labels = _batch([0, 1, 1, 2, 0, 2, 2], views=2)
    z, y = _flat(features, labels)
    S = similarity_kernel(z, kernel).numpy()
    n, lam = len(y), 0.7
    cross = sum(S[i, j] for i in range(n) for j in range(n) if y[i] != y[j])
    loss_c = representation_loss(features, labels, LossSpec(loss="gc", form="c", kernel=kernel, lam=lam))
    assert loss_c.item() == pytest.approx(lam * cross / n, rel=1e-10)
    # ... which is the set-function identity (sum_k f(A_k) - f(V)) / N; form s is sum_k f(A_k) / N
    St = torch.from_numpy(S)
    classes = _masks([[i for i in range(n) if y[i] == k] for k in np.unique(y)], n)
    per_class = graph_cut(St, classes, lam).sum()
    whole = graph_cut(St, torch.ones(1, n, dtype=torch.bool), lam).sum()
    assert loss_c.item() == pytest.approx(((per_class - whole) / n).item(), rel=1e-10)
    loss_s = representation_loss(features, labels, LossSpec(loss="gc", form="s", kernel=kernel, lam=lam))
    assert loss_s.item() == pytest.approx((per_class / n).item(), rel=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
def test_logdet_forms_match_class_by_class_numpy(kernel):
    features, labels = _batch([2, 0, 1, 1, 2, 0, 2, 5], views=2)
    z, y = _flat(features, labels)
    S = similarity_kernel(z, kernel).numpy()
    n, lam = len(y), 0.5
    per_class = 0.0
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        per_class += np.linalg.slogdet(S[np.ix_(idx, idx)] + lam * np.eye(len(idx)))[1]
    whole = np.linalg.slogdet(S + lam * np.eye(n))[1]
    spec = {"loss": "logdet", "kernel": kernel, "lam": lam}
    assert representation_loss(features, labels, LossSpec(form="s", **spec)).item() == pytest.approx(
        per_class / n, rel=1e-10)
    assert representation_loss(features, labels, LossSpec(form="c", **spec)).item() == pytest.approx(
        (per_class - whole) / n, rel=1e-10)


def _fl_reference(features: torch.Tensor, labels: torch.Tensor, kernel: str, t: float | None) -> float:
    """Per anchor, per other class: the soft max (1/t) log sum exp(t s) or (t None) the hard max."""
    z, y = _flat(features, labels)
    S = similarity_kernel(z, kernel).numpy()
    total = 0.0
    for i in range(len(y)):
        for k in set(y.tolist()) - {y[i]}:
            row = S[i, y == k]
            total += row.max() if t is None else row.max() + np.log(np.exp(t * (row - row.max())).sum()) / t
    return total / len(y)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fl_soft_max_matches_a_loop_and_tends_to_the_hard_max(kernel):
    features, labels = _batch([0, 1, 1, 2, 0, 2, 2, 3], views=2)
    hard = _fl_reference(features, labels, kernel, None)
    gaps = []
    for t in (1.0, 10.0, 100.0, 1e4):
        soft = representation_loss(features, labels, LossSpec(loss="fl", kernel=kernel, fl_scale=t)).item()
        assert soft == pytest.approx(_fl_reference(features, labels, kernel, t), rel=1e-10)
        gaps.append(soft - hard)
    assert all(gap >= -1e-12 for gap in gaps)
    assert all(a > b for a, b in itertools.pairwise(gaps))
    assert gaps[-1] < math.log(6) / 1e4  # the soft max exceeds the max by at most log(|A_k|) / t
    # S_f and C_f coincide for FL
    spec_s = LossSpec(loss="fl", form="s", kernel=kernel)
    assert representation_loss(features, labels, spec_s).item() == representation_loss(
        features, labels, LossSpec(loss="fl", form="c", kernel=kernel)).item()


def _supcon_reference(features: torch.Tensor, labels: torch.Tensor, temperature: float,
                      submodular: bool) -> float:
    z, y = _flat(features, labels)
    S = similarity_kernel(z, "cosine").numpy() / temperature
    losses = []
    for i in range(len(y)):
        positives = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        negatives = [a for a in range(len(y)) if y[a] != y[i]]
        others = negatives if submodular else [a for a in range(len(y)) if a != i]
        if not positives or not others:
            continue
        log_den = np.log(sum(np.exp(S[i, a]) for a in others))
        losses.append(-np.mean([S[i, p] - log_den for p in positives]))
    return float(np.mean(losses))


@pytest.mark.parametrize("loss", ["supcon", "submod_supcon"])
@pytest.mark.parametrize("views", [1, 2])
def test_supcon_matches_a_per_anchor_loop(loss, views):
    # classes 1 and 3 have one image: with one view their anchors have no positive and are skipped
    features, labels = _batch([0, 1, 0, 2, 2, 3, 2], views=views)
    spec = LossSpec(loss=loss, temperature=0.2, loss_scale=1.5)
    expected = 1.5 * _supcon_reference(features, labels, 0.2, submodular=loss == "submod_supcon")
    assert representation_loss(features, labels, spec).item() == pytest.approx(expected, rel=1e-10)


def _all_specs() -> list[LossSpec]:
    specs = [LossSpec(loss=loss, form=form, kernel=kernel)
             for loss, form, kernel in itertools.product(LOSSES, FORMS, KERNELS)
             if not (loss == "gc_ratio" and kernel == "cosine")]
    # Graph Cut's S_f rewards compactness only for lam > 1; Log-Det with the reference's ridge
    return specs + [LossSpec(loss="gc", form="s", lam=2.0), LossSpec(loss="logdet", form="c", lam=0.5)]


def _spec_id(spec: LossSpec) -> str:
    return f"{spec.loss}-{spec.form}-{spec.kernel}-lam{spec.lam}"


@pytest.mark.parametrize("spec", _all_specs(), ids=_spec_id)
def test_each_loss_is_lower_for_separated_clusters(spec):
    g = torch.Generator().manual_seed(6)
    labels = torch.arange(24) % 4
    separated = 3 * torch.eye(8)[labels].unsqueeze(1) + 0.3 * torch.randn(24, 2, 8, generator=g)
    mixed = separated[torch.randperm(24, generator=g)]  # same labels, features of random clusters
    assert representation_loss(separated, labels, spec) < representation_loss(mixed, labels, spec)


EDGE_CASES = {
    "singleton class": ([0, 0, 1, 1, 2], 1),
    "one class": ([4, 4, 4], 2),
    "no positives": ([0, 1, 2, 3], 1),
    "one example": ([7], 1),
}


@pytest.mark.parametrize("spec", _all_specs(), ids=_spec_id)
def test_losses_and_gradients_are_finite_on_edge_cases(spec):
    cases = {name: _batch(labels, views=views, seed=8) for name, (labels, views) in EDGE_CASES.items()}
    features, labels = _batch([0, 0, 1, 2, 2], views=2, seed=8)
    cases["duplicate views"] = (features[:, :1].expand(-1, 2, -1).contiguous(), labels)
    cases["all identical"] = (torch.ones(4, 2, 6, dtype=torch.float64), torch.tensor([0, 0, 1, 1]))
    for name, (features, labels) in cases.items():
        for dtype in (torch.float64, torch.float32):
            x = features.to(dtype).requires_grad_(True)
            loss = representation_loss(x, labels, spec)
            (grad,) = torch.autograd.grad(loss, x)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (name, dtype)


@pytest.mark.parametrize("loss, labels, views", [
    ("submod_supcon", [3, 3, 3], 2), ("fl", [3, 3, 3], 2), ("gc", [3, 3, 3], 2), ("gc_ratio", [3, 3, 3], 2),
    ("supcon", [0, 1, 2], 1), ("submod_supcon", [0, 1, 2], 1), ("gc_ratio", [0, 1, 2], 1),
])
def test_losses_without_a_term_are_a_connected_zero(loss, labels, views):
    """One class: no negatives / other classes; distinct labels and one view: no positives."""
    features, labels = _batch(labels, views=views)
    features.requires_grad_(True)
    value = representation_loss(features, labels, LossSpec(loss=loss, kernel="rbf"))
    assert value.item() == 0.0 and value.requires_grad
    assert representation_loss(*_batch([3, 3, 1], views=2), LossSpec(loss=loss, kernel="rbf")).item() != 0.0


@pytest.mark.parametrize("kwargs, fragment", [
    ({"loss": "fll"}, "'fl'"),
    ({"loss": "ce"}, "unknown loss 'ce'"),
    ({"form": "x"}, "unknown form"),
    ({"kernel": "cosin"}, "'cosine'"),
    ({"loss": "gc_ratio", "kernel": "cosine"}, "positive kernel"),
    ({"loss": "logdet", "lam": 0.0}, "lam = 0.0: must be > 0"),
    ({"loss": "logdet", "lam": -1.0}, "lam = -1.0: must be > 0"),
    ({"loss": "gc", "lam": -0.5}, "lam = -0.5: must be >= 0"),
    ({"kernel_width": 0.0}, "kernel_width"),
    ({"temperature": float("nan")}, "temperature"),
    ({"fl_scale": -1.0}, "fl_scale"),
])
def test_bad_specs_are_one_line_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        LossSpec(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_bad_inputs_are_config_errors():
    spec = LossSpec()
    features, labels = _batch([0, 1, 1], views=2)
    for bad_features, bad_labels in [(features[:, 0], labels), (features, labels[:2]),
                                     (features, labels[:, None]), (features[:0], labels[:0]),
                                     (features.long(), labels)]:
        with pytest.raises(ConfigError):
            representation_loss(bad_features, bad_labels, spec)
    with pytest.raises(ConfigError, match="not positive definite"):
        log_det(-torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.bool), 0.5)

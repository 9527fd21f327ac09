"""FedLoGe's pieces (issue 16's acceptance list): SSE-C geometry and sparsity, a frozen SSE-C, personal
heads that never leave their client, sample-weighted FedAvg, GLA-FR, and seeding that makes a run
independent of client order and bitwise reproducible (what the Flower-vs-simulator test relies on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustkit.core.errors import ConfigError
from robustkit.federated.fedloge import (
    aggregate,
    client_generator,
    client_selection,
    client_update,
    generic_state,
    gla_fr_global,
    gla_fr_local,
    personal_head,
    personal_state,
    simplex_etf,
    sse_c,
    sse_objective,
)
from robustkit.federated.simulate import run_simulator
from robustkit.models import load_model
from robustkit.models.fedloge import FedLoGeNet

C, WIDTH, D = 4, 4, 16  # SmallCNN features: 4 * width
STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
UPDATE = {"epochs": 1, "batch_size": 8, "lr": 0.05, "momentum": 0.5}


def make_model(seed: int = 0, **kw) -> FedLoGeNet:
    torch.manual_seed(seed)  # tests only: the library never touches the global RNG
    return FedLoGeNet(3, C, WIDTH, **STATS, **kw)


def client_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """3 clients of 16x16 random images with different label mixes (client 2 sees classes 2, 3 only)."""
    g = torch.Generator().manual_seed(1)
    labels = [torch.tensor([0] * 10 + [1] * 4 + [2] * 2), torch.tensor([1] * 6 + [3] * 6),
              torch.tensor([2] * 3 + [3] * 7)]
    return [(torch.rand(len(y), 3, 16, 16, generator=g), y) for y in labels]


@pytest.fixture(scope="module")
def sse() -> torch.Tensor:
    return sse_c(D, C, steps=50, lr=1e-3, seed=0)[0]


def one_line_error(fn, *args, match: str, **kw) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        fn(*args, **kw)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------- SSE-C


def test_simplex_etf_rows_have_equal_norm_and_cosine_minus_one_over_c_minus_one():
    m = simplex_etf(32, 10, seed=3)
    assert m.shape == (10, 32)
    assert torch.allclose(m.norm(dim=1), torch.ones(10), atol=1e-6)
    cos = F.normalize(m, dim=1) @ F.normalize(m, dim=1).T
    off = cos[~torch.eye(10, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 9), atol=1e-6)
    assert torch.equal(m, simplex_etf(32, 10, seed=3)) and not torch.equal(m, simplex_etf(32, 10, seed=4))


def test_sse_c_zeroes_exactly_beta_and_refinement_keeps_them_zero_and_lowers_the_objective():
    weight, mask = sse_c(20, 5, beta=0.6, steps=300, lr=1e-3, seed=2)
    assert int((~mask).sum()) == round(0.6 * 100)
    assert bool((weight[~mask] == 0).all())
    start = simplex_etf(20, 5, seed=2) * mask  # the sparsified ETF, before refinement
    assert bool((start[mask] != 0).all())
    assert float(sse_objective(weight)) < float(sse_objective(start)) - 0.1
    assert bool((weight[mask] != start[mask]).any())
    again, mask2 = sse_c(20, 5, beta=0.6, steps=300, lr=1e-3, seed=2)
    assert torch.equal(weight, again) and torch.equal(mask, mask2)
    assert int((~sse_c(20, 5, beta=0.0, steps=0)[1]).sum()) == 0


def test_bad_sse_input_is_a_one_line_error():
    for beta in (1.0, -0.1):
        one_line_error(sse_c, 20, 5, beta=beta, steps=0, match="beta")
    one_line_error(simplex_etf, 8, 10, seed=0, match="smaller than the class count")
    one_line_error(sse_c, 8, 10, steps=0, match="smaller than the class count")


# --------------------------------------------------------------------------------------- the model


def test_fedloge_net_adds_the_personal_head_and_masks_classes():
    base = make_model()
    x = torch.rand(5, 3, 16, 16)
    personal = make_model(extra_head=True)
    personal.load_state_dict(personal_state(base.state_dict(), torch.randn(C, D)))
    personal.eval()
    f = personal.embed(x)
    assert torch.allclose(personal(x), personal.head(f) + personal.head2(f))
    masked = make_model(extra_head=True, class_mask=[1, 3])
    masked.load_state_dict(personal.state_dict())  # the mask is an architecture argument, not state
    masked.eval()
    out = masked(x)
    assert torch.equal(out[:, [1, 3]], personal(x)[:, [1, 3]]) and bool((out[:, [0, 2]] == -1e9).all())
    for bad in ([], [4], [1, 1]):
        one_line_error(FedLoGeNet, 3, C, WIDTH, **STATS, class_mask=bad, match="class_mask")
    assert isinstance(load_model("fedloge.init", width=4).model, FedLoGeNet)


# ------------------------------------------------------------------------------------ client update


def run_update(model, sse, psi, phi, k=0, rnd=0, method="fedloge"):
    x, y = client_data()[k]
    return client_update(model, sse, psi, phi, x, y, method=method, gen=client_generator(7, rnd, k), **UPDATE)


def test_client_update_leaves_sse_c_bitwise_unchanged_and_trains_the_rest(sse):
    frozen = sse.clone()
    model, phi = make_model(), personal_head(D, C, 7, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    phi0 = phi.weight.detach().clone()
    stats = run_update(model, sse, model.head, phi)
    assert torch.equal(sse, frozen)
    assert stats["n"] == 16 and {"loss", "loss_psi", "loss_phi"} <= set(stats)
    after = model.state_dict()
    assert not torch.equal(after["features.0.0.weight"], before["features.0.0.weight"])
    assert not torch.equal(after["head.weight"], before["head.weight"]) and not torch.equal(phi.weight, phi0)


def test_heads_learn_on_detached_features_only(sse):
    """The backbone learns through SSE-C alone: a different psi and phi leave its update bitwise equal."""
    a, b = make_model(), make_model()
    with torch.no_grad():
        b.head.weight.mul_(-3.0)
    run_update(a, sse, a.head, personal_head(D, C, 7, 0))
    run_update(b, sse, b.head, personal_head(D, C, 99, 0))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head."))


def test_fedavg_trains_backbone_and_psi_jointly_and_leaves_phi():
    a, b = make_model(), make_model()
    with torch.no_grad():
        b.head.weight.mul_(-3.0)
    phi = personal_head(D, C, 7, 0)
    phi0 = phi.weight.detach().clone()
    run_update(a, None, a.head, phi, method="fedavg")
    run_update(b, None, b.head, personal_head(D, C, 7, 0), method="fedavg")
    assert torch.equal(phi.weight, phi0)
    assert not torch.equal(a.state_dict()["features.0.0.weight"], b.state_dict()["features.0.0.weight"])


# ------------------------------------------------------------------------------------------ server


def test_aggregate_is_the_sample_weighted_mean_in_client_order():
    g = torch.Generator().manual_seed(0)
    s1 = {"w": torch.randn(3, 2, generator=g), "nbt": torch.tensor(4)}
    s2 = {"w": torch.randn(3, 2, generator=g), "nbt": torch.tensor(9)}
    out = aggregate([s1, s2], [1, 3])
    assert torch.allclose(out["w"], (1 * s1["w"] + 3 * s2["w"]) / 4, atol=1e-7)
    assert out["nbt"].item() == 9 and out["nbt"].dtype == s1["nbt"].dtype
    # Float sums depend on their order: 1e20 - 1e20 + 1 is 1 but 1e20 + 1 - 1e20 is 0. Summed in
    # ascending client order, the result does not depend on the order the states are listed in.
    big, small = {"w": torch.tensor([1e20])}, {"w": torch.tensor([1.0])}
    neg = {"w": torch.tensor([-1e20])}
    for states, clients in (([big, small, neg], [0, 2, 1]), ([small, neg, big], [2, 1, 0])):
        assert aggregate(states, [1, 1, 1], clients=clients)["w"].item() == pytest.approx(1 / 3)
    one_line_error(aggregate, [{"head2.weight": s1["w"]}], [1], match="personal head")
    one_line_error(aggregate, [s1, s2], [1], match="one weight per state")


def test_personal_heads_are_never_averaged_and_client_order_does_not_matter(sse):
    """A run's phis are each exactly what its client trained alone; clients run in reverse order and
    aggregated give the run's global state bitwise."""
    init, data = make_model(), client_data()
    run = run_simulator(init, sse, data, rounds=1, fraction=1.0, seed=7, **UPDATE)
    states, ns = [], []
    for k in reversed(range(3)):
        model = make_model()
        phi = personal_head(D, C, 7, k)
        ns.append(run_update(model, sse, model.head, phi, k=k)["n"])
        states.append(model.state_dict())
        assert torch.equal(run.personal[k]["weight"], phi.weight.detach())
    phis = [run.personal[k]["weight"] for k in range(3)]
    assert not torch.equal(phis[0], phis[1]) and not torch.equal(phis[1], phis[2])
    expected = aggregate(states, ns, clients=[2, 1, 0])
    assert all(torch.equal(run.global_state[k], expected[k]) for k in expected)


def test_client_selection_and_generators_are_seeded_by_their_integers_alone():
    picks = [client_selection(3, r, 10, 0.3) for r in range(6)]
    assert all(p == sorted(set(p)) and len(p) == 3 and all(0 <= c < 10 for c in p) for p in picks)
    assert picks == [client_selection(3, r, 10, 0.3) for r in range(6)] and len({tuple(p) for p in picks}) > 1
    assert client_selection(3, 0, 10, 0.01) != [] and client_selection(0, 0, 100, 0.29).__len__() == 29
    one_line_error(client_selection, 0, 0, 10, 0.0, match="fraction")
    draw = [torch.rand(4, generator=client_generator(1, 2, k)) for k in (0, 1, 0)]
    assert torch.equal(draw[0], draw[2]) and not torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], torch.rand(4, generator=client_generator(1, 3, 0)))


def test_run_simulator_is_deterministic_and_leaves_its_inputs(sse):
    init, data = make_model(), client_data()
    init_state = {k: v.clone() for k, v in init.state_dict().items()}
    kw = {"rounds": 2, "fraction": 0.67, "seed": 5, **UPDATE}
    a, b = run_simulator(init, sse, data, **kw), run_simulator(init, sse, data, **kw)
    assert all(torch.equal(a.global_state[k], b.global_state[k]) for k in a.global_state)
    assert all(torch.equal(a.personal[k]["weight"], b.personal[k]["weight"]) for k in range(3))
    assert all(torch.equal(v, init.state_dict()[k]) for k, v in init_state.items())
    assert [log["clients"] for log in a.logs] == [client_selection(5, r, 3, 0.67) for r in range(2)]
    assert sum(a.trained_rounds.values()) == 4
    one_line_error(run_simulator, init, sse, [*data, (data[0][0][:0], data[0][1][:0])], match="no training data",
                   **kw)


# ------------------------------------------------------------------------------------------ GLA-FR


def test_global_realignment_gives_every_row_the_same_norm_and_keeps_directions():
    psi = torch.randn(6, 12) * torch.linspace(0.1, 3.0, 6)[:, None]
    out = gla_fr_global(psi)
    assert torch.allclose(out.norm(dim=1), torch.full((6,), 1.7), atol=1e-5)
    assert torch.allclose(F.cosine_similarity(out, psi, dim=1), torch.ones(6), atol=1e-6)
    state = generic_state({"head.weight": psi})
    assert torch.equal(state["head.weight"], out)
    assert torch.equal(generic_state({"head.weight": psi}, realign=False)["head.weight"], psi)


def test_local_realignment_has_psi_directions_and_phi_norms():
    g = torch.Generator().manual_seed(0)
    psi, phi = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g) * 4
    out = gla_fr_local(psi, phi)
    assert torch.allclose(F.cosine_similarity(out, psi, dim=1), torch.ones(6), atol=1e-6)
    assert torch.allclose(out.norm(dim=1), phi.norm(dim=1), atol=1e-5)
    one_line_error(gla_fr_local, psi, phi[:, :5], match="shapes differ")

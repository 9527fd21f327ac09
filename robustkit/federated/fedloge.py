"""FedLoGe (Xiao et al., ICLR 2024, arXiv 2401.08977) written once, as plain functions every engine calls.

The in-process simulator (:mod:`robustkit.federated.simulate`) and the Flower app
(:mod:`robustkit.federated.flower_app`) differ only in how states travel; the arithmetic is here:

* SSE-C: a simplex ETF from a seeded orthonormal basis, a random fraction beta of its entries zeroed,
  the survivors refined with masked Adam (:func:`sse_c`); frozen, zero bias, never aggregated;
* the client update (:func:`client_update`): the backbone learns through SSE-C, the auxiliary global
  head psi and the personal head phi_k learn on detached features, three SGD optimisers re-created
  every call as in the reference's ``update_weights_balsoft``; ``method="fedavg"`` is the baseline;
* the server step (:func:`aggregate`): sample-weighted FedAvg of the backbone and psi only;
* GLA-FR (:func:`gla_fr_global`, :func:`gla_fr_local`): realignment without training.

State convention: the global state is the ``state_dict()`` of a :class:`~robustkit.models.fedloge.FedLoGeNet`
(no ``head2``, no mask) whose ``head`` is psi; a personal head is a bias-free ``nn.Linear`` whose state is
``{"weight": [C, d]}``. Every head is bias-free (see :mod:`robustkit.models.fedloge`).

Seeding: each draw has its own generator seeded from explicit integers and a trailing stream tag
(numpy's ``SeedSequence`` pads short entropy with zeros, :mod:`robustkit.federated.partition`), so a
client's update depends only on (seed, round, client), never on the engine, the process or the order.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.core.errors import ConfigError
from robustkit.train._loop import RunningStats, crop_flip, epoch_batches

_SELECT_TAG = 3  # which clients a round samples: [seed, round, 3]
_CLIENT_TAG = 4  # a client's batch order and augmentation in a round: [seed, round, client, 4]
_PHI_TAG = 5  # a client's personal-head initialisation: [seed, client, 5]
_SSE_TAG = 6  # the ETF basis and the sparsity mask: [seed, 6]

Method = Literal["fedloge", "fedavg"]
METHODS = ("fedloge", "fedavg")
PERSONAL_PREFIX = "head2."  # keys of a personal head inside a FedLoGeNet state: never aggregated


def _check_int(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _seed(*entropy: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (one SeedSequence: independent streams)."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------- SSE-C


def simplex_etf(d: int, num_classes: int, seed: int) -> torch.Tensor:
    """Simplex ETF rows ``[C, d]``: ``sqrt(C/(C-1)) * (P (I - 11^T/C))^T`` with ``P`` the ``d x C``
    orthonormal factor of the QR of a seeded uniform matrix (reference ``ETF_Classifier``). Every row has
    norm 1 and every pair cosine -1/(C-1); computed in float64, returned as float32."""
    d, c = _check_int("feature dimension d", d, 1), _check_int("class count C", num_classes, 2)
    if d < c:
        raise ConfigError(f"feature dimension d = {d} is smaller than the class count C = {c} (SSE-C needs d >= C)")
    gen = torch.Generator().manual_seed(_seed(_check_int("seed", seed, 0), _SSE_TAG))
    p, _ = torch.linalg.qr(torch.rand(d, c, generator=gen, dtype=torch.float64))  # [d, C], orthonormal columns
    centre = torch.eye(c, dtype=torch.float64) - torch.full((c, c), 1.0 / c, dtype=torch.float64)
    return (math.sqrt(c / (c - 1)) * (p @ centre)).T.contiguous().float()


def sse_objective(weight: torch.Tensor, target_norm: float = 0.1) -> torch.Tensor:
    """The paper's Eq. 4 on class rows ``w_c``: ``sum_c (||w_c|| - 0.1)^2 - mean_c arccos(max_{c'!=c}
    cos(w_c, w_c'))``: norms held at 0.1, each class's smallest angle to another class pushed up. (The
    reference's comment says "norm of each row should be 1"; its code targets 0.1 over classes.)"""
    norms = weight.norm(dim=1)
    unit = weight / norms.clamp_min(1e-12)[:, None]
    cos = unit @ unit.T
    cos = cos.masked_fill(torch.eye(len(weight), dtype=torch.bool, device=weight.device), -2.0)
    # Clamped: arccos has an infinite slope at +-1, which one duplicated row would otherwise hit.
    angle = torch.arccos(cos.max(dim=1).values.clamp(-1 + 1e-7, 1 - 1e-7))
    return ((norms - target_norm) ** 2).sum() - angle.mean()


def sse_c(d: int, num_classes: int, *, beta: float = 0.6, steps: int = 10_000, lr: float = 1e-4,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The Static Sparse ETF classifier ``(weight [C, d], mask [C, d] bool, True = kept)``.

    Exactly ``round(beta * d * C)`` entries are zeroed, chosen uniformly at random (not by magnitude,
    reference ``gen_sparse_ETF``); the survivors are refined by Adam on :func:`sse_objective` with the
    zeroed entries' gradients masked, so they stay exactly zero (Adam moves nothing without a gradient).
    Defaults are the reference's (beta 0.6, 10,000 steps, lr 1e-4). The classifier built from it is
    frozen and has zero bias; the reference's ``nn.Linear`` keeps a random, never-trained bias.
    ``mask`` is the record of the sparsity: the objective can also drive a kept entry towards zero
    (below float32's range after thousands of steps), so count zeros through the mask, not the weight.
    """
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 1:
        raise ConfigError(f"beta = {beta!r}: the SSE-C sparsity fraction must be in [0, 1)")
    steps = _check_int("steps", steps, 0)
    if not lr > 0:
        raise ConfigError(f"lr = {lr!r}: the SSE-C refinement learning rate must be > 0")
    etf = simplex_etf(d, num_classes, seed).double()
    gen = torch.Generator().manual_seed(_seed(seed, 1, _SSE_TAG))  # another stream than the basis
    mask = torch.ones(etf.numel(), dtype=torch.bool)
    mask[torch.randperm(etf.numel(), generator=gen)[: round(beta * etf.numel())]] = False
    mask = mask.view_as(etf)
    weight = nn.Parameter(etf * mask)
    opt = torch.optim.Adam([weight], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        sse_objective(weight).backward()
        weight.grad.mul_(mask)
        opt.step()
    return weight.detach().float(), mask


# -------------------------------------------------------------------------------------- client side


def client_generator(seed: int, round: int, client: int) -> torch.Generator:
    """The CPU generator of one client's update in one round (batch order, crops, flips), seeded from
    (seed, round, client) alone: the update is the same in any engine, process or client order."""
    return torch.Generator().manual_seed(_seed(_check_int("seed", seed, 0), _check_int("round", round, 0),
                                               _check_int("client", client, 0), _CLIENT_TAG))


def personal_head(d: int, num_classes: int, seed: int, client: int) -> nn.Linear:
    """Client k's personal head phi_k before training: bias-free, ``nn.Linear``'s default range
    U(-1/sqrt(d), 1/sqrt(d)), drawn from (seed, client) so any engine builds the same one."""
    head = nn.Linear(_check_int("feature dimension d", d, 1), _check_int("class count C", num_classes, 1),
                     bias=False)
    gen = torch.Generator().manual_seed(_seed(_check_int("seed", seed, 0), _check_int("client", client, 0),
                                              _PHI_TAG))
    bound = 1.0 / math.sqrt(d)
    with torch.no_grad():
        head.weight.copy_(torch.rand(num_classes, d, generator=gen) * (2 * bound) - bound)
    return head


def _check_update(method: str, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown federated method {method!r}; known: {', '.join(METHODS)}")
    if len(y) == 0 or len(x) != len(y):
        raise ConfigError(f"a client needs data: got {len(x)} images and {len(y)} labels")
    _check_int("epochs", epochs, 1)
    _check_int("batch_size", batch_size, 1)


def client_update(backbone: nn.Module, sse_weight: torch.Tensor | None, psi: nn.Linear, phi: nn.Linear,
                  x: torch.Tensor, y: torch.Tensor, *, method: Method = "fedloge", epochs: int = 5,
                  batch_size: int = 8, lr: float = 0.03, momentum: float = 0.5, pad: int = 4,
                  gen: torch.Generator) -> dict[str, float]:
    """One client's local training, in place on ``backbone`` (a FedLoGeNet), ``psi`` and ``phi``.

    ``fedloge``: per batch, the backbone steps on CE(SSE-C(f(x)), y), then psi on CE(psi(f.detach()), y)
    and phi on CE(phi(f.detach()), y), each with its own SGD (no weight decay, momentum reset every call:
    reference ``update_weights_balsoft``). ``fedavg``: backbone and psi jointly on CE(psi(f(x)), y);
    phi untouched, ``sse_weight`` unused (may be None). ``psi`` may be ``backbone.head`` (the global-state convention) or a separate module:
    backbone parameters are all of ``backbone``'s others. ``sse_weight`` is read, never written.
    ``x``/``y`` live on ``gen``'s device (the CPU): batches are drawn and augmented (crop, pad ``pad``,
    and flip) there, then moved to the model's device, so the random stream is the same on any device.
    Defaults are the reference's (5 epochs, batch 8, lr 0.03, momentum 0.5). Returns the mean losses,
    the training accuracy of the head the backbone learns through, and ``n``.
    """
    _check_update(method, x, y, epochs, batch_size)
    device = next(backbone.parameters()).device
    head_ids = {id(p) for p in (*psi.parameters(), *phi.parameters())}
    body = [p for p in backbone.parameters() if id(p) not in head_ids]
    if method == "fedloge" and sse_weight is None:
        raise ConfigError("method 'fedloge' needs the SSE-C weight (sse_c)")
    sse = sse_weight.detach().to(device) if method == "fedloge" else None
    if method == "fedloge":
        opts = [torch.optim.SGD(ps, lr=lr, momentum=momentum) for ps in (body, psi.parameters(), phi.parameters())]
    else:
        opts = [torch.optim.SGD([*body, *psi.parameters()], lr=lr, momentum=momentum)]
    main, aux, per = RunningStats(), RunningStats(), RunningStats()
    backbone.train()
    for _ in range(epochs):
        for idx in epoch_batches(len(y), batch_size, gen):
            idx = idx.to(x.device)
            xb, yb = crop_flip(x[idx], pad, gen).to(device), y[idx].to(device)
            f = backbone.embed(xb)
            logits = F.linear(f, sse) if method == "fedloge" else psi(f)
            _step(opts[0], F.cross_entropy(logits, yb), main, logits, yb)
            if method == "fedloge":
                for opt, head, stats in ((opts[1], psi, aux), (opts[2], phi, per)):
                    out = head(f.detach())
                    _step(opt, F.cross_entropy(out, yb), stats, out, yb)
    stats = {"n": len(y), "loss": main.loss, "acc": main.acc}
    if method == "fedloge":
        stats.update(loss_psi=aux.loss, acc_psi=aux.acc, loss_phi=per.loss, acc_phi=per.acc)
    return stats


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, stats: RunningStats, logits: torch.Tensor,
          y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    stats.add(loss.detach(), logits.detach(), y)


# -------------------------------------------------------------------------------------- server side


def client_selection(seed: int, round: int, num_clients: int, fraction: float) -> list[int]:
    """The sorted clients a round trains: ``max(1, floor(fraction * K))`` of K without replacement (the
    reference's ``max(int(frac * num_users), 1)``), from a generator of (seed, round) alone."""
    k = _check_int("num_clients", num_clients, 1)
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ConfigError(f"fraction = {fraction!r}: the share of clients per round must be in (0, 1]")
    m = max(1, math.floor(fraction * k + 1e-9))  # 1e-9: 0.29 * 100 is 28.999999999999996 in floats
    rng = np.random.default_rng([_check_int("seed", seed, 0), _check_int("round", round, 0), _SELECT_TAG])
    return sorted(int(c) for c in rng.choice(k, size=m, replace=False))


def aggregate(states: list[dict[str, torch.Tensor]], weights: list[int], *,
              clients: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Sample-weighted FedAvg of client global states (backbone + psi; reference ``FedAvg_noniid``).

    Float tensors: ``sum_k n_k s_k / sum_k n_k``, accumulated in float64 in ascending ``clients`` order
    when given (so the bits do not depend on the order results arrive in, as they do in Flower), cast
    back. Integer buffers (BatchNorm's ``num_batches_tracked``): the maximum, which is order-free and
    stays an integer; it only matters for BatchNorm with ``momentum=None``, which SmallCNN does not use.
    A personal head (``head2.*``) is refused: personal heads never leave their client.
    """
    if not states or len(states) != len(weights) or (clients is not None and len(clients) != len(states)):
        raise ConfigError(f"aggregate needs one weight per state: {len(states)} states, {len(weights)} weights")
    if any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 for w in weights):
        raise ConfigError(f"aggregate weights are client sample counts (integers >= 1), got {weights}")
    keys = list(states[0])
    if any(list(s) != keys for s in states) or any(k.startswith(PERSONAL_PREFIX) for k in keys):
        raise ConfigError("aggregate takes global states (backbone + psi) with identical keys, no personal head")
    order = sorted(range(len(states)), key=lambda i: clients[i]) if clients is not None else range(len(states))
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][key]
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for i in order:
                acc += states[i][key].to(torch.float64) * weights[i]
            out[key] = (acc / total).to(first.dtype)
        else:
            out[key] = torch.stack([s[key] for s in states]).amax(dim=0)
    return out


# ------------------------------------------------------------------------------------------- GLA-FR


def gla_fr_global(psi_weight: torch.Tensor, norm: float = 1.7) -> torch.Tensor:
    """Global realignment: every row of psi rescaled to the same ``norm`` (the reference's 1.7), which
    removes the head-class norm bias that imbalanced training leaves in a classifier."""
    if not norm > 0:
        raise ConfigError(f"GLA-FR norm = {norm!r}: must be > 0")
    return psi_weight * (norm / psi_weight.norm(dim=1, keepdim=True).clamp_min(1e-12))


def gla_fr_local(psi_weight: torch.Tensor, phi_weight: torch.Tensor) -> torch.Tensor:
    """Local realignment for client k: psi's row directions with phi_k's row norms (the paper's psi~_k).
    The reference multiplies psi's raw rows by phi_k's norms (``update_weights_norm_init``), so its
    norms are ``||psi_c|| * ||phi_kc||``; normalising first gives exactly the paper's definition."""
    if psi_weight.shape != phi_weight.shape:
        raise ConfigError(f"psi and phi shapes differ: {tuple(psi_weight.shape)} vs {tuple(phi_weight.shape)}")
    unit = psi_weight / psi_weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit * phi_weight.norm(dim=1, keepdim=True)


def generic_state(global_state: dict[str, torch.Tensor], *, realign: bool = True,
                  norm: float = 1.7) -> dict[str, torch.Tensor]:
    """The generic model's FedLoGeNet state: backbone + psi, GLA-FR-realigned unless ``realign=False``
    (the "FedLoGe without GLA-FR" ablation, and FedAvg's generic model)."""
    state = dict(global_state)
    if realign:
        state["head.weight"] = gla_fr_global(state["head.weight"], norm)
    return state


def personal_state(global_state: dict[str, torch.Tensor], phi_weight: torch.Tensor, *,
                   realign: bool = True) -> dict[str, torch.Tensor]:
    """Client k's personalised FedLoGeNet state (``extra_head=True``): ``head`` = psi~_k (psi itself
    unless ``realign``), ``head2`` = phi_k; the model's logits are their sum."""
    state = dict(global_state)
    psi = state["head.weight"]
    state["head.weight"] = gla_fr_local(psi, phi_weight) if realign else psi
    state["head2.weight"] = phi_weight
    return state

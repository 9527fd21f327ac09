"""The in-process federated engine: every client of every round trained in turn, in this process.

It is the reference implementation the Flower engine (:mod:`robustkit.federated.flower_app`) is tested
against: both call the same functions of :mod:`robustkit.federated.fedloge`, and every random draw is
seeded from (seed, round, client), so the same configuration gives the same global weights in either.
Deterministic: two runs with the same arguments give bitwise-identical states on the same device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustkit.core.errors import ConfigError
from robustkit.federated.fedloge import (
    METHODS,
    Method,
    aggregate,
    client_generator,
    client_selection,
    client_update,
    personal_head,
)


@dataclass
class FederatedRun:
    """A finished run: the global state (a FedLoGeNet ``state_dict`` whose ``head`` is psi), every
    client's personal head state ``{"weight": [C, d]}`` (untrained for a client never selected), how
    many rounds each client trained, and one log entry per round. Tensors are on the CPU."""

    global_state: dict[str, torch.Tensor]
    personal: dict[int, dict[str, torch.Tensor]]
    trained_rounds: dict[int, int]
    logs: list[dict[str, Any]] = field(default_factory=list)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _check_run(init_model: nn.Module, client_data: list[tuple[torch.Tensor, torch.Tensor]], rounds: int,
               method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown federated method {method!r}; known: {', '.join(METHODS)}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not client_data:
        raise ConfigError("a federated run needs at least one client")
    empty = [k for k, (_, y) in enumerate(client_data) if len(y) == 0]
    if empty:
        raise ConfigError(f"client {empty[0]} has no training data")
    if getattr(init_model, "head2", None) is not None or getattr(init_model, "keep", None) is not None:
        raise ConfigError("the model a federated run trains has one head (psi) and no class mask")


def _round_log(r: int, selected: list[int], stats: list[dict[str, float]]) -> dict[str, Any]:
    """The round's per-client statistics and their sample-weighted means."""
    n = sum(s["n"] for s in stats)
    keys = [k for k in stats[0] if k != "n"]
    means = {k: sum(s[k] * s["n"] for s in stats) / n for k in keys}
    return {"round": r, "clients": selected, "n": n, **means,
            "per_client": [{"client": c, **s} for c, s in zip(selected, stats, strict=True)]}


def run_simulator(init_model: nn.Module, sse_weight: torch.Tensor | None,
                  client_data: list[tuple[torch.Tensor, torch.Tensor]], *, rounds: int, fraction: float,
                  method: Method = "fedloge", epochs: int = 5, batch_size: int = 8, lr: float = 0.03,
                  momentum: float = 0.5, seed: int = 0, device: torch.device | str = "cpu",
                  progress: Callable[[str], None] | None = None) -> FederatedRun:
    """Train ``init_model`` (a FedLoGeNet whose ``head`` is psi; not modified) federated over
    ``client_data`` (per client, CPU images in [0, 1] and labels).

    Each round: :func:`client_selection` picks clients; each starts from the global state and its own
    phi (built once from (seed, client) by :func:`personal_head`, then kept by the client), runs
    :func:`client_update` with :func:`client_generator` (seed, round, client); the server averages the
    returned global states weighted by client sample counts (:func:`aggregate`). The phis never leave
    their client.
    """
    _check_run(init_model, client_data, rounds, method)
    device = torch.device(device)
    work = copy.deepcopy(init_model).to(device)
    d, num_classes = work.head.in_features, work.head.out_features
    global_state = {k: v.detach().clone() for k, v in work.state_dict().items()}
    personal = {k: _cpu_state(personal_head(d, num_classes, seed, k)) for k in range(len(client_data))}
    trained = dict.fromkeys(range(len(client_data)), 0)
    run = FederatedRun(global_state, personal, trained)
    for r in range(rounds):
        selected = client_selection(seed, r, len(client_data), fraction)
        states, stats = [], []
        for k in selected:
            work.load_state_dict(global_state)
            phi = personal_head(d, num_classes, seed, k).to(device)
            phi.load_state_dict(personal[k])
            x, y = client_data[k]
            stats.append(client_update(work, sse_weight, work.head, phi, x, y, method=method, epochs=epochs,
                                       batch_size=batch_size, lr=lr, momentum=momentum,
                                       gen=client_generator(seed, r, k)))
            states.append({key: v.detach().clone() for key, v in work.state_dict().items()})
            personal[k] = _cpu_state(phi)
            trained[k] += 1
        global_state = aggregate(states, [s["n"] for s in stats], clients=selected)
        run.logs.append(_round_log(r, selected, stats))
        if progress is not None:
            log = run.logs[-1]
            progress(f"round {r + 1}/{rounds}: clients {selected}, loss {log['loss']:.4f}, acc {log['acc']:.3f}")
    run.global_state = {k: v.detach().to("cpu", copy=True) for k, v in global_state.items()}
    return run

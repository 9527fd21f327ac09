"""Trainer ``fedloge``: FedLoGe (Xiao et al., ICLR 2024), federated learning on globally long-tailed data.

Clients hold Dirichlet(alpha) slices of a long-tailed training view. The shared backbone learns through
a frozen Static Sparse ETF classifier (SSE-C); an auxiliary global head psi and a personal head phi_k per
client learn on detached features; the server averages backbone and psi, weighted by client sizes; the
personal heads never leave their client. After training, GLA-FR realigns without training: psi's rows
to equal norm for the generic model, psi's directions with phi_k's norms (plus phi_k) for client k's
personalised model. The algorithm is :mod:`robustkit.federated.fedloge`; this file runs it on one of
two engines and turns the result into robustkit checkpoints::

    robustkit train fedloge --recipe defenses/fedloge.toml --data-dir ../shared/data/partial --out runs/fedloge
    robustkit eval --model runs/fedloge.safetensors --attack autoattack --n-examples 200   # the generic model
    robustkit eval --model runs/fedloge.safetensors --client 3 --attack none               # client 3's own

Outputs: ``<out>`` the generic model (FedLoGe: backbone + realigned psi; FedAvg: backbone + psi);
``<out>.no_glafr`` (FedLoGe only) the generic model without GLA-FR, the ablation; ``<out>.client<k>``
client k's personalised model (FedLoGe: realigned psi~_k + phi_k; FedAvg: psi fine-tuned on the
client's data, the usual personalised baseline), recording its local test set. ``engine = "flower"``
runs the same algorithm as a Flower simulation (``pip install "robustkit[federated]"``).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from robustkit.core.checkpoint import Checkpoint, save_checkpoint
from robustkit.core.errors import ConfigError
from robustkit.core.provenance import training_run
from robustkit.federated.checkpoints import client_path
from robustkit.models.fedloge import FedLoGeNet
from robustkit.train._adversarial import say
from robustkit.train._loop import epoch_batches
from robustkit.train._lt import LTData, load_longtail
from robustkit.train.base import RunOptions, register_trainer


@dataclass(frozen=True)
class FedLoGeConfig:
    """Federated long-tailed data, the federation, SSE-C and GLA-FR, the local optimiser, the engine."""

    # Data: a global long-tailed view of the training split, split over clients by Dirichlet(alpha) per class;
    # each client's local test set mirrors its training label distribution (drawn from the test split).
    dataset: str = "cifar10"
    longtail: str | None = "exp:100"  # PROFILE:RATIO of the global view (robustkit.longtail)
    longtail_n_max: int | None = None
    data_seed: int = 0  # the view, the client split and the local test sets
    n_train: int | None = None
    n_test: int | None = None
    clients: int = 10  # K
    alpha: float = 0.5  # Dirichlet concentration: smaller = more skewed clients

    # Federation: rounds, the fraction of clients sampled per round, local SGD (the reference: lr 0.03,
    # momentum 0.5, batch 8, 5 epochs; optimisers re-created every round).
    method: Literal["fedloge", "fedavg"] = "fedloge"
    rounds: int = 30
    fraction: float = 0.5
    local_epochs: int = 2
    local_batch_size: int = 16
    lr: float = 0.03
    momentum: float = 0.5
    width: int = 16  # SmallCNN backbone: 4 * width features (must be >= the class count for the ETF)

    # SSE-C: a fraction beta of the ETF's entries zeroed, survivors refined (masked Adam); frozen, zero bias.
    beta: float = 0.6
    sse_steps: int = 10_000
    sse_lr: float = 1e-4
    realign_norm: float = 1.7  # GLA-FR global: every row of psi rescaled to this norm

    # FedAvg's personalised baseline: psi fine-tuned on each client's data (frozen backbone).
    finetune_epochs: int = 5
    finetune_lr: float = 0.01

    engine: Literal["simulator", "flower"] = "simulator"
    seed: int = 0  # model init, SSE-C, client sampling, local batches and augmentation

    def __post_init__(self) -> None:
        for name, low in (("clients", 1), ("rounds", 1), ("local_epochs", 1), ("local_batch_size", 1),
                          ("width", 1), ("sse_steps", 0), ("finetune_epochs", 0), ("n_train", 1), ("n_test", 1),
                          ("longtail_n_max", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} = {value}: must be >= {low}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha = {self.alpha}: the Dirichlet concentration must be > 0")
        if not 0 <= self.beta < 1:
            raise ConfigError(f"beta = {self.beta}: the SSE-C sparsity fraction must be in [0, 1)")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction = {self.fraction}: the fraction of clients per round must be in (0, 1]")
        if self.longtail is not None:
            from robustkit.longtail import LongTail

            LongTail.parse(self.longtail)


SMOKE: dict[str, Any] = {"longtail": "exp:2", "n_train": 200, "n_test": 64, "clients": 3, "rounds": 2,
                         "local_epochs": 1, "local_batch_size": 16, "width": 4, "sse_steps": 20, "finetune_epochs": 1}


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _predict(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + 500].to(device)).argmax(1).cpu() for i in range(0, len(x), 500)])


def _model(args: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device, **extra: Any) -> FedLoGeNet:
    model = FedLoGeNet(**args, **extra)
    model.load_state_dict(state)
    return model.to(device).eval()


def generic_metrics(model: torch.nn.Module, data: LTData, device: torch.device) -> dict[str, Any]:
    """Balanced-test accuracy, per class and many/medium/few (by the global view's class counts)."""
    from robustkit.eval.per_class import per_class_report

    ok = _predict(model, data.x_test, device) == data.y_test
    report = per_class_report(data.y_test, ok, None, data.info.num_classes, class_names=data.info.classes,
                              train_counts=data.record["class_counts"])
    groups = report.get("groups") or {}
    return {"clean_acc": float(ok.float().mean()), "balanced_clean_acc": report["balanced_clean_acc"],
            "groups": {g: v["clean_acc"] for g, v in groups.items()},
            "clean_flags": "".join("1" if v else "0" for v in ok.tolist())}


def local_accuracy(model_of: Any, split: Any, data: LTData, device: torch.device) -> dict[str, Any]:
    """Mean over clients of each personalised model's accuracy on its own local test set, without and
    with the reference's label-prior masking (classes the client never trained on get -1e9 logits:
    knowledge of the client's label distribution at test time, so both are reported)."""
    out: dict[str, list[float | None]] = {"unmasked": [], "masked": []}
    for k, positions in enumerate(split.local_test):
        if len(positions) == 0:
            out["unmasked"].append(None)
            out["masked"].append(None)
            continue
        keep = torch.as_tensor(positions, dtype=torch.long)
        x, y = data.x_test[keep], data.y_test[keep]
        classes = [c for c, n in enumerate(split.client_counts[k]) if n > 0]
        for kind, mask in (("unmasked", None), ("masked", classes)):
            out[kind].append(float((_predict(model_of(k, mask), x, device) == y).float().mean()))
    means = {f"local_acc_{kind}": sum(v for v in vals if v is not None) / max(1, sum(v is not None for v in vals))
             for kind, vals in out.items()}
    return means | {"local_acc_per_client": out}


def finetune_head(global_state: dict[str, torch.Tensor], args: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
                  config: FedLoGeConfig, client: int, device: torch.device) -> dict[str, torch.Tensor]:
    """FedAvg's personalised baseline: psi fine-tuned on one client's data with the backbone frozen."""
    from robustkit.federated.fedloge import client_generator

    model = _model(args, global_state, device)
    with torch.no_grad():
        feats = torch.cat([model.embed(x[i : i + 500].to(device)) for i in range(0, len(x), 500)])
    head = copy.deepcopy(model.head).train()
    opt = torch.optim.SGD(head.parameters(), lr=config.finetune_lr, momentum=config.momentum)
    gen = client_generator(config.seed, config.rounds, client)  # the round after the last: a fresh stream
    for _ in range(config.finetune_epochs):
        for idx in epoch_batches(len(y), config.local_batch_size, gen):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(feats[idx.to(device)]), y[idx].to(device)).backward()
            opt.step()
    return {**global_state, "head.weight": head.weight.detach().cpu()}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _engine(config: FedLoGeConfig) -> Any:
    if config.engine == "simulator":
        from robustkit.federated.simulate import run_simulator

        return run_simulator
    if config.engine == "flower":
        try:
            from robustkit.federated.flower_app import run_flower_simulation
        except ImportError as e:
            raise ConfigError(f"engine = \"flower\" needs Flower: pip install \"robustkit[federated]\" ({e})") from None
        return run_flower_simulation
    raise ConfigError(f"unknown engine {config.engine!r}; choose simulator or flower")


@register_trainer("fedloge", FedLoGeConfig, smoke=SMOKE,
                  description="FedLoGe (Xiao et al. 2024): federated long-tailed learning, SSE-C + GLA-FR; or FedAvg")
def train(config: FedLoGeConfig, run: RunOptions) -> Checkpoint:
    from robustkit.federated.fedloge import generic_state, personal_state, sse_c
    from robustkit.federated.partition import federated_split

    data = load_longtail(config, run)
    info, dev = data.info, run.device
    if 4 * config.width < info.num_classes:
        raise ConfigError(f"width = {config.width}: the feature dimension 4 * width = {4 * config.width} is smaller "
                          f"than the class count {info.num_classes} (SSE-C is a simplex ETF in feature space)")
    split = federated_split(data.y_train.numpy(), data.y_test.numpy(), info.num_classes, clients=config.clients,
                            alpha=config.alpha, seed=config.data_seed)
    client_data = [(data.x_train[torch.as_tensor(p, dtype=torch.long)], data.y_train[torch.as_tensor(p, dtype=torch.long)])
                   for p in split.clients]
    args = {"in_channels": int(info.shape[0]), "num_classes": int(info.num_classes), "width": config.width,
            "mean": [float(m) for m in info.mean], "std": [float(s) for s in info.std]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        init = FedLoGeNet(**args)
    say(run, f"robustkit train fedloge: {config.method} on {config.engine}; {len(data.y_train)} train images "
             f"({config.longtail}) over {config.clients} clients (alpha {config.alpha}; sizes "
             f"{min(len(p) for p in split.clients)}-{max(len(p) for p in split.clients)}), {config.rounds} rounds x "
             f"{config.fraction:g} of the clients; {torch.get_num_threads()} threads")
    t0, c0 = time.perf_counter(), time.process_time()
    sse = None
    if config.method == "fedloge":
        sse, _ = sse_c(4 * config.width, info.num_classes, beta=config.beta, steps=config.sse_steps,
                       lr=config.sse_lr, seed=config.seed)
    result = _engine(config)(init, sse, client_data, rounds=config.rounds, fraction=config.fraction,
                             method=config.method, epochs=config.local_epochs, batch_size=config.local_batch_size,
                             lr=config.lr, momentum=config.momentum, seed=config.seed, device=dev,
                             progress=(lambda m: print(m, file=sys.stderr, flush=True)) if run.log else None)
    fedloge = config.method == "fedloge"
    if fedloge:
        personal = {k: personal_state(result.global_state, result.personal[k]["weight"]) for k in range(config.clients)}
    else:
        personal = {k: finetune_head(result.global_state, args, *client_data[k], config, k, dev)
                    for k in range(config.clients)}
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    generic = generic_state(result.global_state, realign=fedloge, norm=config.realign_norm)
    extra = {"extra_head": True} if fedloge else {}

    def model_of(k: int, mask: list[int] | None) -> FedLoGeNet:
        return _model(args, personal[k], dev, class_mask=mask, **extra)

    metrics: dict[str, Any] = {"split": "test", "n": len(data.y_test),
                               **generic_metrics(_model(args, generic, dev), data, dev),
                               **local_accuracy(model_of, split, data, dev)}
    if fedloge:  # the ablation: the same training, no realignment
        raw = {k: personal_state(result.global_state, result.personal[k]["weight"], realign=False)
               for k in range(config.clients)}
        metrics["no_glafr"] = {**generic_metrics(_model(args, result.global_state, dev), data, dev),
                               **local_accuracy(lambda k, m: _model(args, raw[k], dev, class_mask=m, **extra), split,
                                                data, dev)}
        sse_model = _model(args, {**result.global_state, "head.weight": sse}, dev)
        metrics["sse_c"] = generic_metrics(sse_model, data, dev)  # the "universal" model of step 1
    say(run, f"generic: balanced test acc {metrics['balanced_clean_acc']:.4f}; personalised: local acc "
             f"{metrics['local_acc_unmasked']:.4f} (masked {metrics['local_acc_masked']:.4f}); {wall:.0f}s")
    federated = {"clients": config.clients, "alpha": config.alpha, "split": split.record, "engine": config.engine,
                 "trained_rounds": result.trained_rounds, "rounds_log": result.logs}
    training = {"method": config.method, "data": data.record, "federated": federated, "seed": config.seed,
                **training_run(dev, wall, cpu)}
    common = {"architecture": "fedloge", "normalization": {"mean": args["mean"], "std": args["std"]},
              "dataset": config.dataset, "num_classes": int(info.num_classes), "trainer": "fedloge", "config": config}
    stem = run.stem
    for k in range(config.clients):
        local = {**training, "federated": {"generic": stem.name, "client": k}, "client": k,
                 "local_test_positions": [int(i) for i in split.local_test[k]],
                 "local_train_counts": split.client_counts[k]}
        save_checkpoint(_model(args, personal[k], dev, **extra), client_path(stem, k),
                        arch_args={**args, **extra}, training=local,
                        metrics={"local_acc": metrics["local_acc_per_client"]["unmasked"][k]}, **common)
    if fedloge:
        save_checkpoint(_model(args, result.global_state, dev), stem.parent / f"{stem.name}.no_glafr", arch_args=args,
                        training={**training, "federated": {**federated, "clients": None, "ablation": "no GLA-FR"}},
                        metrics=metrics["no_glafr"], **common)
    return save_checkpoint(_model(args, generic, dev), run.out, arch_args=args, training=training, metrics=metrics,
                           **common)

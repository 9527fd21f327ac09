"""FedLoGe on Flower (``flwr`` >= 1.42, Message API): a ClientApp, a Strategy and a ServerApp main.

The arithmetic is :mod:`robustkit.federated.fedloge`, the same functions the in-process simulator
(:mod:`robustkit.federated.simulate`) calls, so both engines give the same weights for the same inputs:
the server samples ``client_selection(seed, round, K, fraction)`` (rounds count from 0, as in the
simulator), a client trains with ``client_generator(seed, round, partition)``, the server averages with
``aggregate(..., clients=...)`` in ascending client order whatever order the replies arrive in.

Who holds what:

* the server: the global state (a FedLoGeNet ``state_dict`` whose ``head`` is psi) and the SSE-C weight,
  sent with every train message (it is frozen and tiny; clients never recompute the 10,000 Adam steps);
* client k (``node_config["partition-id"]``): its data, loaded from its own file (``data-path`` in the
  node config, else ``<data-dir>/client<k>.safetensors``; :func:`save_client_data` writes them), and
  its personal head phi_k in ``context.state``, which persists across rounds and is never in a train
  reply. After the last round a separate ``query.personal`` round asks every client for phi_k, because
  the personalised models are built on the server; aggregation never sees it.

Two ways to run it: :func:`run_flower_simulation` (Ray-backed virtual SuperNodes in this process, the
simulator's signature, returns a :class:`~robustkit.federated.simulate.FederatedRun`), and a real
deployment, ``flwr run`` of the app :func:`write_app` writes, whose module-level ``server_app`` /
``client_app`` read the run config (:data:`RUN_CONFIG_DEFAULTS`) and write the run to ``out-dir``
(:func:`load_run` reads it back).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit.core.errors import ConfigError, RobustkitError
from robustkit.federated.fedloge import (
    aggregate,
    client_generator,
    client_selection,
    client_update,
    personal_head,
    sse_c,
)
from robustkit.federated.simulate import FederatedRun, _check_run, _round_log


class FlowerMissingError(ConfigError, ImportError):
    """The ``federated`` extra is not installed (a ConfigError for the CLI, an ImportError for code)."""


try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise FlowerMissingError('the Flower engine needs flwr: pip install "robustkit[federated]"') from e

DATA_FILE = "client{k}.safetensors"  # a client's data under data-dir
RUN_FILE = "fedloge_run"  # <out-dir>/fedloge_run.safetensors + .json: what a deployment writes

# The run config of a deployment (``flwr run``); the Python path takes the same values as arguments.
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "num-clients": 4,  # K: SuperNodes with partition-id 0..K-1 must connect
    "rounds": 2,
    "fraction": 0.5,
    "method": "fedloge",  # or "fedavg"
    "epochs": 1,
    "batch-size": 8,
    "lr": 0.03,
    "momentum": 0.5,
    "seed": 0,  # client selection, batch order, phi init, SSE-C, the initial weights
    "device": "cpu",  # a SuperNode's node config "device" overrides it
    "dataset": "cifar10",  # FedLoGeNet's input channels, classes and normalisation
    "width": 16,  # SmallCNN width (features d = 4 * width)
    "sse-beta": 0.6,
    "sse-steps": 10_000,
    "sse-lr": 1e-4,
    "data-dir": "",  # clients without node config data-path read <data-dir>/client<k>.safetensors
    "out-dir": "fedloge-flower",  # the server writes fedloge_run.safetensors/.json here
    "node-timeout": 600.0,  # seconds to wait for all K SuperNodes
    "round-timeout": 3600.0,  # seconds to wait for a round's replies
}


# ----------------------------------------------------------------------------------- settings, data


@dataclass(frozen=True)
class TrainSettings:
    """What every client of a run is told in each train message (the server is the single source)."""

    method: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    seed: int
    device: str

    def record(self, round_: int) -> ConfigRecord:
        return ConfigRecord({"round": round_, "method": self.method, "epochs": self.epochs,
                             "batch-size": self.batch_size, "lr": self.lr, "momentum": self.momentum,
                             "seed": self.seed, "device": self.device})


def _int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def save_client_data(client_data: list[tuple[torch.Tensor, torch.Tensor]], out_dir: str | Path) -> list[Path]:
    """Write client k's ``(x, y)`` to ``<out_dir>/client<k>.safetensors`` (x as given: the simulator's
    float images stay bit-identical). On a real deployment each SuperNode's machine holds only its own."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (x, y) in enumerate(client_data):
        path = out / DATA_FILE.format(k=k)
        save_file({"x": x.detach().cpu().contiguous(), "y": y.detach().cpu().to(torch.int64).contiguous()}, path)
        paths.append(path)
    return paths


_DATA_CACHE: OrderedDict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_DATA_CACHE_BYTES = 1 << 30  # per process; a Ray actor serves many clients, a SuperNode one


def load_client_data(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's ``(x, y)`` from its file, cached per process by (path, mtime, size): a simulation
    actor runs many rounds of the same clients and should not re-read them every round."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"client data file {p} is missing")
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key in _DATA_CACHE:
        _DATA_CACHE.move_to_end(key)
        return _DATA_CACHE[key]
    try:
        tensors = load_file(p)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"client data file {p} is unreadable: {e}") from None
    if set(tensors) != {"x", "y"} or len(tensors["x"]) != len(tensors["y"]) or tensors["y"].ndim != 1:
        raise ConfigError(f"client data file {p} must hold tensors x [N, ...] and y [N], got {sorted(tensors)}")
    data = (tensors["x"], tensors["y"].to(torch.int64))
    _DATA_CACHE[key] = data
    while len(_DATA_CACHE) > 1 and sum(x.nbytes + y.nbytes for x, y in _DATA_CACHE.values()) > _DATA_CACHE_BYTES:
        _DATA_CACHE.popitem(last=False)
    return data


def _state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def _record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


# -------------------------------------------------------------------------------------- client side


ModelFactory = Callable[[Context], nn.Module]


def model_from_run_config(context: Context) -> nn.Module:
    """A deployment's FedLoGeNet, built from the run config's ``dataset`` and ``width`` (weights come
    from the server's first train message)."""
    from robustkit.data import dataset_info
    from robustkit.models.fedloge import FedLoGeNet

    cfg = {**RUN_CONFIG_DEFAULTS, **dict(context.run_config)}
    info = dataset_info(str(cfg["dataset"]))
    return FedLoGeNet(info.shape[0], info.num_classes, int(cfg["width"]), info.mean, info.std)


def _partition_id(context: Context) -> int:
    pid = context.node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise ConfigError(f"this SuperNode has no valid partition-id in its node config (got {pid!r}); start it "
                          "with --node-config 'partition-id=K data-path=\"FILE\"'")
    return pid


def _data_path(context: Context, pid: int, data_dir: str | None) -> Path:
    node_path = context.node_config.get("data-path")
    if node_path:
        return Path(str(node_path))
    root = data_dir or context.run_config.get("data-dir")
    if not root:
        raise ConfigError(f"client {pid} has no data: set node config data-path or run config data-dir")
    return Path(str(root)) / DATA_FILE.format(k=pid)


def _phi(context: Context, model: nn.Module, seed: int, pid: int) -> nn.Linear:
    """Client k's phi: the one in ``context.state`` (trained in an earlier round), else the untrained
    :func:`personal_head` of (seed, k), exactly as the simulator builds it."""
    phi = personal_head(model.head.in_features, model.head.out_features, seed, pid)
    if "phi" in context.state:
        phi.load_state_dict(_state(context.state["phi"]))
    return phi


def _trained_rounds(context: Context) -> int:
    return int(context.state["fedloge"]["trained-rounds"]) if "fedloge" in context.state else 0


def _user_error(message: Message, pid: int | None, error: RobustkitError) -> Message:
    """A robustkit error as a reply the server re-raises as one line (not a Flower error traceback)."""
    who = "a client" if pid is None else f"client {pid}"
    return Message(RecordDict({"error": ConfigRecord({"message": f"{who}: {error}"})}), reply_to=message)


def _train(message: Message, context: Context, factory: ModelFactory, data_dir: str | None) -> Message:
    """One round of client k: global arrays in, ``client_update``, global arrays + metrics out; phi_k
    and the count of rounds trained stay in ``context.state``."""
    cfg = message.content["config"]
    pid = _partition_id(context)
    seed, round_ = int(cfg["seed"]), int(cfg["round"])
    device = torch.device(str(context.node_config.get("device") or cfg["device"]))
    model = factory(context)
    model.load_state_dict(_state(message.content["arrays"]), strict=True)
    model.to(device)
    phi = _phi(context, model, seed, pid).to(device)
    x, y = load_client_data(_data_path(context, pid, data_dir))
    sse = _state(message.content["sse"])["weight"] if "sse" in message.content else None
    stats = client_update(model, sse, model.head, phi, x, y, method=str(cfg["method"]), epochs=int(cfg["epochs"]),
                          batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                          gen=client_generator(seed, round_, pid))
    context.state["phi"] = _record(phi.state_dict())
    context.state["fedloge"] = ConfigRecord({"trained-rounds": _trained_rounds(context) + 1})
    metrics = MetricRecord({**stats, "num-examples": int(stats["n"]), "partition-id": pid})
    return Message(RecordDict({"arrays": _record(model.state_dict()), "metrics": metrics}), reply_to=message)


def _info(message: Message, context: Context, data_dir: str | None) -> Message:
    """Which partition this SuperNode holds and how many examples (loading them fails fast)."""
    pid = _partition_id(context)
    _, y = load_client_data(_data_path(context, pid, data_dir))
    return Message(RecordDict({"info": ConfigRecord({"partition-id": pid, "num-examples": len(y)})}),
                   reply_to=message)


def _personal(message: Message, context: Context, factory: ModelFactory) -> Message:
    """The final query: phi_k (untrained if never selected) and the rounds it trained. Only here does
    phi leave the client, for the personalised models; no aggregation ever reads it."""
    pid = _partition_id(context)
    phi = _phi(context, factory(context), int(message.content["config"]["seed"]), pid)
    info = ConfigRecord({"partition-id": pid, "trained-rounds": _trained_rounds(context)})
    return Message(RecordDict({"phi": _record(phi.state_dict()), "info": info}), reply_to=message)


def make_client_app(model_factory: ModelFactory | None = None, data_dir: str | None = None) -> ClientApp:
    """The FedLoGe ClientApp. ``model_factory(context)`` builds the (untrained) FedLoGeNet the global
    arrays load into (default :func:`model_from_run_config`); ``data_dir`` overrides the run config's."""
    factory = model_factory or model_from_run_config
    app = ClientApp()

    def guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
        def run(message: Message, context: Context) -> Message:
            try:
                return handler(message, context)
            except RobustkitError as e:
                pid = context.node_config.get("partition-id")
                return _user_error(message, pid if isinstance(pid, int) else None, e)
        return run

    app.train()(guarded(lambda m, c: _train(m, c, factory, data_dir)))
    app.query("info")(guarded(lambda m, c: _info(m, c, data_dir)))
    app.query("personal")(guarded(lambda m, c: _personal(m, c, factory)))
    return app


# -------------------------------------------------------------------------------------- server side


@dataclass
class ServerPlan:
    """Everything the server needs for one run: the initial global state (a FedLoGeNet ``state_dict``
    whose ``head`` is psi), the SSE-C weight (None for ``fedavg``), K, rounds, fraction, and what every
    client is told."""

    init_state: dict[str, torch.Tensor]
    sse_weight: torch.Tensor | None
    num_clients: int
    rounds: int
    fraction: float
    settings: TrainSettings
    node_timeout: float = 600.0
    round_timeout: float = 3600.0


def _content(reply: Message, key: str, what: str) -> Any:
    """A reply's record ``key``; a client's robustkit error becomes a one-line ConfigError here."""
    if reply.has_error():
        raise RuntimeError(f"{what}: node {reply.metadata.src_node_id} failed ({reply.error.code}): {reply.error.reason}")
    if "error" in reply.content:
        raise ConfigError(str(reply.content["error"]["message"]))
    return reply.content[key]


class FedLoGeStrategy(Strategy):
    """FedLoGe's server side as a Flower Strategy: each round trains exactly the simulator's
    ``client_selection(seed, round - 1, K, fraction)`` (nodes are found by their partition id, asked
    once with ``query.info``) and averages their backbone + psi with :func:`fedloge.aggregate`.
    No client-side evaluation rounds; :meth:`collect_personal` is the separate final query for phi."""

    def __init__(self, num_clients: int, fraction: float, settings: TrainSettings,
                 sse_weight: torch.Tensor | None, *, node_timeout: float = 600.0, rounds: int | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        client_selection(settings.seed, 0, num_clients, fraction)  # the simulator's checks of K, fraction, seed
        self.num_clients, self.fraction, self.settings = num_clients, fraction, settings
        self.sse = None if sse_weight is None else _record({"weight": sse_weight})
        self.node_timeout, self.rounds, self.progress = node_timeout, rounds, progress
        self.nodes: dict[int, int] = {}  # partition id -> Flower node id
        self.sizes: dict[int, int] = {}
        self.selected_rounds = dict.fromkeys(range(num_clients), 0)
        self.logs: list[dict[str, Any]] = []
        self._selected: dict[int, list[int]] = {}

    def connect(self, grid: Grid) -> dict[int, int]:
        """Wait for K SuperNodes and map partition ids to node ids (each must hold a distinct one)."""
        if self.nodes:
            return self.nodes
        deadline = time.monotonic() + self.node_timeout
        while len(node_ids := sorted(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise ConfigError(f"{len(node_ids)} of {self.num_clients} SuperNodes connected within "
                                  f"{self.node_timeout:g} s")
            time.sleep(0.2)
        asks = [Message(RecordDict(), dst_node_id=n, message_type="query.info") for n in node_ids]
        infos = {}
        for reply in grid.send_and_receive(asks, timeout=self.node_timeout):
            info = _content(reply, "info", "query.info")
            infos[int(info["partition-id"])] = (reply.metadata.src_node_id, int(info["num-examples"]))
        if sorted(infos) != list(range(self.num_clients)) or len(infos) != len(node_ids):
            raise ConfigError(f"the {len(node_ids)} SuperNodes hold partitions {sorted(infos)}; a run with "
                              f"{self.num_clients} clients needs partition-id 0..{self.num_clients - 1}, one each")
        self.nodes = {k: node for k, (node, _) in infos.items()}
        self.sizes = {k: n for k, (_, n) in infos.items()}
        return self.nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The round's selected clients, each sent the global arrays, SSE-C and the settings
        (``config`` is not used: :class:`TrainSettings` is the single source)."""
        nodes = self.connect(grid)
        selected = client_selection(self.settings.seed, server_round - 1, self.num_clients, self.fraction)
        self._selected[server_round] = selected
        content = RecordDict({"arrays": arrays, "config": self.settings.record(server_round - 1)})
        if self.sse is not None:
            content["sse"] = self.sse
        return [Message(content, dst_node_id=nodes[k], message_type="train", group_id=str(server_round))
                for k in selected]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sample-weighted FedAvg of the selected clients' backbone + psi, in ascending client order."""
        selected = self._selected.pop(server_round)
        got: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        for reply in replies:
            metrics = dict(_content(reply, "metrics", f"round {server_round - 1}"))
            pid = int(metrics.pop("partition-id"))
            metrics.pop("num-examples")
            if self.nodes.get(pid) != reply.metadata.src_node_id or pid in got:
                raise RuntimeError(f"round {server_round - 1}: an unexpected reply for client {pid}")
            got[pid] = (_state(reply.content["arrays"]), {**metrics, "n": int(metrics["n"])})
        if sorted(got) != selected:
            missing = sorted(set(selected) - set(got))
            raise RuntimeError(f"round {server_round - 1}: clients {missing} did not reply in time; "
                               "FedLoGe averages exactly the selected clients, so the run stops")
        stats = [got[k][1] for k in selected]
        new = aggregate([got[k][0] for k in selected], [s["n"] for s in stats], clients=selected)
        for k in selected:
            self.selected_rounds[k] += 1
        log = _round_log(server_round - 1, selected, stats)
        self.logs.append(log)
        if self.progress is not None:
            of = f"/{self.rounds}" if self.rounds else ""
            self.progress(f"round {server_round}{of}: clients {selected}, loss {log['loss']:.4f}, "
                          f"acc {log['acc']:.3f}")
        means = {k: float(v) for k, v in log.items() if k not in ("round", "clients", "per_client")}
        return _record(new), MetricRecord(means)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # FedLoGe evaluates the realigned models after training, not per round

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        from flwr.supercore import log

        log(logging.INFO, "FedLoGe: K=%d, fraction=%s, %s", self.num_clients, self.fraction, asdict(self.settings))

    def collect_personal(self, grid: Grid, timeout: float) -> tuple[dict[int, dict[str, torch.Tensor]],
                                                                     dict[int, int]]:
        """Every client's phi_k after training, asked once (``query.personal``). A client whose count
        of trained rounds differs from the server's lost its state (a restarted SuperNode): refused."""
        nodes = self.connect(grid)
        content = RecordDict({"config": ConfigRecord({"seed": self.settings.seed})})
        asks = [Message(content, dst_node_id=nodes[k], message_type="query.personal") for k in sorted(nodes)]
        personal, trained = {}, {}
        for reply in grid.send_and_receive(asks, timeout=timeout):
            info = _content(reply, "info", "query.personal")
            pid, n = int(info["partition-id"]), int(info["trained-rounds"])
            if n != self.selected_rounds[pid]:
                raise RuntimeError(f"client {pid} reports {n} trained rounds but was selected "
                                   f"{self.selected_rounds[pid]} times: its SuperNode lost its state")
            personal[pid], trained[pid] = _state(reply.content["phi"]), n
        if sorted(personal) != list(range(self.num_clients)):
            raise RuntimeError(f"personal heads came back from clients {sorted(personal)} only")
        return dict(sorted(personal.items())), dict(sorted(trained.items()))


def serve(grid: Grid, plan: ServerPlan, progress: Callable[[str], None] | None = None) -> FederatedRun:
    """A whole FedLoGe run on ``grid``: ``rounds`` rounds of :class:`FedLoGeStrategy`, then the query
    for the personal heads. Returns what :func:`~robustkit.federated.simulate.run_simulator` returns."""
    strategy = FedLoGeStrategy(plan.num_clients, plan.fraction, plan.settings, plan.sse_weight,
                               node_timeout=plan.node_timeout, rounds=plan.rounds, progress=progress)
    result = strategy.start(grid, _record(plan.init_state), num_rounds=plan.rounds, timeout=plan.round_timeout)
    personal, trained = strategy.collect_personal(grid, plan.round_timeout)
    return FederatedRun(_state(result.arrays), personal, trained, strategy.logs)


def make_server_app(plan: Callable[[Context], ServerPlan], finish: Callable[[FederatedRun, Context], None],
                    progress: Callable[[str], None] | None = None,
                    on_exit: Callable[[], None] | None = None) -> ServerApp:
    """A ServerApp whose main builds the :class:`ServerPlan` from its context, :func:`serve`\\s it and
    hands the run to ``finish`` (the Python path keeps it; a deployment writes it to out-dir);
    ``on_exit`` runs when main ends, whether or not it succeeded."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            finish(serve(grid, plan(context), progress), context)
        finally:
            if on_exit is not None:
                on_exit()

    return app


# ------------------------------------------------------------------------------ deployment (flwr run)


def _run_config(context: Context) -> dict[str, Any]:
    cfg = {**RUN_CONFIG_DEFAULTS, **dict(context.run_config)}
    unknown = sorted(set(cfg) - set(RUN_CONFIG_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown FedLoGe run config keys {unknown}; known: {', '.join(RUN_CONFIG_DEFAULTS)}")
    return cfg


def plan_from_run_config(context: Context) -> ServerPlan:
    """A deployment's plan: FedLoGeNet initialised from ``seed`` (a forked global RNG, so the caller's
    is untouched) and SSE-C from (d, C, sse-beta, sse-steps, sse-lr, seed), both on the server."""
    cfg = _run_config(context)
    seed = _int(cfg["seed"], "seed", 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_from_run_config(context)
    d, num_classes = model.head.in_features, model.head.out_features
    method = str(cfg["method"])
    sse = (sse_c(d, num_classes, beta=float(cfg["sse-beta"]), steps=_int(cfg["sse-steps"], "sse-steps", 0),
                 lr=float(cfg["sse-lr"]), seed=seed)[0] if method == "fedloge" else None)
    settings = TrainSettings(method, _int(cfg["epochs"], "epochs", 1), _int(cfg["batch-size"], "batch-size", 1),
                             float(cfg["lr"]), float(cfg["momentum"]), seed, str(cfg["device"]))
    return ServerPlan({k: v.detach().clone() for k, v in model.state_dict().items()}, sse,
                      _int(cfg["num-clients"], "num-clients", 1), _int(cfg["rounds"], "rounds", 1),
                      float(cfg["fraction"]), settings, float(cfg["node-timeout"]), float(cfg["round-timeout"]))


def save_run(run: FederatedRun, out_dir: str | Path, record: Mapping[str, Any] | None = None) -> Path:
    """``<out_dir>/fedloge_run.safetensors`` (global state, every phi_k) + ``.json`` (rounds trained per
    client, the round logs, ``record``); :func:`load_run` reads them back."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"global/{k}": v.contiguous() for k, v in run.global_state.items()}
    tensors.update({f"personal/{c}/{k}": v.contiguous() for c, s in run.personal.items() for k, v in s.items()})
    save_file(tensors, out / f"{RUN_FILE}.safetensors")
    meta = {"global_keys": list(run.global_state),  # safetensors sorts keys; a state_dict's order matters
            "trained_rounds": {str(c): n for c, n in run.trained_rounds.items()}, "logs": run.logs,
            "record": dict(record or {})}
    (out / f"{RUN_FILE}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out / f"{RUN_FILE}.safetensors"


def load_run(out_dir: str | Path) -> FederatedRun:
    """The :class:`FederatedRun` a deployment wrote with :func:`save_run`."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    path, meta_path = out / f"{RUN_FILE}.safetensors", out / f"{RUN_FILE}.json"
    if not path.is_file() or not meta_path.is_file():
        raise ConfigError(f"{out} holds no Flower FedLoGe run ({RUN_FILE}.safetensors and .json)")
    tensors, meta = load_file(path), json.loads(meta_path.read_text())
    global_state = {k: tensors[f"global/{k}"] for k in meta["global_keys"]}
    personal: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("personal/"):
            _, client, name = key.split("/", 2)
            personal.setdefault(int(client), {})[name] = v
    trained = {int(c): int(n) for c, n in meta["trained_rounds"].items()}
    return FederatedRun(global_state, dict(sorted(personal.items())), trained, meta["logs"])


def _save_to_out_dir(run: FederatedRun, context: Context) -> None:
    cfg = _run_config(context)
    save_run(run, str(cfg["out-dir"]), {"engine": "flower deployment", "run_config": cfg})


server_app = make_server_app(plan_from_run_config, _save_to_out_dir)
client_app = make_client_app()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string (JSON escapes are valid TOML escapes)


def write_app(app_dir: str | Path, **run_config: Any) -> Path:
    """Write a Flower App (``pyproject.toml`` only) whose components are this module's ``server_app`` and
    ``client_app``, with :data:`RUN_CONFIG_DEFAULTS` updated by ``run_config`` (underscores become
    dashes): ``flwr run <app_dir> <superlink>`` runs it. robustkit[federated] must be installed where
    the ServerApp and the ClientApps run; the app itself ships no code."""
    cfg = dict(RUN_CONFIG_DEFAULTS)
    for key, value in run_config.items():
        name = key.replace("_", "-")
        if name not in cfg:
            raise ConfigError(f"unknown FedLoGe run config key {name!r}; known: {', '.join(RUN_CONFIG_DEFAULTS)}")
        cfg[name] = value
    lines = [
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "robustkit-fedloge"', 'version = "1.0.0"',
        'description = "FedLoGe (robustkit.federated.flower_app) as a Flower App"', 'license = "MIT"',
        "dependencies = []", "", "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "robustkit"', "", "[tool.flwr.app.components]",
        'serverapp = "robustkit.federated.flower_app:server_app"',
        'clientapp = "robustkit.federated.flower_app:client_app"', "", "[tool.flwr.app.config]",
        *(f"{k} = {_toml_value(v)}" for k, v in cfg.items()),
    ]
    out = Path(app_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return out / "pyproject.toml"


# ------------------------------------------------------------------------ simulation (this process)


def _backend_config(device: torch.device, num_cpus: int | None, client_cpus: int,
                    client_gpus: float | None) -> dict[str, Any]:
    """Ray resources: ``client_cpus`` per virtual client out of ``num_cpus`` (all by default). Ray hides
    the GPUs from an actor with no GPU share, so a CUDA run gives each actor an equal share by default."""
    total = num_cpus or os.cpu_count() or 1
    if client_gpus is None:
        client_gpus = 1.0 / max(1, total // client_cpus) if device.type == "cuda" else 0.0
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": float(client_gpus)},
            "init_args": {"num_cpus": total}}


def _ray_processes() -> set[tuple[int, str]]:
    """(pid, start time) of this process's live descendants that are Ray's (gcs, raylet, workers,
    actors: "ray" in the command line). Linux ``/proc``; an empty set elsewhere."""
    children: dict[int, list[tuple[int, str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), fields[19]))
    found, pending = set(), [os.getpid()]
    while pending:
        for child in children.get(pending.pop(), []):
            pending.append(child[0])
            with contextlib.suppress(OSError):
                if b"ray" in Path(f"/proc/{child[0]}/cmdline").read_bytes():
                    found.add(child)
    return found


def _alive(proc: tuple[int, str]) -> bool:
    try:
        return Path(f"/proc/{proc[0]}/stat").read_text().rpartition(")")[2].split()[19] == proc[1]
    except (OSError, IndexError):
        return False


def _reap(procs: set[tuple[int, str]], grace: float = 3.0) -> None:
    """End what Ray left behind: after ``ray.shutdown`` an orphaned actor can linger for tens of
    seconds. Each process is one this run started (seen as Ray's descendant of this process while Ray
    was up), identified by pid and start time; it gets ``grace`` seconds, then SIGTERM, then SIGKILL."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL, None):
        deadline = time.monotonic() + grace
        while (left := [p for p in procs if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not left or sig is None:
            return
        for pid, _ in left:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)


def run_flower_simulation(init_model: nn.Module, sse_weight: torch.Tensor | None,
                          client_data: list[tuple[torch.Tensor, torch.Tensor]], *, rounds: int, fraction: float,
                          method: str = "fedloge", epochs: int = 5, batch_size: int = 8, lr: float = 0.03,
                          momentum: float = 0.5, seed: int = 0, device: torch.device | str = "cpu",
                          progress: Callable[[str], None] | None = None, num_cpus: int | None = None,
                          client_cpus: int = 1, client_gpus: float | None = None,
                          timeout: float = 3600.0) -> FederatedRun:
    """:func:`~robustkit.federated.simulate.run_simulator`'s run on Flower: K = ``len(client_data)``
    virtual SuperNodes (``flwr.simulation.run_simulation``, Ray backend), this module's ServerApp and
    ClientApp. The clients' data travel as files in a temporary folder (one per client, as on a real
    deployment), the model as a template the ClientApp deep-copies. Ray is shut down on return.
    ``num_cpus``/``client_cpus``/``client_gpus``: Ray's resources (all CPUs, 1 per client, a GPU share
    on CUDA). ``timeout``: seconds to wait for the SuperNodes and for each round's replies.
    """
    from flwr.simulation import run_simulation  # its import sets Ray options of its own, kept

    environ = dict(os.environ)  # a Ray run sets PYTHONPATH (this process's sys.path) and more

    _check_run(init_model, client_data, rounds, method)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("client_cpus", client_cpus)):
        _int(value, name, 1)
    if num_cpus is not None:
        _int(num_cpus, "num_cpus", client_cpus)
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    dev = torch.device(device)
    template = copy.deepcopy(init_model).cpu()
    plan = ServerPlan({k: v.detach().to("cpu", copy=True) for k, v in template.state_dict().items()},
                      None if sse_weight is None else sse_weight.detach().cpu(), len(client_data), rounds, fraction,
                      TrainSettings(method, epochs, batch_size, float(lr), float(momentum), _int(seed, "seed", 0),
                                    str(dev)), timeout, timeout)
    client_selection(seed, 0, len(client_data), fraction)  # fraction errors before Ray starts
    box: dict[str, Any] = {}
    before, ours = _ray_processes(), set()
    try:
        with tempfile.TemporaryDirectory(prefix="robustkit-flower-") as tmp:
            save_client_data(client_data, tmp)
            # on_exit runs in the ServerApp's thread while Ray is still up, success or not.
            server = make_server_app(lambda _ctx: plan, lambda run, _ctx: box.update(run=run), progress,
                                     on_exit=lambda: ours.update(_ray_processes() - before))
            client = make_client_app(lambda _ctx: copy.deepcopy(template), data_dir=tmp)
            run_simulation(server_app=server, client_app=client, num_supernodes=len(client_data),
                           backend_config=_backend_config(dev, num_cpus, client_cpus, client_gpus))
    finally:
        _reap(ours)
        # ... and leaves them set: a later subprocess of the caller (pip, another interpreter) would
        # import this environment's packages. The caller's environment is put back as it was.
        os.environ.clear()
        os.environ.update(environ)
    if "run" not in box:
        raise RuntimeError("the Flower simulation ended without a result (see the Flower log above)")
    return box["run"]

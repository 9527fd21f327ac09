"""The Flower engine of FedLoGe (robustkit.federated.flower_app) against the in-process simulator.

* A Flower simulation (Ray, 3 virtual SuperNodes x 2 rounds) gives the simulator's global weights and
  personal heads; Ray is shut down and leaves no process behind.
* The ServerApp's strategy and the ClientApp, wired through an in-process loopback Grid (no Ray, fast):
  the same equality for both methods, what travels (never a personal head in training traffic), and the
  failures a deployment can meet (a duplicated partition, a missing data file, a silent client, a
  SuperNode that lost its state).
* A deployment: the Flower App ``write_app`` writes passes flwr's own validation, and (slow) runs on a
  real SuperLink with two SuperNodes through ``flwr run``, as the README documents.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported: no network calls

import copy
import itertools
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason='the Flower engine needs the federated extra: pip install "robustkit[federated]"')

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from robustkit.core.errors import ConfigError  # noqa: E402
from robustkit.federated import flower_app as fa  # noqa: E402
from robustkit.federated.fedloge import client_selection, personal_head, sse_c  # noqa: E402
from robustkit.federated.simulate import run_simulator  # noqa: E402
from robustkit.models.fedloge import FedLoGeNet  # noqa: E402

K, C, WIDTH = 3, 4, 4  # 3 clients, 4 classes, SmallCNN width 4 (d = 16); 16 x 16 images
HYPER = {"rounds": 2, "fraction": 0.67, "epochs": 1, "batch_size": 4, "lr": 0.05, "momentum": 0.5, "seed": 3}


def _data(sizes: tuple[int, ...] = (10, 7, 13)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(n, 3, 16, 16, generator=gen), torch.randint(0, C, (n,), generator=gen)) for n in sizes]


def _model() -> FedLoGeNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return FedLoGeNet(3, C, WIDTH)


def _sse() -> torch.Tensor:
    return sse_c(4 * WIDTH, C, beta=0.5, steps=20, lr=1e-3, seed=0)[0]


def _assert_same_run(got: fa.FederatedRun, ref: fa.FederatedRun) -> None:
    assert list(got.global_state) == list(ref.global_state)
    for key, want in ref.global_state.items():
        have = got.global_state[key]
        assert have.dtype == want.dtype and have.shape == want.shape, key
        assert torch.allclose(have, want, atol=1e-6, rtol=0) if want.is_floating_point() else torch.equal(have, want)
    assert sorted(got.personal) == sorted(ref.personal) == list(range(len(ref.personal)))
    for k, want in ref.personal.items():
        assert list(got.personal[k]) == ["weight"] and torch.allclose(got.personal[k]["weight"], want["weight"],
                                                                      atol=1e-6, rtol=0), k
    assert got.trained_rounds == ref.trained_rounds
    assert [log["clients"] for log in got.logs] == [log["clients"] for log in ref.logs]
    for have, want in zip(got.logs, ref.logs, strict=True):
        assert have["n"] == want["n"] and have["loss"] == pytest.approx(want["loss"], abs=1e-6)


def test_selection_exercises_persistence() -> None:
    """The configuration below trains one client in both rounds, so its phi must survive between rounds
    in the ClientApp's context for the engines to agree, and leaves one untrained in round 0."""
    picks = [client_selection(HYPER["seed"], r, K, HYPER["fraction"]) for r in range(HYPER["rounds"])]
    assert set(picks[0]) & set(picks[1]) and len(picks[0]) < K


def test_flower_simulation_matches_simulator(one_thread) -> None:
    """3 virtual SuperNodes x 2 rounds on Ray: the simulator's global weights and personal heads."""
    import ray

    data, model, sse = _data(), _model(), _sse()
    ref = run_simulator(model, sse, data, **HYPER)
    lines: list[str] = []
    import flwr.simulation  # noqa: F401  (its import sets Ray options once per process, on purpose)

    environ = dict(os.environ)
    got = fa.run_flower_simulation(model, sse, data, **HYPER, num_cpus=2, client_cpus=1, progress=lines.append)
    # Ray sets PYTHONPATH and more for its workers; the caller's environment must come back as it was
    # (a later `pip --python other-env` would otherwise see this environment's packages).
    assert dict(os.environ) == environ
    _assert_same_run(got, ref)
    assert lines[-1].startswith(f"round {HYPER['rounds']}/{HYPER['rounds']}: clients")
    twice = [k for k, n in got.trained_rounds.items() if n == 2]
    assert twice and not torch.equal(got.personal[twice[0]]["weight"],
                                     personal_head(4 * WIDTH, C, HYPER["seed"], twice[0]).weight.detach())
    assert not ray.is_initialized()
    assert not fa._ray_processes(), "Ray processes outlived the simulation"


# ----------------------------------------------------------------- the apps on an in-process loopback Grid


@pytest.fixture
def task_identity():
    """The identity Flower's runtime gives a ServerApp process (messages are stamped with it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class LoopbackGrid(Grid):
    """Delivers each message to the ClientApp in this process, keeping one Context per node as a
    SuperNode does; replies come back in reverse order (arrival order is not send order)."""

    def __init__(self, app, node_configs: list[dict], drop: tuple[int, ...] = ()) -> None:
        self.app, self.drop = app, drop
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config=cfg, state=RecordDict(),
                                          run_config={}) for i, cfg in enumerate(node_configs)}
        self.traffic: list[tuple[Message, Message]] = []
        self._ids = itertools.count()

    def set_run(self, run) -> None:  # pragma: no cover - the abstract API; unused here
        pass

    @property
    def run(self):  # pragma: no cover
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(next(self._ids))
            node = message.metadata.dst_node_id
            reply = self.app(message, self.contexts[node])
            self.traffic.append((message, reply))
            if not (message.metadata.message_type == "train" and node - 100 in self.drop):
                replies.append(reply)
        return replies[::-1]


def _loopback(tmp_path: Path, data, model, *, node_configs: list[dict] | None = None, drop=()) -> LoopbackGrid:
    fa.save_client_data(data, tmp_path)
    app = fa.make_client_app(lambda _ctx: copy.deepcopy(model), data_dir=str(tmp_path))
    configs = node_configs if node_configs is not None else [{"partition-id": k} for k in range(len(data))]
    return LoopbackGrid(app, configs, drop)


def _plan(model, sse, n_clients: int, method: str = "fedloge") -> fa.ServerPlan:
    settings = fa.TrainSettings(method, HYPER["epochs"], HYPER["batch_size"], HYPER["lr"], HYPER["momentum"],
                                HYPER["seed"], "cpu")
    return fa.ServerPlan({k: v.clone() for k, v in model.state_dict().items()}, sse, n_clients, HYPER["rounds"],
                         HYPER["fraction"], settings, node_timeout=1.0, round_timeout=1.0)


@pytest.mark.parametrize("method", ["fedloge", "fedavg"])
def test_strategy_and_client_app_match_simulator(tmp_path, one_thread, task_identity, method) -> None:
    data, model = _data(), _model()
    sse = _sse() if method == "fedloge" else None
    ref = run_simulator(model, sse, data, method=method, **HYPER)
    grid = _loopback(tmp_path, data, model)
    _assert_same_run(fa.serve(grid, _plan(model, sse, K, method)), ref)
    # What travelled: personal heads only in the final query's replies, never towards the server's average.
    for message, reply in grid.traffic:
        kind = message.metadata.message_type
        assert sorted(reply.content) == {"query.info": ["info"], "train": ["arrays", "metrics"],
                                         "query.personal": ["info", "phi"]}[kind]
        sent = [key for name, rec in message.content.array_records.items() for key in rec]
        back = [key for name, rec in reply.content.array_records.items() if name != "phi" for key in rec]
        assert not any(key.startswith("head2") for key in sent + back)
    assert sum(m.metadata.message_type == "query.personal" for m, _ in grid.traffic) == K
    assert all("phi" in ctx.state for node, ctx in grid.contexts.items() if ref.trained_rounds[node - 100])


def test_deployment_failures_are_named(tmp_path, one_thread, task_identity) -> None:
    data, model, sse = _data(), _model(), _sse()
    twins = _loopback(tmp_path / "a", data, model, node_configs=[{"partition-id": 0}, {"partition-id": 0},
                                                                  {"partition-id": 2}])
    with pytest.raises(ConfigError, match=r"partitions \[0, 2\].*partition-id 0\.\.2, one each"):
        fa.serve(twins, _plan(model, sse, K))
    no_data = _loopback(tmp_path / "b", data, model)
    (tmp_path / "b" / "client1.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"^client 1: client data file .*client1.safetensors is missing$"):
        fa.serve(no_data, _plan(model, sse, K))
    unnamed = _loopback(tmp_path / "c", data, model, node_configs=[{}, {"partition-id": 1}, {"partition-id": 2}])
    with pytest.raises(ConfigError, match="no valid partition-id"):
        fa.serve(unnamed, _plan(model, sse, K))
    silent = _loopback(tmp_path / "d", data, model, drop=(2,))
    with pytest.raises(RuntimeError, match=r"round 0: clients \[2\] did not reply"):
        fa.serve(silent, _plan(model, sse, K))
    few = _loopback(tmp_path / "e", data[:2], model)
    with pytest.raises(ConfigError, match="2 of 3 SuperNodes connected"):
        fa.serve(few, _plan(model, sse, K))


def test_a_supernode_that_lost_its_state_is_refused(tmp_path, one_thread, task_identity) -> None:
    data, model, sse = _data(), _model(), _sse()
    grid = _loopback(tmp_path, data, model)
    strategy = fa.FedLoGeStrategy(K, HYPER["fraction"], _plan(model, sse, K).settings, sse)
    strategy.start(grid, fa._record(model.state_dict()), num_rounds=1, timeout=1.0)
    trained = client_selection(HYPER["seed"], 0, K, HYPER["fraction"])[0]
    grid.contexts[100 + trained].state = RecordDict()  # what a restarted SuperNode holds
    with pytest.raises(RuntimeError, match=f"client {trained} reports 0 trained rounds but was selected 1 times"):
        strategy.collect_personal(grid, timeout=1.0)


def test_user_errors_before_ray_starts() -> None:
    data, model = _data(), _model()
    with pytest.raises(ConfigError, match="client 1 has no training data"):
        fa.run_flower_simulation(model, None, [data[0], (data[1][0][:0], data[1][1][:0])], rounds=1, fraction=1.0,
                                 method="fedavg")
    with pytest.raises(ConfigError, match="fraction"):
        fa.run_flower_simulation(model, None, data, rounds=1, fraction=0.0, method="fedavg")
    with pytest.raises(ConfigError, match="unknown federated method"):
        fa.run_flower_simulation(model, None, data, rounds=1, fraction=1.0, method="fedprox")
    with pytest.raises(ConfigError, match="unknown FedLoGe run config key 'round'"):
        fa.write_app("unused", round=3)


# ---------------------------------------------------------------------------------------- deployment


def test_app_project_is_valid_and_run_files_round_trip(tmp_path) -> None:
    import tomllib

    from flwr.common.config import validate_config

    path = fa.write_app(tmp_path / "app", num_clients=2, dataset="synthetic", width=4, sse_steps=5, data_dir="/d")
    config = tomllib.loads(path.read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=tmp_path / "app")
    assert ok, errors
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert run_config["num-clients"] == 2 and run_config["data-dir"] == "/d" and set(run_config) == set(
        fa.RUN_CONFIG_DEFAULTS)
    plan = fa.plan_from_run_config(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                           run_config=run_config))
    assert plan.num_clients == 2 and tuple(plan.sse_weight.shape) == (10, 16)  # synthetic: 10 classes
    run = fa.FederatedRun(plan.init_state, {0: {"weight": torch.ones(10, 16)}, 1: {"weight": torch.zeros(10, 16)}},
                          {0: 1, 1: 0}, [{"round": 0, "clients": [0]}])
    fa.save_run(run, tmp_path / "out")
    back = fa.load_run(tmp_path / "out")
    assert list(back.global_state) == list(run.global_state)
    assert all(torch.equal(back.global_state[k], v) for k, v in run.global_state.items())
    assert back.trained_rounds == run.trained_rounds and back.logs == run.logs
    assert torch.equal(back.personal[0]["weight"], run.personal[0]["weight"])
    with pytest.raises(ConfigError, match="holds no Flower FedLoGe run"):
        fa.load_run(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


@pytest.mark.slow
def test_real_deployment_superlink_two_supernodes(tmp_path) -> None:
    """The README's deployment commands, on this machine: a SuperLink, two SuperNodes each holding one
    client's file, ``flwr run`` of one round (phi_k still crosses ClientApp processes in the SuperNode's
    context, to the final query); the run it writes equals the simulator's (about a minute)."""
    bindir = Path(sys.executable).parent
    if not (bindir / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed beside this Python")
    data = _data((9, 12))
    fa.save_client_data(data, tmp_path / "data")
    app = fa.write_app(tmp_path / "app", num_clients=2, rounds=1, fraction=1.0, dataset="synthetic", width=4,
                       batch_size=4, sse_steps=10, out_dir=str(tmp_path / "out"), node_timeout=120.0).parent
    link = _free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0"}
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    logs = open(tmp_path / "processes.log", "w")  # closed in finally
    procs = [subprocess.Popen([bindir / "flower-superlink", "--insecure", "--port", str(link)], env=env,
                              stdout=logs, stderr=subprocess.STDOUT)]
    try:
        _wait_for_port(link)
        for k in range(2):
            node_config = f'partition-id={k} data-path="{tmp_path / "data" / f"client{k}.safetensors"}"'
            procs.append(subprocess.Popen([bindir / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                           "--port", str(_free_port()), "--node-config", node_config],
                                          env=env, stdout=logs, stderr=subprocess.STDOUT))
        done = subprocess.run([bindir / "flwr", "run", str(app), "test", "--stream"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert (tmp_path / "out" / "fedloge_run.json").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        logs.close()
    got = fa.load_run(tmp_path / "out")
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={**fa.RUN_CONFIG_DEFAULTS, "num-clients": 2, "rounds": 1, "fraction": 1.0,
                              "dataset": "synthetic", "width": 4, "batch-size": 4, "sse-steps": 10})
    plan = fa.plan_from_run_config(ctx)
    model = fa.model_from_run_config(ctx)
    model.load_state_dict(plan.init_state)
    s = plan.settings
    ref = run_simulator(model, plan.sse_weight, data, rounds=1, fraction=1.0, method=s.method, epochs=s.epochs,
                        batch_size=s.batch_size, lr=s.lr, momentum=s.momentum, seed=s.seed)
    _assert_same_run(got, ref)
    shutil.rmtree(tmp_path / "data")

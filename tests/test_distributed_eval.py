"""Evaluation beyond one process: torchrun jobs (gloo on CPU) and --shard + merge job arrays.

The reference for every check is a single-process run of the same command: a job shares the
single-process batch plan among its ranks, so its per-example flags must be identical to it (with
the reference AutoAttack, which re-seeds per batch, too), and nothing may be computed twice.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from conftest import kill_all

from robustkit.cli import main

REPO = Path(__file__).resolve().parents[1]
# A short standard AutoAttack (all four stages, each cut down): the reference engine, batch-seeded.
AA_SHORT = """attack = "autoattack"
[params]
version = "standard"
[params.overrides]
"apgd.n_iter" = 5
"apgd.n_restarts" = 1
"apgd_targeted.n_iter" = 5
"apgd_targeted.n_restarts" = 1
"apgd_targeted.n_target_classes" = 2
"fab.n_iter" = 5
"fab.n_restarts" = 1
"fab.n_target_classes" = 2
"square.n_queries" = 20
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``subprocess.run`` that, on a timeout, kills everything it started (torchrun's workers too)."""
    proc = _popen(cmd, cwd, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _popen(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _torchrun(args: list[str], cwd: Path, *, nproc: int = 2, launcher: list[str] | None = None,
              env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *(launcher or ["--standalone"]),
           f"--nproc-per-node={nproc}", "-m", "robustkit", *args]
    return _run(cmd, cwd, env or _env(), timeout)


def _eval_args(ckpt: Path, attack: str, out: str, *extra: str) -> list[str]:
    return ["eval", "--model", str(ckpt), "--dataset", "synthetic", "--attack", attack, "--eps", "4/255",
            "--n-examples", "96", "--batch-size", "8", "--seed", "3", "--device", "cpu", "--no-progress",
            "--threads", "1", "--out", out, *extra]


def _committed(*files: Path) -> Counter:
    """(stage, example) -> how many committed batches of these records files hold it."""
    seen: Counter = Counter()
    for f in files:
        pending: list[dict] = []
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("type") == "commit":
                seen.update((x["stage"], x["i"]) for x in pending if x["batch"] == r["batch"])
                pending = []
            elif r.get("type") is None:
                pending.append(r)
    return seen


def _same_flags(a: dict, b: dict, *, passes: bool = True) -> None:
    """Same per-example results; ``passes``: the same cost too (the same batches: not across shards,
    where a batch's early stop depends on its members)."""
    for key in ("clean_flags", "robust_flags", "clean_accuracy", "robust_accuracy", "per_class",
                *(["passes"] if passes else [])):
        assert a[key] == b[key], key
    assert [(s["name"], s["n_attacked"], s["n_broken"]) for s in a["stages"]] == \
           [(s["name"], s["n_attacked"], s["n_broken"]) for s in b["stages"]]


@pytest.fixture(scope="module")
def single(tiny_checkpoint, tmp_path_factory) -> dict[str, dict]:
    """The single-process results every job is compared with (pgd and the short AutoAttack)."""
    import torch

    folder = tmp_path_factory.mktemp("single")
    (folder / "aa_short.toml").write_text(AA_SHORT)
    before = torch.get_num_threads()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(_eval_args(tiny_checkpoint, "aa_short.toml,pgd", "r.json")) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(before)
    return {a: json.loads((folder / f"r__{a}.json").read_text()) for a in ("aa_short.toml", "pgd")}


def test_torchrun_two_ranks_identical_to_one_process(single, tiny_checkpoint, tmp_path):
    (tmp_path / "aa_short.toml").write_text(AA_SHORT)
    done = _torchrun(_eval_args(tiny_checkpoint, "aa_short.toml,pgd", "r.json"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("robust accuracy by attack") == 1  # rank 0 alone prints
    for attack in ("aa_short.toml", "pgd"):
        job = json.loads((tmp_path / f"r__{attack}.json").read_text())
        _same_flags(job, single[attack])
        assert sum(s["n_attacked"] for s in job["stages"][1:]) > 0
        files = [tmp_path / f"r__{attack}.records.jsonl", tmp_path / f"r__{attack}.records.rank1.jsonl"]
        seen = _committed(*files)
        assert set(seen.values()) == {1}, "an example was computed twice"
        d = job["distributed"]
        assert d["world_size"] == 2 and d["backend"] == "gloo"
        assert all(r["batches"] > 0 for r in d["ranks"])
        assert sum(r["forward"] for r in d["ranks"]) == job["passes"]["forward"]
        assert sum(r["backward"] for r in d["ranks"]) == job["passes"]["backward"]
        assert sum(r["batches"] for r in d["ranks"]) == sum(
            1 for f in files for line in f.read_text().splitlines() if '"type": "commit"' in line)
    assert not list(tmp_path.glob("*.lock")), "a lock file was left behind"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_on_a_localhost_rendezvous(single, tiny_checkpoint, tmp_path):
    launcher = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
                f"--rdzv-id={uuid.uuid4().hex[:8]}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc-per-node=1", "-m", "robustkit",
           *_eval_args(tiny_checkpoint, "pgd", "r.json")]
    nodes = [_popen(cmd, tmp_path, _env()) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in nodes]
    finally:
        for p in nodes:
            kill_all(p)
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    job = json.loads((tmp_path / "r.json").read_text())
    _same_flags(job, single["pgd"])
    assert job["distributed"]["world_size"] == 2


def _kill_rank1_when(records: Path, stage: str, proc: subprocess.Popen, at_least: int = 2) -> None:
    """SIGKILL rank 1 (its pid is in its records file's lock) once it committed ``at_least`` batches."""
    lock = records.with_name(records.name + ".lock")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and _committed(records) and sum(
                1 for k in _committed(records) if k[0] == stage) >= at_least * 8 and lock.exists():
            pid = int(lock.read_text().strip() or 0)
            if pid:
                os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.02)
    kill_all(proc)
    raise AssertionError("the job finished before rank 1 could be killed; make it longer")


LONG = ["--attack-arg", "steps=150", "--eps", "1/255"]  # slow enough to be killed mid-stage


@pytest.fixture(scope="module")
def single_long(tiny_checkpoint, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("single_long")
    done = _run([sys.executable, "-m", "robustkit", *_eval_args(tiny_checkpoint, "pgd", "r.json", *LONG)],
                folder, _env())
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((folder / "r.json").read_text())


def _launch(tiny_checkpoint: Path, folder: Path, *launcher: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *launcher, "--nproc-per-node=2",
           "-m", "robustkit", *_eval_args(tiny_checkpoint, "pgd", "r.json", *LONG)]
    return _popen(cmd, folder, _env())


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        kill_all(proc)  # only what is still running (torchrun puts each worker in a session of its own)


def _check_resumed(folder: Path, single_long: dict) -> None:
    job = json.loads((folder / "r.json").read_text())
    _same_flags(job, single_long)
    assert job["timing"]["resumed_batches"] > 0
    seen = _committed(folder / "r.records.jsonl", folder / "r.records.rank1.jsonl")
    assert set(seen.values()) == {1}, "an example was recorded twice"


def test_sigkill_of_one_rank_then_relaunch_gives_the_identical_result(single_long, tiny_checkpoint, tmp_path):
    proc = _launch(tiny_checkpoint, tmp_path)
    _kill_rank1_when(tmp_path / "r.records.rank1.jsonl", "pgd", proc)
    _, err = _finish(proc)
    assert proc.returncode != 0 and not (tmp_path / "r.json").exists(), err[-2000:]
    again = _launch(tiny_checkpoint, tmp_path)
    _, err = _finish(again)
    assert again.returncode == 0, err[-2000:]
    _check_resumed(tmp_path, single_long)


def test_elastic_restart_after_a_killed_rank(single_long, tiny_checkpoint, tmp_path):
    proc = _launch(tiny_checkpoint, tmp_path, "--max-restarts=1")
    _kill_rank1_when(tmp_path / "r.records.rank1.jsonl", "pgd", proc)
    _, err = _finish(proc)
    assert proc.returncode == 0, err[-2000:]
    _check_resumed(tmp_path, single_long)


FAILING_ATTACK = '''
import os

import torch

from robustkit.attacks.base import Attack, register_attack


@register_attack("fails_on_rank1", name="fails_on_rank1")
class FailsOnRank1(Attack):
    """Raises on rank 1 of a job (a bug or bad input met by one rank only)."""

    name = "fails_on_rank1"

    def perturb(self, model, x, y, *, stage, seed):
        if os.environ.get("RANK") == "1":
            raise ValueError("planted failure on rank 1")
        return x.clone()
'''


def test_a_rank_that_raises_stops_every_rank(tiny_checkpoint, tmp_path):
    (tmp_path / "rk_failing_plugin.py").write_text(FAILING_ATTACK)
    env = _env(ROBUSTKIT_PLUGINS="rk_failing_plugin", PYTHONPATH=str(tmp_path), ROBUSTKIT_DIST_TIMEOUT="60")
    t0 = time.time()
    done = _torchrun(_eval_args(tiny_checkpoint, "fails_on_rank1", "r.json"), tmp_path, env=env)
    assert done.returncode != 0
    assert time.time() - t0 < 60, "a rank waited for the timeout"
    assert "planted failure on rank 1" in done.stderr  # rank 1's own error
    assert "rank 1 of 2 failed: ValueError: planted failure on rank 1" in done.stderr  # rank 0's
    assert not (tmp_path / "r.json").exists()


def test_shards_merge_identical_for_pgd(single, tiny_checkpoint, tmp_path, capsys, one_thread):
    parts = [tmp_path / f"r.shard{i}of3.json" for i in range(3)]
    for i, part in enumerate(parts):
        assert main(_eval_args(tiny_checkpoint, "pgd", str(part), "--shard", f"{i}/3")) == 0
    capsys.readouterr()
    assert main(["merge", *map(str, reversed(parts))]) == 0  # any order; default out: r.json
    out = capsys.readouterr().out
    assert "identical to a single run" in out
    merged = json.loads((tmp_path / "r.json").read_text())
    _same_flags(merged, single["pgd"], passes=False)
    assert merged["checks"]["merge"]["batch_exact"] is True and "shard" not in merged
    assert merged["n_examples"] == 96


def test_merge_says_the_reference_autoattack_is_not_batch_exact(tiny_checkpoint, tmp_path, capsys, one_thread):
    (tmp_path / "aa_short.toml").write_text(AA_SHORT)
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"a{i}.json")
        assert main(_eval_args(tiny_checkpoint, str(tmp_path / "aa_short.toml"), str(parts[-1]),
                               "--shard", f"{i}/2")) == 0
    capsys.readouterr()
    assert main(["merge", *map(str, parts), "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "NOT batch-exact" in out and "valid worst-case flags" in out
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["checks"]["merge"]["batch_exact"] is False
    assert len(merged["robust_flags"]) == 96


@pytest.mark.parametrize("trouble, needle", [
    ("missing", "missing shard(s) 2/3"),
    ("twice", "are both shard 0/3"),
    ("other", "not parts of one evaluation (differ in seed)"),
])
def test_merge_refuses_parts_of_another_evaluation(tiny_checkpoint, tmp_path, capsys, one_thread, trouble, needle):
    parts = []
    for i in range(3):
        seed = ["--seed", "4"] if trouble == "other" and i == 2 else []
        parts.append(tmp_path / f"p{i}.json")
        if trouble == "missing" and i == 2:
            break
        assert main([*_eval_args(tiny_checkpoint, "pgd", str(parts[-1]), "--shard", f"{i}/3",
                                 "--attack-arg", "steps=2"), *seed]) == 0
    if trouble == "missing":
        parts = parts[:2]
    if trouble == "twice":
        parts[1] = parts[0]
    capsys.readouterr()
    assert main(["merge", *map(str, parts), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustkit: error:") and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("bad", ["3/3", "1/0", "a/b", "-1/2"])
def test_bad_shard_is_one_line_exit_2(tiny_checkpoint, tmp_path, capsys, bad):
    assert main(_eval_args(tiny_checkpoint, "pgd", str(tmp_path / "r.json"), f"--shard={bad}")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustkit: error: --shard") and len(err.splitlines()) == 1


def test_curve_and_regress_under_torchrun(single, tiny_checkpoint, tmp_path, capsys, one_thread):
    curve = ["curve", "--model", str(tiny_checkpoint), "--dataset", "synthetic", "--attack", "pgd",
             "--attack-arg", "steps=5", "--eps", "0,2/255,8/255", "--n-examples", "64", "--batch-size", "8",
             "--device", "cpu", "--no-progress", "--threads", "1"]
    assert main([*curve, "--out", str(tmp_path / "one.json")]) == 0
    done = _torchrun([*curve, "--out", "two.json"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert [p["robust_flags"] for p in one["points"]] == [p["robust_flags"] for p in two["points"]]
    assert (tmp_path / "two.png").exists()

    (tmp_path / "pgd.json").write_text(json.dumps(single["pgd"]))
    assert main(["regress", str(tmp_path / "base.json"), "--from-result", str(tmp_path / "pgd.json")]) == 0
    done = _torchrun(["regress", "base.json", "--device", "cpu", "--no-progress", "--threads", "1"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("ok") >= 1


API_SCRIPT = '''
import json, sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[1])
from conftest import train_tiny  # noqa: E402
from test_tradeoff import build_mixed  # noqa: E402

from robustkit.attacks import create_attack  # noqa: E402
from robustkit.data import load_split  # noqa: E402
from robustkit.eval import evaluate  # noqa: E402
from robustkit.eval.tradeoff import accuracy_tradeoff  # noqa: E402

torch.set_num_threads(1)
alone = len(sys.argv) > 3
if not alone:
    dist.init_process_group("gloo")
model = train_tiny()
x, y = load_split("synthetic", "test").tensors(48)
attack = create_attack("pgd", norm="Linf", eps="4/255", steps=3)
res = evaluate(model, attack, x, y, batch_size=8, device="cpu", progress=False, distributed=not alone)
mixed = build_mixed(model)
trade = accuracy_tradeoff(mixed, lambda: create_attack("pgd", norm="Linf", eps="4/255", steps=3), [0.5], x, y,
                          batch_size=8, device="cpu", seed=0, progress=False)
assert res.robust_accuracy is not None
if alone or dist.get_rank() == 0:
    json.dump({"flags": res.robust_flags, "world": (res.distributed or {}).get("world_size"),
               "trade": [r.robust_acc for r in trade.rows]}, open(sys.argv[2], "w"))
'''


def test_python_api_and_tradeoff_under_torchrun(tmp_path):
    script = tmp_path / "api.py"
    script.write_text(API_SCRIPT)
    tests = str(Path(__file__).resolve().parent)
    alone = _run([sys.executable, str(script), tests, str(tmp_path / "one.json"), "alone"], tmp_path, _env())
    assert alone.returncode == 0, alone.stderr[-2000:]
    job = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                str(script), tests, str(tmp_path / "two.json")], tmp_path, _env())
    assert job.returncode == 0, job.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["flags"] == two["flags"] and one["trade"] == two["trade"]
    assert one["world"] is None and two["world"] == 2


def test_distributed_true_without_a_job_is_an_error(tiny_model, synthetic_test):
    from robustkit.core.errors import ConfigError
    from robustkit.eval import evaluate

    x, y = synthetic_test
    with pytest.raises(ConfigError, match="torchrun"):
        evaluate(tiny_model, None, x[:8], y[:8], device="cpu", progress=False, distributed=True)


def test_device_and_backend_of_a_rank_on_a_gpu_machine(monkeypatch):
    """No GPU here: what a rank would pick on one, with torch's answers faked (``--device auto`` on a
    4-GPU node, local rank 1 of a job of 8)."""
    import torch

    from robustkit import distributed
    from robustkit.core.provenance import resolve_device

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 4)
    assert [distributed.backend_for(d) for d in ("auto", "cuda", "cuda:1", "cpu")] == ["nccl", "nccl", "nccl", "gloo"]
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 8)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 5)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)  # an explicit index is the user's
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    assert distributed.backend_for("auto") == "gloo"

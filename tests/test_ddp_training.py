"""Data-parallel training under torchrun (issue 18, item 4), through the CLI on CPU with gloo.

The acceptance criterion: on a BatchNorm-free model, ``torchrun --nproc-per-node 2 -m robustkit
train ...`` gives the weights one process gives with the same global batch, to float tolerance, with
a batch that does not split evenly. Around it: rank 0 alone writes, the checkpoint records the job,
airbench runs, and a killed run (adversarial loop or airbench, one process or two, relaunched or
restarted by torchrun itself) resumes to the weights of an uninterrupted one.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import children, kill_all
from safetensors.torch import load_file

from robustkit.cli import main
from robustkit.core.errors import ConfigError
from robustkit.distributed import Dist
from robustkit.train._ddp import agree, check_shares, loss_weight, share

# A BatchNorm-free TinyCNN; a global batch of 15 splits 8 + 7, the last (38 = 2 * 15 + 8) 4 + 4.
TINY = ["--dataset", "synthetic", "--set", "arch=tiny_cnn", "--set", "arch_args={ width = 4 }", "--set", "n_train=38",
        "--set", "n_test=16", "--set", "epochs=2", "--set", "batch_size=15", "--set", "val_pgd_n=8", "--threads", "1",
        "--no-progress"]
# 8 steps an epoch: lookahead (every 5 steps) is mid-cycle at every epoch's end, and the whitening
# bias freezes after epoch 3; epochs of ~0.2 s, so a kill after the first lands long before the end.
AIRBENCH = ["--dataset", "synthetic", "--set", "n_train=512", "--set", "n_test=64", "--set", "widths=[8, 16, 16]",
            "--set", "batch_size=64", "--set", "epochs=6.0", "--threads", "1", "--no-progress"]
CASES = {  # name: (trainer, its overrides)
    "pgd_at": ("pgd_at", ["--set", "steps=3", "--set", "eps_warmup=2"]),  # PGD from a uniform random start
    "ltd_awp": ("ltd", ["--set", "framework=pgd_at", "--set", "steps=2", "--set", "teacher=tiny_cnn.init",
                        "--set", "awp=true"]),  # soft labels, and AWP's gradient summed over the ranks
    # TRADES' KL gradients at x' ~ x are so small that a 1e-8 change of the weights flips the sign of
    # some (0.3% of the pixels on this model): one and two processes agree until the first float
    # rounding difference in the weights, so the check is two steps long (the first at lr 0).
    "trades": ("trades", ["--set", "steps=2", "--set", "n_train=30", "--set", "epochs=1"]),
}
# Rank 1 records every file it opens for writing, renames or deletes (Python's audit hooks), then
# runs the CLI; what it recorded ends its stderr. Not robustkit's: torch's import of torch._dynamo
# (by DDP) making its cache folder, on every rank, after asking tempfile for the temp folder, which
# tempfile finds by writing and deleting a probe file there (done here, before the hook).
AUDIT = """\
import os, sys, tempfile
tempfile.gettempdir()
writes = []
def hook(event, args):
    if args and "torchinductor_" in str(args[0]):
        return
    if event == "open" and args[0] is not None:
        path, mode, flags = args
        if (mode and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)):
            if str(path) != os.devnull:
                writes.append(str(path))
    elif event in ("os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree"):
        writes.append(f"{event} {args[0]}")
if os.environ["RANK"] != "0":
    sys.addaudithook(hook)
from robustkit.cli import main
code = main(sys.argv[1:])
if os.environ["RANK"] != "0":
    print("RANK-WRITES", repr(writes), file=sys.stderr, flush=True)
sys.exit(code)
"""


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def torchrun(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """``robustkit ARGS`` under ``torchrun --standalone`` (rank 1 audited for writes), in ``workdir``."""
    script = workdir / "audited_robustkit.py"
    script.write_text(AUDIT)
    for _ in range(3):  # --standalone picks a free port, which another job on the machine may take first
        proc = launch([*TORCHRUN, str(script), *args], workdir)
        err = finish(proc)
        if "EADDRINUSE" not in err:
            break
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.read(), err)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- processes, killed


def launch(cmd: list[str], cwd: Path) -> subprocess.Popen:
    """``cmd`` in a session of its own, its output in files (a pipe nobody reads would block it),
    kept as ``proc.stdout`` and ``proc.stderr`` for :func:`finish`."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=err, start_new_session=True)
    proc.stdout, proc.stderr = out, err
    return proc


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    """Wait for ``proc`` (everything it started is killed on a timeout); its stderr."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise
    for f in (proc.stdout, proc.stderr):
        f.seek(0)  # type: ignore[union-attr]
    return proc.stderr.read()  # type: ignore[union-attr]


def rank_pid(proc: subprocess.Popen, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` (from its environment), or None before it started."""
    for pid in children(proc.pid):
        with contextlib.suppress(OSError):
            env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
            if env.get("RANK") == str(rank):
                return pid
    return None


def killed_after_first_epoch(cmd: list[str], cwd: Path, state: Path,
                             victim: Callable[[subprocess.Popen], None]) -> subprocess.Popen:
    """``cmd`` in ``cwd`` with ``victim(proc)`` called the moment ``state`` (the resume file of
    the first epoch) appears; the process, still running or not."""
    for _ in range(3):
        proc = launch(cmd, cwd)
        deadline = time.monotonic() + 180
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if state.exists() and proc.poll() is None:
            victim(proc)
            return proc
        if proc.poll() is None:
            kill_all(proc)
            raise AssertionError(f"no {state.name} after 180 s")
        err = finish(proc)
        if "EADDRINUSE" not in err:
            raise AssertionError(f"the run ended before it could be killed; make it longer\n{err[-3000:]}")
    raise AssertionError("no free port for torchrun --standalone")


def rank_writes(proc: subprocess.CompletedProcess) -> list[str]:
    lines = [line for line in proc.stderr.splitlines() if "RANK-WRITES" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return ast.literal_eval(lines[0].split("RANK-WRITES", 1)[1])


def weights(stem: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stem.with_name(stem.name + ".safetensors")))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"


# --------------------------------------------------------------------------- shares and weights


def _job(rank: int, world_size: int) -> Dist:
    return Dist(rank=rank, world_size=world_size, local_rank=rank, backend="gloo", group=None)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shares_partition_a_batch_and_their_weighted_losses_average_to_its_mean(world_size: int) -> None:
    per_example = torch.rand(23, dtype=torch.float64)
    for n in range(world_size, 24):
        parts = [share(n, _job(r, world_size)) for r in range(world_size)]
        assert torch.cat([torch.arange(n)[p] for p in parts]).tolist() == list(range(n))
        sizes = [p.stop - p.start for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        # DDP averages the ranks' gradients: the weighted share means must average to the batch mean
        ddp_mean = sum(loss_weight(len(per_example[p]), n, _job(0, world_size)) * per_example[p].mean()
                       for p in parts) / world_size
        assert torch.isclose(ddp_mean, per_example[:n].mean(), rtol=1e-12)


def test_a_batch_too_small_to_share_is_a_config_error() -> None:
    check_shares(30, 15, _job(1, 2))  # 15 + 15: every rank has examples
    check_shares(31, 15, _job(1, 2), drop_last=True)  # airbench drops the last batch of 1
    with pytest.raises(ConfigError, match="a global batch of 1 image"):
        check_shares(31, 15, _job(1, 2))


class _PeerSays:
    """Rank 0 of a two-rank job whose peer exchanges ``value`` (for :func:`agree`)."""

    def __init__(self, value: object) -> None:
        self.value = value

    def exchange(self, obj: object, error: Exception | None) -> list[object]:
        if error is not None:
            raise error
        return [obj, self.value]


def test_ranks_that_decide_differently_stop_with_one_line() -> None:
    assert agree(_PeerSays(2), lambda: (2, ["log"]), lambda r: r[0], "differ") == (2, ["log"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^resume differs \(by rank: 2, 0\)$"):
        agree(_PeerSays(0), lambda: (2, []), lambda r: r[0], "resume differs")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the acceptance criterion


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, subprocess.CompletedProcess]]:
    """Every case trained by one process (in-process) and by two (torchrun): the two checkpoint
    stems and the torchrun process."""
    out = {}
    for name, (trainer, extra) in CASES.items():
        work = tmp_path_factory.mktemp(name)
        (work / "two").mkdir()
        assert main(["train", trainer, *TINY, *extra, "--out", str(work / "one")]) == 0
        proc = torchrun(work / "two", "train", trainer, *TINY, *extra, "--out", "run")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (work / "one", work / "two" / "run", proc)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_train_the_weights_of_one(runs: dict, name: str) -> None:
    one, two, _ = runs[name]
    assert_close(weights(one), weights(two))


def test_the_checkpoint_records_the_job_and_rank_1_writes_nothing(runs: dict) -> None:
    _, two, proc = runs["pgd_at"]
    meta = json.loads(two.with_name("run.json").read_text())
    assert meta["training"]["distributed"]["world_size"] == 2 and meta["training"]["distributed"]["backend"] == "gloo"
    assert rank_writes(proc) == []
    # rank 0 wrote the checkpoint (and the epoch-1 resume state, deleted at the end); nothing else
    assert sorted(p.name for p in two.parent.iterdir()) == ["audited_robustkit.py", "run.json", "run.safetensors"]
    assert proc.stdout.count("saved ") == 1  # rank 1's summary is silenced


def test_one_process_records_world_size_1(runs: dict) -> None:
    one, _, _ = runs["pgd_at"]
    assert json.loads(one.with_name("one.json").read_text())["training"]["distributed"]["world_size"] == 1


@pytest.fixture(scope="module")
def airbench_two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, Path]:
    """An uninterrupted two-process airbench run: its checkpoint stem, its process, and a copy of
    its resume state after the first epoch (what a kill at that moment leaves)."""
    work = tmp_path_factory.mktemp("airbench_two")
    (work / "run").mkdir()
    script = work / "run" / "audited_robustkit.py"
    script.write_text(AUDIT)
    state, snapshot = work / "run" / "ab.resume.safetensors", work / "epoch1.resume.safetensors"
    proc = killed_after_first_epoch([*TORCHRUN, str(script), "train", "airbench94", *AIRBENCH, "--out", "ab"],
                                    work / "run", state, lambda _: shutil.copy(state, snapshot))
    err = finish(proc)
    return work / "run" / "ab", subprocess.CompletedProcess(proc.args, proc.returncode, "", err), snapshot


def test_airbench_trains_under_torchrun_and_rank_0_alone_writes(airbench_two: tuple) -> None:
    # BatchNorm statistics are per-rank without sync_bn (CUDA only), so no equality with one process.
    stem, proc, _ = airbench_two
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rank_writes(proc) == []  # nor the resume state, which rank 0 wrote after each epoch and deleted
    assert sorted(p.name for p in stem.parent.iterdir()) == ["ab.json", "ab.safetensors", "audited_robustkit.py"]
    meta = json.loads((stem.parent / "ab.json").read_text())
    assert meta["training"]["distributed"]["world_size"] == 2 and meta["metrics"]["n"] == 64


def test_user_errors_under_torchrun_are_one_line_and_end_the_job(tmp_path: Path) -> None:
    proc = torchrun(tmp_path, "train", "pgd_at", *TINY, "--set", "sync_bn=true", "--out", "x")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("robustkit: error:")]
    # Both ranks find the error alone; the one that exits first makes torchrun SIGTERM the other,
    # which on a busy machine can come before that one printed (seen 3 times in 15 runs).
    assert errors and all("sync_bn = true needs CUDA" in e for e in errors), proc.stderr[-3000:]
    frames = [line for line in proc.stderr.splitlines() if line.lstrip().startswith("File ") and "/robustkit/" in line]
    assert frames == [], proc.stderr[-3000:]  # no traceback from a rank: torchrun's own is the launcher's
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A one-process run SIGKILLed once its first epoch's resume state is on disk: its folder and
    its command's arguments."""
    work = tmp_path_factory.mktemp("killed")
    # epochs of ~0.3 s: the kill lands long before the last one ends, even on a busy machine
    args = ["train", "pgd_at", *TINY, "--set", "n_train=120", "--set", "epochs=6", "--set", "steps=3"]
    proc = killed_after_first_epoch([sys.executable, "-m", "robustkit", *args, "--out", "run"], work,
                                    work / "run.resume.safetensors", kill_all)
    assert proc.returncode == -signal.SIGKILL
    assert (work / "run.resume.safetensors").exists() and not (work / "run.safetensors").exists()
    return work, args


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, killed: tuple[Path, list[str]]) -> Path:
    stem = tmp_path_factory.mktemp("whole") / "run"
    assert main([*killed[1], "--out", str(stem)]) == 0
    assert not stem.with_name("run.resume.safetensors").exists()
    return stem


def resumed_to_the_end(stem: Path, epochs: int) -> None:
    """The run of ``stem`` continued from a resume state, logged every epoch and deleted the state."""
    assert not stem.with_name(stem.name + ".resume.safetensors").exists()
    log = json.loads(stem.with_name(stem.name + ".json").read_text())["training"]["epochs_log"]
    assert [e["epoch"] for e in log] == list(range(1, epochs + 1)) and any("resumed_from_epoch" in e for e in log)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path, killed: tuple[Path, list[str]],
                                                                    uninterrupted: Path) -> None:
    shutil.copy(killed[0] / "run.resume.safetensors", tmp_path / "run.resume.safetensors")
    assert main([*killed[1], "--out", str(tmp_path / "run")]) == 0
    a, b = weights(tmp_path / "run"), weights(uninterrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit: every state came back
    resumed_to_the_end(tmp_path / "run", 6)


def test_two_processes_resume_a_one_process_run(tmp_path: Path, killed: tuple[Path, list[str]],
                                                uninterrupted: Path) -> None:
    shutil.copy(killed[0] / "run.resume.safetensors", tmp_path / "run.resume.safetensors")
    proc = torchrun(tmp_path, *killed[1], "--out", "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rank_writes(proc) == []
    assert_close(weights(tmp_path / "run"), weights(uninterrupted))
    assert not (tmp_path / "run.resume.safetensors").exists()


def test_a_resume_state_of_another_config_is_refused(tmp_path: Path, killed: tuple[Path, list[str]],
                                                     capsys: pytest.CaptureFixture) -> None:
    shutil.copy(killed[0] / "run.resume.safetensors", tmp_path / "run.resume.safetensors")
    assert main([*killed[1], "--set", "lr_max=0.2", "--out", str(tmp_path / "run")]) == 2
    err = only_error(capsys.readouterr().err)
    assert "config.lr_max differs" in err and "delete it" in err


def only_error(stderr: str) -> str:
    """The one error line a refused run ends with; before it only its log lines (a header), nothing
    else that reads as an error."""
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("robustkit: error:"), lines
    assert not any("error" in ln.lower() or "Traceback" in ln for ln in lines[:-1]), lines
    return lines[-1]


def kill_rank_1(proc: subprocess.Popen) -> None:
    pid = None
    while pid is None and proc.poll() is None:
        pid = rank_pid(proc, 1)
        time.sleep(0.005)
    assert pid is not None, "torchrun ended before its rank 1 could be killed"
    os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds rank 1 through /proc")
def test_an_elastic_restart_after_a_killed_rank_resumes_to_the_weights_of_an_uninterrupted_run(
        tmp_path: Path, killed: tuple[Path, list[str]], uninterrupted: Path) -> None:
    # torchrun restarts both workers (--max-restarts 1); they continue from the resume state. The
    # reference is the one-process run: two processes train its weights (the acceptance test above),
    # and a third launch of torchrun would double this test's time.
    cmd = [*TORCHRUN, "--max-restarts", "1", "-m", "robustkit", *killed[1], "--out", "run"]
    proc = killed_after_first_epoch(cmd, tmp_path, tmp_path / "run.resume.safetensors", kill_rank_1)
    err = finish(proc)
    assert proc.returncode == 0, err[-3000:]
    resumed_to_the_end(tmp_path / "run", 6)
    assert_close(weights(tmp_path / "run"), weights(uninterrupted))


# --------------------------------------------------------------------------- airbench resume


@pytest.fixture(scope="module")
def airbench_killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The resume state of a one-process airbench run SIGKILLed after its first epoch."""
    work = tmp_path_factory.mktemp("airbench_killed")
    state = work / "ab.resume.safetensors"
    proc = killed_after_first_epoch([sys.executable, "-m", "robustkit", "train", "airbench94", *AIRBENCH, "--out",
                                     "ab"], work, state, kill_all)
    assert proc.returncode == -signal.SIGKILL and not (work / "ab.safetensors").exists()
    return state


def test_a_killed_airbench_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path,
                                                                             airbench_killed: Path) -> None:
    # weights, momentum, the lookahead EMA, the step, the generator, the pre-flipped set: all come back
    assert main(["train", "airbench94", *AIRBENCH, "--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole.resume.safetensors").exists()
    shutil.copy(airbench_killed, tmp_path / "ab.resume.safetensors")
    assert main(["train", "airbench94", *AIRBENCH, "--out", str(tmp_path / "ab")]) == 0
    a, b = weights(tmp_path / "ab"), weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    resumed_to_the_end(tmp_path / "ab", 6)


def test_an_airbench_resume_state_of_another_config_is_refused(tmp_path: Path, airbench_killed: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    shutil.copy(airbench_killed, tmp_path / "ab.resume.safetensors")
    assert main(["train", "airbench94", *AIRBENCH, "--set", "lookahead_every=4", "--out", str(tmp_path / "ab")]) == 2
    assert "config.lookahead_every differs" in only_error(capsys.readouterr().err)
    assert main(["train", "airbench95", *AIRBENCH, "--set", "widths=[8, 16, 16]", "--set", "lr=11.5",
                 "--out", str(tmp_path / "ab")]) == 2  # the same fields, another trainer
    assert "its trainer differs" in capsys.readouterr().err


def test_a_two_process_airbench_job_resumes_to_the_weights_of_an_uninterrupted_one(
        tmp_path: Path, airbench_two: tuple) -> None:
    shutil.copy(airbench_two[2], tmp_path / "ab.resume.safetensors")
    again = torchrun(tmp_path, "train", "airbench94", *AIRBENCH, "--out", "ab")
    assert again.returncode == 0, again.stderr[-3000:]
    assert rank_writes(again) == []
    assert_close(weights(tmp_path / "ab"), weights(airbench_two[0]))
    resumed_to_the_end(tmp_path / "ab", 6)

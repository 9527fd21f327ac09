"""Outputs never lose data (issue 14, findings 1 and 5).

An output path that is one of the run's inputs (a checkpoint, its sidecar, a data file, a result
read) is refused, with or without --force; an existing file that is not an earlier output of the
same run is refused unless --force; a path that cannot be written (a folder, a read-only folder, a
parent that is a file) is refused before any model or data loads. Every refusal is one line and exit
2 and leaves every file as it was, with nothing added. Two runs with the same --out: the second
refuses, naming the first one's pid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from robustkit.cli import main
from robustkit.core.errors import ConfigError
from robustkit.eval.results import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
FAST = ["--attack", "pgd", "--attack-arg", "steps=2", "--eps", "2/255", "--n-examples", "16",
        "--batch-size", "16", "--no-progress", "--threads", "1", "--device", "cpu"]


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("robustkit: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None: a folder): equal snapshots, nothing changed."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def work(tmp_path: Path, tiny_checkpoint: Path, synthetic_test, capsys, monkeypatch) -> Path:
    """A folder holding a checkpoint pair, a data file, a user's notes, a result and its records."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck").mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(tiny_checkpoint.with_suffix(suffix), tmp_path / "ck" / f"run{suffix}")
    x, y = synthetic_test
    np.savez(tmp_path / "data.npz", images=x[:32].numpy(), labels=y[:32].numpy())
    (tmp_path / "notes.txt").write_text("my notes\n")
    code, _, err = run_main(capsys, "eval", "--model", "ck/run.safetensors", "--dataset", "synthetic", *FAST,
                            "--out", "r.json")
    assert code == 0, err
    return tmp_path


EVAL = ["eval", "--model", "ck/run.safetensors", "--dataset", "synthetic", *FAST]
CURVE = ["curve", "--model", "ck/run.safetensors", "--dataset", "synthetic", "--attack", "pgd",
         "--attack-arg", "steps=2", "--eps", "0,2/255", "--n-examples", "16", "--no-progress",
         "--threads", "1", "--device", "cpu"]
MASKING = ["check", "masking", "--model", "ck/run.safetensors", "--dataset", "synthetic",
           "--n-examples", "16", "--square-queries", "0", "--no-progress", "--threads", "1",
           "--device", "cpu"]
LATENCY = ["bench", "latency", "--model", "ck/run.safetensors", "--batch-sizes", "1", "--repeats", "1",
           "--threads", "1", "--device", "cpu"]

# (argv, what the one line must say): each would overwrite an input of the run or a file that is
# not an earlier output of it
OVERWRITES = {
    "eval over the checkpoint's metadata": ([*EVAL, "--out", "ck/run.json"], "metadata of the checkpoint"),
    "eval over the checkpoint": ([*EVAL, "--out", "ck/run.safetensors"], "the checkpoint ck/run.safetensors"),
    "eval over its --data-file": (["eval", "--model", "ck/run.safetensors", "--data-file", "data.npz", *FAST,
                                   "--out", "data.npz"], "the --data-file data.npz"),
    "eval with --force over an input": ([*EVAL, "--out", "ck/run.json", "--force"], "an input of this run"),
    "eval over a user's file": ([*EVAL, "--out", "notes.txt"], "is not a result of this evaluation"),
    "eval over another evaluation's result": ([*EVAL, "--seed", "1", "--out", "r.json"],
                                              "is not a result of this evaluation"),
    "eval whose records path is a user's file": (
        [*EVAL, "--out", "notes.txt.json"],
        "notes.txt.records.jsonl exists and is not a robustkit records file"),
    "a comma list's per-attack file": ([*EVAL[:-len(FAST)], *FAST[4:], "--attack", "pgd,fgsm",
                                        "--out", "mine.json"], "mine__fgsm.json exists"),
    "curve over the checkpoint's metadata": ([*CURVE, "--out", "ck/run.json"], "metadata of the checkpoint"),
    "curve --plot over a user's file": ([*CURVE, "--out", "c.json", "--plot", "notes.txt"],
                                        "--plot notes.txt exists"),
    "masking --markdown over the checkpoint": ([*MASKING, "--out", "m.json", "--markdown", "ck/run.json"],
                                               "--markdown ck/run.json is the metadata"),
    "masking --markdown over a user's file": ([*MASKING, "--out", "m.json", "--markdown", "notes.txt"],
                                              "--markdown notes.txt exists"),
    "latency over the checkpoint's metadata": ([*LATENCY, "--out", "ck/run.json"],
                                               "metadata of the checkpoint"),
    "latency over a user's file": ([*LATENCY, "--out", "notes.txt"], "is not a latency report"),
    "a baseline over the result it is made from": (
        ["regress", "r.json", "--from-result", "r.json", "--force"], "the --from-result r.json"),
    "a baseline over a user's file": (["regress", "notes.txt", "--from-result", "r.json"],
                                      "is not a baseline of the same evaluation"),
    "train over its teacher": (["train", "ltd", "--set", 'teacher="ck/run.safetensors"', "--out", "ck/run",
                                "--force", "--device", "cpu"], "the checkpoint ck/run.safetensors"),
    "train over a registered model's weights": (["train", "ltd", "--out", "WEIGHTS/small_cnn.cifar10_partial",
                                                 "--force", "--device", "cpu"], "an input of this run"),
}


@pytest.mark.parametrize("case", sorted(OVERWRITES))
def test_an_overwrite_is_refused_and_changes_nothing(case, work, capsys, monkeypatch):
    from robustkit.models.base import WEIGHTS_DIR

    argv, needle = OVERWRITES[case]
    argv = [a.replace("WEIGHTS", str(WEIGHTS_DIR)) for a in argv]
    if case == "eval whose records path is a user's file":
        (work / "notes.txt.records.jsonl").write_text("not records\n")
    if case == "a comma list's per-attack file":
        (work / "mine__fgsm.json").write_text("{}\n")
    shipped = snapshot(WEIGHTS_DIR)
    before = snapshot(work)
    code, _, err = run_main(capsys, *argv)
    assert_refused(code, err, needle)
    assert snapshot(work) == before, "a refused run changed or left a file"
    assert snapshot(WEIGHTS_DIR) == shipped


def test_force_replaces_and_a_rerun_of_the_same_evaluation_needs_none(work, capsys):
    code, _, err = run_main(capsys, *EVAL, "--out", "notes.txt", "--force")
    assert code == 0, err
    assert json.loads((work / "notes.txt").read_text())["schema"] == "robustkit.eval-result"

    # the same evaluation again: a resume, which may rewrite its own result without --force
    records = (work / "r.records.jsonl").read_bytes()
    code, _, err = run_main(capsys, *EVAL, "--out", "r.json")
    assert code == 0, err
    assert (work / "r.records.jsonl").read_bytes() == records, "a finished run committed batches again"

    # another evaluation over it: --force replaces the result, and its records start over
    code, _, err = run_main(capsys, *EVAL, "--seed", "1", "--out", "r.json", "--force")
    assert code == 0, err
    assert json.loads((work / "r.json").read_text())["seed"] == 1
    header = json.loads((work / "r.records.jsonl").read_text().splitlines()[0])
    assert header["protocol"]["seed"] == 1

    # the same fields but another eps (the result looks like this run's, its records do not): without
    # --force the records are refused, nothing changes; --force starts them over
    before = snapshot(work)
    other_eps = [*EVAL, "--seed", "1", "--eps", "1/255", "--out", "r.json"]
    code, _, err = run_main(capsys, *other_eps)
    assert_refused(code, err, "records a different evaluation")
    assert snapshot(work) == before
    code, _, err = run_main(capsys, *other_eps, "--force")
    assert code == 0, err
    header = json.loads((work / "r.records.jsonl").read_text().splitlines()[0])
    assert header["protocol"]["attack_config"]["eps"] == pytest.approx(1 / 255)
    assert json.loads((work / "r.json").read_text())["attack_config"]["eps"] == pytest.approx(1 / 255)


def test_submit_replaces_only_its_own_bundle(work, capsys):
    src = REPO / "leaderboard" / "entries" / "cifar10" / "Linf" / "Robustkit2026Small_CNN-FGSM-RS.json"
    d = json.loads(src.read_text())
    d["robustkit"].update(subset=False, n_examples=d["robustkit"]["full_test_set"])  # submittable
    entry = work / "model_info" / "cifar10" / "Linf" / src.name
    entry.parent.mkdir(parents=True)
    entry.write_text(json.dumps(d, indent=2))

    before = snapshot(work)
    # the bundle's model_info file would be the entry itself: refused even with --force
    code, _, err = run_main(capsys, "leaderboard", "submit", entry, "--out-dir", ".", "--force")
    assert_refused(code, err, "the entry read")
    (work / "mine").mkdir()
    (work / "mine" / "README.md").write_text("# my project\n")
    code, _, err = run_main(capsys, "leaderboard", "submit", entry, "--out-dir", "mine")
    assert_refused(code, err, "mine/README.md exists")
    assert snapshot(work) == {**before, "mine": None, "mine/README.md": b"# my project\n"}

    for _ in range(2):  # a bundle of the same entry is replaced without --force
        code, _, err = run_main(capsys, "leaderboard", "submit", entry, "--out-dir", "bundle")
        assert code == 0, err
    code, _, err = run_main(capsys, "leaderboard", "submit", entry, "--out-dir", "mine", "--force")
    assert code == 0, err
    assert (work / "mine" / "README.md").read_text().startswith("# RobustBench submission: ")


# --------------------------------------------------------------------------- unwritable places


@pytest.fixture
def readonly_dir(tmp_path: Path):
    """A folder no file can be created in, even by root (immutable where chmod does not bind root)."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None and \
        subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
    try:
        probe = d / "probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("cannot make a read-only folder here (root without chattr +i)")
        yield d
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        d.chmod(0o755)


def _place_cases(ro: Path) -> dict[str, tuple[list[str], str]]:
    """Each command with an output it cannot write: a folder, under a file, in a read-only folder."""
    cases: dict[str, tuple[list[str], str]] = {}
    commands = (("eval", EVAL, "--out"), ("curve", CURVE, "--out"), ("masking", MASKING, "--out"),
                ("latency", LATENCY, "--out"), ("curve plot", [*CURVE, "--out", "c.json"], "--plot"),
                ("masking markdown", [*MASKING, "--out", "m.json"], "--markdown"))
    for name, argv, flag in commands:
        cases[f"{name}: a folder"] = ([*argv, flag, "ck"], "is a folder")
        cases[f"{name}: under a file"] = ([*argv, flag, "notes.txt/x.json"],
                                          "notes.txt is a file, not a folder")
        cases[f"{name}: read-only"] = ([*argv, flag, f"{ro}/x.json"], "cannot write in")
    tradeoff = ["tradeoff", "--model", "adaptive_smoothing", "--attack", "apgd-ce", "--n-examples", "8",
                "--device", "cpu"]
    cases["tradeoff: --out-dir a file"] = ([*tradeoff, "--out-dir", "notes.txt"], "is a file; give a folder")
    cases["tradeoff: --out-dir under a file"] = ([*tradeoff, "--out-dir", "notes.txt/t"],
                                                 "is a file, not a folder")
    cases["tradeoff: --out-dir read-only"] = ([*tradeoff, "--out-dir", f"{ro}/t"], "cannot write in")
    cases["baseline: under a file"] = (["regress", "notes.txt/b.json", "--from-result", "r.json"],
                                       "is a file, not a folder")
    cases["baseline: read-only"] = (["regress", f"{ro}/b.json", "--from-result", "r.json"], "cannot write in")
    cases["train: under a file"] = (["train", "ltd", "--out", "notes.txt/run", "--device", "cpu"],
                                    "is a file, not a folder")
    cases["train: read-only"] = (["train", "ltd", "--out", f"{ro}/run", "--device", "cpu"], "cannot write in")
    cases["leaderboard add: read-only"] = ([
        "leaderboard", "add", "r.json", "--name", "Doe2026Robust", "--paper-title", "T", "--paper-link",
        "https://example.org", "--authors", "A", "--venue", "V", "--additional-data", "false",
        "--entries", f"{ro}/entries"], "cannot write in")
    return cases


PLACE_CASES = sorted(_place_cases(Path("RO")))


@pytest.mark.parametrize("case", PLACE_CASES)
def test_an_unwritable_output_is_refused_before_any_work(case, work, readonly_dir, capsys, monkeypatch):
    import robustkit.models

    def no_work(*_, **__):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(robustkit.models, "load_model", no_work)
    argv, needle = _place_cases(readonly_dir)[case]
    before, ro_before = snapshot(work), snapshot(readonly_dir)
    code, _, err = run_main(capsys, *argv)
    assert_refused(code, err, needle)
    assert snapshot(work) == before and snapshot(readonly_dir) == ro_before


def test_write_json_atomic_leaves_no_temp_file_on_failure(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="cannot write"):
        write_json_atomic(tmp_path / "taken", {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "r.json", {"a": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# --------------------------------------------------------------------------- one run per records file

# A model whose forward waits for a gate file: the run holds its lock for as long as the test wants.
GATE_PLUGIN = '''
import os
import time

from torch import nn

from robustkit.models import register_model


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        while not os.path.exists(os.environ["RK_TEST_GATE"]):
            time.sleep(0.02)
        return self.fc(x.flatten(1))


register_model("gated_test", Gated, description="waits for a gate file", dataset="synthetic")
'''


def test_a_second_run_with_the_same_out_refuses_naming_the_first(tmp_path):
    (tmp_path / "rk_gate_plugin.py").write_text(GATE_PLUGIN)
    gate = tmp_path / "gate"
    env = {**os.environ, "ROBUSTKIT_PLUGINS": "rk_gate_plugin", "RK_TEST_GATE": str(gate),
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "r.json"
    records, lock = out.with_suffix(".records.jsonl"), tmp_path / "r.records.jsonl.lock"
    cmd = [sys.executable, "-m", "robustkit", "eval", "--model", "gated_test", "--dataset", "synthetic",
           "--attack", "none", "--n-examples", "32", "--batch-size", "8", "--no-progress", "--threads", "1",
           "--device", "cpu", "--out", str(out)]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and first.poll() is None:
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break
            time.sleep(0.05)
        assert first.poll() is None, f"the first run ended before it held the lock: {first.stderr.read()}"
        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"another robustkit process (pid {first.pid})" in lines[0], second.stderr
        assert not records.exists() or _commits(records) == 0  # the refused run wrote nothing
    finally:
        gate.touch()
        first_rc = first.wait(timeout=300)
    assert first_rc == 0, first.stderr.read()
    done = records.read_bytes()
    assert _commits(records) == 4 and not lock.exists()

    # one after the other both work: the second resumes every batch and commits none again
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert records.read_bytes() == done and not lock.exists()
    assert json.loads(out.read_text())["timing"]["resumed_batches"] == 4


def _commits(records: Path) -> int:
    return sum(json.loads(line).get("type") == "commit" for line in records.read_text().splitlines())


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    from robustkit.eval.records import RecordStore

    path = tmp_path / "r.records.jsonl"
    (tmp_path / "r.records.jsonl.lock").write_text("999999999\n")  # its process is gone: no flock on it
    store = RecordStore(path, {"n_examples": 1})
    try:
        assert (tmp_path / "r.records.jsonl.lock").read_text().strip() == str(os.getpid())
    finally:
        store.close()
    assert not (tmp_path / "r.records.jsonl.lock").exists()
    assert json.loads(path.read_text().splitlines()[0])["type"] == "header"

"""The command line: bad input gives one line and exit code 2; list; a real kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from robustkit.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("robustkit: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_model_lists_close_matches(capsys):
    code, _, err = run_main(capsys, "eval", "--model", "smal_cnn", "--no-progress")
    assert_one_line_error(code, err, "unknown model", "small_cnn")


def test_unknown_attack_lists_close_matches(capsys, tiny_checkpoint):
    code, _, err = run_main(capsys, "eval", "--model", str(tiny_checkpoint), "--attack", "autoatack")
    assert_one_line_error(code, err, "unknown attack", "'autoattack'")


def test_malformed_eps(capsys, tiny_checkpoint):
    code, _, err = run_main(capsys, "eval", "--model", str(tiny_checkpoint), "--eps", "8/25x")
    assert_one_line_error(code, err, "malformed eps", "8/25x")


def test_n_examples_larger_than_data(capsys, tiny_checkpoint, tmp_path):
    code, _, err = run_main(capsys, "eval", "--model", str(tiny_checkpoint), "--dataset", "synthetic",
                            "--attack", "none", "--n-examples", "100000", "--out", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, "100000", "512")


def test_missing_data_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("ROBUSTKIT_DATA", raising=False)
    missing = tmp_path / "nowhere"
    code, _, err = run_main(capsys, "eval", "--model", "small_cnn", "--attack", "none", "--no-download",
                            "--data-dir", str(missing), "--out", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, str(missing))


def test_checkpoint_sha256_mismatch(capsys, tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.safetensors"
    blob = bytearray(tiny_checkpoint.read_bytes())
    blob[-1] ^= 0xFF  # flip bits in the last weight
    bad.write_bytes(bytes(blob))
    bad.with_suffix(".json").write_text(tiny_checkpoint.with_suffix(".json").read_text())
    code, _, err = run_main(capsys, "eval", "--model", str(bad), "--attack", "none")
    assert_one_line_error(code, err, "sha256 mismatch")


def test_inputs_outside_unit_interval(capsys, tiny_checkpoint, tmp_path):
    f = tmp_path / "normalised.npz"
    rng = np.random.default_rng(0)
    np.savez(f, images=rng.normal(size=(8, 3, 32, 32)).astype(np.float32), labels=np.arange(8) % 10)
    code, _, err = run_main(capsys, "eval", "--model", str(tiny_checkpoint), "--data-file", str(f),
                            "--attack", "none", "--out", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, "[0, 1]")


def test_bad_attack_arg(capsys, tiny_checkpoint):
    code, _, err = run_main(capsys, "eval", "--model", str(tiny_checkpoint), "--attack", "pgd",
                            "--attack-arg", "steps")
    assert_one_line_error(code, err, "KEY=VALUE")


def test_exit_code_from_real_process(tiny_checkpoint):
    proc = subprocess.run([sys.executable, "-m", "robustkit", "eval", "--model", str(tiny_checkpoint),
                           "--eps", "8/25x"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["robustkit: error: " + proc.stderr.split("error: ", 1)[1].strip()]


@pytest.mark.parametrize("what,needle", [("models", "small_cnn.cifar10_partial"), ("attacks", "autoattack-plus"),
                                         ("datasets", "fashion_mnist")])
def test_list(capsys, what, needle):
    code, out, _ = run_main(capsys, "list", what)
    assert code == 0 and needle in out


def test_help_mentions_examples(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "robustkit eval --model small_cnn --attack autoattack" in out and "ROBUSTKIT_DATA" in out


def test_eval_writes_result(capsys, tiny_checkpoint, tmp_path):
    out = tmp_path / "res.json"
    code, stdout, _ = run_main(capsys, "eval", "--model", str(tiny_checkpoint), "--dataset", "synthetic",
                               "--attack", "pgd", "--attack-arg", "steps=3", "--eps", "2/255", "--n-examples", "32",
                               "--batch-size", "16", "--no-progress", "--out", str(out))
    assert code == 0
    d = json.loads(out.read_text())
    assert d["n_examples"] == 32 and d["attack"] == "pgd" and d["attack_config"]["steps"] == 3
    assert d["provenance"]["checkpoint_sha256"] and "robust accuracy" in stdout
    assert out.with_suffix(".records.jsonl").exists()


def _eval_cmd(ckpt: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "robustkit", "eval", "--model", str(ckpt), "--dataset", "synthetic",
            "--attack", "pgd", "--attack-arg", "steps=40", "--eps", "2/255", "--n-examples", "160",
            "--batch-size", "8", "--seed", "7", "--no-progress", "--out", str(out)]


def _committed(records: Path, stage: str) -> int:
    if not records.exists():
        return 0
    n = 0
    for line in records.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        n += r.get("type") == "commit" and r.get("stage") == stage
    return n


def test_sigkill_and_resume_gives_identical_result(tiny_checkpoint, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed.json"
    records = killed.with_suffix(".records.jsonl")
    proc = subprocess.Popen(_eval_cmd(tiny_checkpoint, killed), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _committed(records, "pgd") < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the evaluation finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _committed(records, "pgd")
    assert not killed.exists()

    subprocess.run(_eval_cmd(tiny_checkpoint, killed), cwd=REPO, env=env, check=True, capture_output=True)
    straight = tmp_path / "straight.json"
    subprocess.run(_eval_cmd(tiny_checkpoint, straight), cwd=REPO, env=env, check=True, capture_output=True)

    a, b = json.loads(killed.read_text()), json.loads(straight.read_text())
    assert a["timing"]["resumed_batches"] >= done_before + 1  # the clean batches and the pgd ones
    for key in ("clean_accuracy", "robust_accuracy", "clean_flags", "robust_flags", "passes", "n_examples",
                "budget"):  # the budget counts every attacked example, not only this process's
        assert a[key] == b[key], key
    assert [(s["name"], s["accuracy"], s["n_attacked"]) for s in a["stages"]] == \
           [(s["name"], s["accuracy"], s["n_attacked"]) for s in b["stages"]]
    keys = [(r["stage"], r["i"]) for r in map(json.loads, records.read_text().splitlines()) if r.get("type") is None]
    assert len(keys) == len(set(keys)), "an example was recorded twice"


TINY_TRAIN = ["--dataset", "synthetic", "--set", "arch=tiny_cnn", "--set", "arch_args={ width = 4 }", "--set",
              "n_train=30", "--set", "n_test=8", "--set", "epochs=2", "--set", "batch_size=15", "--set", "steps=2",
              "--set", "val_pgd_n=4", "--threads", "1"]


@pytest.mark.parametrize("flag, lines", [("--no-progress", 2), ("--quiet", 0)])
def test_no_progress_drops_the_bars_not_the_epoch_lines(capsys, tmp_path, monkeypatch, flag, lines):
    """A run under nohup with --no-progress still says how each epoch went; --quiet says nothing."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(capsys, "train", "pgd_at", *TINY_TRAIN, flag, "--out", "x")
    assert code == 0, err
    epochs = [ln for ln in err.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == lines, err
    assert ("\r" in err) is False  # no bar was drawn either way
    assert [ln.split()[1] for ln in epochs] == [f"{k + 1}/2" for k in range(lines)]

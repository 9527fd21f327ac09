"""The Slurm recipes in eval/examples/ run as written: their commands, executed on this machine at
tiny size (a fake ``srun`` that starts its command once per "node", a fake ``scontrol``), give the
flags of a single-process run."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from robustkit.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "eval" / "examples"
TINY = {"DATASET": "synthetic", "ATTACK": "pgd", "N_EXAMPLES": "48", "BATCH_SIZE": "8", "DEVICE": "cpu",
        "EXTRA": "--attack-arg steps=3 --threads 1"}
FAKE_SRUN = """#!/bin/bash
# srun as on SLURM_NNODES nodes: the command once per node, all at once.
pids=()
for ((k = 0; k < SLURM_NNODES; k++)); do SLURM_NODEID=$k "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def _sbatch_options(script: Path) -> dict[str, str]:
    opts = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            opts[m.group(1)] = m.group(2) or ""
    return opts


def _env(tmp_path: Path, ckpt: Path, **extra: str) -> dict[str, str]:
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text("#!/bin/bash\necho localhost\n")  # show hostnames
    for f in fake.iterdir():
        f.chmod(0o755)
    path = os.pathsep.join([str(fake), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "MODEL": str(ckpt), **TINY, **extra}


@pytest.fixture(scope="module")
def single(tiny_checkpoint, tmp_path_factory) -> dict:
    import torch

    out = tmp_path_factory.mktemp("single") / "r.json"
    before = torch.get_num_threads()
    try:
        assert main(["eval", "--model", str(tiny_checkpoint), "--dataset", "synthetic", "--attack", "pgd",
                     "--n-examples", "48", "--batch-size", "8", "--device", "cpu", "--no-progress",
                     "--attack-arg", "steps=3", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    return json.loads(out.read_text())


def test_multi_node_torchrun_recipe(single, tiny_checkpoint, tmp_path):
    script = EXAMPLES / "slurm_torchrun.sbatch"
    opts = _sbatch_options(script)
    assert opts["nodes"] == "2" and "gpus-per-node" in opts and "time" in opts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = _env(tmp_path, tiny_checkpoint, SLURM_NNODES=opts["nodes"], SLURM_JOB_NODELIST="node[01-02]",
               SLURM_JOB_ID="4242", GPUS_PER_NODE="1", MASTER_PORT=port, OUT=str(tmp_path / "r.json"))
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    job = json.loads((tmp_path / "r.json").read_text())
    assert job["distributed"]["world_size"] == 2  # two "nodes" of one process each
    for key in ("clean_flags", "robust_flags", "passes"):
        assert job[key] == single[key], key


def test_job_array_recipe_and_its_merge(single, tiny_checkpoint, tmp_path):
    script = EXAMPLES / "slurm_shards.sbatch"
    lo, hi = map(int, _sbatch_options(script)["array"].split("-"))
    tasks = list(range(lo, hi + 1))
    parts, out = tmp_path / "parts", tmp_path / "merged.json"
    env = _env(tmp_path, tiny_checkpoint, PARTS=str(parts), OUT=str(out), SLURM_ARRAY_TASK_COUNT=str(len(tasks)))
    for i in tasks:  # the array's tasks, one after another here
        done = subprocess.run(["bash", str(script)], cwd=tmp_path, env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(parts.glob("*.shard*of*.json"))) == len(tasks)
    # the dependent merge job, as the script's usage line submits it
    usage = next(line for line in script.read_text().splitlines() if "--wrap" in line)
    wrapped = shlex.split(usage.split("--wrap", 1)[1])[0]
    done = subprocess.run(["bash", "-c", wrapped], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "identical to a single run" in done.stdout
    merged = json.loads(out.read_text())
    for key in ("clean_flags", "robust_flags"):  # not passes: PGD stops a batch once all of it is broken
        assert merged[key] == single[key], key

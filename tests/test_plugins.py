"""CONTRIBUTING.md's worked examples are the code: its model, trainer and attack files are written
out of the page into a folder outside the package and loaded as an out-of-tree plug-in, and the
commands of its plug-in section run as written (list, train, eval), each in a fresh process."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTRIBUTING = (REPO / "CONTRIBUTING.md").read_text()
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", flags=re.S | re.M)


def _blocks(lang: str) -> list[str]:
    return [code for kind, code in BLOCK.findall(CONTRIBUTING) if kind == lang]


def _example_files() -> dict[str, str]:
    """The blocks whose first line is ``# <path>``: path -> content."""
    files = {}
    for code in _blocks("python") + _blocks("toml"):
        first = code.splitlines()[0]
        if re.fullmatch(r"# [\w./-]+\.(py|toml)", first):
            files[first[2:]] = code
    return files


FILES = _example_files()


def _registered(pattern: str) -> str:
    """The one name a ``register_*`` call in the examples registers."""
    (name,) = {m for code in FILES.values() for m in re.findall(pattern, code)}
    return name


def test_each_example_is_one_file_in_its_registry_folder() -> None:
    folders = sorted(str(Path(p).parent) for p in FILES)
    assert folders == ["attacks", "robustkit/attacks", "robustkit/models", "robustkit/train"]


def test_fragments_call_the_real_api() -> None:
    """The blocks that are not whole files (the weights tag) use keywords the API has."""
    from robustkit.models import Weights, register_model

    accepted = {"register_model": set(inspect.signature(register_model).parameters),
                "Weights": {f.name for f in dataclasses.fields(Weights)}}
    fragments = [c for c in _blocks("python") if c not in FILES.values()]
    calls = [node for code in fragments for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)]
    checked = [c for c in calls if isinstance(c.func, ast.Name) and c.func.id in accepted]
    assert {c.func.id for c in checked} == set(accepted)
    for call in checked:
        unknown = {k.arg for k in call.keywords} - accepted[call.func.id]
        assert not unknown, f"CONTRIBUTING.md calls {call.func.id} with unknown keywords {unknown}"


def _plugin_commands() -> tuple[dict[str, str], list[str]]:
    """The plug-in section's shell block: its ``export`` settings and its robustkit command lines."""
    (block,) = [b for b in _blocks("bash") if "ROBUSTKIT_PLUGINS" in b]
    env, commands = {}, []
    for line in block.splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("export "):
            env.update(kv.split("=", 1) for kv in shlex.split(line)[1:])
        elif line:
            commands.append(line)
    return env, commands


def _env(extra: dict[str, str]) -> dict[str, str]:
    # One intra-op thread: the tiny runs gain nothing from more, and the test machine is shared.
    # PATH: `robustkit` is the script beside this interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": path, **extra}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "robustkit", *args], cwd=cwd, env=_env(env),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """The example files, flat in a folder outside the package, as the plug-in section says."""
    for path, code in FILES.items():
        (tmp_path / Path(path).name).write_text(code)
    return tmp_path


def test_out_of_tree_plugin_is_listed_trained_and_evaluated(plugin_dir: Path) -> None:
    tmp_path = plugin_dir
    env, commands = _plugin_commands()
    assert env["ROBUSTKIT_PLUGINS"].split(",") == [Path(p).stem for p in FILES if p.endswith(".py")]
    expected = {"models": _registered(r'register_model\(\s*"(\w+)"') + ".init",
                "trainers": _registered(r'register_trainer\(\s*"(\w+)"'),
                "attacks": _registered(r'register_attack\([^)]*?name="([\w-]+)"')}
    listed = set()
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "robustkit", command
        proc = _run(argv[1:], tmp_path, env)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        if argv[1] == "list":
            assert expected[argv[2]] in proc.stdout, f"{command} does not show {expected[argv[2]]}"
            listed.add(argv[2])
        if argv[1] == "eval":
            assert "robust accuracy" in proc.stdout
    assert listed == set(expected)
    assert {shlex.split(c)[1] for c in commands} >= {"list", "train", "eval"}


def test_shipping_weights_commands_record_the_recipe_and_a_function_pin(plugin_dir: Path) -> None:
    """The "Add a model" shell block, run as written: its recipe re-creates the recorded config."""
    (block,) = [b for b in _blocks("bash") if "--print-config" in b]
    env, _ = _plugin_commands()
    # In a checkout the files are in the package; here they are plug-ins, in a folder that is not the
    # working one (whose robustkit/weights/ folder would otherwise shadow the package on PYTHONPATH).
    env["PYTHONPATH"] = str(plugin_dir)
    work = plugin_dir / "checkout"
    for folder in ("defenses", "robustkit/weights"):
        (work / folder).mkdir(parents=True)
    proc = subprocess.run(["bash", "-e", "-c", block], cwd=work, env=_env(env), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (recipe,) = (work / "defenses").glob("*.toml")
    fields = tomllib.loads(recipe.read_text())
    sidecar = json.loads((work / "robustkit" / "weights" / f"{recipe.stem}.json").read_text())
    assert sidecar["trainer"] == fields.pop("trainer")
    # Fields the recipe leaves out (None prints as a comment) are recorded as None.
    assert sidecar["config"] == {k: fields.get(k) for k in sidecar["config"]}
    assert "function_sha256" in sidecar  # what the weights tag pins


def test_a_plugin_that_does_not_import_is_a_one_line_error(tmp_path: Path) -> None:
    proc = _run(["list", "models"], tmp_path, {"ROBUSTKIT_PLUGINS": "no_such_robustkit_plugin"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no_such_robustkit_plugin" in proc.stderr


@pytest.mark.parametrize("path", sorted(p for p in FILES if p.startswith("robustkit/")))
def test_examples_are_not_shipped_in_the_package(path: str) -> None:
    """Were one copied into the package, the plug-in test would register its names twice."""
    assert not (REPO / path).exists()

"""The wheel works on its own, away from the checkout.

An editable install reads presets, weights and modules straight from the repository, so a file the
wheel forgets (a preset reached through a symlink, a weight file outside ``package-data``, a new
subpackage) breaks only users. So: build the wheel from this tree, install it with ``--no-deps``
into a fresh venv that sees this environment's packages (torch and friends) through a ``.pth`` file,
and from a folder outside the checkout list the attacks and run a tiny evaluation of shipped weights.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.name for p in (REPO / "attacks").glob("*.toml"))
WEIGHTS = sorted(p.name for p in (REPO / "robustkit" / "weights").iterdir() if p.suffix in (".json", ".safetensors"))


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: pip builds in the source folder (build/, egg-info), and the checkout is shared.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("robustkit", "attacks"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(out), str(src)], cwd=src)
    (whl,) = out.glob("robustkit-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A venv holding only the wheel, plus a .pth line per site folder of this environment (torch...)."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    # Install before the .pth exists, so pip sees an empty environment (not this one's robustkit): nor
    # through a PYTHONPATH that something earlier in the session set (Ray sets one for its workers).
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=env_dir, env=clean)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=env_dir).strip()
    # Plain path lines: the folders' own .pth files (e.g. this checkout's editable finder) do not run.
    (Path(purelib) / "test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = str(bindir) + os.pathsep + env.get("PATH", "")
    return bindir, env


def test_wheel_carries_presets_weights_and_every_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"robustkit/presets/attacks/{p}" for p in PRESETS} <= names
    assert {f"robustkit/weights/{w}" for w in WEIGHTS} <= names
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "robustkit").rglob("__init__.py")}
    assert {f"{pkg}/__init__.py" for pkg in packages} <= names
    assert not any(n.startswith(("attacks/", "tests/", "eval/", "defenses/")) for n in names)


def test_installed_wheel_lists_attacks_and_evaluates(installed: tuple[Path, dict[str, str]],
                                                     tmp_path: Path) -> None:
    bindir, env = installed
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    where = _run([str(python), "-c", "import robustkit, robustkit.presets as p; "
                  "print(robustkit.__file__); print(p.attack_preset_dir())"], cwd=tmp_path, env=env).split()
    venv_root = bindir.parent.resolve()
    assert all(Path(w).resolve().is_relative_to(venv_root) for w in where), where  # not the checkout's

    listed = _run([str(bindir / "robustkit"), "list", "attacks"], cwd=tmp_path, env=env)
    assert all(Path(p).stem in listed for p in PRESETS), listed

    # shipped weights (sha256 and function pin verified on load) under a preset, on generated data
    _run([str(bindir / "robustkit"), "eval", "--model", "small_cnn", "--dataset", "synthetic", "--attack",
          "apgd-ce", "--n-examples", "8", "--batch-size", "8", "--device", "cpu", "--threads", "1",
          "--no-progress", "--out", "r.json"], cwd=tmp_path, env=env)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n_examples"] == 8 and result["attack"] == "apgd-ce" and result["robust_accuracy"] is not None
    assert result["records_path"] == "r.records.jsonl"  # relative to the result, not this machine's path

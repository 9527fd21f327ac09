"""What git tracks is inputs, code and results: no machine's paths, no experiment checkpoints, no
resume state.

A committed absolute path (a result's ``records_path``, a recipe's ``--data-dir``, a log's venv
interpreter) names one machine's layout: useless on a clone and a leak of where it was made. Every
tracked text file is scanned; each finding is reported as ``file:line``. A line that must show such
a path (documentation of this very rule) carries the marker ``hygiene: allow-path``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOW = "hygiene: allow-path"
# Roots of machine-local trees (spelled without their slashes here, so this file passes its own scan):
# this project's machines, Linux homes and temp, macOS homes and temp, Windows profiles and temp.
POSIX_ROOTS = ("work", "root", "home", "tmp", "mnt", "Users", "var/folders", "private/var")
WINDOWS_ROOTS = ("Users", "Windows", "Temp", "ProgramData", "Program Files", "Documents and Settings")
# A POSIX root counts only at the start of a path: not after a word character, a dot or a slash, so
# URLs (https://host/home/...), relative paths (a/tmp/b) and ~/.cache do not match.
POSIX = re.compile(r"(?<![\w.~/:-])/(?:" + "|".join(re.escape(r) for r in POSIX_ROOTS) + r")/")
# A drive letter, one or two backslashes (JSON escapes them) or a slash, then a Windows root folder;
# a lone drive letter is too common in code (``"a:\n"``) to flag on its own.
WINDOWS = re.compile(r"(?<![\w])[A-Za-z]:(?:\\\\|\\|/)(?:" + "|".join(re.escape(r) for r in WINDOWS_ROOTS)
                     + r")\b", re.IGNORECASE)
BINARY_SUFFIXES = (".png", ".jpg", ".safetensors", ".pt", ".npz", ".gz", ".zip", ".whl")
RESUME_STATE = re.compile(r"(\.records\.jsonl(\.lock)?$|\.records/|(^|/)\.[^/]+\.tmp$)")


def machine_paths(line: str) -> list[str]:
    """The machine-local absolute paths in one line of text (empty when it carries the allow marker)."""
    if ALLOW in line:
        return []
    return [m.group(0) for m in POSIX.finditer(line)] + [m.group(0) for m in WINDOWS.finditer(line)]


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, timeout=60)
    except OSError:
        pytest.skip("git is not available")
    if out.returncode != 0:
        pytest.skip("not a git checkout (e.g. an unpacked sdist): nothing is tracked")
    return [f for f in out.stdout.split("\0") if f]


def _text(path: Path) -> str | None:
    if path.suffix.lower() in BINARY_SUFFIXES or path.is_symlink() or not path.is_file():
        return None
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


@pytest.mark.parametrize("line,found", [
    ("records_path: /tmp/bl/apgd.records.jsonl", ["/tmp/"]),  # hygiene: allow-path
    ('"source": "/work/shared/data/partial/cifar10/train.npz"', ["/work/"]),  # hygiene: allow-path
    ("--data-dir /home/jane/data --out /Users/jane/r.json", ["/home/", "/Users/"]),  # hygiene: allow-path
    ('"path": "C:\\\\Users\\\\jane\\\\r.json"', ["C:\\\\Users"]),  # hygiene: allow-path
    ("D:/Users/jane/robustkit", ["D:/Users"]),  # hygiene: allow-path
    ("see https://example.org/home/tmp/x and http://localhost:8000/tmp/", []),
    ("data in ../shared/data/partial, cache in ~/.cache/robustkit, out in runs/tmp/x", []),
    ('print(f"{name}:\\tvalue")  # an escape after a colon is not a drive', []),
    ("the test rejects /tmp/ paths  # hygiene: allow-path", []),
])
def test_scanner_finds_machine_paths_and_nothing_else(line: str, found: list[str]) -> None:
    assert machine_paths(line) == found


def test_no_machine_paths_in_tracked_files() -> None:
    hits = []
    for name in _tracked():
        text = _text(REPO / name)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            hits += [f"{name}:{number}: {p}" for p in machine_paths(line)]
    assert not hits, ("absolute machine paths in tracked files (make them relative, e.g. ../shared/... or "
                      "a path relative to the file):\n" + "\n".join(hits[:50]))


def test_no_checkpoints_or_resume_state_tracked() -> None:
    tracked = _tracked()
    checkpoints = [f for f in tracked if f.endswith(".safetensors") and not f.startswith("robustkit/weights/")]
    assert not checkpoints, ("experiment checkpoints are not data; write them under runs/ (ignored): "
                             + ", ".join(checkpoints))
    sidecars = [f for f in tracked if f.endswith(".json") and not f.startswith("robustkit/weights/")
                and '"format": "robustkit.checkpoint"' in ((REPO / f).read_text(errors="replace")[:400])]
    assert not sidecars, f"checkpoint sidecars outside robustkit/weights/: {', '.join(sidecars)}"
    resume = [f for f in tracked if RESUME_STATE.search(f)]
    assert not resume, f"resume state is tracked (it belongs next to a run, ignored): {', '.join(resume)}"


def test_results_record_the_program_by_name_not_by_its_install_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """argv[0] is where robustkit is installed; a result records the program, so it can be committed."""
    import sys

    from robustkit.core.provenance import command_line

    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/robustkit", "eval", "--model", "small_cnn"])
    assert command_line() == ["robustkit", "eval", "--model", "small_cnn"]
    monkeypatch.setattr(sys, "argv", ["/opt/src/robustkit/__main__.py", "eval"])
    assert command_line() == ["python -m robustkit", "eval"]

"""The leaderboard page in a real headless Chromium: it loads, and its sort script sorts.

Needs Debian's `chromium` (`.ci/run` installs it when it can); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from robustkit.cli import main

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium on PATH (Debian: apt-get install chromium)")

BASE = {"link": "https://arxiv.org/abs/1905.13736", "name": "P", "authors": "A B", "additional_data": False,
        "number_forward_passes": 1, "dataset": "cifar10", "venue": "N/A", "architecture": "WRN",
        "eps": "8/255", "reported": None}
ROWS = {"Aaa2026First": ("80.00", "50.00"), "Bbb2026Second": ("90.00", "40.00"), "Ccc2026Third": ("70.00", "60.00")}


def dom(url: str, tmp_path: Path) -> str:
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def test_page_renders_and_sorts_in_chromium(tmp_path):
    entries = tmp_path / "lb" / "entries" / "cifar10" / "Linf"
    entries.mkdir(parents=True)
    for name, (clean, aa) in ROWS.items():
        (entries / f"{name}.json").write_text(json.dumps({**BASE, "clean_acc": clean, "autoattack_acc": aa}))
    assert main(["leaderboard", "build", "--entries", str(tmp_path / "lb" / "entries")]) == 0
    page = (tmp_path / "lb" / "index.html").as_uri()

    def order(html: str) -> list[str]:
        return re.findall(r'<tr data-id="([^"]+)"', html)

    html = dom(page, tmp_path)
    assert "<h1>robustkit leaderboard</h1>" in html
    assert order(html) == ["Ccc2026Third", "Aaa2026First", "Bbb2026Second"]  # RobustBench's rank
    html = dom(page + "#sort=cifar10-Linf:2:desc", tmp_path)  # by clean accuracy, the script ran
    assert order(html) == ["Bbb2026Second", "Aaa2026First", "Ccc2026Third"]
    assert 'aria-sort="descending"' in html
    html = dom(page + "#sort=cifar10-Linf:1:asc", tmp_path)  # by title text, ties keep rank order
    assert order(html) == ["Ccc2026Third", "Aaa2026First", "Bbb2026Second"]

"""The example GitHub Actions workflow users copy: valid YAML, and every robustkit command in it
is one our CLI accepts (so a renamed flag breaks this test, not a user's CI)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from robustkit.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "eval" / "examples" / "github-actions-robustness-gate.yml"


def robustkit_commands(workflow: dict) -> list[list[str]]:
    out = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            for line in step.get("run", "").splitlines():
                words = shlex.split(line.strip())
                if words[:1] == ["robustkit"]:
                    out.append(words[1:])
    return out


def test_workflow_is_valid_and_its_commands_parse():
    wf = yaml.safe_load(WORKFLOW.read_text())
    assert wf["name"] and "robustness-gate" in wf["jobs"]
    cmds = robustkit_commands(wf)
    assert [c[0] for c in cmds] == ["regress", "leaderboard", "leaderboard"]
    parser = build_parser()
    for argv in cmds:
        args = parser.parse_args(argv)  # SystemExit (a failed test) on an unknown flag
        assert callable(args.func)


def test_ci_runs_the_same_gates():
    ci = (REPO / ".ci" / "run").read_text()
    for needle in ("robustkit regress eval/baselines/", "robustkit leaderboard validate leaderboard/entries --strict",
                   "robustkit leaderboard build --check"):
        assert needle in ci, needle


@pytest.mark.parametrize("argv", [["regress", "--help"], ["leaderboard", "--help"], ["leaderboard", "add", "--help"]])
def test_help_works(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0 and "usage: robustkit" in capsys.readouterr().out

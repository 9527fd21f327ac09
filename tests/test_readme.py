"""The README's commands are the ones that work: CI runs its test command, the CLI accepts its
eval commands, and its Python example runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from robustkit.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_quickstart_is_two_commands_and_ci_runs_the_test_command():
    install_and_run, install_and_test = bash_blocks()[:2]
    assert len(install_and_run.strip().splitlines()) == 1 and len(install_and_test.strip().splitlines()) == 1
    test_cmd = install_and_test.strip().split("&&")[-1].strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in [ln.strip() for ln in ci.splitlines()], f"{test_cmd!r} is not what .ci/run runs"
    assert 'pip install -c .ci/constraints.txt -e ".[test]"' in install_and_test and ".ci/constraints.txt" in ci


def test_the_federated_install_line_is_what_ci_installs():
    lines = [ln.split("#")[0].strip() for b in bash_blocks() for ln in b.splitlines() if '".[federated]"' in ln]
    ci = (REPO / ".ci" / "run").read_text()
    assert lines and all(ln in ci for ln in lines), lines


def test_every_readme_cli_line_parses():
    parser = build_parser()
    cmds = []
    for block in bash_blocks():
        for line in block.splitlines():
            for seg in line.split("#")[0].split("&&"):
                seg = re.sub(r"^\s*(\w+=\S+\s+)*", "", seg).strip()  # drop VAR=value prefixes
                if seg.startswith("torchrun ") and " -m robustkit " in seg:  # the command torchrun runs
                    seg = "robustkit " + seg.split(" -m robustkit ", 1)[1]
                if seg.startswith("robustkit "):
                    cmds.append(seg)
    assert len(cmds) >= 6
    for c in cmds:
        argv = shlex.split(c)[1:]
        if argv[:1] == ["list"]:
            argv = ["list", argv[1].split("|")[0]]
        parser.parse_args(argv)


def test_python_example_runs(real_data_dir, monkeypatch, tmp_path):
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    code = code.replace("n=200", "n=8").replace('"autoattack"', '"apgd-ce"')
    monkeypatch.setenv("ROBUSTKIT_DATA", str(real_data_dir))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "aa.json").exists() and (tmp_path / "aa.jsonl").exists()


def test_readme_has_no_unfilled_markers():
    assert "@@" not in README, "fill the measured figures"


@pytest.mark.parametrize("preset", sorted((REPO / "attacks").glob("*.toml")), ids=lambda p: p.stem)
def test_every_preset_resolves(preset):
    from robustkit import create_attack

    attack = create_attack(preset.stem, norm="Linf", eps="8/255")
    assert attack.config()["eps"] == pytest.approx(8 / 255)

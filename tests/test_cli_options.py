"""One option layer: every shared flag means the same in every subcommand that has it."""

from __future__ import annotations

import argparse

import pytest

from robustkit.cli import build_parser, main
from robustkit.cli.options import HELP


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command parser by its full name, e.g. 'check masking'."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}".strip()
                out[full] = sub
                out.update(_commands(sub, full))
    return out


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings if a.help != argparse.SUPPRESS}


COMMANDS = _commands(build_parser())


def test_the_commands_that_run_models_share_the_layer():
    for name in ("eval", "curve", "tradeoff", "check masking", "regress", "train", "bench latency"):
        flags = _flags(COMMANDS[name])
        assert {"--device", "--threads"} <= set(flags), name


@pytest.mark.parametrize("flag, key", [("--device", "device"), ("--threads", "threads"),
                                       ("--data-dir", "data_dir"), ("--no-download", "no_download"),
                                       ("--no-progress", "no_progress"), ("--quiet", "quiet"), ("--force", "force")])
def test_a_shared_flag_has_one_help_text_and_default(flag, key):
    seen = {name: _flags(p)[flag] for name, p in COMMANDS.items() if flag in _flags(p)}
    assert seen, flag
    helps = {a.help for name, a in seen.items() if not name.startswith("leaderboard")}
    defaults = {a.default for a in seen.values()}
    assert helps <= {HELP[key]}, (flag, helps)
    assert len(defaults) == 1, (flag, defaults)
    if flag == "--device":
        assert defaults == {"auto"}


def test_out_always_names_a_file_and_out_dir_a_folder():
    for name, p in COMMANDS.items():
        flags = _flags(p)
        if "--out" in flags:
            assert "folder" not in flags["--out"].help.split("(")[0], name
        if "--out-dir" in flags:
            assert any(w in flags["--out-dir"].help for w in ("folder", "where", "go")), name


def test_no_flag_means_two_things():
    """--alpha was a significance level, a mixing weight and a step size; now none of them."""
    for name, p in COMMANDS.items():
        assert "--alpha" not in _flags(p), name


def test_deprecated_spellings_still_work_with_a_warning(tmp_path, capsys):
    # regress --alpha: the old name of --significance; its value is checked like the new one's
    assert main(["regress", str(tmp_path / "none.json"), "--alpha", "2"]) == 2
    err = capsys.readouterr().err
    assert "--alpha is deprecated" in err and "--significance must be in (0, 1)" in err


def test_bad_common_values_are_one_line_errors(capsys):
    assert main(["eval", "--model", "tiny_cnn.init", "--device", "gpu0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device 'gpu0'" in err[0], err
    with pytest.raises(SystemExit) as info:  # argparse's own usage error, exit 2
        main(["train", "--list", "--threads", "0"])
    assert info.value.code == 2 and "must be at least 1" in capsys.readouterr().err

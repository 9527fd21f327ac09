"""``robustkit leaderboard {validate,add,build,submit}``.

Exit codes: 0 fine; 1 an entry is invalid or a committed page is out of date (what CI gates on);
2 arguments robustkit cannot use (a missing path, a result that is not comparable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustkit.cli.options import warn
from robustkit.core.errors import ConfigError
from robustkit.leaderboard.entries import (
    Entry,
    boards,
    is_http_url,
    iter_entry_files,
    load_entries,
    read_entry,
)
from robustkit.leaderboard.render import render_html, render_markdown, write_if_changed

DEFAULT_ENTRIES = Path("leaderboard/entries")

EXAMPLES = """\
examples:
  robustkit leaderboard validate leaderboard/entries --strict
  robustkit leaderboard add results/my_run.json --name Doe2026Robust --paper-title "..." \\
      --paper-link https://arxiv.org/abs/... --authors "Jane Doe" --venue "arXiv, Nov 2026" \\
      --additional-data false
  robustkit leaderboard build            # leaderboard/README.md and leaderboard/index.html
  robustkit leaderboard build --check    # exit 1 when those are out of date (CI)
  robustkit leaderboard submit leaderboard/entries/cifar10/Linf/Doe2026Robust.json
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    lb = sub.add_parser("leaderboard", help="RobustBench-format entries: validate, add, build, submit",
                        description="RobustBench-format leaderboard entries.", epilog=EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    lsub = lb.add_subparsers(dest="lb_command", metavar="ACTION", required=True)

    va = lsub.add_parser("validate", help="check entry files (every problem, with the field and the fix)")
    va.add_argument("paths", nargs="+", metavar="PATH", help="entry files or folders (searched recursively)")
    va.add_argument("--strict", action="store_true", help="treat warnings (known quirks) as errors")
    va.add_argument("--quiet", action="store_true", help="print only the problems (warnings and errors), "
                    "not the summary line")
    va.set_defaults(func=cmd_validate)

    ad = lsub.add_parser("add", help="write an entry from a robustkit result JSON",
                         description="Write leaderboard/entries/<dataset>/<threat>/<NAME>.json from a result "
                         "of `robustkit eval --attack autoattack`. The numbers come from the result; the "
                         "flags give what it cannot know.")
    ad.add_argument("result", help="result JSON written by `robustkit eval`")
    ad.add_argument("--name", required=True, help="model id and file name, e.g. Doe2026Robust_WRN-28-10")
    ad.add_argument("--paper-title", required=True, help="title of the paper (the entry's `name` field)")
    ad.add_argument("--paper-link", required=True, help="URL of the paper or project")
    ad.add_argument("--authors", required=True, help='comma-separated, e.g. "Jane Doe, John Roe"')
    ad.add_argument("--venue", required=True, help='e.g. "NeurIPS 2026", "arXiv, Nov 2026" or "N/A"')
    ad.add_argument("--additional-data", required=True, choices=["true", "false"],
                    help="was any data beyond the training set used (unlabeled, synthetic, pre-training)?")
    ad.add_argument("--architecture", help="override the architecture the result records")
    ad.add_argument("--forward-passes", type=int, help="test-time forward passes per input (default: "
                    "what the result records, 1 for a single network)")
    ad.add_argument("--reported", help="robust accuracy claimed in the paper, percent (default: the "
                    "AutoAttack accuracy measured here)")
    ad.add_argument("--footnote", help="a note shown under the title")
    ad.add_argument("--allow-subset", action="store_true",
                    help="accept fewer than the full test set; the entry is marked as a subset")
    ad.add_argument("--entries", default=str(DEFAULT_ENTRIES), help="entries folder (default: %(default)s)")
    ad.add_argument("--force", action="store_true", help="replace an existing entry")
    ad.set_defaults(func=cmd_add)

    bu = lsub.add_parser("build", help="render leaderboard/README.md and leaderboard/index.html")
    bu.add_argument("--entries", default=str(DEFAULT_ENTRIES), help="entries folder (default: %(default)s)")
    bu.add_argument("--with", dest="extra", action="append", default=[], metavar="DIR",
                    help="also rank these entries (e.g. RobustBench's model_info); ours are highlighted")
    bu.add_argument("--out-dir", help="where README.md and index.html go (default: the entries' parent)")
    bu.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files are out of date")
    bu.set_defaults(func=cmd_build)

    su = lsub.add_parser("submit", help="RobustBench issue text and pull-request files for an entry")
    su.add_argument("entry", help="entry JSON file")
    su.add_argument("--out-dir", help="folder for the bundle (default: submissions/<ModelId>)")
    su.add_argument("--out", dest="out_deprecated", help=argparse.SUPPRESS)
    su.add_argument("--checkpoint-url", help="public URL of the weights (default: private submission)")
    su.add_argument("--code-url", help="URL of the code")
    su.add_argument("--model-zoo", action="store_true", help="ask for the model to join the model zoo")
    su.add_argument("--architecture-available", action="store_true",
                    help="the architecture already exists in RobustBench or timm")
    su.add_argument("--license-url", help="custom license (default: MIT)")
    su.add_argument("--evaluation-method", help="override the evaluation description")
    su.add_argument("--force", action="store_true", help="replace existing files in --out-dir that are not "
                    "an earlier bundle of this entry")
    su.set_defaults(func=cmd_submit)


# --------------------------------------------------------------------------- validate


def cmd_validate(args: argparse.Namespace) -> int:
    entries = load_entries(args.paths, strict=args.strict)
    n_err = n_warn = 0
    for e in entries:
        for p in e.problems:
            if p.level == "error":
                n_err += 1
                print(p)
            else:
                n_warn += 1
                print(p)
    invalid = [e for e in entries if not e.valid]
    if not args.quiet:
        print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {len(entries) - len(invalid)} valid, "
              f"{len(invalid)} invalid; {n_err} error(s), {n_warn} warning(s)"
              + (" (strict: warnings count as errors)" if args.strict else ""))
    return 1 if invalid else 0


# --------------------------------------------------------------------------- add


def cmd_add(args: argparse.Namespace) -> int:
    from robustkit.eval.outputs import check_place, command_inputs
    from robustkit.eval.results import EvalResult
    from robustkit.leaderboard.submission import PaperInfo, entry_from_result, naming_hint, write_entry

    check_place(args.entries, "--entries", folder=True)  # before anything is read
    result = EvalResult.load(args.result)
    paper = PaperInfo(
        model_id=args.name, title=args.paper_title, link=args.paper_link, authors=args.authors,
        venue=args.venue, additional_data=args.additional_data == "true", architecture=args.architecture,
        reported=args.reported, footnote=args.footnote, number_forward_passes=args.forward_passes,
    )
    if args.reported is not None:
        from robustkit.leaderboard.entries import is_percent

        if not is_percent(args.reported):
            raise ConfigError(f"--reported {args.reported!r}: write a percentage such as 62.50")
    if not is_http_url(args.paper_link):
        raise ConfigError(f"--paper-link {args.paper_link!r}: give the paper's http(s) URL, e.g. "
                          "https://arxiv.org/abs/2611.00001")
    if args.forward_passes is not None and args.forward_passes < 1:
        raise ConfigError(f"--forward-passes must be >= 1, got {args.forward_passes}")
    data = entry_from_result(result, paper, allow_subset=args.allow_subset, result_path=args.result)
    path = write_entry(data, args.entries, args.name, force=args.force, inputs=command_inputs(args))
    entry = read_entry(path)
    hint = naming_hint(args.name)
    for msg in ([hint] if hint else []) + [str(p) for p in entry.problems] + list(result.warnings):
        print(f"robustkit: warning: {msg}", file=sys.stderr)
    ext = data["robustkit"]
    subset = f" (SUBSET: {ext['n_examples']} of {ext['full_test_set']} test images)" if ext["subset"] else ""
    print(f"wrote {path}: clean {data['clean_acc']}%, AutoAttack {data['autoattack_acc']}%{subset}")
    print("next: robustkit leaderboard build")
    return 0


# --------------------------------------------------------------------------- build


def collect(entries_dir: Path, extra: list[str]) -> tuple[list[Entry], set[str], list[str]]:
    """Entries to rank, the paths of ours (highlighted when mixed with others), source labels."""
    if not entries_dir.is_dir():
        raise ConfigError(f"{entries_dir}: no such folder (run from the repository root or pass --entries)")
    ours = load_entries([entries_dir]) if any(entries_dir.rglob("*.json")) else []
    others = load_entries(extra) if extra else []
    seen: dict[tuple[tuple[str, str], str], Path | None] = {}
    for e in ours + others:
        key = (e.board, e.model_id)
        if key in seen:
            raise ConfigError(f"model id {e.model_id!r} appears twice on the {e.board[0]}/{e.board[1]} "
                              f"leaderboard: {seen[key]} and {e.path}")
        seen[key] = e.path
    highlight = {str(e.path) for e in ours} if others else set()
    return ours + others, highlight, [str(entries_dir), *extra]


def cmd_build(args: argparse.Namespace) -> int:
    entries_dir = Path(args.entries)
    out_dir = Path(args.out_dir) if args.out_dir else entries_dir.parent
    entries, highlight, sources = collect(entries_dir, args.extra)
    invalid = [e for e in entries if not e.valid]
    if invalid:
        for e in invalid:
            for p in e.errors:
                print(p, file=sys.stderr)
        print(f"robustkit: error: {len(invalid)} invalid entr{'y' if len(invalid) == 1 else 'ies'}; "
              "nothing rendered", file=sys.stderr)
        return 1
    labels = [_label(s) for s in sources]
    grouped = boards(entries)
    files = {out_dir / "README.md": render_markdown(grouped, sources=labels),
             out_dir / "index.html": render_html(grouped, sources=labels, highlight=highlight)}
    if args.check:
        stale = [p for p, text in files.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
        for p in stale:
            print(f"out of date: {p}", file=sys.stderr)
        if stale:
            print("robustkit: run `robustkit leaderboard build` and commit the result", file=sys.stderr)
            return 1
        print(f"up to date: {', '.join(str(p) for p in files)} ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'})")
        return 0
    for p, text in files.items():
        changed = write_if_changed(p, text)
        print(f"{'wrote' if changed else 'unchanged'} {p}")
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} on {len(grouped)} leaderboard(s): "
          + ", ".join(f"{d}/{t} ({len(v)})" for (d, t), v in grouped.items()))
    return 0


def _label(source: str) -> str:
    """A source as the user named it (CI and the committed build run from the repository root)."""
    return Path(source).as_posix()


# --------------------------------------------------------------------------- submit


def _check_bundle(args: argparse.Namespace, entry: Entry, out: Path) -> None:
    """The bundle's files replace only an earlier bundle of the same entry (its README or issue
    names the model id), other files only with --force; never the entry itself."""
    from robustkit.eval.outputs import check_output, check_place, command_inputs, first_line_is
    from robustkit.leaderboard.submission import submission_paths

    check_place(out, "--out-dir", folder=True)
    issue, info, readme = submission_paths(entry, out)
    ours = any(first_line_is(line)(p) for p, line in ((readme, f"# RobustBench submission: {entry.model_id}"),
                                                       (issue, f"[New Model] {entry.model_id}")))
    for p in (issue, info, readme):
        check_output(p, inputs=command_inputs(args), flag="--out-dir", force=args.force or ours,
                     kind=f"part of an earlier submission bundle of {entry.model_id}")


def cmd_submit(args: argparse.Namespace) -> int:
    from robustkit.leaderboard.submission import (
        SubmissionOptions,
        issue_text,
        submission_problems,
        write_submission,
    )

    files = list(iter_entry_files([args.entry]))
    if len(files) != 1:
        raise ConfigError(f"{args.entry}: give one entry file, not a folder of {len(files)}")
    entry = read_entry(files[0], strict=False)
    why = submission_problems(entry)
    if why:
        raise ConfigError(f"{files[0]} cannot be submitted: " + "; ".join(why))
    opts = SubmissionOptions(
        checkpoint_url=args.checkpoint_url, code_url=args.code_url, model_zoo=args.model_zoo,
        architecture_available=args.architecture_available, license_url=args.license_url,
        evaluation_method=args.evaluation_method,
    )
    if args.out_deprecated:
        warn("leaderboard submit --out is deprecated and will be removed in the next release; use --out-dir")
        args.out_dir = args.out_dir or args.out_deprecated
    out = Path(args.out_dir) if args.out_dir else Path("submissions") / entry.model_id
    _check_bundle(args, entry, out)
    written = write_submission(entry, out, opts)
    print(issue_text(entry, opts))
    print("wrote " + ", ".join(str(p) for p in written) + f" (next steps: {out / 'README.md'})", file=sys.stderr)
    for p in entry.warnings:
        print(f"robustkit: warning: {p}", file=sys.stderr)
    return 0

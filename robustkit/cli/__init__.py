"""The ``robustkit`` command line.

Every error a user can cause ends in one line on stderr and exit code 2 (3 when an attack breaks
the threat model); progress bars go to stderr and the summary table to stdout, so
``robustkit eval ... > summary.txt`` captures just the table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from robustkit.core.errors import ConfigError, RobustkitError

# Nothing above imports torch: main() imports the commands, so its handlers (one line for Ctrl-C or
# a bad argument, exit 130 or 2) are in place while torch loads, the longest part of start-up.
INTERRUPTED = ("robustkit: error: interrupted (an evaluation keeps its finished batches: the same command "
               "resumes it)")

EXAMPLES = """\
examples:
  robustkit eval --model small_cnn --attack autoattack --n-examples 200
  robustkit eval --model small_cnn --attack pgd --norm L2 --eps 0.5 --attack-arg steps=50
  robustkit eval --model small_cnn --attack none                 # clean accuracy only
  robustkit eval --model rb:Standard --rb-model-dir ./models     # a RobustBench zoo model
  robustkit eval --model my_run.safetensors --dataset cifar10    # your own robustkit checkpoint
  robustkit list models

data: --data-dir DIR, else $ROBUSTKIT_DATA, else ~/.cache/robustkit/data; a folder holding
<dataset>/test.npz (robustkit's cache format) or torchvision's files (downloaded when online).
"""

REGRESS_EXAMPLES = """\
examples:
  robustkit eval --model small_cnn --attack apgd-ce --n-examples 200 --out r.json
  robustkit regress eval/baselines/small_cnn.json --from-result r.json   # make a baseline
  robustkit regress eval/baselines/                                      # the gate (CI)
  robustkit regress --update eval/baselines/small_cnn.json               # accept a change deliberately
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line in robustkit's form (exit 2), like every other user error;
    the usage itself is one ``--help`` away."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"robustkit: error: {' '.join(message.split())}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    from robustkit.cli.options import add_common

    parser = OneLineParser(
        prog="robustkit",
        description="Adversarial-robustness evaluation: clean and AutoAttack accuracy you can trust, "
        "reproduce, resume and submit.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"robustkit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from robustkit.cli.eval import add_parsers as add_eval_parsers

    add_eval_parsers(sub, epilog=EXAMPLES)  # eval, curve, tradeoff, check masking

    ls = sub.add_parser("list", help="list models, attacks, datasets or trainers")
    ls.add_argument("what", choices=["models", "attacks", "datasets", "trainers"])
    ls.set_defaults(func=cmd_list)

    from robustkit.cli.train import add_parser as add_train_parser

    add_train_parser(sub)

    rg = sub.add_parser(
        "regress", help="re-run baselines and fail when robustness regressed (a CI gate)",
        description="Re-run the evaluation each baseline file pins (same model, attack config, images, "
        "seed and batch size) and compare per-example flags with the stored ones. Exit 0 when all are ok, "
        "1 when any regressed or changed, 2 on bad input.",
        epilog=REGRESS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rg.add_argument("paths", nargs="+", metavar="PATH",
                    help="baseline files, or folders (every *.json in them, sorted)")
    rg.add_argument("--update", action="store_true",
                    help="re-run and rewrite each baseline's result (keeps its tolerance and command); "
                    "exit 0")
    rg.add_argument("--tolerance", choices=["auto", "exact", "paired"], default=None,
                    help="override the baselines' mode: exact (identical flags), paired (exact McNemar test) "
                    "or auto (exact when both runs are on CPU with the same torch, else paired)")
    rg.add_argument("--significance", type=float, default=None, metavar="P",
                    help="override the baselines' significance level of the paired test, in (0, 1)")
    rg.add_argument("--alpha", type=float, default=None, dest="alpha_deprecated", help=argparse.SUPPRESS)
    rg.add_argument("--from-result", default=None, metavar="RESULT.json",
                    help="create the baseline file PATH from an existing result JSON (exactly one PATH)")
    add_common(rg, seed=None, force=True)
    rg.set_defaults(func=cmd_regress)

    mg = sub.add_parser(
        "merge", help="join the results of an `eval --shard I/N` job array into one result JSON",
        description="Check that the results are the N parts of one evaluation (same model, checkpoint, attack, "
        "data, seed and batch size; every part once) and write the result a single run writes: flags in "
        "example order, stage counts and passes summed, per-class accuracy recomputed. Says whether the "
        "merged flags are identical to a single run's (attacks with per-example randomness: pgd, fgsm, square) or "
        "valid worst-case flags but not batch-exact (the reference AutoAttack re-seeds per batch).",
        epilog="example:\n  for i in 0 1 2 3; do robustkit eval --model small_cnn --attack pgd --shard $i/4 "
        "--out r.shard$i.json; done\n  robustkit merge r.shard*.json --out r.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mg.add_argument("parts", nargs="+", metavar="SHARD.json", help="the result JSON of every part")
    add_common(mg, seed=None, data=False, progress=False, force=True,
               out="merged result JSON (default: the first part's path without .shard<I>of<N>, or with "
               ".merged)")
    mg.set_defaults(func=cmd_merge)

    pr = sub.add_parser(
        "paired", help="paired statistics of result JSONs on the same images: McNemar tests, per-example worst case",
        description="Compare result JSONs scored on the same images at the same threat (data fingerprint, count, "
        "norm, eps; anything else is refused): for every pair, the examples robust under one and not the other "
        "and the exact McNemar p on them (robust flags, and clean flags); when all results evaluate one model "
        "(several attacks), the per-example worst case: robust only if every attack left it robust, the number "
        "to quote.",
        epilog="examples:\n  robustkit paired r__autoattack.json r__autoattack-adaptive.json     # worst case of two attacks\n"
        "  robustkit paired pgd_at.json pgd_at_ltd.json --label PGD-AT --label PGD-AT+LTD --out paired.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument("results", nargs="+", metavar="RESULT.json", help="result JSONs (robustkit eval or merge)")
    pr.add_argument("--label", action="append", default=None, metavar="NAME",
                    help="a short name per result, in order (repeat once per result; default: the attack or model)")
    add_common(pr, seed=None, data=False, progress=False, force=True,
               out="also write the report as JSON (schema robustkit.paired) to PATH")
    pr.set_defaults(func=cmd_paired)

    from robustkit.cli.bench import add_parser as add_bench_parser

    add_bench_parser(sub)

    from robustkit.cli.leaderboard import add_parser as add_leaderboard_parser

    add_leaderboard_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 on success, 2 (one line on stderr) on any user error, 130 on Ctrl-C at any
    point, start-up included; a usage error exits 2 through argparse's SystemExit."""
    return guarded(_run, argv)


def guarded(run: Callable[[Any], int], argv: Any = None) -> int:
    """``run(argv)`` with robustkit's exit contract (one line + exit 2 per user error, 130 on Ctrl-C):
    the CLI and the ``python -m robustkit.train.*_compare`` drivers alike."""
    try:
        return run(argv)
    except RobustkitError as e:
        print(f"robustkit: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


def _run(argv: list[str] | None) -> int:
    from robustkit.cli.options import apply_common, check_device_flag
    from robustkit.core.plugins import load_plugins

    load_plugins()  # out-of-tree models, trainers and attacks register before names are looked up
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "device", None) is not None:
        check_device_flag(args.device)
    with apply_common(args):
        return int(args.func(args) or 0)


# --------------------------------------------------------------------------- regress


def cmd_regress(args: argparse.Namespace) -> int:
    from robustkit.cli.options import progress_enabled, warn
    from robustkit.eval.regress import DEFAULT_ALPHA, create_baseline, run_regress

    if args.alpha_deprecated is not None:
        warn("regress --alpha is deprecated and will be removed in the next release; use --significance")
        if args.significance is None:
            args.significance = args.alpha_deprecated

    if args.from_result is not None:
        if len(args.paths) != 1:
            raise ConfigError(f"--from-result needs exactly one PATH (the baseline file to write), "
                              f"got {len(args.paths)}")
        if args.update:
            raise ConfigError("--from-result and --update do not combine")
        out = Path(args.paths[0])
        if out.is_dir():
            raise ConfigError(f"{out} is a folder; give the baseline file to write, e.g. {out / 'name.json'}")
        _check_baseline_out(args, out)
        existed = out.exists()
        alpha = args.significance if args.significance is not None else DEFAULT_ALPHA
        baseline = create_baseline(args.from_result, out, alpha=alpha, mode=args.tolerance or "auto")
        r = baseline.result
        print(f"{'replaced' if existed else 'wrote'} baseline {out}: {r.model} | {r.attack} | {r.dataset} "
              f"n={r.n_examples} | clean {100 * r.clean_accuracy:.2f}% | robust "
              f"{100 * (r.robust_accuracy or 0.0):.2f}% | tolerance {baseline.mode}, "
              f"alpha {baseline.alpha:g}")
        return 0
    return run_regress(args.paths, update=args.update, tolerance=args.tolerance, alpha=args.significance,
                       device=args.device, data_dir=args.data_dir, progress=progress_enabled(args))


def _check_baseline_out(args: argparse.Namespace, out: Path) -> None:
    """An existing file is replaced only when it is a baseline of the same evaluation as the result
    (model, attack, dataset, n, seed) or with --force; never the result itself."""
    from robustkit.eval.outputs import check_output, command_inputs, read_json, same_run
    from robustkit.eval.regress import BASELINE_SCHEMA

    src = read_json(Path(args.from_result))
    keys = ("model", "attack", "dataset", "n_examples", "seed")
    fields = {k: src.get(k) for k in keys} if isinstance(src, dict) else None
    check_output(out, inputs=command_inputs(args), flag="PATH", force=args.force,
                 kind="a baseline of the same evaluation",
                 replaceable=same_run(BASELINE_SCHEMA, fields, section="result") if fields else None)


# --------------------------------------------------------------------------- merge


def cmd_merge(args: argparse.Namespace) -> int:
    import re

    from robustkit.eval.merge import merge_results
    from robustkit.eval.outputs import check_output, same_run
    from robustkit.eval.results import RESULT_SCHEMA

    merged, merge = merge_results(args.parts)
    first = Path(args.parts[0])
    stem = re.sub(r"\.shard\d+of\d+$", "", first.stem)
    out = Path(args.out) if args.out else first.with_name(
        f"{stem if stem != first.stem else stem + '.merged'}{first.suffix}")
    keys = ("model", "attack", "dataset", "n_examples", "seed")
    check_output(out, inputs=[(Path(p), f"the part {p}") for p in args.parts], force=args.force,
                 kind="a merged result of the same evaluation",
                 replaceable=same_run(RESULT_SCHEMA, {k: getattr(merged, k) for k in keys}))
    merged.save(out)
    print(merged.summary())
    print(f"\n{'identical to a single run' if merge['batch_exact'] else 'NOT batch-exact'}: {merge['why']}")
    print(f"merged {len(args.parts)} parts -> {out}")
    return 0


def cmd_paired(args: argparse.Namespace) -> int:
    from robustkit.eval.outputs import check_output, read_json
    from robustkit.eval.paired import PAIRED_SCHEMA, compare_results, format_comparison
    from robustkit.eval.results import write_json_atomic

    out = None
    if args.out:  # checked before reading anything: a typo costs nothing
        out = check_output(args.out, inputs=[(Path(p), f"the result {p}") for p in args.results], force=args.force,
                           kind="a paired report",
                           replaceable=lambda p: (d := read_json(p)) is not None and d.get("schema") == PAIRED_SCHEMA)
    report = compare_results(args.results, args.label)
    print(format_comparison(report))
    if out is not None:
        write_json_atomic(out, report)
        print(f"report -> {out}")
    return 0


# --------------------------------------------------------------------------- list / train / bench


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "models":
        from robustkit.models import MODEL_SOURCES, MODELS

        for entry in MODELS:
            info = entry.factory()
            tags = ", ".join(f"{info.name}.{t}" for t in sorted(info.tags)) or "(no shipped weights)"
            print(f"{info.name:<14} {info.dataset:<10} {info.description}\n{'':<14} weights: {tags}; "
                  f"random init: {info.name}.init")
        for source in MODEL_SOURCES:  # rb:<Name> and any plug-in's prefix:<id>
            print(f"{source.meta['usage']:<14} {source.description}")
    elif args.what == "attacks":
        from robustkit.attacks import ATTACKS

        for entry in ATTACKS:
            print(f"{entry.name:<16} {entry.description}")
        print(f"{'foolbox:<Name>':<16} any fixed-epsilon foolbox 3 attack, e.g. foolbox:LinfPGD")
    elif args.what == "trainers":
        from robustkit.train import list_trainers

        for trainer in list_trainers():
            print(f"{trainer.name:<20} {trainer.description}")
    else:
        from robustkit.data import DATASETS, dataset_info

        for name in DATASETS.names():
            info = dataset_info(name)
            shape = "x".join(map(str, info.shape))
            print(f"{name:<14} {info.num_classes:>3} classes  {shape:<8} {info.description}")
    return 0


def _version() -> str:
    from robustkit import __version__

    return __version__

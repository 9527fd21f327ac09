"""The ``robustkit`` command line.

Every error a user can cause ends in one line on stderr and exit code 2 (3 when an attack breaks
the threat model); progress bars go to stderr and the summary table to stdout, so
``robustkit eval ... > summary.txt`` captures just the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustkit.cli.options import add_common, apply_common, check_device_flag, progress_enabled, warn
from robustkit.core.errors import ConfigError, RobustkitError

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    add_common(rg, seed=None)
    rg.set_defaults(func=cmd_regress)

    from robustkit.cli.bench import add_parser as add_bench_parser

    add_bench_parser(sub)

    from robustkit.cli.leaderboard import add_parser as add_leaderboard_parser

    add_leaderboard_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from robustkit.core.plugins import load_plugins

    try:
        load_plugins()  # out-of-tree models, trainers and attacks register before names are looked up
    except RobustkitError as e:
        print(f"robustkit: error: {e}", file=sys.stderr)
        return e.exit_code
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "device", None) is not None:
            check_device_flag(args.device)
        with apply_common(args):
            return int(args.func(args) or 0)
    except RobustkitError as e:
        print(f"robustkit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("robustkit: interrupted; finished batches are saved — run the same command to resume",
              file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- regress


def cmd_regress(args: argparse.Namespace) -> int:
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

"""The ``robustkit`` command line.

Every error a user can cause ends in one line on stderr and exit code 2 (3 when an attack breaks
the threat model); progress bars go to stderr and the summary table to stdout, so
``robustkit eval ... > summary.txt`` captures just the table.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

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

    ev = sub.add_parser(
        "eval", help="clean and adversarial accuracy of a model, written to a result JSON",
        description="Evaluate a model: clean pass over the first N test examples (in order), then the "
        "attack on the correctly classified ones. Killed runs resume when re-run with the same --out.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("--model", required=True,
                    help="registered id (see `robustkit list models`), rb:<RobustBenchName>, or a "
                    ".safetensors checkpoint path")
    ev.add_argument("--attack", default="autoattack",
                    help="attack name (see `robustkit list attacks`), foolbox:<Name>, a preset .toml, "
                    "or 'none' for clean accuracy only (default: autoattack); a comma list, e.g. "
                    "autoattack,autoattack-adaptive, runs each on the same examples, writes one result "
                    "each (with --out R.json: R__<attack>.json) and prints the per-example worst case")
    ev.add_argument("--norm", default="Linf", help="threat norm: Linf or L2 (default: Linf)")
    ev.add_argument("--eps", default=None,
                    help="budget as a float or fraction, e.g. 8/255 (default: the dataset's convention, "
                    "CIFAR Linf 8/255, L2 0.5; MNIST Linf 0.3)")
    ev.add_argument("--attack-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="override an attack parameter (repeatable), e.g. steps=50 or random_start=true")
    ev.add_argument("--dataset", default=None,
                    help="dataset name (default: the one the model was trained on)")
    ev.add_argument("--data-file", default=None,
                    help="evaluate on your own .npz (images uint8 NHWC or float in [0,1], labels)")
    ev.add_argument("--subset", choices=["cifar", "imagenet"], default=None,
                    help="CINIC-10 only: evaluate on the CIFAR-10 or the ImageNet part, to measure the shift "
                    "between them")
    ev.add_argument("--n-examples", type=int, default=None,
                    help="first N test examples (default: 1000, or all if fewer)")
    ev.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    ev.add_argument("--no-resume", action="store_true", help="start over even if --out has records")
    ev.add_argument("--rb-model-dir", default=None,
                    help="where rb: weights live (<dir>/<dataset>/<threat>/<Name>.pt; default: "
                    "$ROBUSTKIT_RB_MODEL_DIR or ~/.cache/robustkit/robustbench)")
    add_common(ev, out="result JSON; per-example records go next to it as .records.jsonl "
               "(default: results/<model>__<attack>__<dataset>-n<N>-s<seed>.json)")
    ev.set_defaults(func=cmd_eval)

    cv = sub.add_parser(
        "curve", help="accuracy vs eps (a robustness curve), JSON + PNG, with a monotonicity check",
        description="Evaluate the attack at every eps of a grid on the same first N test examples "
        "(clean pass once). Accuracy must not rise with eps; where it does, or an example broken at a "
        "smaller eps survives a larger one, the attack failed: that is flagged and the monotone envelope "
        "(the honest upper bound) is reported next to the measured curve.",
        epilog="examples:\n  robustkit curve --model small_cnn --attack pgd --eps 0:16/255:2/255\n"
        "  robustkit curve --model small_cnn --attack apgd-ce --eps 0,2/255,4/255,8/255 --n-examples 200\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cv.add_argument("--model", required=True, help="as for eval: registered id, rb:<Name> or a checkpoint")
    cv.add_argument("--attack", default="autoattack", help="as for eval, except 'none' (default: autoattack)")
    cv.add_argument("--eps", required=True, metavar="SPEC",
                    help="start:stop:step (stop inclusive), e.g. 0:8/255:1/255, or a list, e.g. 0,2/255,4/255")
    cv.add_argument("--norm", default="Linf", help="threat norm: Linf or L2 (default: Linf)")
    cv.add_argument("--attack-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="override an attack parameter (repeatable), e.g. steps=50")
    cv.add_argument("--dataset", default=None, help="dataset name (default: the one the model was trained on)")
    cv.add_argument("--data-file", default=None, help="your own .npz (as for eval)")
    cv.add_argument("--rb-model-dir", default=None, help="where rb: weights live (as for eval)")
    cv.add_argument("--n-examples", type=int, default=None, help="first N test examples (default: 1000)")
    cv.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    cv.add_argument("--no-resume", action="store_true",
                    help="start over even if the curve's records folder (next to --out) has finished points")
    cv.add_argument("--plot", default=None, metavar="PATH.png", help="plot path (default: --out with .png)")
    add_common(cv, seed="seed, the same at every eps (default: 0)",
               out="curve JSON (default: results/curve__<model>__<attack>__<dataset>-n<N>-s<seed>.json)")
    cv.set_defaults(func=cmd_curve)

    to = sub.add_parser(
        "tradeoff", help="clean vs robust accuracy of a mixed classifier: g, h, fixed-alpha mixtures and the "
        "adaptive model (JSON + PNG + verdict)",
        description="Evaluate a MixedClassifier (Adaptive Smoothing) as g alone, h alone, each fixed-alpha "
        "mixture and the adaptive model, on the same first N test examples with the same attack and seed, "
        "and say whether the adaptive point lies above the piecewise-linear fixed-alpha curve at its clean "
        "accuracy. g and h are the curve's endpoints (alpha 0 and 1 are not re-run unless --check-endpoints). "
        "Each point keeps its own result and records under --out-dir, so a killed run resumes point by point.",
        epilog="example:\n  robustkit tradeoff --model adaptive_smoothing --alphas 0,0.25,0.5,0.75,0.9,1 "
        "--attack autoattack --n-examples 500\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    to.add_argument("--model", required=True, help="a registered MixedClassifier id, e.g. adaptive_smoothing")
    to.add_argument("--alphas", default="0,0.25,0.5,0.75,0.9,1",
                    help="fixed mixing weights in [0, 1], comma-separated (default: 0,0.25,0.5,0.75,0.9,1)")
    to.add_argument("--attack", default="autoattack", help="as for eval, except 'none' (default: autoattack)")
    to.add_argument("--norm", default="Linf", help="threat norm: Linf or L2 (default: Linf)")
    to.add_argument("--eps", default=None, help="budget, e.g. 8/255 (default: the dataset's convention)")
    to.add_argument("--attack-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="override an attack parameter (repeatable), e.g. steps=50")
    to.add_argument("--dataset", default=None, help="dataset name (default: the one the model was trained on)")
    to.add_argument("--data-file", default=None, help="your own .npz (as for eval)")
    to.add_argument("--rb-model-dir", default=None, help=argparse.SUPPRESS)
    to.add_argument("--n-examples", type=int, default=None, help="first N test examples (default: 1000)")
    to.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    to.add_argument("--check-endpoints", action="store_true",
                    help="also evaluate fixed alpha 0 and 1 (the mixed form of g and h) as a consistency check")
    to.add_argument("--out-dir", default="eval/tradeoff",
                    help="writes <model>__<attack>__n<N>.json/.png and a .points/ folder there "
                    "(default: eval/tradeoff)")
    to.add_argument("--no-resume", action="store_true", help="start over even if finished points exist")
    add_common(to, seed="seed, the same at every point (default: 0)")
    to.set_defaults(func=cmd_tradeoff)

    ck = sub.add_parser("check", help="sanity checks of an evaluation (see `robustkit check masking --help`)")
    cks = ck.add_subparsers(dest="check", metavar="CHECK", required=True)
    mk = cks.add_parser(
        "masking", help="gradient-masking checks: zero gradients, eps sweep, APGD vs Square",
        description="Is a gradient-attack robust accuracy believable? Checks (1) input gradients of the correct "
        "examples (zero / non-finite: the model hides them), (2) accuracy under APGD-CE over an eps sweep "
        "(must not rise; near 0 at 4x eps), (3) Square (black-box) vs the gradient attacks, from a standard "
        "AutoAttack result, one run here, or APGD-CE vs Square run directly. Writes a JSON report and a "
        "Markdown model-card section. Exit 0 when nothing is flagged, 1 when something is, 2 on bad input.",
        epilog="examples:\n  robustkit check masking --model small_cnn --n-examples 200\n"
        "  robustkit check masking --model small_cnn --autoattack-result results/aa.json --markdown card.md\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mk.add_argument("--model", required=True, help="as for eval: registered id, rb:<Name> or a checkpoint")
    mk.add_argument("--dataset", default=None, help="dataset name (default: the one the model was trained on)")
    mk.add_argument("--data-file", default=None, help="your own .npz (as for eval)")
    mk.add_argument("--rb-model-dir", default=None, help="where rb: weights live (as for eval)")
    mk.add_argument("--n-examples", type=int, default=200, help="first N test examples (default: 200)")
    mk.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    mk.add_argument("--norm", default="Linf", help="threat norm: Linf or L2 (default: Linf)")
    mk.add_argument("--eps", default=None, help="the claimed budget, e.g. 8/255 (default: the dataset's convention)")
    mk.add_argument("--eps-grid", default=None, metavar="SPEC",
                    help="sweep budgets, as for curve --eps (default: eps x 0,1/4,1/2,1,2,4; eps is always added)")
    mk.add_argument("--unbounded", action="store_true", help="Linf: add eps=1 to the sweep (accuracy must reach 0)")
    mk.add_argument("--attack", default="apgd-ce", help="the sweep's gradient attack (default: apgd-ce)")
    mk.add_argument("--attack-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="override a sweep attack parameter (repeatable), as for eval")
    mk.add_argument("--autoattack-result", default=None, metavar="PATH",
                    help="a standard AutoAttack result JSON of this model at this eps, for the Square gap")
    mk.add_argument("--run-autoattack", action="store_true",
                    help="run standard AutoAttack here for the Square gap (default: APGD-CE vs Square directly)")
    mk.add_argument("--square-queries", type=int, default=5000,
                    help="queries of the direct Square run (default: 5000, AutoAttack's; 0 skips that check)")
    mk.add_argument("--markdown", default=None, metavar="PATH.md", help="Markdown path (default: --out with .md)")
    add_common(mk, out="report JSON (default: results/<model>__masking__<dataset>-n<N>-s<seed>.json)")
    mk.set_defaults(func=cmd_check_masking)

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


# --------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:

    from robustkit.attacks import create_attack
    from robustkit.eval import evaluate

    device, loaded, dataset = _load_model_arg(args)

    names = [args.attack] if "," not in args.attack else [a.strip() for a in args.attack.split(",")]
    if len(names) > 1 and (any(not a or a.lower() == "none" for a in names) or len(set(names)) < len(names)):
        raise ConfigError(f"--attack {args.attack!r}: a comma list needs distinct attack names (no 'none')")
    attacks: list[Any] = [None]
    if args.attack.lower() != "none":
        params = dict(parse_attack_arg(a) for a in args.attack_arg)  # applied to every listed attack
        attacks = [create_attack(a, norm=args.norm, eps=args.eps, dataset=dataset, **params) for a in names]
        for attack in attacks:  # e.g. autoattack-adaptive on a model without forward_with_gamma
            if hasattr(attack, "check_model"):
                attack.check_model(loaded.model)
    elif args.attack_arg:
        raise ConfigError("--attack-arg needs an attack")

    x, y, data_info, dataset_name = _load_data_arg(args, loaded, dataset)

    results = []
    for name, attack in zip(names, attacks, strict=True):
        out = Path(args.out) if args.out else default_out(loaded.name, name, dataset_name, len(y), args.seed)
        if args.out and len(names) > 1:  # one result per attack beside the path given
            out = out.with_name(f"{out.stem}__{re.sub(r'[^A-Za-z0-9._+-]+', '_', name)}{out.suffix}")
        records = out.with_suffix(".records.jsonl")
        result = evaluate(
            loaded.model, attack, x, y,
            batch_size=args.batch_size, device=device, seed=args.seed,
            records_path=records, resume=not args.no_resume, progress=progress_enabled(args),
            model_name=loaded.name, attack_name=None if attack is None else name,
            dataset=dataset_name, data_info=data_info, checkpoint_sha256=loaded.checkpoint_sha256,
            model_info={k: loaded.metadata[k] for k in ("architecture", "arch_args") if k in loaded.metadata},
        )
        result.save(out)
        if results:
            print()
        print(result.summary())
        print(f"\nresult: {out}\nrecords: {records}")
        results.append(result)
    if len(results) > 1:
        print("\n" + _attack_comparison(results))
    return 0


def _attack_comparison(results: list[Any]) -> str:
    """One line: robust accuracy per attack and the number to report, the per-example worst case (an
    example is robust only if no attack broke it; never above the minimum over attacks)."""
    accs = [r.robust_accuracy for r in results]
    worst = min(range(len(results)), key=lambda i: accs[i])
    flags = [r.robust_flags for r in results]
    per_example = sum(all(f[i] == "1" for f in flags) for i in range(len(flags[0]))) / len(flags[0])
    each = " | ".join(f"{r.attack} {100 * a:.2f}%" for r, a in zip(results, accs, strict=True))
    return (f"robust accuracy by attack: {each} -> report {100 * per_example:.2f}% "
            f"(per-example worst case; the strongest single attack, {results[worst].attack}, "
            f"gives {100 * accs[worst]:.2f}%)")


def _load_model_arg(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """Checks, device and model shared by eval and curve: (device, LoadedModel, dataset name)."""
    from robustkit.core.provenance import require_device
    from robustkit.models import load_model

    if args.n_examples is not None and args.n_examples < 1:
        raise ConfigError(f"--n-examples must be >= 1, got {args.n_examples}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = require_device(args.device)
    model_kwargs: dict[str, Any] = {}
    if args.model.startswith("rb:"):
        model_kwargs = {"dataset": args.dataset or "cifar10", "threat_model": args.norm,
                        "model_dir": args.rb_model_dir, "download": not args.no_download}
    loaded = load_model(args.model, device=device, **model_kwargs)
    return device, loaded, args.dataset or loaded.dataset or "cifar10"


def _load_data_arg(args: argparse.Namespace, loaded: Any, dataset: str) -> tuple[Any, Any, dict[str, Any], str]:
    """The first N examples shared by eval and curve: (x, y, data_info, dataset name)."""
    from robustkit.data import DataError, dataset_info, load_array_file, load_split

    subset = getattr(args, "subset", None)
    if args.data_file and subset:
        raise ConfigError("--subset picks part of a registered dataset (cinic10); "
                          "it does not apply to --data-file")
    if args.data_file:
        x, y = load_array_file(args.data_file)
        if args.n_examples is not None:
            if args.n_examples > len(y):
                raise DataError(f"--n-examples {args.n_examples} exceeds the {len(y)} examples in {args.data_file}")
            x, y = x[: args.n_examples], y[: args.n_examples]
        data_info = {"source": str(args.data_file), "split": "file", "n_available": int(x.shape[0])}
        dataset_name = Path(args.data_file).stem
    else:
        dataset_info(dataset)  # unknown names fail here with close matches
        split = load_split(dataset, "test", data_dir=args.data_dir, download=not args.no_download,
                           subset=subset, progress=progress_enabled(args))
        n = args.n_examples if args.n_examples is not None else min(1000, len(split))
        x, y = split.tensors(n)
        data_info = {"source": split.source, "split": "test", "n_available": len(split),
                     "indices": "first-n", "fingerprint": split.fingerprint(n)}
        if split.subset is not None:
            data_info["subset"] = split.subset
        if split.n_duplicates is not None:  # exact repeats within a class among the examples evaluated
            data_info["duplicates"] = int(split.extra["duplicate"][:n].sum())
        dataset_name = dataset
    if loaded.num_classes is not None and int(y.max()) >= loaded.num_classes:
        raise ConfigError(f"labels go up to {int(y.max())} but {args.model} has {loaded.num_classes} classes: "
                          f"is --dataset {dataset_name} the data it was trained for?")
    return x, y, data_info, dataset_name


def cmd_curve(args: argparse.Namespace) -> int:
    """Load like eval, then hand over to robustkit.eval.curve (where the logic lives)."""
    import warnings

    from robustkit.attacks import create_attack
    from robustkit.eval.curve import CurveWarning, parse_eps_spec, robustness_curve

    grid = parse_eps_spec(args.eps)
    if args.attack.lower() == "none":
        raise ConfigError("a curve needs an attack (--attack none gives clean accuracy only: use eval)")
    device, loaded, dataset = _load_model_arg(args)
    params = dict(parse_attack_arg(a) for a in args.attack_arg)

    def factory(eps: float) -> Any:
        return create_attack(args.attack, norm=args.norm, eps=eps, dataset=dataset, **params)

    factory(next(e for e in grid if e > 0))  # a bad attack name or parameter fails before data loads
    x, y, data_info, dataset_name = _load_data_arg(args, loaded, dataset)
    eval_out = default_out(loaded.name, args.attack, dataset_name, len(y), args.seed)
    out = Path(args.out) if args.out else eval_out.with_name(f"curve__{eval_out.name}")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    records_dir = out.with_suffix(".records")
    if args.no_resume and records_dir.exists():
        shutil.rmtree(records_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurveWarning)  # printed below as one line each
        curve = robustness_curve(
            loaded.model, factory, grid, x, y,
            batch_size=args.batch_size, device=device, seed=args.seed, progress=progress_enabled(args),
            model_name=loaded.name, attack_name=args.attack, dataset=dataset_name, data_info=data_info,
            checkpoint_sha256=loaded.checkpoint_sha256,
            model_info={k: loaded.metadata[k] for k in ("architecture", "arch_args") if k in loaded.metadata},
            records_dir=records_dir,
        )
    curve.save(out)
    curve.plot(plot)
    print(curve.summary())
    print(f"\ncurve: {out}\nplot: {plot}\nrecords: {records_dir}/ (a killed run resumes from them)")
    for msg in curve.warnings:
        print(f"robustkit: warning: {msg}", file=sys.stderr)
    return 0


def cmd_tradeoff(args: argparse.Namespace) -> int:
    """Load like eval, then hand over to robustkit.eval.tradeoff (where the logic lives)."""
    import shlex

    from robustkit.attacks import create_attack
    from robustkit.eval.tradeoff import accuracy_tradeoff, parse_alphas, require_mixed, tradeoff_stem

    alphas = parse_alphas(args.alphas)
    if args.attack.lower() == "none":
        raise ConfigError("a trade-off needs an attack (--attack none gives clean accuracy only: use eval)")
    if "," in args.attack:
        raise ConfigError("tradeoff takes one --attack per run (run it once per attack)")
    device, loaded, dataset = _load_model_arg(args)
    require_mixed(loaded.model, loaded.name)
    params = dict(parse_attack_arg(a) for a in args.attack_arg)

    def factory() -> Any:
        return create_attack(args.attack, norm=args.norm, eps=args.eps, dataset=dataset, **params)

    factory()  # a bad attack name or parameter fails before data loads
    x, y, data_info, dataset_name = _load_data_arg(args, loaded, dataset)
    stem = tradeoff_stem(loaded.name, args.attack, len(y))
    out = Path(args.out_dir) / f"{stem}.json"
    points_dir = Path(args.out_dir) / f"{stem}.points"
    if args.no_resume and points_dir.exists():
        shutil.rmtree(points_dir)
    # every option spelled out, defaults included: re-running this line reproduces the run
    argv = ["--model", args.model, "--alphas", ",".join(f"{a:g}" for a in alphas), "--attack", args.attack,
            "--norm", args.norm, *(["--eps", args.eps] if args.eps else []),
            *[f"--attack-arg={a}" for a in args.attack_arg], "--dataset", dataset, *(["--data-dir", args.data_dir] if args.data_dir else []),
            *(["--data-file", args.data_file] if args.data_file else []), "--n-examples", str(len(y)),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", args.device,
            *(["--check-endpoints"] if args.check_endpoints else []), "--out-dir", args.out_dir]
    result = accuracy_tradeoff(
        loaded.model, factory, alphas, x, y, points_dir=points_dir, check_endpoints=args.check_endpoints,
        command="robustkit tradeoff " + shlex.join(argv),
        batch_size=args.batch_size, device=device, seed=args.seed, progress=progress_enabled(args),
        model_name=loaded.name, attack_name=args.attack, dataset=dataset_name, data_info=data_info,
        checkpoint_sha256=loaded.checkpoint_sha256,
        model_info={k: loaded.metadata[k] for k in ("architecture", "arch_args") if k in loaded.metadata},
    )
    result.save(out)
    plot = result.plot(out.with_suffix(".png"))
    print(result.summary())
    print(f"\ntradeoff: {out}\nplot: {plot}\npoints: {points_dir}/ (a killed run resumes from them)")
    for msg in result.warnings:
        print(f"robustkit: warning: {msg}", file=sys.stderr)
    return 0


def cmd_check_masking(args: argparse.Namespace) -> int:
    """Load like eval, then hand over to robustkit.eval.masking; exit 1 when anything is flagged."""
    from robustkit.attacks import create_attack
    from robustkit.core.threat import ThreatModel
    from robustkit.eval.masking import masking_report, render_markdown, save_report, sweep_grid

    if args.autoattack_result and args.run_autoattack:
        raise ConfigError("--autoattack-result and --run-autoattack do not combine")
    params = dict(parse_attack_arg(a) for a in args.attack_arg)
    device, loaded, dataset = _load_model_arg(args)
    threat = ThreatModel.create(args.norm, args.eps, dataset)
    sweep_grid(threat, args.eps_grid, unbounded=args.unbounded)  # a bad grid or attack fails before data loads
    create_attack(args.attack, norm=threat.norm, eps=threat.eps, **params)
    x, y, data_info, dataset_name = _load_data_arg(args, loaded, dataset)
    out = Path(args.out) if args.out else default_out(loaded.name, "masking", dataset_name, len(y), args.seed)
    md = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    report = masking_report(
        loaded.model, x, y, eps=threat.eps, norm=threat.norm, device=device, eps_grid=args.eps_grid,
        unbounded=args.unbounded, sweep_attack=args.attack, sweep_params=params,
        autoattack_result=args.autoattack_result, run_autoattack=args.run_autoattack,
        square_queries=args.square_queries, batch_size=args.batch_size, seed=args.seed,
        progress=progress_enabled(args), model_name=loaded.name, dataset=dataset_name, data_info=data_info,
        checkpoint_sha256=loaded.checkpoint_sha256,
    )
    save_report(report, out)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(render_markdown(report))
    print(render_markdown(report))
    print(f"report: {out}\nmarkdown: {md}")
    for flag in report["flags"]:
        print(f"robustkit: warning: {flag['check']}: {flag['message']}", file=sys.stderr)
    return 1 if report["flagged"] else 0


def parse_attack_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a TOML value (numbers, booleans, lists), else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise ConfigError(f"--attack-arg {text!r}: write KEY=VALUE, e.g. steps=50")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def default_out(model: str, attack: str, dataset: str, n: int, seed: int) -> Path:
    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", Path(s).stem if s.endswith((".safetensors", ".toml")) else s)

    return Path("results") / f"{clean(model)}__{clean(attack)}__{clean(dataset)}-n{n}-s{seed}.json"


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
        from robustkit.models import MODELS

        for entry in MODELS:
            info = entry.factory()
            tags = ", ".join(f"{info.name}.{t}" for t in sorted(info.tags)) or "(no shipped weights)"
            print(f"{info.name:<14} {info.dataset:<10} {info.description}\n{'':<14} weights: {tags}; "
                  f"random init: {info.name}.init")
        print("rb:<Name>      any RobustBench model-zoo entry (weights from --rb-model-dir)")
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

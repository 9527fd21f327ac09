"""The eval-side commands: ``eval``, ``curve``, ``tradeoff`` and ``check masking``.

Each reads straight down: parse -> :func:`load_subject` (the model, its attack factory and the
first N examples, checked in that order so a bad name fails before any data loads, plus the
:class:`~robustkit.eval.Subject` every result records) -> the eval function
(:func:`robustkit.eval.evaluate`, :func:`~robustkit.eval.curve.robustness_curve`,
:func:`~robustkit.eval.tradeoff.accuracy_tradeoff`, :func:`~robustkit.eval.masking.masking_report`)
-> print and save. The flags every command shares come from :mod:`robustkit.cli.options`.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustkit.cli.options import add_common, progress_enabled, warn
from robustkit.core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from robustkit.attacks.base import Attack
    from robustkit.core.threat import ThreatModel
    from robustkit.eval.subject import Subject
    from robustkit.models.base import LoadedModel


def add_parsers(sub: argparse._SubParsersAction, epilog: str) -> None:
    """The four eval-side subcommands; ``epilog`` is eval's examples (the top-level ones)."""
    _add_eval(sub, epilog)
    _add_curve(sub)
    _add_tradeoff(sub)
    _add_check(sub)


def _add_subject_flags(p: argparse.ArgumentParser, *, model: str, attack: str, eps: dict[str, Any],
                       attack_default: str = "autoattack", attack_arg: str = "override an attack parameter "
                       "(repeatable), e.g. steps=50", data_file: str = "your own .npz (as for eval)",
                       n_examples: int | None = None, n_help: str = "first N test examples (default: 1000)",
                       rb_model_dir: str = "where rb: weights live (as for eval)") -> None:
    """The flags :func:`load_subject` reads (model, attack, data), defined once for the four commands;
    the help texts are the command's own (eval's in full, the others refer to it)."""
    p.add_argument("--model", required=True, help=model)
    p.add_argument("--attack", default=attack_default, help=attack)
    p.add_argument("--norm", default="Linf", help="threat norm: Linf or L2 (default: Linf)")
    p.add_argument("--eps", **eps)
    p.add_argument("--attack-arg", action="append", default=[], metavar="KEY=VALUE", help=attack_arg)
    p.add_argument("--dataset", default=None, help="dataset name (default: the one the model was trained on)")
    p.add_argument("--data-file", default=None, help=data_file)
    p.add_argument("--n-examples", type=int, default=n_examples, help=n_help)
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    p.add_argument("--rb-model-dir", default=None, help=rb_model_dir)
    p.add_argument("--compile", action="store_true",
                   help="run the model through torch.compile: about 2x faster forward passes on a CPU after a "
                   "minute or two of compiling; logits equal to float rounding; recorded in the provenance")


def _add_eval(sub: argparse._SubParsersAction, epilog: str) -> None:
    ev = sub.add_parser(
        "eval", help="clean and adversarial accuracy of a model, written to a result JSON",
        description="Evaluate a model: clean pass over the first N test examples (in order), then the "
        "attack on the correctly classified ones. Killed runs resume when re-run with the same --out.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_subject_flags(
        ev, model="registered id (see `robustkit list models`), rb:<RobustBenchName>, or a .safetensors "
        "checkpoint path",
        attack="attack name (see `robustkit list attacks`), foolbox:<Name>, a preset .toml, or 'none' for clean "
        "accuracy only (default: autoattack); a comma list, e.g. autoattack,autoattack-adaptive, runs each on "
        "the same examples, writes one result each (with --out R.json: R__<attack>.json) and prints the "
        "per-example worst case",
        eps={"default": None, "help": "budget as a float or fraction, e.g. 8/255 (default: the dataset's "
             "convention, CIFAR Linf 8/255, L2 0.5; MNIST Linf 0.3)"},
        attack_arg="override an attack parameter (repeatable), e.g. steps=50 or random_start=true",
        data_file="evaluate on your own .npz (images uint8 NHWC or float in [0,1], labels)",
        n_help="first N test examples (default: 1000, or all if fewer)",
        rb_model_dir="where rb: weights live (<dir>/<dataset>/<threat>/<Name>.pt; default: "
        "$ROBUSTKIT_RB_MODEL_DIR or ~/.cache/robustkit/robustbench)",
    )
    ev.add_argument("--subset", choices=["cifar", "imagenet"], default=None,
                    help="CINIC-10 only: evaluate on the CIFAR-10 or the ImageNet part, to measure the shift "
                    "between them")
    ev.add_argument("--client", type=int, default=None, metavar="K",
                    help="federated models (fedloge): evaluate client K's personalised model on its local test set")
    ev.add_argument("--no-resume", action="store_true", help="start over even if --out has records")
    ev.add_argument("--fixed-alpha", type=float, default=None, metavar="A",
                    help="mixed classifiers (adaptive smoothing): evaluate the fixed mixture of g and h with weight "
                    "A in [0, 1] instead of the mixing network's alpha(x), named <model>:alpha_<A> as `robustkit "
                    "tradeoff` names its points (so a sharded, merged run can be one of its points)")
    ev.add_argument("--shard", default=None, metavar="I/N",
                    help="evaluate only part I (0-based) of N contiguous parts of the examples, with no "
                    "communication (a job array); `robustkit merge` joins the parts' results. Under torchrun "
                    "no flag is needed: the ranks share the batches themselves")
    add_common(ev, out="result JSON; per-example records go next to it as .records.jsonl "
               "(default: results/<model>__<attack>__<dataset>-n<N>-s<seed>.json)", force=True)
    ev.set_defaults(func=cmd_eval)


def _add_curve(sub: argparse._SubParsersAction) -> None:
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
    _add_subject_flags(
        cv, model="as for eval: registered id, rb:<Name> or a checkpoint",
        attack="as for eval, except 'none' (default: autoattack)",
        eps={"required": True, "metavar": "SPEC", "help": "start:stop:step (stop inclusive), e.g. "
             "0:8/255:1/255, or a list, e.g. 0,2/255,4/255"},
    )
    cv.add_argument("--no-resume", action="store_true",
                    help="start over even if the curve's records folder (next to --out) has finished points")
    cv.add_argument("--plot", default=None, metavar="PATH.png", help="plot path (default: --out with .png)")
    add_common(cv, seed="seed, the same at every eps (default: 0)",
               out="curve JSON (default: results/curve__<model>__<attack>__<dataset>-n<N>-s<seed>.json)",
               force=True)
    cv.set_defaults(func=cmd_curve)


def _add_tradeoff(sub: argparse._SubParsersAction) -> None:
    to = sub.add_parser(
        "tradeoff", help="clean vs robust accuracy of a mixed classifier: g, h, fixed-alpha mixtures and the "
        "adaptive model (JSON + PNG + verdict)",
        description="Evaluate a MixedClassifier (Adaptive Smoothing) as g alone, h alone, each fixed-alpha "
        "mixture and the adaptive model, on the same first N test examples with the same attack and seed, "
        "and say whether the adaptive point lies above the piecewise-linear fixed-alpha curve at its clean "
        "accuracy. g and h are the curve's endpoints (alpha 0 and 1 are not re-run unless --check-endpoints). "
        "Each point keeps its own result and records under --out-dir, so a killed run resumes point by point, "
        "and the same command started twice (two cores) shares the points: the one that ends first exits 3, "
        "the other (or a re-run) writes the figure.",
        epilog="example:\n  robustkit tradeoff --model adaptive_smoothing --alphas 0,0.25,0.5,0.75,0.9,1 "
        "--attack autoattack --n-examples 500\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_subject_flags(
        to, model="a registered MixedClassifier id, e.g. adaptive_smoothing",
        attack="as for eval, except 'none' (default: autoattack)",
        eps={"default": None, "help": "budget, e.g. 8/255 (default: the dataset's convention)"},
        rb_model_dir=argparse.SUPPRESS,
    )
    to.add_argument("--alphas", default="0,0.25,0.5,0.75,0.9,1",
                    help="fixed mixing weights in [0, 1], comma-separated (default: 0,0.25,0.5,0.75,0.9,1)")
    to.add_argument("--check-endpoints", action="store_true",
                    help="also evaluate fixed alpha 0 and 1 (the mixed form of g and h) as a consistency check")
    to.add_argument("--paired", action="store_true",
                    help="also evaluate the largest fixed alpha at least as accurate as the adaptive model "
                         "(found on clean images, no attack) and test the adaptive model against it, paired "
                         "per image (exact McNemar on robust flags)")
    to.add_argument("--endpoint-result", action="append", default=[], metavar="g|h=RESULT",
                    help="an existing `robustkit eval` result of the base g or h alone (same images, attack, "
                         "seed; shards merged) used as that endpoint instead of attacking it again")
    to.add_argument("--out-dir", default="eval/tradeoff",
                    help="writes <model>__<attack>__n<N>.json/.png and a .points/ folder there "
                    "(default: eval/tradeoff)")
    to.add_argument("--no-resume", action="store_true", help="start over even if finished points exist")
    add_common(to, seed="seed, the same at every point (default: 0)", force=True)
    to.set_defaults(func=cmd_tradeoff)


def _add_check(sub: argparse._SubParsersAction) -> None:
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
    _add_subject_flags(
        mk, model="as for eval: registered id, rb:<Name> or a checkpoint",
        attack="the sweep's gradient attack (default: apgd-ce)", attack_default="apgd-ce",
        eps={"default": None, "help": "the claimed budget, e.g. 8/255 (default: the dataset's convention)"},
        attack_arg="override a sweep attack parameter (repeatable), as for eval",
        n_examples=200, n_help="first N test examples (default: 200)",
    )
    mk.add_argument("--eps-grid", default=None, metavar="SPEC",
                    help="sweep budgets, as for curve --eps (default: eps x 0,1/4,1/2,1,2,4; eps is always added)")
    mk.add_argument("--unbounded", action="store_true", help="Linf: add eps=1 to the sweep (accuracy must reach 0)")
    mk.add_argument("--autoattack-result", default=None, metavar="PATH",
                    help="a standard AutoAttack result JSON of this model at this eps, for the Square gap")
    mk.add_argument("--run-autoattack", action="store_true",
                    help="run standard AutoAttack here for the Square gap (default: APGD-CE vs Square directly)")
    mk.add_argument("--square-queries", type=int, default=5000,
                    help="queries of the direct Square run (default: 5000, AutoAttack's; 0 skips that check)")
    mk.add_argument("--markdown", default=None, metavar="PATH.md", help="Markdown path (default: --out with .md)")
    add_common(mk, out="report JSON (default: results/<model>__masking__<dataset>-n<N>-s<seed>.json)",
               force=True)
    mk.set_defaults(func=cmd_check_masking)


# --------------------------------------------------------------------------- the shared load step


@dataclass(frozen=True)
class AttackFactory:
    """The command's attack: --attack, --norm, --eps and --attack-arg, with the dataset's default eps."""

    name: str
    norm: str
    eps: str | None
    dataset: str  # the model's dataset, whose convention sets the default eps
    params: dict[str, Any]

    def __call__(self, name: str | None = None, eps: float | str | None = None) -> Attack:
        """A fresh attack (another name or eps than the command's when given)."""
        from robustkit.attacks import create_attack

        return create_attack(name or self.name, norm=self.norm, eps=self.eps if eps is None else eps,
                             dataset=self.dataset, **self.params)

    def threat(self) -> ThreatModel:
        """The threat model the command's flags describe."""
        from robustkit.core.threat import ThreatModel

        return ThreatModel.create(self.norm, self.eps, self.dataset)


@dataclass
class EvalInputs:
    """What an eval-side command works on, loaded once."""

    model: nn.Module
    device: torch.device
    attack: AttackFactory
    x: torch.Tensor
    y: torch.Tensor
    subject: Subject  # what every result of this command records as evaluated


def load_subject(args: argparse.Namespace,
                 check: Callable[[AttackFactory, LoadedModel], object] | None = None) -> EvalInputs:
    """Model, attack factory and the first N examples, in that order: ``check(attack, loaded)`` runs
    before the data loads, so a bad attack name or parameter costs no data loading."""
    from robustkit.core.provenance import require_device
    from robustkit.distributed import main_first
    from robustkit.eval.inputs import check_model_data, expected_input_shape
    from robustkit.eval.subject import Subject
    from robustkit.models import load_model
    from robustkit.models.base import model_source

    if args.n_examples is not None and args.n_examples < 1:
        raise ConfigError(f"--n-examples must be >= 1, got {args.n_examples}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    params = dict(parse_attack_arg(a) for a in args.attack_arg)  # applied to every attack built
    if args.dataset and not args.data_file:  # a typo is an unknown dataset, not a missing default eps
        from robustkit.data import dataset_info

        dataset_info(args.dataset)
    device = require_device(args.device)
    client = getattr(args, "client", None)
    if client is not None:
        from robustkit.federated.checkpoints import client_checkpoint

        args.model = str(client_checkpoint(args.model, client))
    options: dict[str, Any] = {}
    if model_source(args.model) is not None:  # a foreign zoo: which benchmark, where its weights live
        options = {"dataset": args.dataset or "cifar10", "threat_model": args.norm,
                   "model_dir": args.rb_model_dir, "download": not args.no_download}
    with main_first():  # a first download (rb: weights, the dataset) happens once, on rank 0
        loaded = load_model(args.model, device=device, **options)
    dataset = args.dataset or loaded.dataset or "cifar10"
    attack = AttackFactory(args.attack, args.norm, args.eps, dataset, params)
    if check is not None:
        check(attack, loaded)
    if client is not None:
        from robustkit.federated.checkpoints import local_test_examples

        x, y, data_info, dataset_name = local_test_examples(loaded, args, dataset)
    else:
        with main_first():
            x, y, data_info, dataset_name = _load_examples(args, dataset)
    other_dataset = check_model_data(loaded, x, y, data_name=dataset_name,
                                     dataset=None if args.data_file else dataset)  # refuses a mismatch
    if other_dataset:
        warn(other_dataset)
    subject = Subject.from_loaded(loaded, dataset=dataset_name, data_info=data_info)
    shape = expected_input_shape(loaded)
    if shape is not None:  # recorded, and every evaluate() of this subject checks its images against it
        subject = replace(subject, model_info={**subject.model_info, "input_shape": list(shape)})
    return EvalInputs(loaded.model, device, attack, x, y, subject)


def _load_examples(args: argparse.Namespace, dataset: str) -> tuple[Any, Any, dict[str, Any], str]:
    """The first N examples of --data-file or the dataset's test split: (x, y, data_info, name)."""
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
        return x, y, data_info, Path(args.data_file).stem
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
    return x, y, data_info, dataset


# --------------------------------------------------------------------------- the commands


def cmd_eval(args: argparse.Namespace) -> int:
    """One result per attack of the (comma) list, all on the same examples."""
    from robustkit.distributed import current
    from robustkit.eval import evaluate
    from robustkit.eval.lock import locked
    from robustkit.eval.outputs import check_early
    from robustkit.eval.records import rank_path

    names = [args.attack] if "," not in args.attack else [a.strip() for a in args.attack.split(",")]
    if len(names) > 1 and (any(not a or a.lower() == "none" for a in names) or len(set(names)) < len(names)):
        raise ConfigError(f"--attack {args.attack!r}: a comma list needs distinct attack names (no 'none')")
    attacks: list[Any] = [None]

    def build(attack: AttackFactory, loaded: LoadedModel) -> None:
        if args.fixed_alpha is not None:
            from robustkit.eval.tradeoff import parse_alphas, require_mixed

            require_mixed(loaded.model, loaded.name)
            parse_alphas([args.fixed_alpha])  # in [0, 1], one line otherwise
            loaded.model = loaded.model.fixed_alpha(args.fixed_alpha)
        if args.attack.lower() == "none":
            if args.attack_arg:
                raise ConfigError("--attack-arg needs an attack")
            return
        attacks[:] = [attack(a) for a in names]
        for a in attacks:  # e.g. autoattack-adaptive on a model without forward_with_gamma
            if hasattr(a, "check_model"):
                a.check_model(loaded.model)

    if args.out:  # an output that cannot be written or would destroy an input fails before anything loads
        check_early(args, [(p, "--out") for a in names for p in _eval_paths(args, a, len(names), None)])
    shard = parse_shard(args.shard) if args.shard else None
    s = load_subject(args, check=build)
    if args.fixed_alpha is not None:  # the name a trade-off gives this point (robustkit.eval.tradeoff)
        s = replace(s, subject=s.subject.renamed(f"{s.subject.model}:alpha_{args.fixed_alpha:.6g}"))
    outs = [_eval_paths(args, a, len(names), s)[0] for a in names]
    fresh = [_check_eval_output(args, s, None if attack is None else name, out)  # --force over another run
             for name, attack, out in zip(names, attacks, outs, strict=True)]
    results = []
    job = current()
    with contextlib.ExitStack() as held:  # every records file is ours before the first batch runs
        for out in outs:  # in a torchrun job each rank writes (and locks) its own records file
            held.enter_context(locked(rank_path(out.with_suffix(".records.jsonl"), job.rank if job else 0)))
        for name, attack, out, start_over in zip(names, attacks, outs, fresh, strict=True):
            records = out.with_suffix(".records.jsonl")
            result = evaluate(s.model, attack, s.x, s.y, subject=s.subject,
                              attack_name=None if attack is None else name, batch_size=args.batch_size,
                              device=s.device, seed=args.seed, records_path=records,
                              resume=not (args.no_resume or start_over), replace_other_records=args.force,
                              progress=progress_enabled(args),
                              shard=shard, compile=args.compile)
            result.save(out)
            if results:
                print()
            print(result.summary())
            print(f"\nresult: {out}\nrecords: {records}")
            results.append(result)
    if len(results) > 1:
        print("\n" + _attack_comparison(results))
    return 0


def _eval_paths(args: argparse.Namespace, name: str, n_attacks: int, s: EvalInputs | None) -> list[Path]:
    """An attack's result and records path (``s`` None: only --out is known, before loading)."""
    if args.out:
        out = Path(args.out)
        if n_attacks > 1:  # one result per attack beside the path given
            out = out.with_name(f"{out.stem}__{re.sub(r'[^A-Za-z0-9._+-]+', '_', name)}{out.suffix}")
    else:
        assert s is not None
        out = default_out(s.subject.model, name, s.subject.dataset, len(s.y), args.seed)
        if args.shard:  # parts of one evaluation side by side: <stem>.shard<I>of<N>.json
            i, parts = parse_shard(args.shard)
            out = out.with_name(f"{out.stem}.shard{i}of{parts}{out.suffix}")
    return [out, out.with_suffix(".records.jsonl")]


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard I/N``: part I (0-based, as Slurm's $SLURM_ARRAY_TASK_ID with --array=0-(N-1)) of N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(2)) > int(m.group(1)) >= 0:
        raise ConfigError(f"--shard {text!r}: write I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4")
    return int(m.group(1)), int(m.group(2))


def _check_eval_output(args: argparse.Namespace, s: EvalInputs, attack: str | None, out: Path) -> bool:
    """An existing result is replaced only when it is one of this evaluation (which a resume may
    rewrite) or with --force; records only when they are robustkit records (resume checks whose).
    True when --force replaces another evaluation's result: its records beside it start over too."""
    from robustkit.eval.outputs import check_output, command_inputs, data_inputs, is_records_file, same_run
    from robustkit.eval.results import RESULT_SCHEMA

    inputs = command_inputs(args) + data_inputs(s.subject.data_info)
    from robustkit.eval.harness import shard_examples

    n = len(shard_examples(len(s.y), parse_shard(args.shard) if args.shard else None))
    fields = {"model": s.subject.name_for(s.model), "attack": attack, "dataset": s.subject.dataset,
              "n_examples": n, "seed": args.seed}
    ours = same_run(RESULT_SCHEMA, fields)
    check_output(out, inputs=inputs, force=args.force, kind="a result of this evaluation", replaceable=ours)
    check_output(out.with_suffix(".records.jsonl"), inputs=inputs, force=args.force,
                 kind="a robustkit records file", replaceable=is_records_file)
    return out.exists() and not ours(out)


def _attack_comparison(results: list[Any]) -> str:
    """One line: robust accuracy per attack and the number to report, the per-example worst case (an
    example is robust only if no attack broke it; never above the minimum over attacks)."""
    accs = [r.robust_accuracy for r in results]
    worst = min(range(len(results)), key=lambda i: accs[i])
    from robustkit.eval.paired import per_example_worst

    worst_flags = per_example_worst([r.robust_flags for r in results])
    per_example = sum(worst_flags) / len(worst_flags)
    each = " | ".join(f"{r.attack} {100 * a:.2f}%" for r, a in zip(results, accs, strict=True))
    return (f"robust accuracy by attack: {each} -> report {100 * per_example:.2f}% "
            f"(per-example worst case; the strongest single attack, {results[worst].attack}, "
            f"gives {100 * accs[worst]:.2f}%)")


def cmd_curve(args: argparse.Namespace) -> int:
    """The attack at every eps of the grid (robustkit.eval.curve holds the logic)."""
    import warnings

    from robustkit.eval.curve import CURVE_SCHEMA, CurveWarning, parse_eps_spec, robustness_curve
    from robustkit.eval.outputs import check_early, is_png

    grid = parse_eps_spec(args.eps)
    if args.attack.lower() == "none":
        raise ConfigError("a curve needs an attack (--attack none gives clean accuracy only: use eval)")
    if args.out or args.plot:  # unwritable outputs fail before anything loads
        check_early(args, _given_outputs(args.out, ("--plot", args.plot), ".png"),
                    folders=[Path(args.out).with_suffix(".records")] if args.out else [])
    # a bad attack name or parameter fails before data loads
    s = load_subject(args, check=lambda attack, _: attack(eps=next(e for e in grid if e > 0)))
    eval_out = default_out(s.subject.model, args.attack, s.subject.dataset, len(s.y), args.seed)
    out = Path(args.out) if args.out else eval_out.with_name(f"curve__{eval_out.name}")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    records_dir = out.with_suffix(".records")
    _check_report_outputs(args, s, out, CURVE_SCHEMA, {"attack": args.attack},
                          [(plot, "--plot" if args.plot else "--out", "plot", is_png)], [records_dir])
    _start_over(args.no_resume, records_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CurveWarning)  # printed below as one line each
        curve = robustness_curve(s.model, lambda eps: s.attack(eps=eps), grid, s.x, s.y, subject=s.subject,
                                 attack_name=args.attack, batch_size=args.batch_size, device=s.device,
                                 seed=args.seed, progress=progress_enabled(args), records_dir=records_dir,
                                 compile=args.compile)
    curve.save(out)
    curve.plot(plot)
    print(curve.summary())
    print(f"\ncurve: {out}\nplot: {plot}\nrecords: {records_dir}/ (a killed run resumes from them)")
    for msg in curve.warnings:
        print(f"robustkit: warning: {msg}", file=sys.stderr)
    return 0


def cmd_tradeoff(args: argparse.Namespace) -> int:
    """g, h, fixed-alpha mixtures and the adaptive model (robustkit.eval.tradeoff holds the logic)."""
    from robustkit.eval.outputs import check_early, is_png
    from robustkit.eval.tradeoff import (
        TRADEOFF_SCHEMA,
        PointsInProgress,
        accuracy_tradeoff,
        parse_alphas,
        require_mixed,
        tradeoff_stem,
    )

    alphas = parse_alphas(args.alphas)
    if args.attack.lower() == "none":
        raise ConfigError("a trade-off needs an attack (--attack none gives clean accuracy only: use eval)")
    if "," in args.attack:
        raise ConfigError("tradeoff takes one --attack per run (run it once per attack)")

    def check(attack: AttackFactory, loaded: LoadedModel) -> None:
        require_mixed(loaded.model, loaded.name)
        attack()  # a bad attack name or parameter fails before data loads

    check_early(args, [], folders=[Path(args.out_dir)], flag="--out-dir")  # before anything loads
    endpoint_paths = _endpoint_flags(args.endpoint_result)
    s = load_subject(args, check=check)
    endpoints = {label: (path, _base_sha256(s.model, label)) for label, path in endpoint_paths.items()}
    stem = tradeoff_stem(s.subject.model, args.attack, s.subject.dataset, len(s.y), args.seed)
    out = Path(args.out_dir) / f"{stem}.json"
    points_dir = Path(args.out_dir) / f"{stem}.points"
    _check_report_outputs(args, s, out, TRADEOFF_SCHEMA, {"attack": args.attack},
                          [(out.with_suffix(".png"), "--out-dir", "plot", is_png)], [points_dir],
                          flag="--out-dir")
    _start_over(args.no_resume, points_dir)
    try:
        result = accuracy_tradeoff(
            s.model, s.attack, alphas, s.x, s.y, subject=s.subject, points_dir=points_dir,
            check_endpoints=args.check_endpoints, paired=args.paired, command=_tradeoff_command(args, alphas, s),
            endpoint_results=endpoints, attack_name=args.attack, batch_size=args.batch_size, device=s.device, seed=args.seed,
            progress=progress_enabled(args), compile=args.compile,
        )
    except PointsInProgress as e:  # not an error: this process's share is done
        print(f"robustkit: {e}", file=sys.stderr)
        return e.exit_code
    result.save(out)
    plot = result.plot(out.with_suffix(".png"))
    print(result.summary())
    print(f"\ntradeoff: {out}\nplot: {plot}\npoints: {points_dir}/ (a killed run resumes from them)")
    for msg in result.warnings:
        print(f"robustkit: warning: {msg}", file=sys.stderr)
    return 0


def _endpoint_flags(items: list[str]) -> dict[str, str]:
    """``--endpoint-result g=PATH`` / ``h=PATH`` as {label: path}; one line and exit 2 otherwise."""
    out: dict[str, str] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or label.strip() not in ("g", "h") or not path.strip():
            raise ConfigError(f"--endpoint-result takes g=RESULT or h=RESULT, got {item!r}")
        if label.strip() in out:
            raise ConfigError(f"--endpoint-result {label.strip()} given twice")
        out[label.strip()] = path.strip()
    return out


def _base_sha256(model: nn.Module, label: str) -> str:
    """The checkpoint sha256 of the composite's base g or h (an imported endpoint must be of that file)."""
    from robustkit.models import load_model

    base = (getattr(model, "arch_args", None) or {}).get("std" if label == "g" else "robust")
    if not base:
        raise ConfigError(f"--endpoint-result {label}: this composite does not record which model its {label} is")
    sha = load_model(base).checkpoint_sha256
    if not sha:
        raise ConfigError(f"--endpoint-result {label}: its base {base!r} has no checkpoint to check the result against")
    return sha


def _tradeoff_command(args: argparse.Namespace, alphas: list[float], s: EvalInputs) -> str:
    """Every option spelled out, defaults included: re-running this line reproduces the run."""
    import shlex

    argv = ["--model", args.model, "--alphas", ",".join(f"{a:g}" for a in alphas), "--attack", args.attack,
            "--norm", args.norm, *(["--eps", args.eps] if args.eps else []),
            *[f"--attack-arg={a}" for a in args.attack_arg], "--dataset", s.attack.dataset,
            *(["--data-dir", args.data_dir] if args.data_dir else []),
            *(["--data-file", args.data_file] if args.data_file else []), "--n-examples", str(len(s.y)),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", args.device,
            *(["--check-endpoints"] if args.check_endpoints else []), *(["--paired"] if args.paired else []),
            *[f"--endpoint-result={e}" for e in args.endpoint_result], "--out-dir", args.out_dir]
    return "robustkit tradeoff " + shlex.join(argv)


def cmd_check_masking(args: argparse.Namespace) -> int:
    """The gradient-masking checks (robustkit.eval.masking holds the logic); exit 1 when flagged."""
    from robustkit.distributed import is_follower
    from robustkit.eval.masking import (
        MARKDOWN_HEAD,
        MASKING_SCHEMA,
        masking_report,
        render_markdown,
        save_report,
        sweep_grid,
    )
    from robustkit.eval.outputs import check_early, first_line_is

    if args.autoattack_result and args.run_autoattack:
        raise ConfigError("--autoattack-result and --run-autoattack do not combine")

    def check(attack: AttackFactory, _: LoadedModel) -> None:  # a bad grid or attack fails before data loads
        threat = attack.threat()
        sweep_grid(threat, args.eps_grid, unbounded=args.unbounded)
        attack(eps=threat.eps)

    if args.out or args.markdown:  # unwritable outputs fail before anything loads
        check_early(args, _given_outputs(args.out, ("--markdown", args.markdown), ".md"))
    s = load_subject(args, check=check)
    threat = s.attack.threat()
    out = Path(args.out) if args.out else default_out(s.subject.model, "masking", s.subject.dataset, len(s.y),
                                                      args.seed)
    md = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    _check_report_outputs(args, s, out, MASKING_SCHEMA, {},
                          [(md, "--markdown" if args.markdown else "--out", "Markdown",
                            first_line_is(MARKDOWN_HEAD))], [])
    report = masking_report(
        s.model, s.x, s.y, eps=threat.eps, norm=threat.norm, device=s.device, eps_grid=args.eps_grid,
        unbounded=args.unbounded, sweep_attack=args.attack, sweep_params=s.attack.params,
        autoattack_result=args.autoattack_result, run_autoattack=args.run_autoattack,
        square_queries=args.square_queries, batch_size=args.batch_size, seed=args.seed,
        progress=progress_enabled(args), subject=s.subject, compile=args.compile,
    )
    save_report(report, out)
    if not is_follower():  # in a torchrun job rank 0 writes
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(render_markdown(report))
    print(render_markdown(report))
    print(f"report: {out}\nmarkdown: {md}")
    for flag in report["flags"]:
        print(f"robustkit: warning: {flag['check']}: {flag['message']}", file=sys.stderr)
    return 1 if report["flagged"] else 0


# --------------------------------------------------------------------------- helpers


def _start_over(no_resume: bool, folder: Path) -> None:
    """--no-resume: delete a report's records folder (rank 0 alone in a torchrun job; the others
    wait for it, so none of them reads or recreates a file that is about to go)."""
    from robustkit.distributed import current
    from robustkit.eval.lock import refuse_if_locked

    job = current()
    if no_resume and folder.exists() and (job is None or job.is_main):
        refuse_if_locked(folder)
        shutil.rmtree(folder)
    if job is not None:
        job.barrier()


# A file written beside a report: its path, the flag that named it, what it is, and a check of its format.
Companion = tuple[Path, str, str, Callable[[Path], bool]]


def _given_outputs(out: str | None, beside: tuple[str, str | None], suffix: str) -> list[tuple[Path, str]]:
    """The files a command line names as outputs, with their flags: --out and the file beside it
    (``beside``: its flag and value, e.g. --plot; unset: --out with ``suffix``)."""
    flag, value = beside
    paths = [(Path(out), "--out")] if out else []
    if value:
        paths.append((Path(value), flag))
    elif out:
        paths.append((Path(out).with_suffix(suffix), "--out"))
    return paths


def _check_report_outputs(args: argparse.Namespace, s: EvalInputs, out: Path, schema: str,
                          fields: dict[str, Any], companions: list[Companion], folders: list[Path],
                          flag: str = "--out") -> None:
    """Before the work: a report JSON is replaced only when it is one of this run (same model, data,
    n, seed and ``fields``) or with --force, a plot or Markdown beside it only along with it; none of
    them and no records folder may be an input or unwritable."""
    from robustkit.eval.outputs import (
        check_not_input,
        check_output,
        check_place,
        command_inputs,
        companion_of,
        data_inputs,
        same_run,
    )

    inputs = command_inputs(args) + data_inputs(s.subject.data_info)
    ours = same_run(schema, {"model": s.subject.name_for(s.model), "dataset": s.subject.dataset,
                             "n_examples": len(s.y), "seed": args.seed, **fields})
    check_output(out, inputs=inputs, flag=flag, force=args.force, kind="a report of this run",
                 replaceable=ours)
    for path, path_flag, what, own_format in companions:  # replaced along with the report it belongs to
        check_output(path, inputs=inputs, flag=path_flag, force=args.force,
                     kind=f"the {what} of an earlier run of this command ({out})",
                     replaceable=companion_of(out, ours, own_format))
    for folder in folders:
        check_place(folder, flag, folder=True)
        check_not_input(folder, inputs, flag)


OWN_FLAGS = {"eps": "--eps", "norm": "--norm", "dataset": "--dataset", "name": "--attack"}


def parse_attack_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a TOML value (numbers, booleans, lists), else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise ConfigError(f"--attack-arg {text!r}: write KEY=VALUE, e.g. steps=50")
    if key in OWN_FLAGS:  # the threat model is not an attack parameter: one spelling, checked once
        raise ConfigError(f"--attack-arg {text!r}: {key} has its own flag, {OWN_FLAGS[key]}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def default_out(model: str, attack: str, dataset: str, n: int, seed: int) -> Path:
    """``results/<model>__<attack>__<dataset>-n<N>-s<seed>.json`` (the one result-file scheme)."""
    from robustkit.eval.results import result_stem

    return Path("results") / f"{result_stem(model, attack, dataset, n, seed)}.json"

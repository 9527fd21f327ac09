"""``robustkit bench``: user-facing benchmarks (developer benchmarks are scripts in eval/benchmarks/)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from robustkit.cli.options import add_common
from robustkit.core.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    be = sub.add_parser("bench", help="benchmarks: latency (ms per image at each batch size)",
                        description="User-facing benchmarks. Developer benchmarks (harness overhead, airbench "
                        "against its reference) are scripts: python eval/benchmarks/<name>.py --help.")
    bsub = be.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    la = bsub.add_parser("latency", help="inference time per image of a model at each batch size",
                         description="Median wall time of a forward call on random inputs of the model's shape, "
                         "in eval mode under torch.inference_mode, after warm-up calls. Model cards quote it.")
    la.add_argument("--model", required=True, help="registered id or checkpoint path")
    la.add_argument("--batch-sizes", default="1,256", help="comma list (default: 1,256)")
    la.add_argument("--repeats", type=int, default=30, help="timed calls at least (default: 30)")
    add_common(la, seed=None, data=False, progress=False, out="write the figures as JSON here (default: none)",
               force=True)
    la.set_defaults(func=cmd_latency)


def cmd_latency(args: argparse.Namespace) -> int:
    from robustkit.core.provenance import require_device
    from robustkit.eval.latency import latency_report

    try:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: write e.g. 1,256") from None
    if not sizes or min(sizes) < 1 or args.repeats < 1:
        raise ConfigError("--batch-sizes and --repeats must be positive")
    if args.out:  # before the model loads: never over an input, another file or an unwritable place
        from robustkit.eval.outputs import check_output, command_inputs

        check_output(args.out, inputs=command_inputs(args), force=args.force,
                     kind=f"a latency report of {args.model}",
                     replaceable=lambda p: _latency_of(p, args.model))
    command = "robustkit bench latency " + shlex.join(
        ["--model", args.model, "--batch-sizes", args.batch_sizes, "--repeats", str(args.repeats),
         "--device", args.device, *(["--threads", str(args.threads)] if args.threads else [])])
    latency_report(args.model, sizes, repeats=args.repeats, device=require_device(args.device),
                   out=args.out, command=command)
    return 0


def _latency_of(path: Path, model: str) -> bool:
    """The file is a report of ``bench latency --model MODEL`` (which a re-run may replace)."""
    from robustkit.eval.outputs import read_json

    d = read_json(path)
    command = d.get("command") if isinstance(d, dict) else None
    if not isinstance(command, str) or not command.startswith("robustkit bench latency "):
        return False
    try:
        argv = shlex.split(command)
    except ValueError:
        return False
    return "--model" in argv[:-1] and argv[argv.index("--model") + 1] == model

"""``python eval/benchmarks/overhead.py``: wall time of ``evaluate()`` vs the bare pyautoattack call.

The harness adds records, resume, budget checks, pass counting and provenance around the very
same attack computation; this measures what that costs (target: at most 1.05x) and confirms the
per-example robust flags agree. It is a benchmark, never a timed test: timings on a shared CI
machine are too noisy to gate on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from robustkit.attacks.autoattack import bare_autoattack
from robustkit.eval.results import write_json_atomic


def main(argv: list[str] | None = None) -> int:
    from robustkit.attacks import create_attack
    from robustkit.core.provenance import describe_device, package_versions, resolve_device
    from robustkit.data import load_split
    from robustkit.eval import Subject, evaluate
    from robustkit.models import load_model

    p = argparse.ArgumentParser(prog="python eval/benchmarks/overhead.py", description=__doc__)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n-examples", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--norm", default="Linf")
    p.add_argument("--version", default="standard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device)
    x, y = load_split(args.dataset, "test", data_dir=args.data_dir).tensors(args.n_examples)
    attack = create_attack("autoattack", norm=args.norm, eps=args.eps, version=args.version)
    model = loaded.model
    runs: list[dict[str, Any]] = []
    for r in range(args.repeats):
        # Alternate the order so warm caches and CPU frequency drift favour neither side.
        order = ("bare", "harness") if r % 2 == 0 else ("harness", "bare")
        times: dict[str, float] = {}
        flags: dict[str, list[bool]] = {}
        for which in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if which == "bare":
                flags[which] = bare_autoattack(model, x, y, norm=attack.norm, eps=attack.eps, version=args.version,
                                               seed=args.seed, batch_size=args.batch_size, device=device)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    res = evaluate(model, attack, x, y, batch_size=args.batch_size, device=device, seed=args.seed,
                                   records_path=Path(tmp) / "r.jsonl", progress=False,
                                   subject=Subject(model=loaded.name))
                flags[which] = [c == "1" for c in res.robust_flags or ""]
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[which] = time.perf_counter() - t0
        run = {"bare_s": times["bare"], "harness_s": times["harness"], "ratio": times["harness"] / times["bare"],
               "flags_identical": flags["bare"] == flags["harness"],
               "robust_accuracy": sum(flags["harness"]) / len(flags["harness"])}
        runs.append(run)
        print(f"run {r + 1}/{args.repeats}: bare {run['bare_s']:.2f}s  harness {run['harness_s']:.2f}s  "
              f"ratio {run['ratio']:.3f}  flags identical: {run['flags_identical']}", flush=True)
    summary = {
        "benchmark": "harness overhead vs bare pyautoattack run_standard_evaluation",
        "command": "python eval/benchmarks/overhead.py " + " ".join(argv or []),
        "model": loaded.name, "dataset": args.dataset, "n_examples": args.n_examples,
        "batch_size": args.batch_size, "norm": args.norm, "eps": args.eps, "version": args.version,
        "seed": args.seed, "device": describe_device(device), "versions": package_versions(),
        "runs": runs,
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "all_flags_identical": all(r["flags_identical"] for r in runs),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"median ratio harness/bare: {summary['median_ratio']:.3f} (target <= 1.05); "
          f"per-example flags identical in every run: {summary['all_flags_identical']}")
    if args.out:
        write_json_atomic(args.out, summary)
        print(f"written: {args.out}")
    return 0 if summary["all_flags_identical"] else 1


if __name__ == "__main__":
    import sys

    from robustkit.core.errors import RobustkitError

    try:
        raise SystemExit(main())
    except RobustkitError as e:
        print(f"eval/benchmarks/overhead.py: error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None

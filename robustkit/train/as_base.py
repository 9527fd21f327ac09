"""Adaptive Smoothing's robust base h, chosen on held-out *training* images before any mixer exists.

The composite inherits most of its robustness from h, so which robust model becomes h is a choice
like the deployed constants: made on test images, it would bias the evaluation that judges the
method. This driver scores candidate robust models on the last ``--holdout`` training images, which
none of them trained on (checked against the official indices each checkpoint records; refused
otherwise), with the same attacks and rule as :mod:`robustkit.train.as_constants` (clean, APGD-CE,
then Square on APGD-CE's survivors; highest mean of clean and robust wins)::

    python -m robustkit.train.as_base --candidates small_cnn.mnist_pgd_at,ltd.mnist_partial \\
        --holdout 1000 --eps 0.3 --square-queries 1000 --data-dir ../shared/data/partial --out defenses/as_base_mnist

writes ``<out>/bases.json`` (every candidate's scores, the pick, the rule, the command) and ``bases.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from robustkit.core.errors import ConfigError, DataError
from robustkit.train.as_constants import RULE, _ranges, score


def markdown(report: dict[str, Any]) -> str:
    lines = ["| candidate | clean | APGD-CE | robust | mean |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        mark = " **(picked)**" if r["model"] == report["pick"] else ""
        lines.append(f"| `{r['model']}` | {100 * r['clean_acc']:.2f}% | {100 * r['apgd_ce_acc']:.2f}% | "
                     f"{100 * r['robust_acc']:.2f}% | {50 * (r['clean_acc'] + r['robust_acc']):.2f}%{mark} |")
    square = report["square_queries"]
    lines += ["", f"{report['n']} held-out {report['dataset']} *training* images (official indices "
              f"{report['held_out_indices']}, seen by no candidate), APGD-CE {report['steps']} steps at Linf "
              f"{report['eps']:g}" + (f", then Square ({square} queries) on its survivors" if square else "")
              + f", seed {report['seed']}. Rule: {RULE}.", f"Reproduce: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m robustkit.train.as_base", description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", required=True, help="comma list of robust model ids or checkpoints")
    p.add_argument("--holdout", type=int, required=True, help="score on the last N training images")
    p.add_argument("--dataset", default=None, help="default: the first candidate's")
    p.add_argument("--eps", required=True, help="attack radius, e.g. 0.3")
    p.add_argument("--steps", type=int, default=20, help="APGD-CE iterations")
    p.add_argument("--square-queries", type=int, default=1000,
                   help="Square queries on APGD-CE's survivors (0: APGD-CE alone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="folder for bases.json and bases.md (committed)")
    args = p.parse_args(argv)

    from robustkit.core.provenance import require_device
    from robustkit.core.threat import parse_eps
    from robustkit.data import load_split
    from robustkit.eval.results import write_json_atomic
    from robustkit.models.base import load_model
    from robustkit.train._loop import index_ranges

    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if len(names) < 2 or len(set(names)) < len(names):
        raise ConfigError(f"--candidates {args.candidates!r}: give two or more distinct models to choose from")
    if args.square_queries < 0:
        raise ConfigError(f"--square-queries {args.square_queries}: must be 0 (off) or a positive query count")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = require_device(args.device)
    eps = parse_eps(args.eps)
    loaded = [load_model(n, device=dev) for n in names]
    dataset = args.dataset or loaded[0].dataset
    split = load_split(dataset, "train", data_dir=args.data_dir)
    if not 0 < args.holdout < len(split.labels):
        raise ConfigError(f"--holdout {args.holdout}: must be between 1 and {len(split.labels) - 1}")
    held = [int(i) for i in split.indices[-args.holdout:]]
    for name, lm in zip(names, loaded, strict=True):
        data = (lm.metadata.get("training") or {}).get("data") or {}
        if data.get("dataset") != dataset or "train_indices" not in data:
            raise DataError(f"{name} records no {dataset} training images, so it cannot be shown not to have "
                            "trained on the held-out ones; choose among models trained by robustkit")
        seen = set(held) & _ranges(data["train_indices"])
        if seen:
            raise DataError(f"{name} trained on {len(seen)} of the held-out images (e.g. official index "
                            f"{min(seen)}): hold them out of its training, or hold out fewer")
    x, y = split.tensors()
    x, y = x[-args.holdout:].to(dev), y[-args.holdout:].to(dev)
    print(f"{len(names)} candidate(s) on the last {args.holdout} {dataset} training images", flush=True)
    t0 = time.perf_counter()
    rows = []
    for name, lm in zip(names, loaded, strict=True):
        s = score(lm.model.eval(), x, y, eps=eps, steps=args.steps, seed=args.seed, square_queries=args.square_queries)
        rows.append({"model": name, "checkpoint_sha256": lm.checkpoint_sha256,
                     **{k: v for k, v in s.items() if k != "mean_alpha_clean"}})
        print(f"  {name}: clean {100 * s['clean_acc']:.2f}%, APGD-CE {100 * s['apgd_ce_acc']:.2f}%, "
              f"robust {100 * s['robust_acc']:.2f}%", flush=True)
    pick = max(rows, key=lambda r: ((r["clean_acc"] + r["robust_acc"]) / 2, r["robust_acc"]))["model"]
    command = "python -m robustkit.train.as_base " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = {"schema": "robustkit.as_base", "schema_version": 1, "command": command, "rule": RULE,
              "dataset": dataset, "n": args.holdout, "held_out_indices": index_ranges(held), "eps": eps,
              "steps": args.steps, "square_queries": args.square_queries, "seed": args.seed,
              "seconds": time.perf_counter() - t0, "rows": rows, "pick": pick}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bases.json", report)
    (out / "bases.md").write_text(markdown(report))
    print(markdown(report))
    print(f"picked {pick}: put it in the recipe as robust = \"{pick}\"")
    return 0


if __name__ == "__main__":
    from robustkit.cli import guarded

    raise SystemExit(guarded(main))

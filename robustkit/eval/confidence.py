"""The confidence gap of a robust model: how much surer it is when it is right than when it is wrong.

Adaptive Smoothing (Bai et al.) rests on this property of the robust base h: mixing its
probabilities with an accurate model's only helps if h is much more confident on the examples it
gets right than on those it gets wrong, on clean *and* on attacked inputs. This measures it on real
test images: the top softmax probability of every example, clean and under APGD-CE, split by
whether the prediction is correct; the gap is the difference of the two groups' means::

    python -m robustkit.eval.confidence --model ltd.cifar10_partial --n-examples 1000 \\
        --data-dir ../shared/data/partial --out eval/confidence/ltd.cifar10_partial

writes ``<out>.json`` (per-example confidences and correctness, group means and gaps, the command)
and ``<out>.png`` (the four distributions).
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

SCHEMA = "robustkit.confidence_gap"


def confidences(model: Any, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int, seed: int,
                batch_size: int = 250) -> dict[str, dict[str, list[float] | list[bool]]]:
    """Top softmax probability and correctness per example, clean and after APGD-CE (Linf ``eps``)."""
    from robustkit.attacks.apgd import apgd_ce_batches

    out: dict[str, dict[str, list[Any]]] = {k: {"confidence": [], "correct": []} for k in ("clean", "attacked")}
    for xb, yb, adv in apgd_ce_batches(model, x, y, eps=eps, steps=steps, seed=seed, batch_size=batch_size):
        with torch.no_grad():
            for key, inputs in (("clean", xb), ("attacked", adv)):
                p = model(inputs).softmax(dim=1)
                conf, pred = p.max(dim=1)
                out[key]["confidence"] += conf.tolist()
                out[key]["correct"] += (pred == yb).tolist()
    return out


def gaps(per_example: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, float | int | None]]:
    """Per input kind: mean confidence of correct and of incorrect predictions, their difference and counts."""
    out = {}
    for key, d in per_example.items():
        right = [c for c, ok in zip(d["confidence"], d["correct"], strict=True) if ok]
        wrong = [c for c, ok in zip(d["confidence"], d["correct"], strict=True) if not ok]
        mr = sum(right) / len(right) if right else None
        mw = sum(wrong) / len(wrong) if wrong else None
        out[key] = {"n_correct": len(right), "n_incorrect": len(wrong), "mean_confidence_correct": mr,
                    "mean_confidence_incorrect": mw, "gap": None if mr is None or mw is None else mr - mw}
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustkit.core.threat import format_eps
    from robustkit.eval.curve import save_figure_atomic

    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=120, sharey=True)
    bins = [i / 20 for i in range(21)]
    for ax, key in zip(axes, ("clean", "attacked"), strict=True):
        d, g = report["per_example"][key], report["gaps"][key]
        for ok, colour, label in ((True, "tab:green", "correct"), (False, "tab:red", "incorrect")):
            vals = [c for c, k in zip(d["confidence"], d["correct"], strict=True) if k == ok]
            if vals:
                ax.hist(vals, bins=bins, color=colour, alpha=0.55, label=f"{label} ({len(vals)})",
                        weights=[1 / len(vals)] * len(vals))
        gap = "n/a" if g["gap"] is None else f"{g['gap']:.3f}"
        ax.set_title(f"{key}: mean confidence gap {gap}", fontsize=9)
        ax.set_xlabel("top softmax probability")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("fraction of the group")
    fig.suptitle(f"{report['model']} on {report['n_examples']} {report['dataset']} test images "
                 f"(attacked: APGD-CE {report['steps']} steps, Linf {format_eps(report['eps'])})", fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m robustkit.eval.confidence", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model id or checkpoint")
    p.add_argument("--dataset", default=None, help="default: the model's")
    p.add_argument("--n-examples", type=int, default=1000, help="the first N test images")
    p.add_argument("--eps", default=None, help="Linf radius (default: the dataset's)")
    p.add_argument("--steps", type=int, default=100, help="APGD-CE iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="path stem: <out>.json and <out>.png")
    args = p.parse_args(argv)

    from robustkit.core.errors import ConfigError
    from robustkit.core.provenance import provenance, require_device
    from robustkit.core.threat import ThreatModel
    from robustkit.data import load_split
    from robustkit.eval.results import write_json_atomic
    from robustkit.models.base import load_model

    if args.n_examples < 1 or args.steps < 1:
        raise ConfigError(f"--n-examples and --steps must be >= 1, got {args.n_examples}, {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = require_device(args.device)
    loaded = load_model(args.model, device=dev)
    dataset = args.dataset or loaded.dataset
    eps = ThreatModel.create("Linf", args.eps, dataset).eps
    x, y = load_split(dataset, "test", data_dir=args.data_dir).tensors(args.n_examples)
    t0 = time.perf_counter()
    per_example = confidences(loaded.model.eval(), x.to(dev), y.to(dev), eps=eps, steps=args.steps,
                              seed=args.seed)
    report = {"schema": SCHEMA, "schema_version": 1,
              "command": "python -m robustkit.eval.confidence " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "model_sha256": loaded.checkpoint_sha256, "dataset": dataset,
              "n_examples": len(y), "eps": eps, "steps": args.steps, "seed": args.seed,
              "seconds": time.perf_counter() - t0, "gaps": gaps(per_example), "per_example": per_example,
              "provenance": provenance(dev)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = Path(f"{out}.json"), Path(f"{out}.png")  # not with_suffix: model ids have dots
    write_json_atomic(json_path, report)
    plot(report, png_path)
    for key, g in report["gaps"].items():
        print(f"{key:8s}: correct {g['n_correct']} (mean confidence {g['mean_confidence_correct']}), incorrect "
              f"{g['n_incorrect']} ({g['mean_confidence_incorrect']}), gap {g['gap']}")
    print(f"wrote {json_path} and {png_path.name}")
    return 0


if __name__ == "__main__":
    from robustkit.cli import guarded

    raise SystemExit(guarded(main))

"""Adaptive Smoothing's deployed constants, chosen on held-out *training* images.

A mixer is trained with one gamma transform and deployed with another (``eval_bias``, ``alpha_min``,
``alpha_max``: larger values lean on the robust base h). Where the deployed point sits on the
accuracy-robustness trade-off is decided by these constants, so choosing them on test images would
bias the very comparison the method is judged by (the CIFAR-10 card had to disclose exactly that).
This driver scores a grid of constants on the last ``--holdout`` training images, which neither the
mixer nor either base model trained on (checked against the official indices their checkpoints
record, refused otherwise), and picks the highest mean of clean and robust accuracy. Robust means
APGD-CE alone by default; ``--square-queries N`` also runs Square (black-box) on APGD-CE's survivors
and scores the worst case. Use it: a mixer can learn to resist the one gradient attack it trained
against, and on Fashion-MNIST constants picked by APGD-CE-20 alone (69.0% on the holdout) met 55.2%
under full AutoAttack, with Square breaking 35 of 1,000 test images that three gradient attacks
missed. The pick goes into the recipe and a re-deploy (``mixer_from``) ships it without retraining::

    python -m robustkit.train.as_constants --model runs/as_fmnist.safetensors --holdout 1000 \\
        --eval-bias 0.4,1.5,2.5 --alpha-min 0,0.5,0.8 --data-dir ../shared/data/partial \\
        --out defenses/as_constants_fmnist

writes ``<out>/constants.json`` (every candidate's scores, the pick, the rule, the command),
``constants.md`` and ``constants.png`` (the candidates, g and h in the clean-vs-robust plane). With
Square a candidate costs minutes to tens of minutes, so each finished score is kept in
``<out>/constants.records.jsonl`` (resume state, ignored by git, keyed by everything the score depends
on): a killed run picks up where it stopped, and a second process given the same grid in reverse
order (``--eval-bias 2.5,1.5,0.4 --alpha-min 0.8,0.5,0``) shares the work on a second core; the
canonical command re-run at the end reads every score back and writes the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from robustkit.core.errors import ConfigError, DataError

RULE = "max mean(clean, robust) accuracy on the held-out training images; ties: higher robust, then the first in the order given"


def _ranges(spec: str) -> set[int]:
    """The official indices of a ``0-99,200-299`` record (``index_ranges``'s format)."""
    out: set[int] = set()
    for part in filter(None, (spec or "").split(",")):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def check_unseen(model: Any, mixer_data: dict[str, Any], held_out: Sequence[int], dataset: str) -> list[str]:
    """Refuse held-out images that the mixer or a base model trained on; returns what was checked.

    Uses the official training indices each checkpoint records. A base without such a record (trained
    elsewhere, or on other data) cannot be checked, which is said, not assumed."""
    from robustkit.models.base import load_model

    held = set(int(i) for i in held_out)
    checked = []
    parts = [("mixer", mixer_data)]
    for role in ("std", "robust"):
        meta = load_model(model.arch_args[role]).metadata
        parts.append((f"{role} base {model.arch_args[role]}", (meta.get("training") or {}).get("data") or {}))
    for name, data in parts:
        if data.get("dataset") != dataset or "train_indices" not in data:
            checked.append(f"{name}: no record of its {dataset} training images (not checked)")
            continue
        seen = held & _ranges(data["train_indices"])
        if seen:
            raise DataError(f"the {name} trained on {len(seen)} of the held-out images (e.g. official index "
                            f"{min(seen)}): hold them out of its training, or hold out fewer")
        checked.append(f"{name}: none of its training images held out")
    return checked


def score(model: Any, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int, seed: int,
          square_queries: int = 0, batch_size: int = 250, compile: bool = False) -> dict[str, float]:
    """Accuracies of ``model`` as deployed now: clean, APGD-CE-``steps``, robust (APGD-CE, then Square
    with ``square_queries`` on its survivors: the worst case; APGD-CE's when 0) and the mean deployed
    alpha on clean inputs (``nan`` for a plain model). Square's seeds are the images' positions in
    ``x``, so a score does not depend on ``batch_size``. ``compile``: the attacks' passes go through
    ``torch.compile`` (about 2x on Square's forward passes on a CPU; logits equal to float rounding)."""
    from robustkit.attacks.apgd import apgd_ce_batches
    from robustkit.attacks.engine import rng
    from robustkit.attacks.engine.square import square_linf

    run = model
    if compile:
        torch._dynamo.reset()  # the deployed constants are guarded values: one fresh graph per candidate
        run = torch.compile(model)
    seeds = rng.derive_seeds(seed, len(y), device=x.device)
    clean = apgd = robust = alpha = 0.0
    mixing = getattr(model, "mixing_weight", None)
    batches = apgd_ce_batches(run, x, y, eps=eps, steps=steps, seed=seed, batch_size=batch_size)
    for i, (xb, yb, adv) in zip(range(0, len(y), batch_size), batches, strict=True):
        with torch.no_grad():
            clean += float((run(xb).argmax(1) == yb).sum())
            held = run(adv).argmax(1) == yb
            alpha += float(mixing(xb).sum()) if mixing is not None else float("nan")
        apgd += float(held.sum())
        if square_queries and bool(held.any()):
            sq, _ = square_linf(run, xb[held], yb[held], eps=eps, seeds=seeds[i:i + batch_size][held],
                                n_queries=square_queries)
            with torch.no_grad():
                held[held.clone()] = run(sq).argmax(1) == yb[held]
        robust += float(held.sum())
    n = len(y)
    return {"clean_acc": clean / n, "apgd_ce_acc": apgd / n, "robust_acc": robust / n, "mean_alpha_clean": alpha / n}


class ScoreCache:
    """Finished scores in a JSON-lines file, each under a key naming everything it depends on (model,
    images, attack settings, candidate), so a killed run resumes and a changed setting re-scores."""

    def __init__(self, path: Path | None, base: dict[str, Any]) -> None:
        self.path, self.base, self.done = path, base, {}

    def _load(self) -> None:
        # Re-read at every lookup: a second process scoring the grid in another order (a second core)
        # appends to the same file, and neither scores what the other has finished.
        if self.path is None or not self.path.exists():
            return
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
                self.done[json.dumps(entry["key"], sort_keys=True)] = entry["score"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut off by a kill: that candidate is scored again

    def _key(self, candidate: dict[str, Any]) -> dict[str, Any]:
        return {**self.base, **candidate}

    def get(self, candidate: dict[str, Any]) -> dict[str, float] | None:
        self._load()
        return self.done.get(json.dumps(self._key(candidate), sort_keys=True))

    def put(self, candidate: dict[str, Any], s: dict[str, float]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": self._key(candidate), "score": s}) + "\n")


def select(model: Any, x: torch.Tensor, y: torch.Tensor, grid: Sequence[tuple[float, float]], *, eps: float,
           steps: int, seed: int, square_queries: int = 0, alpha_max: float | None = None,
           compile: bool = False, cache: ScoreCache | None = None) -> dict[str, Any]:
    """Score every (eval_bias, alpha_min) of ``grid`` and the two bases; the pick follows :data:`RULE`."""
    from robustkit.models.adaptive_smoothing import MixingConfig

    cache = cache or ScoreCache(None, {})
    kw = {"eps": eps, "steps": steps, "seed": seed, "square_queries": square_queries, "compile": compile}

    def scored(net: Any, candidate: dict[str, Any]) -> dict[str, float]:
        s = cache.get(candidate)
        if s is None:
            s = score(net, x, y, **kw)
            cache.put(candidate, s)
        return s

    original: MixingConfig = model.config
    rows = []
    try:
        for bias, floor in grid:
            model.config = dataclasses.replace(original, eval_bias=bias, alpha_min=floor,
                                               **({} if alpha_max is None else {"alpha_max": alpha_max}))
            s = scored(model, {"eval_bias": bias, "alpha_min": floor, "alpha_max": model.config.alpha_max})
            rows.append({"eval_bias": bias, "alpha_min": floor, "alpha_max": model.config.alpha_max, **s})
            print(f"  eval_bias {bias:g}, alpha_min {floor:g}: clean {100 * s['clean_acc']:.2f}%, APGD-CE "
                  f"{100 * s['apgd_ce_acc']:.2f}%, robust {100 * s['robust_acc']:.2f}%, mean alpha "
                  f"{s['mean_alpha_clean']:.3f}", flush=True)
    finally:
        model.config = original
    bases = {}
    for role, net in (("std", model.g), ("robust", model.h)):
        s = scored(net, {"base": role})
        bases[role] = {k: v for k, v in s.items() if k != "mean_alpha_clean"}
    pick = max(rows, key=lambda r: ((r["clean_acc"] + r["robust_acc"]) / 2, r["robust_acc"]))
    return {"rows": rows, "bases": bases, "pick": pick}


def _floats(spec: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes a comma list of numbers, got {spec!r}") from None


def markdown(report: dict[str, Any]) -> str:
    lines = ["| eval_bias | alpha_min | clean | APGD-CE | robust | mean | mean alpha (clean) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        mark = " **(picked)**" if r == report["pick"] else ""
        lines.append(f"| {r['eval_bias']:g} | {r['alpha_min']:g} | {100 * r['clean_acc']:.2f}% | "
                     f"{100 * r['apgd_ce_acc']:.2f}% | {100 * r['robust_acc']:.2f}% | "
                     f"{50 * (r['clean_acc'] + r['robust_acc']):.2f}%{mark} | {r['mean_alpha_clean']:.3f} |")
    for role, b in report["bases"].items():
        lines.append(f"| {role} base alone | | {100 * b['clean_acc']:.2f}% | {100 * b['apgd_ce_acc']:.2f}% | "
                     f"{100 * b['robust_acc']:.2f}% | | |")
    square = report.get("square_queries", 0)
    robust = (f"APGD-CE then Square ({square} queries) on its survivors, the worst case" if square
              else "APGD-CE alone")
    lines += ["", f"{report['n']} held-out {report['dataset']} *training* images (official indices "
              f"{report['held_out_indices']}), APGD-CE {report['steps']} steps at Linf {report['eps']:g}, "
              f"seed {report['seed']}; robust: {robust}. Rule: {RULE}.", *[f"- {c}" for c in report["checked"]],
              f"Reproduce: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustkit.eval.curve import save_figure_atomic

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for r in report["rows"]:
        picked = r == report["pick"]
        ax.scatter(100 * r["clean_acc"], 100 * r["robust_acc"], s=90 if picked else 40,
                   color="tab:red" if picked else "tab:gray", zorder=3)
        ax.annotate(f"{r['eval_bias']:g}/{r['alpha_min']:g}", (100 * r["clean_acc"], 100 * r["robust_acc"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    for role, marker in (("std", "s"), ("robust", "D")):
        b = report["bases"][role]
        ax.scatter(100 * b["clean_acc"], 100 * b["robust_acc"], marker=marker, s=60, color="tab:blue",
                   label=f"{role} base", zorder=3)
    ax.set_xlabel("clean accuracy (%)")
    square = report.get("square_queries", 0)
    ax.set_ylabel(f"APGD-CE-{report['steps']}" + (f" + Square-{square}" if square else "") + " accuracy (%)")
    ax.set_title(f"deployed constants (eval_bias/alpha_min) on {report['n']} held-out train images", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m robustkit.train.as_constants", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained adaptive_smoothing checkpoint or model id")
    p.add_argument("--holdout", type=int, required=True, help="score on the last N training images")
    p.add_argument("--eval-bias", default="0.4,1.5,2.5", help="comma list of deployed gamma biases")
    p.add_argument("--alpha-min", default="0,0.5,0.8", help="comma list of deployed alpha floors")
    p.add_argument("--alpha-max", type=float, default=None, help="deployed alpha ceiling (default: the model's)")
    p.add_argument("--eps", default=None, help="attack radius (default: the mixer's training eps)")
    p.add_argument("--steps", type=int, default=20, help="APGD-CE iterations")
    p.add_argument("--square-queries", type=int, default=0,
                   help="also run Square with this many queries on APGD-CE's survivors and score the worst "
                        "case (0: APGD-CE alone); catches a mixer that only resists gradient attacks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="run the attacks' passes through torch.compile (about 2x on Square on a CPU)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="folder for constants.json, .md and .png (committed)")
    args = p.parse_args(argv)

    from robustkit.core.provenance import require_device
    from robustkit.core.threat import parse_eps
    from robustkit.data import load_split
    from robustkit.eval.results import write_json_atomic
    from robustkit.models.base import load_model
    from robustkit.train._loop import index_ranges

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = require_device(args.device)
    loaded = load_model(args.model, device=dev)
    model = loaded.model.eval()
    if loaded.metadata.get("architecture") != "adaptive_smoothing" or model.mixing_net is None:
        raise ConfigError(f"{args.model} is not an adaptive-smoothing composite with a mixing network")
    mixer_data = (loaded.metadata.get("training") or {}).get("data") or {}
    dataset = loaded.dataset or mixer_data.get("dataset")
    config = loaded.metadata.get("config") or {}
    eps = parse_eps(args.eps if args.eps is not None else config.get("eps", "8/255"))
    split = load_split(dataset, "train", data_dir=args.data_dir)
    if args.square_queries < 0:
        raise ConfigError(f"--square-queries {args.square_queries}: must be 0 (off) or a positive query count")
    if not 0 < args.holdout < len(split.labels):
        raise ConfigError(f"--holdout {args.holdout}: must be between 1 and {len(split.labels) - 1}")
    x, y = split.tensors()
    x, y = x[-args.holdout:].to(dev), y[-args.holdout:].to(dev)
    held = [int(i) for i in split.indices[-args.holdout:]]
    checked = check_unseen(model, mixer_data, held, dataset)
    grid = [(b, a) for b in _floats(args.eval_bias, "--eval-bias") for a in _floats(args.alpha_min, "--alpha-min")]
    print(f"{len(grid)} candidate(s) on the last {args.holdout} {dataset} training images, APGD-CE {args.steps} "
          f"steps" + (f" + Square {args.square_queries} queries" if args.square_queries else "") + f" at eps {eps:g}",
          flush=True)
    t0 = time.perf_counter()
    out = Path(args.out)
    cache = ScoreCache(out / "constants.records.jsonl",
                       {"model_sha256": loaded.checkpoint_sha256, "dataset": dataset, "holdout": args.holdout,
                        "eps": eps, "steps": args.steps, "seed": args.seed, "square_queries": args.square_queries})
    result = select(model, x, y, grid, eps=eps, steps=args.steps, seed=args.seed, square_queries=args.square_queries,
                    alpha_max=args.alpha_max, compile=args.compile, cache=cache)
    command = "python -m robustkit.train.as_constants " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = {"schema": "robustkit.as_constants", "schema_version": 1, "command": command, "rule": RULE,
              "model": args.model, "model_sha256": loaded.checkpoint_sha256, "dataset": dataset,
              "n": args.holdout, "held_out_indices": index_ranges(held), "eps": eps, "steps": args.steps,
              "square_queries": args.square_queries, "seed": args.seed, "checked": checked,
              "seconds": time.perf_counter() - t0, **result}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "constants.json", report)
    (out / "constants.md").write_text(markdown(report))
    plot(report, out / "constants.png")
    pk = report["pick"]
    print(markdown(report))
    print(f"picked eval_bias = {pk['eval_bias']:g}, alpha_min = {pk['alpha_min']:g}; put them in the recipe and "
          "re-deploy with mixer_from (no retraining)")
    return 0


if __name__ == "__main__":
    from robustkit.cli import guarded

    raise SystemExit(guarded(main))

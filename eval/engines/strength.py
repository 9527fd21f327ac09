"""``python eval/engines/strength.py``: is robustkit's own AutoAttack engine as strong as the reference?

For every shipped model, the same real test images are attacked by the reference (``autoattack``:
pyautoattack), by the standard protocol on our engine (``autoattack-rk``) and by the screening
version (``autoattack-fast``); Adaptive Smoothing also by the adaptive variants of all three. Each run
is a plain ``robustkit eval`` writing its result next to this script (``strength/``), so the command
is resumable twice over: a finished run is read back, a killed one resumes from its records.

Then, per model and engine against the reference: robust accuracy, the per-example agreement matrix,
the exact two-sided McNemar test on the discordant examples, and the per-example worst case over
all engines. Targets (issue 17): rk within paired noise of the reference (p >= 0.05) and never more
than 0.5 points above it; fast at most 0.5 points above the reference. Writes ``strength.json``,
``strength.md`` (the table the README quotes) and ``strength.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from robustkit.attacks.autoattack_rk import ENGINE_PRESETS

HERE = Path(__file__).resolve().parent
# (model, family, n): family "standard" or "adaptive" picks the attacks below; MNIST gets 1,000 images.
MODELS: list[tuple[str, str, int]] = [
    ("small_cnn.cifar10_partial", "standard", 1017),
    ("ltd.cifar10_partial", "standard", 500),
    ("adaptive_smoothing.cifar10_partial", "standard", 500),
    ("adaptive_smoothing.cifar10_partial", "adaptive", 500),
    ("airbench94.cifar10_partial_tta0", "standard", 500),
    ("lightweight_cnn.cifar10_partial", "standard", 500),
    ("lightweight_cnn.mnist_partial", "standard", 1000),
]
ENGINES = ("reference", "rk", "fast")
ATTACKS = ENGINE_PRESETS
RK_MAX_EXCESS = 0.5  # points: the most rk / fast may read above the reference
ALPHA = 0.05


def mcnemar_two_sided(b: int, c: int) -> float:
    """Exact two-sided McNemar p: twice the smaller binomial tail of the discordant pairs (capped at 1)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def agreement(ref: str, other: str) -> dict[str, int]:
    """Counts of (reference, other) per-example robust flags: both robust, only one, both broken."""
    pairs = list(zip(ref, other, strict=True))
    return {"both_robust": pairs.count(("1", "1")), "only_reference_robust": pairs.count(("1", "0")),
            "only_other_robust": pairs.count(("0", "1")), "both_broken": pairs.count(("0", "0"))}


def result_path(out_dir: Path, model: str, attack: str, n: int) -> Path:
    return out_dir / f"{model}__{attack}__n{n}.json"


def run_one(model: str, attack: str, n: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The result of one ``robustkit eval``: read back when finished, else run (or resumed)."""
    if out.exists():
        return json.loads(out.read_text())
    cmd = [sys.executable, "-m", "robustkit", "eval", "--model", model, "--attack", attack, "--n-examples", str(n),
           "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads),
           "--out", str(out), *(["--data-dir", args.data_dir] if args.data_dir else []),
           *([] if args.progress else ["--no-progress"])]
    print(f"$ {shlex.join(['robustkit', *cmd[3:]])}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        raise SystemExit(f"robustkit eval failed (exit {done.returncode}) for {model} / {attack}; "
                         "re-run this command to resume")
    print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(out.read_text())


def summarise(model: str, family: str, n: int, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row: accuracies, agreement with the reference, McNemar, worst case, the targets."""
    ref = results["reference"]
    flags = {e: r["robust_flags"] for e, r in results.items()}
    clean = {r["clean_flags"] for r in results.values()}
    worst = "".join("1" if all(f[i] == "1" for f in flags.values()) else "0" for i in range(n))
    row: dict[str, Any] = {
        "model": model, "family": family, "n_examples": n, "clean_accuracy": ref["clean_accuracy"],
        "clean_flags_identical": len(clean) == 1,
        "robust_accuracy": {e: r["robust_accuracy"] for e, r in results.items()},
        "worst_case_accuracy": worst.count("1") / n,
        "seconds": {e: r["timing"]["total_seconds"] for e, r in results.items()},
        "passes": {e: r["passes"] for e, r in results.items()},
        "results": {e: r["_path"] for e, r in results.items()},
        "versus_reference": {},
    }
    for e in results:
        if e == "reference":
            continue
        m = agreement(flags["reference"], flags[e])
        p = mcnemar_two_sided(m["only_reference_robust"], m["only_other_robust"])
        excess = 100 * (results[e]["robust_accuracy"] - ref["robust_accuracy"])
        target = (p >= ALPHA and excess <= RK_MAX_EXCESS) if e == "rk" else excess <= RK_MAX_EXCESS
        row["versus_reference"][e] = {"agreement": m, "mcnemar_p": p, "points_above_reference": excess,
                                      "target_met": target}
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| model | attack family | n | clean | reference | rk | fast | worst case | rk vs ref: "
            "ref-only / rk-only robust, McNemar p | fast vs ref: ref-only / fast-only, p |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---|---|\n")
    lines = []
    for r in rows:
        acc = r["robust_accuracy"]
        vs = r["versus_reference"]

        def cell(e: str, vs: dict[str, Any] = vs) -> str:
            if e not in vs:
                return "-"
            m = vs[e]["agreement"]
            mark = "" if vs[e]["target_met"] else " **missed**"
            return f"{m['only_reference_robust']} / {m['only_other_robust']}, p = {vs[e]['mcnemar_p']:.3g}{mark}"

        lines.append(f"| `{r['model']}` | {r['family']} | {r['n_examples']} | {100 * r['clean_accuracy']:.1f}% | "
                     + " | ".join(f"{100 * acc[e]:.2f}%" if e in acc else "-" for e in ENGINES)
                     + f" | {100 * r['worst_case_accuracy']:.2f}% | {cell('rk')} | {cell('fast')} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustkit.eval.curve import save_figure_atomic

    labels = [f"{r['model'].split('.')[0]}\n{r['model'].split('.', 1)[1]}"
              + ("\n(adaptive AA)" if r["family"] == "adaptive" else "") for r in rows]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.5 * len(rows)), 3.8))
    width = 0.2
    colours = {"reference": "#4c72b0", "rk": "#55a868", "fast": "#dd8452", "worst case": "#444444"}
    for k, e in enumerate([*ENGINES, "worst case"]):
        vals = [100 * (r["worst_case_accuracy"] if e == "worst case" else r["robust_accuracy"].get(e, math.nan))
                for r in rows]
        bars = ax.bar([i + (k - 1.5) * width for i in range(len(rows))], vals, width, label=e, color=colours[e])
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)  # a 0% bar is otherwise invisible
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title("AutoAttack engines on the same real test images (per-example worst case in black)", fontsize=9)
    ax.legend(fontsize=8, ncol=4, frameon=False)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python eval/engines/strength.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="data root (as robustkit eval --data-dir)")
    p.add_argument("--models", default=None, help="comma list of model ids to run (default: all)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma list of reference, rk, fast")
    p.add_argument("--out-dir", default=os.path.relpath(HERE / "strength"), help="where the runs' results go")
    p.add_argument("--summary", default=os.path.relpath(HERE / "strength.json"),
                   help="the summary JSON (.md, .png beside)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true", help="show robustkit eval's progress bars")
    p.add_argument("--finished-only", action="store_true",
                   help="start no run: summarise the finished ones (a row needs its reference)")
    args = p.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    if "reference" not in engines or set(engines) - set(ENGINES):
        p.error(f"--engines: a comma list of {', '.join(ENGINES)} that includes reference")
    wanted = set(args.models.split(",")) if args.models else None
    # Relative to the working directory: a result records its command, and committed results hold no
    # absolute machine paths.
    out_dir = Path(os.path.relpath(args.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, family, n in MODELS:
        if wanted is not None and model not in wanted:
            continue
        results = {}
        for e in engines:
            path = result_path(out_dir, model, ATTACKS[family][e], n)
            if args.finished_only and not path.exists():
                continue
            results[e] = {**run_one(model, ATTACKS[family][e], n, path, args),
                          "_path": os.path.relpath(path, Path(args.summary).parent)}
        if "reference" in results:
            rows.append(summarise(model, family, n, results))
    md = markdown(rows)
    print(md)
    missing = [f"{m} ({f}): {', '.join(e for e in engines if not result_path(out_dir, m, ATTACKS[f][e], n).exists())}"
               for m, f, n in MODELS if (wanted is None or m in wanted)
               and not all(result_path(out_dir, m, ATTACKS[f][e], n).exists() for e in engines)]
    summary = {"schema": "robustkit.engine-strength", "schema_version": 1, "not_finished": missing,
               "command": "python eval/engines/strength.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "alpha": ALPHA, "max_points_above_reference": RK_MAX_EXCESS,
               "seconds_note": "each run's attack time while up to four jobs shared the 2-core machine, some "
                               "paused for a while: not speed measurements (eval/benchmarks/engines.py is)",
               "rows": rows}
    from robustkit.eval.results import write_json_atomic

    write_json_atomic(args.summary, summary)
    Path(args.summary).with_suffix(".md").write_text(md)
    plot(rows, Path(args.summary).with_suffix(".png"))
    print(f"wrote {args.summary} (+ .md, .png)")
    return 0 if all(v["target_met"] for r in rows for v in r["versus_reference"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

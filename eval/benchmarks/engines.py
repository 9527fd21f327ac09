"""``python eval/benchmarks/engines.py``: wall time and image-passes of AutoAttack on each engine.

For every model of the strength validation (``eval/engines/strength.py``), the reference
(``autoattack``: pyautoattack), the standard protocol on robustkit's engine (``autoattack-rk``) and the
screening version (``autoattack-fast``) evaluate the same first ``n`` real test images, each as a plain
``robustkit eval`` in a fresh output folder. The engines are interleaved within every repeat (and
their order alternates between repeats), so drift on a shared machine favours none. Reported per
model and engine: the median over repeats of the attack's time (``timing.total_seconds``: every
stage, clean pass included, start-up excluded), the end-to-end wall time, forward and backward
image-passes, and the time as a fraction of the reference's. Targets (issue 17): rk <= 0.5x and
fast <= 0.2x the reference on every model. A benchmark, never a timed test.

With ``--out``, every finished run is appended to ``<out>.records.jsonl`` at once, so a killed
benchmark resumes where it stopped when the same command is run again (a run in flight is lost;
the settings must match, or it refuses to mix them). ``--repeat K`` runs only repeat K, so the
repeats can share a machine's cores (one single-threaded process per core, each interleaving the
engines); a last call without it finds every run done and writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from robustkit.attacks.autoattack_rk import ENGINE_PRESETS

# (model, attack family, n): n keeps one repeat of the reference to a few minutes on 2 CPU cores.
# adaptive_smoothing at 50 images with the standard attacks is the README quickstart.
MODELS: list[tuple[str, str, int]] = [
    ("small_cnn.cifar10_partial", "standard", 100),
    ("ltd.cifar10_partial", "standard", 100),
    ("adaptive_smoothing.cifar10_partial", "standard", 50),
    ("adaptive_smoothing.cifar10_partial", "adaptive", 50),
    ("airbench94.cifar10_partial_tta0", "standard", 100),
    ("lightweight_cnn.cifar10_partial", "standard", 200),
    ("lightweight_cnn.mnist_partial", "standard", 200),
]
ENGINES = ("reference", "rk", "fast")
ATTACKS = ENGINE_PRESETS
TARGETS = {"rk": 0.5, "fast": 0.2}


def time_one(model: str, attack: str, n: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "robustkit", "eval", "--model", model, "--attack", attack, "--n-examples", str(n),
           "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads),
           "--no-progress", "--quiet", "--out", str(out), *(["--data-dir", args.data_dir] if args.data_dir else [])]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"robustkit eval failed (exit {done.returncode}) for {model} / {attack}")
    res = json.loads(out.read_text())
    return {"wall_s": wall, "attack_s": res["timing"]["total_seconds"], "robust_accuracy": res["robust_accuracy"],
            "forward_passes": res["passes"]["forward"], "backward_passes": res["passes"]["backward"],
            "stage_seconds": {s["name"]: s["seconds"] for s in res["stages"]}}


def load_records(path: Path | None, settings: dict[str, Any], *,
                 quiet: bool = False) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The runs a killed benchmark finished, keyed by (repeat, model, family, engine, n); starts the
    file (settings first) when there is none. Runs under other settings are never mixed in."""
    if path is None:
        return {}
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings}) + "\n")
        return {}
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not lines or lines[0].get("settings") != settings:
        raise SystemExit(f"{path} holds runs made with other settings ({lines[0].get('settings') if lines else None}); "
                         "delete it or choose another --out")
    done = {(r["repeat"], r["model"], r["family"], r["engine"], r["n_examples"]): r for r in lines[1:]}
    if done and not quiet:
        print(f"resuming: {len(done)} finished run(s) read from {path}", flush=True)
    return done


def summarise(runs: list[dict[str, Any]], rows: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    out = []
    for model, family, n in rows:
        mine = [r for r in runs if r["model"] == model and r["family"] == family]
        med = {e: {k: statistics.median(r[k] for r in mine if r["engine"] == e)
                   for k in ("attack_s", "wall_s", "forward_passes", "backward_passes")}
               for e in ENGINES if any(r["engine"] == e for r in mine)}
        ref = med["reference"]["attack_s"]
        out.append({"model": model, "family": family, "n_examples": n, "median": med,
                    "robust_accuracy": {e: next(r["robust_accuracy"] for r in mine if r["engine"] == e) for e in med},
                    "fraction_of_reference": {e: med[e]["attack_s"] / ref for e in med if e != "reference"},
                    "target_met": {e: med[e]["attack_s"] / ref <= TARGETS[e] for e in med if e != "reference"}})
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| model | family | n | reference | rk | fast | rk / ref | fast / ref | image-passes fwd+bwd "
            "(ref / rk / fast) |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        m, f = r["median"], r["fraction_of_reference"]

        def frac(e: str, f: dict[str, float] = f, r: dict[str, Any] = r) -> str:
            if e not in f:
                return "-"
            return f"{f[e]:.2f}x" + ("" if r["target_met"][e] else " **missed**")

        passes = " / ".join(f"{m[e]['forward_passes'] + m[e]['backward_passes']:,.0f}" for e in m)
        lines.append(f"| `{r['model']}` | {r['family']} | {r['n_examples']} | "
                     + " | ".join(f"{m[e]['attack_s']:.1f} s" if e in m else "-" for e in ENGINES)
                     + f" | {frac('rk')} | {frac('fast')} | {passes} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustkit.eval.curve import save_figure_atomic

    labels = [r["model"] + (" (adaptive AA)" if r["family"] == "adaptive" else "") for r in rows]
    fig, ax = plt.subplots(figsize=(9.0, 0.45 * len(rows) + 1.6))
    for k, (e, colour) in enumerate((("rk", "#55a868"), ("fast", "#dd8452"))):
        vals = [r["fraction_of_reference"].get(e, float("nan")) for r in rows]
        ax.barh([i + (k - 0.5) * 0.38 for i in range(len(rows))], vals, 0.38, label=e, color=colour)
        ax.axvline(TARGETS[e], color=colour, ls="--", lw=1)
    ax.axvline(1.0, color="#4c72b0", lw=1, label="reference")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("attack time / reference's (median over repeats; dashed: the targets 0.5x and 0.2x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python eval/benchmarks/engines.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models", default=None, help="comma list of model ids (default: all)")
    p.add_argument("--n-scale", type=float, default=1.0, help="multiply every model's n (the GPU check uses 1,000)")
    p.add_argument("--n-examples", type=int, default=None, help="the same n for every model instead")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeat", type=int, action="append", default=None, metavar="K",
                   help="run only repeat K (0-based; repeatable) and write no figures: another process "
                        "runs the other repeats on another core")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the figures as JSON here (.md and .png beside it)")
    args = p.parse_args(argv)
    wanted = set(args.models.split(",")) if args.models else None
    rows = [(m, f, args.n_examples or max(1, round(n * args.n_scale))) for m, f, n in MODELS
            if wanted is None or m in wanted]
    settings = {"device": args.device, "threads": args.threads, "batch_size": args.batch_size,
                "data_dir": args.data_dir}
    records = Path(args.out).with_suffix(".records.jsonl") if args.out else None
    done = load_records(records, settings)
    repeats = args.repeat if args.repeat is not None else list(range(args.repeats))
    if any(not 0 <= k < args.repeats for k in repeats):
        p.error(f"--repeat takes 0 to {args.repeats - 1} (--repeats {args.repeats}), got {repeats}")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rk-engine-bench-") as tmp:
        for rep in repeats:
            for model, family, n in rows:
                for e in (ENGINES if rep % 2 == 0 else ENGINES[::-1]):
                    key = (rep, model, family, e, n)
                    done = load_records(records, settings, quiet=True) if records is not None else done
                    if key in done:
                        runs.append(done[key])
                        continue
                    out = Path(tmp) / f"r{rep}-{len(runs)}.json"
                    run = {"repeat": rep, "model": model, "family": family, "engine": e, "n_examples": n,
                           **time_one(model, ATTACKS[family][e], n, out, args)}
                    runs.append(run)
                    if records is not None:
                        with records.open("a") as f:
                            f.write(json.dumps(run) + "\n")
                    print(f"repeat {rep}: {model:<36} {family:<8} {e:<9} {run['attack_s']:8.1f} s attack, "
                          f"robust {100 * run['robust_accuracy']:.1f}%", flush=True)
    if args.repeat is not None:
        print(f"repeat(s) {', '.join(map(str, repeats))} done; run without --repeat for the figures")
        return 0
    table = summarise(runs, rows)
    md = markdown(table)
    print(md)
    if args.out:
        from robustkit.eval.results import write_json_atomic

        report = {"benchmark": "AutoAttack engines: reference vs rk vs fast (attack time, image-passes)",
                  "command": "python eval/benchmarks/engines.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
                  "device": args.device, "threads": args.threads, "cpu_count": os.cpu_count(),
                  "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
                  "targets": TARGETS, "rows": table, "runs": runs}
        write_json_atomic(args.out, report)
        Path(args.out).with_suffix(".md").write_text(md)
        plot(table, Path(args.out).with_suffix(".png"),
             f"AutoAttack engines, {args.device}, {args.threads} thread(s), median of {args.repeats}")
        print(f"wrote {args.out} (+ .md, .png)")
    return 0 if all(ok for r in table for ok in r["target_met"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

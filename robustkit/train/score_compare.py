"""The SCoRe comparison at equal budget: CE vs SupCon vs SCoRe-FL / GC / LogDet on long-tailed data.

The paper's claim (Majee et al., ICML 2024) is that submodular set losses beat CE and SupCon most
under class imbalance. This driver checks it where a CPU can: every method shares the network, the
long-tailed view (same images for every seed), the two augmented views, the epochs, batch and
optimiser; only ``loss`` differs (``defenses/score.toml`` plus one override). Each setting is run with
several training seeds; the table reports balanced test accuracy (the test split is balanced, so this
is plain accuracy) with its spread, many/medium/few-shot accuracy, an exact paired McNemar test of
each loss against CE on the same test images (seed s against seed s, pooled), and standard AutoAttack
on the first ``--aa-n`` test images for each method's best seed. Two adversarial rows ask whether
SCoRe-FL on adversarial views beats PGD-AT with CE at equal budget::

    python -m robustkit.train.score_compare --data-dir ../shared/data/partial --out-dir defenses/score_comparison

Resumable: a finished run is a row of ``table.json`` (its checkpoint lives in ``--work-dir``, default
``runs/<out-dir name>``, not committed); an AutoAttack result in ``--out-dir`` is reused, and a killed
AutoAttack resumes from its records. Writes ``table.json``, ``table.md``, ``table.png``, ``log.txt`` and
the AutoAttack result JSONs: what is committed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustkit.train.compare import (
    _bools,
    _run,
    _train,
    checked_names,
    driver_command,
    driver_parser,
    mcnemar_exact,
    merge_table,
)

RECIPE = Path(__file__).resolve().parents[2] / "defenses" / "score.toml"

# setting -> (dataset, longtail view)
SETTINGS: dict[str, tuple[str, str]] = {
    "cifar10-lt10": ("cifar10", "exp:10"),
    "cifar10-lt100": ("cifar10", "exp:100"),
    "fmnist-lt100": ("fashion_mnist", "exp:100"),
}
# method -> config overrides (the recipe's loss is replaced; everything else is shared)
METHODS: dict[str, list[str]] = {
    "ce": ["loss=ce"],
    "supcon": ["loss=supcon"],
    "score-fl": ["loss=fl"],
    "score-gc": ["loss=gc"],
    "score-logdet": ["loss=logdet"],
    "pgd-at": ["loss=ce", "adversarial=true"],
    "score-fl-adv": ["loss=fl", "adversarial=true"],
}
STANDARD = ("ce", "supcon", "score-fl", "score-gc", "score-logdet")
ADVERSARIAL = ("pgd-at", "score-fl-adv")
# The authors' two-stage ResNet-50 table (README of amajee11us/SCoRe; CIFAR-10 "Longtail", most likely rho 10).
PAPER = {"ce": 86.44, "supcon": 89.96, "score-gc": 90.83, "score-logdet": 90.80, "score-fl": 91.80}


def _train_row(setting: str, method: str, seed: int, shared: list[str], args: argparse.Namespace,
               log: Path) -> dict[str, Any]:
    """Train one (setting, method, seed) through the trainer registry; the row keeps what the table needs."""
    dataset, longtail = SETTINGS[setting]
    overrides = [f"dataset={dataset}", f"longtail={longtail}", *METHODS[method], f"seed={seed}", *shared]
    stem = _work_dir(args) / f"{setting}__{method}__s{seed}"
    meta = _train("score", RECIPE.name, overrides, stem, args, log).metadata
    m, groups = meta["metrics"], meta["metrics"]["per_class"].get("groups") or {}
    return {"setting": setting, "method": method, "seed": seed, "overrides": overrides,
            "checkpoint": str(stem) + ".safetensors", "checkpoint_sha256": meta["sha256"],
            "clean_acc": m["clean_acc"], "balanced_acc": m["balanced_clean_acc"],
            "groups": {g: v.get("clean_acc") for g, v in groups.items()},
            "class_counts": meta["training"]["data"]["class_counts"], "pgd10_acc": m.get("pgd10_acc"),
            "train_wall_s": meta["training"]["wall_time_s"], "train_cpu_s": meta["training"]["cpu_time_s"],
            "clean_flags": m["clean_flags"]}


def _work_dir(args: argparse.Namespace) -> Path:
    return Path(args.work_dir) if args.work_dir else Path("runs") / Path(args.out_dir).name


def _autoattack(row: dict[str, Any], args: argparse.Namespace, out: Path, log: Path) -> dict[str, Any]:
    """Standard AutoAttack of one row's checkpoint on the first ``--aa-n`` test images (reused if done)."""
    from robustkit.eval.results import result_stem, write_json_atomic

    dataset = SETTINGS[row["setting"]][0]
    name = f"score.{row['setting']}.{row['method']}.s{row['seed']}"
    result = out / f"{result_stem(name, 'autoattack', dataset, args.aa_n, 0)}.json"
    if not result.exists():
        if not Path(row["checkpoint"]).exists():
            raise SystemExit(f"{result} is missing and so is its checkpoint {row['checkpoint']}; drop the run's row "
                             f"from {out / 'table.json'} to retrain it")
        scratch = _work_dir(args) / result.name  # its records (resume state) stay in the work folder
        data = ["--data-dir", args.data_dir] if args.data_dir else []
        _run([sys.executable, "-m", "robustkit", "eval", "--model", row["checkpoint"], "--dataset", dataset,
              "--attack", "autoattack", "--n-examples", str(args.aa_n), *data, "--device", args.device,
              "--out", str(scratch), *(["--threads", str(args.threads)] if args.threads else []),
              *(["--no-progress"] if args.no_progress else [])], log)
        write_json_atomic(result, json.loads(scratch.read_text()))
    res = json.loads(result.read_text())
    if res["provenance"].get("checkpoint_sha256") != row["checkpoint_sha256"]:
        raise SystemExit(f"{result} evaluated another checkpoint than run {name}; delete the stale result")
    per_class = res.get("per_class") or {}
    groups = per_class.get("groups") or {}
    few = set((groups.get("few") or {}).get("classes") or [])  # class indices
    few_positions = None
    if few:  # which of the evaluated images are of a few-shot class (for the paired test on them)
        from robustkit.data import load_split

        y = load_split(dataset, "test", data_dir=args.data_dir).tensors(res["n_examples"])[1].tolist()
        few_positions = [i for i, c in enumerate(y) if c in few]
    return {"result": result.name, "n": res["n_examples"], "eps": res.get("eps_str"),
            "clean_acc": res["clean_accuracy"], "autoattack_acc": res["robust_accuracy"],
            "groups": {g: v.get("robust_acc") for g, v in groups.items()},
            "seconds": res["timing"]["total_seconds"], "robust_flags": res["robust_flags"],
            "few_positions": few_positions}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (setting, method): mean and spread over seeds, the paired test against CE."""
    out = []
    for setting in SETTINGS:
        ce = {r["seed"]: r for r in rows if r["setting"] == setting and r["method"] == "ce"}
        for method in METHODS:
            runs = sorted((r for r in rows if r["setting"] == setting and r["method"] == method),
                          key=lambda r: r["seed"])
            if not runs:
                continue
            accs = [r["balanced_acc"] for r in runs]
            line: dict[str, Any] = {
                "setting": setting, "method": method, "seeds": [r["seed"] for r in runs],
                "balanced_acc_mean": statistics.fmean(accs),
                "balanced_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "groups_mean": {g: statistics.fmean(r["groups"][g] for r in runs)
                                for g in runs[0]["groups"] if all(r["groups"].get(g) is not None for r in runs)},
                "train_wall_s_mean": statistics.fmean(r["train_wall_s"] for r in runs),
                "best_seed": max(runs, key=lambda r: (r["balanced_acc"], -r["seed"]))["seed"],
            }
            base = "pgd-at" if method in ADVERSARIAL else "ce"
            ref = ce if base == "ce" else {r["seed"]: r for r in rows
                                           if r["setting"] == setting and r["method"] == base}
            paired = [(ref[r["seed"]], r) for r in runs if r["seed"] in ref]
            if method != base and paired:
                a = [f for c, _ in paired for f in _bools(c["clean_flags"])]
                b = [f for _, r in paired for f in _bools(r["clean_flags"])]
                line["vs"] = {"baseline": base, "pairs": len(a), "seeds": [r["seed"] for _, r in paired],
                              **mcnemar_exact(a, b)}
            out.append(line)
    return out


def _p(p: float) -> str:
    """A p-value as the tables print it (below float's range it is a bound, not 0)."""
    return f"p = {p:.2g}" if p > 0 else "p < 1e-300"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _cost_line(summary: list[dict[str, Any]], aa: dict[str, Any]) -> str:
    """What the table cost, from the rows' own timings (wall time on a shared 2-core CPU, 1 thread each)."""
    train = sum(s["train_wall_s_mean"] * len(s["seeds"]) for s in summary if s.get("trains", True))
    attack = sum(a["seconds"] for a in aa.values())
    return (f"Cost: {train / 60:.0f} min of training and {attack / 60:.0f} min of AutoAttack (wall time, one thread "
            "per run, two or more runs sharing the 2-core CPU).")


def render_markdown(summary: list[dict[str, Any]], aa: dict[str, dict[str, Any]], command: str) -> str:
    lines = []
    for setting, (dataset, lt) in SETTINGS.items():
        block = [s for s in summary if s["setting"] == setting]
        if not block:
            continue
        lines += [f"### {setting}: {dataset}, long-tailed view {lt} (test split balanced)", "",
                  "| method | balanced acc (mean ± sd) | many | medium | few | vs CE: only this / only CE, p | "
                  "AutoAttack (best seed) | AA few | paper | train time |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for s in block:
            g = s["groups_mean"]
            t = s.get("vs")
            vs = f"{t['only_b']} / {t['only_a']}, {_p(t['p_value'])}" + ("" if t["baseline"] == "ce" else
                                                                                  " (vs pgd-at)") if t else "–"
            a = aa.get(f"{setting}/{s['method']}")
            aa_txt = f"{_pct(a['autoattack_acc'])} (s{s['best_seed']}, n={a['n']})" if a else "–"
            aa_few = _pct(a["groups"].get("few")) if a else "–"
            paper = f"{PAPER[s['method']]:.2f}" if s["method"] in PAPER and setting == "cifar10-lt10" else "–"
            lines.append(f"| {s['method']} | {_pct(s['balanced_acc_mean'])} ± {100 * s['balanced_acc_std']:.1f} "
                         f"(n={len(s['seeds'])}) | {_pct(g.get('many'))} | {_pct(g.get('medium'))} | "
                         f"{_pct(g.get('few'))} | {vs} | {aa_txt} | {aa_few} | {paper} | "
                         f"{s['train_wall_s_mean']:.0f} s |")
        lines.append("")
    lines += [*_adversarial_lines(summary, aa),
              "Accuracies in %. many/medium/few: classes with > 100, 20-100, < 20 training images. `vs CE`: exact "
              "McNemar on the clean per-example flags of the same test images, seed s against CE's seed s "
              "(adversarial rows: against PGD-AT's), pooled over seeds. AutoAttack: standard, Linf, the dataset's default eps, first images of the "
              "test split, on the seed with the best balanced accuracy. `paper`: Majee et al.'s two-stage "
              "ResNet-50 (1,000 epochs, full CIFAR-10, imbalance most likely 10).", "",
              _cost_line(summary, aa), "", f"Reproduce: `{command}`"]
    return "\n".join(lines) + "\n"


def adversarial_test(aa: dict[str, dict[str, Any]], setting: str) -> dict[str, Any] | None:
    """SCoRe-FL on adversarial views against PGD-AT with CE: exact McNemar on the AutoAttack flags of the
    same test images, overall and on the few-shot classes' images (the question the row asks)."""
    a, b = aa.get(f"{setting}/pgd-at"), aa.get(f"{setting}/score-fl-adv")
    if not a or not b or "robust_flags" not in a or "robust_flags" not in b:
        return None
    out = {"overall": mcnemar_exact(_bools(a["robust_flags"]), _bools(b["robust_flags"]))}
    few = a.get("few_positions") or []
    if few:
        out["few"] = mcnemar_exact([_bools(a["robust_flags"])[i] for i in few],
                                   [_bools(b["robust_flags"])[i] for i in few]) | {"n": len(few)}
    return out


def _adversarial_lines(summary: list[dict[str, Any]], aa: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for setting in SETTINGS:
        t = adversarial_test(aa, setting)
        if t is None:
            continue
        o = t["overall"]
        line = (f"**Robust representations ({setting})**: AutoAttack-robust under SCoRe-FL + adversarial views only "
                f"{o['only_b']}, under PGD-AT (CE) only {o['only_a']} (exact McNemar, {_p(o['p_value'])})")
        if "few" in t:
            f = t["few"]
            line += (f"; on the {f['n']} few-shot test images: {f['only_b']} vs {f['only_a']} "
                     f"({_p(f['p_value'])})")
        lines += [line + ".", ""]
    return lines


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(x["setting"] == s for x in summary)]
    fig, axes = plt.subplots(1, len(settings), figsize=(4.6 * len(settings), 3.8), dpi=110, squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        block = [s for s in summary if s["setting"] == setting]
        xs = range(len(block))
        ax.bar(xs, [100 * s["balanced_acc_mean"] for s in block], yerr=[100 * s["balanced_acc_std"] for s in block],
               color=["tab:gray" if s["method"] in ("ce", "pgd-at") else "tab:blue" for s in block], alpha=0.8,
               capsize=3, label="balanced (mean ± sd)")
        for group, marker in (("many", "^"), ("few", "v")):
            ys = [100 * s["groups_mean"][group] if group in s["groups_mean"] else None for s in block]
            ax.scatter([x for x, y in zip(xs, ys, strict=True) if y is not None], [y for y in ys if y is not None],
                       marker=marker, color="black", s=25, zorder=3, label=f"{group}-shot")
        ax.set_xticks(list(xs), [s["method"] for s in block], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{setting} ({SETTINGS[setting][1]})", fontsize=9)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = driver_parser("robustkit.train.score_compare", __doc__, "defenses/score_comparison", list(SETTINGS))
    p.add_argument("--methods", default=",".join(STANDARD), help=f"comma list from {', '.join(METHODS)}")
    p.add_argument("--adversarial-settings", default="cifar10-lt100",
                   help=f"settings that also run {' and '.join(ADVERSARIAL)} ('' for none)")
    p.add_argument("--adversarial-seeds", default="0", help="training seeds of the adversarial rows")
    args = p.parse_args(argv)
    command = driver_command("robustkit.train.score_compare", argv)
    settings = checked_names(args.settings, list(SETTINGS), "comparison setting")
    methods = checked_names(args.methods, list(METHODS), "comparison method")
    adv = checked_names(args.adversarial_settings, list(SETTINGS), "comparison setting")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    shared = [a.strip() for a in args.train_arg]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    table_path = out / "table.json"
    previous = json.loads(table_path.read_text()) if table_path.exists() else {}
    kept = {(r["setting"], r["method"], r["seed"]): r for r in previous.get("rows", [])
            if previous.get("shared_overrides") == shared}
    plan = [(s, m, seed) for s in settings for m in methods for seed in seeds]
    adv_seeds = [int(s) for s in args.adversarial_seeds.split(",") if s.strip()]
    plan += [(s, m, seed) for s in adv for m in ADVERSARIAL for seed in adv_seeds if (s, m, seed) not in plan]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def build(all_rows: list[dict[str, Any]], all_aa: dict[str, Any]) -> dict[str, Any]:
        all_rows.sort(key=lambda r: (list(SETTINGS).index(r["setting"]), list(METHODS).index(r["method"]), r["seed"]))
        return {"schema": "robustkit.score_comparison", "schema_version": 1, "command": command,
                "shared_overrides": shared, "device": args.device, "rows": all_rows, "summary": summarise(all_rows),
                "autoattack": all_aa}

    def save(aa: dict[str, Any]) -> dict[str, Any]:
        return merge_table(table_path, _work_dir(args) / "table.lock", rows,
                           lambda r: (r["setting"], r["method"], r["seed"]), build, shared, aa)

    for i, key in enumerate(plan):
        if key in kept:
            rows.append(kept[key])
            continue
        print(f"[{i + 1}/{len(plan)}] {key[0]} {key[1]} seed {key[2]}", flush=True)
        rows.append(_train_row(*key, shared, args, log))
        save({})  # every finished run is kept: a kill loses at most one
    aa: dict[str, dict[str, Any]] = {}
    if args.aa_n:
        for s in summarise(rows):
            row = next(r for r in rows if (r["setting"], r["method"], r["seed"]) == (s["setting"], s["method"],
                                                                                  s["best_seed"]))
            aa[f"{s['setting']}/{s['method']}"] = _autoattack(row, args, out, log)
            save(aa)
    table = save(aa)
    md = render_markdown(table["summary"], table["autoattack"], command)
    (out / "table.md").write_text(md)
    plot(table["summary"], out / "table.png")
    print(md)
    print(f"done in {time.perf_counter() - t0:.0f}s; wrote {table_path}, table.md, table.png")
    return 0


if __name__ == "__main__":
    from robustkit.cli import guarded

    raise SystemExit(guarded(main))

"""The FedLoGe comparison at equal budget: FedAvg, FedAvg + local fine-tuning, FedLoGe, FedLoGe without GLA-FR.

Every method shares the long-tailed view, the client split (same for every seed), the backbone, rounds,
client sampling, local epochs and optimiser (``defenses/fedloge.toml``); FedAvg's run gives the generic
FedAvg model and, by fine-tuning psi on each client, the personalised baseline; FedLoGe's run gives FedLoGe
and, without realignment, its ablation. The table reports the generic models' balanced test accuracy with
its spread over seeds and many/medium/few, the mean personalised accuracy over clients on their local test
sets (unmasked and with the reference's label-prior masking), an exact paired McNemar test of each generic
model against FedAvg, and standard AutoAttack on the first ``--aa-n`` test images of each generic model's
best seed::

    python -m robustkit.train.fedloge_compare --data-dir ../shared/data/partial --out-dir defenses/fedloge_comparison

Resumable like :mod:`robustkit.train.score_compare` (rows in ``table.json``, checkpoints in
``runs/<out-dir name>``, AutoAttack results in the out-dir); two processes with different ``--settings``
share one table.
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
from robustkit.train.score_compare import _cost_line, _p, _pct

RECIPE = Path(__file__).resolve().parents[2] / "defenses" / "fedloge.toml"
SETTINGS: dict[str, tuple[str, str]] = {"cifar10-lt100": ("cifar10", "exp:100"),
                                        "fmnist-lt100": ("fashion_mnist", "exp:100")}
# method -> (training run, checkpoint suffix of its generic model, metrics key of its numbers)
METHODS: dict[str, tuple[str, str, str | None]] = {
    "fedavg": ("fedavg", "", None),
    "fedavg+ft": ("fedavg", "", None),  # same generic model as fedavg; personalised = fine-tuned psi
    "fedloge": ("fedloge", "", None),
    "fedloge-no-glafr": ("fedloge", ".no_glafr", "no_glafr"),
}
GENERIC = ("fedavg", "fedloge", "fedloge-no-glafr")  # fedavg+ft's generic model is fedavg's
PERSONAL = ("fedavg+ft", "fedloge", "fedloge-no-glafr")  # fedavg has no personal heads
# The authors' log (ResNet-18, CIFAR-10-LT IF 100, alpha 0.5, 40 clients, 500 rounds): generic / personalised.
PAPER = {"fedloge": (76.43, 87.63)}


def _work_dir(args: argparse.Namespace) -> Path:
    return Path(args.work_dir) if args.work_dir else Path("runs") / Path(args.out_dir).name


def _train_run(setting: str, method: str, seed: int, shared: list[str], args: argparse.Namespace, log: Path
               ) -> dict[str, Any]:
    """One training run (fedavg or fedloge) through the registry; the row keeps what the table needs."""
    dataset, longtail = SETTINGS[setting]
    overrides = [f"dataset={dataset}", f"longtail={longtail}", f"method={method}", f"seed={seed}", *shared]
    stem = _work_dir(args) / f"{setting}__{method}__s{seed}"
    meta = _train("fedloge", RECIPE.name, overrides, stem, args, log).metadata
    return {"setting": setting, "run": method, "seed": seed, "overrides": overrides, "stem": str(stem),
            "metrics": {k: v for k, v in meta["metrics"].items() if k != "local_acc_per_client"},
            "sha256": {"": meta["sha256"], ".no_glafr": _sha(stem, ".no_glafr")},
            "train_wall_s": meta["training"]["wall_time_s"], "train_cpu_s": meta["training"]["cpu_time_s"]}


def _sha(stem: Path, suffix: str) -> str | None:
    path = Path(f"{stem}{suffix}.json")
    return json.loads(path.read_text())["sha256"] if path.exists() else None


def _numbers(row: dict[str, Any], method: str) -> dict[str, Any]:
    """A method's numbers from its training run's metrics."""
    key = METHODS[method][2]
    m = row["metrics"][key] if key else row["metrics"]
    out = {k: m.get(k) for k in ("balanced_clean_acc", "groups", "clean_flags", "local_acc_unmasked",
                                 "local_acc_masked")}
    if method == "fedavg":
        out["local_acc_unmasked"] = out["local_acc_masked"] = None
    return out


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for setting in SETTINGS:
        for method, (run, _, _) in METHODS.items():
            runs = sorted((r for r in rows if r["setting"] == setting and r["run"] == run), key=lambda r: r["seed"])
            if not runs:
                continue
            nums = [_numbers(r, method) for r in runs]
            accs = [n["balanced_clean_acc"] for n in nums]
            line: dict[str, Any] = {
                "setting": setting, "method": method, "seeds": [r["seed"] for r in runs],
                "generic_acc_mean": statistics.fmean(accs),
                "generic_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "groups_mean": {g: statistics.fmean(n["groups"][g] for n in nums) for g in nums[0]["groups"]
                                if all(n["groups"].get(g) is not None for n in nums)},
                "train_wall_s_mean": statistics.fmean(r["train_wall_s"] for r in runs),
                "trains": method in ("fedavg", "fedloge"),  # the other two reuse these runs
                "best_seed": runs[max(range(len(runs)), key=lambda i: (accs[i], -runs[i]["seed"]))]["seed"]}
            for kind in ("unmasked", "masked"):
                vals = [n[f"local_acc_{kind}"] for n in nums]
                line[f"local_{kind}_mean"] = statistics.fmean(vals) if None not in vals else None
            base = {r["seed"]: _numbers(r, "fedavg") for r in rows if r["setting"] == setting and r["run"] == "fedavg"}
            pairs = [(base[r["seed"]], n) for r, n in zip(runs, nums, strict=True) if r["seed"] in base]
            if method in ("fedloge", "fedloge-no-glafr") and pairs:
                a = [f for b, _ in pairs for f in _bools(b["clean_flags"])]
                b = [f for _, n in pairs for f in _bools(n["clean_flags"])]
                line["vs_fedavg"] = mcnemar_exact(a, b) | {"pairs": len(a)}
            out.append(line)
    return out


def _autoattack(setting: str, method: str, row: dict[str, Any], args: argparse.Namespace, out: Path,
                log: Path) -> dict[str, Any]:
    from robustkit.eval.results import result_stem, write_json_atomic

    suffix = METHODS[method][1]
    dataset = SETTINGS[setting][0]
    name = f"fedloge.{setting}.{method}.s{row['seed']}"
    result = out / f"{result_stem(name, 'autoattack', dataset, args.aa_n, 0)}.json"
    ckpt = Path(f"{row['stem']}{suffix}.safetensors")
    if not result.exists():
        if not ckpt.exists():
            raise SystemExit(f"{result} is missing and so is its checkpoint {ckpt}; drop the run's row from "
                             f"{out / 'table.json'} to retrain it")
        scratch = _work_dir(args) / result.name
        data = ["--data-dir", args.data_dir] if args.data_dir else []
        _run([sys.executable, "-m", "robustkit", "eval", "--model", str(ckpt), "--dataset", dataset, "--attack",
              "autoattack", "--n-examples", str(args.aa_n), *data, "--device", args.device, "--out", str(scratch),
              *(["--threads", str(args.threads)] if args.threads else []),
              *(["--no-progress"] if args.no_progress else [])], log)
        write_json_atomic(result, json.loads(scratch.read_text()))
    res = json.loads(result.read_text())
    if res["provenance"].get("checkpoint_sha256") != row["sha256"][suffix]:
        raise SystemExit(f"{result} evaluated another checkpoint than {name}; delete the stale result")
    groups = (res.get("per_class") or {}).get("groups") or {}
    return {"result": result.name, "n": res["n_examples"], "eps": res.get("eps_str"), "clean_acc": res["clean_accuracy"],
            "autoattack_acc": res["robust_accuracy"], "groups": {g: v.get("robust_acc") for g, v in groups.items()},
            "seconds": res["timing"]["total_seconds"], "seed": row["seed"]}


def render_markdown(summary: list[dict[str, Any]], aa: dict[str, Any], command: str) -> str:
    lines = []
    for setting, (dataset, lt) in SETTINGS.items():
        block = [s for s in summary if s["setting"] == setting]
        if not block:
            continue
        lines += [f"### {setting}: {dataset}, global long-tailed view {lt}", "",
                  "| method | generic acc (mean ± sd) | many | medium | few | vs FedAvg: only this / only FedAvg, p | "
                  "personalised (unmasked) | personalised (masked) | AutoAttack, generic (best seed) | paper "
                  "generic / personalised | train time |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for s in block:
            g, t = s["groups_mean"], s.get("vs_fedavg")
            vs = f"{t['only_b']} / {t['only_a']}, {_p(t['p_value'])}" if t else "–"
            a = aa.get(f"{setting}/{s['method']}")
            aa_txt = f"{_pct(a['autoattack_acc'])} (s{a['seed']}, n={a['n']})" if a else "–"
            paper = PAPER.get(s["method"]) if setting == "cifar10-lt100" else None
            generic = "(= fedavg)" if s["method"] == "fedavg+ft" else (
                f"{_pct(s['generic_acc_mean'])} ± {100 * s['generic_acc_std']:.1f} (n={len(s['seeds'])})")
            lines.append(f"| {s['method']} | {generic} | {_pct(g.get('many'))} | {_pct(g.get('medium'))} | "
                         f"{_pct(g.get('few'))} | {vs} | {_pct(s['local_unmasked_mean'])} | "
                         f"{_pct(s['local_masked_mean'])} | {aa_txt} | "
                         f"{f'{paper[0]:.2f} / {paper[1]:.2f}' if paper else '–'} | {s['train_wall_s_mean']:.0f} s |")
        lines.append("")
    lines += ["Accuracies in %. Generic: the balanced test split; many/medium/few: classes with > 100, 20-100, < 20 "
              "images in the global long-tailed view. Personalised: mean over clients of each client's model on "
              "its local test set (drawn to mirror its training labels); masked: with the reference code's "
              "label-prior masking (classes the client never trained on cannot be predicted). `vs FedAvg`: exact "
              "McNemar on the generic models' clean flags, seed s against FedAvg's seed s, pooled. AutoAttack: "
              "standard, Linf, the dataset's default eps. `paper`: the authors' log, ResNet-18, full CIFAR-10-LT, "
              "40 clients, 500 rounds.", "", _cost_line(summary, aa), "", f"Reproduce: `{command}`"]
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(x["setting"] == s for x in summary)]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 3.8), dpi=110, squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        block = [s for s in summary if s["setting"] == setting]
        xs = list(range(len(block)))
        ax.bar([x - 0.2 for x in xs], [100 * s["generic_acc_mean"] for s in block], width=0.4,
               yerr=[100 * s["generic_acc_std"] for s in block], capsize=3, label="generic (balanced test)")
        ax.bar([x + 0.2 for x in xs], [100 * (s["local_unmasked_mean"] or 0) for s in block], width=0.4,
               color="tab:orange", label="personalised (local test, unmasked)")
        ax.set_xticks(xs, [s["method"] for s in block], rotation=20, fontsize=8)
        ax.set_title(f"{setting} ({SETTINGS[setting][1]})", fontsize=9)
        ax.set_ylabel("accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = driver_parser("robustkit.train.fedloge_compare", __doc__, "defenses/fedloge_comparison",
                         list(SETTINGS)).parse_args(argv)
    command = driver_command("robustkit.train.fedloge_compare", argv)
    settings = checked_names(args.settings, list(SETTINGS), "comparison setting")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    shared = [a.strip() for a in args.train_arg]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log, table_path = out / "log.txt", out / "table.json"
    previous = json.loads(table_path.read_text()) if table_path.exists() else {}
    kept = {(r["setting"], r["run"], r["seed"]): r for r in previous.get("rows", [])
            if previous.get("shared_overrides") == shared}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def build(all_rows: list[dict[str, Any]], all_aa: dict[str, Any]) -> dict[str, Any]:
        all_rows.sort(key=lambda r: (r["setting"], r["run"], r["seed"]))
        return {"schema": "robustkit.fedloge_comparison", "schema_version": 1, "command": command,
                "shared_overrides": shared, "device": args.device, "rows": all_rows, "summary": summarise(all_rows),
                "autoattack": all_aa}

    def save(aa: dict[str, Any]) -> dict[str, Any]:
        return merge_table(table_path, _work_dir(args) / "table.lock", rows,
                           lambda r: (r["setting"], r["run"], r["seed"]), build, shared, aa)

    plan = [(s, run, seed) for s in settings for run in ("fedavg", "fedloge") for seed in seeds]
    for i, key in enumerate(plan):
        if key in kept:
            rows.append(kept[key])
            continue
        print(f"[{i + 1}/{len(plan)}] {key[0]} {key[1]} seed {key[2]}", flush=True)
        rows.append(_train_run(*key, shared, args, log))
        save({})
    aa: dict[str, Any] = {}
    if args.aa_n:
        for s in summarise(rows):
            if s["method"] in GENERIC:
                row = next(r for r in rows if (r["setting"], r["run"], r["seed"]) ==
                           (s["setting"], METHODS[s["method"]][0], s["best_seed"]))
                aa[f"{s['setting']}/{s['method']}"] = _autoattack(s["setting"], s["method"], row, args, out, log)
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

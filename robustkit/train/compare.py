"""The LTD comparison at equal budget: PGD-AT vs PGD-AT+LTD vs TRADES vs TRADES+LTD.

Why a driver and not four commands in a README: the claim being checked ("LTD raises robust accuracy on
top of the framework it plugs into") is only meaningful when the four runs share the network, epochs,
inner attack, data and seed, and are scored by the same standard AutoAttack on the same test images.
This file pins that: one set of shared overrides is passed to every run, each run's own recipe only
chooses the framework (and the LTD teacher/temperatures), and the table is rebuilt from the checkpoints
and result JSONs on disk, never from numbers typed in. Finished trainings and evaluations are reused
(AutoAttack resumes from its per-example records), so a killed run continues where it stopped::

    python -m robustkit.train.compare --data-dir ../shared/data/partial --out-dir defenses/ltd_comparison

writes the results, ``<out-dir>/<run>__autoattack__cifar10-n1000-s0.json`` (the name ``robustkit eval``
gives), ``table.json``, ``table.md``, ``table.png`` and ``log.txt``: what is committed. Checkpoints and
resume state (AutoAttack's records) go to ``--work-dir`` (default ``runs/<out-dir name>``, ignored by
git): experiment checkpoints are not data. ``table.json`` keeps what only a checkpoint knew (training
time, the per-epoch validation curve, architecture, sha256), so the table rebuilds from the committed
files after the checkpoints are gone; a run is retrained only when its result is missing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from robustkit.core.provenance import total_wall_s
from robustkit.eval.paired import as_bools as _bools
from robustkit.eval.paired import mcnemar_exact

RECIPES = Path(__file__).resolve().parents[2] / "defenses"

# name -> (trainer, recipe file in defenses/, config overrides). Only the framework differs between the pairs.
RUNS: dict[str, tuple[str, str, list[str]]] = {
    "pgd-at": ("pgd_at", "pgd_at.toml", []),
    "pgd-at+ltd": ("ltd", "ltd.toml", ["framework=pgd_at"]),
    "trades": ("trades", "trades.toml", []),
    "trades+ltd": ("ltd", "ltd.toml", ["framework=trades"]),
}

# dataset -> what every run on it shares beyond the recipes (which are CIFAR-10's): the data, the threat
# model and the augmentation for all four runs, and LTD's teacher, a fast-AT SmallCNN of the same data
# as on CIFAR-10. Only these differ between datasets, so "the direction holds" compares like with like.
DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {"label": "CIFAR-10", "eps": "8/255", "all": [], "ltd": []},
    # Linf 0.1: the usual Fashion-MNIST budget. Crops of a 2-pixel padding (28-pixel images); horizontal
    # flips keep a garment a garment. The last 1,000 training images are held out of every run (they
    # are the logged validation set): no base model sees them, so adaptive smoothing's deployed
    # constants can be chosen on them without touching the test split.
    "fashion_mnist": {"label": "Fashion-MNIST", "eps": "0.1",
                      "all": ["dataset=fashion_mnist", "eps=0.1", "crop_pad=2", "holdout=1000"],
                      "ltd": ["teacher=small_cnn.fashion_mnist_partial"],
                      "shipped": {"pgd-at": "small_cnn.fashion_mnist_pgd_at", "pgd-at+ltd": "ltd.fashion_mnist_partial",
                                  "trades": "small_cnn.fashion_mnist_trades"}},
    # Linf 0.3: the usual MNIST budget, far larger relative to the data than 0.1 on Fashion-MNIST, so the
    # inner attack gets 5 steps (not 3) and eps ramps up over the first 3 epochs (at full eps from the
    # first step a SmallCNN stays near chance for epochs). 10 epochs of 23,680 images are more steps than
    # 15 of CIFAR-10's 5,438. Crops of a 2-pixel padding shift a digit; no flips (a mirrored 2 is no 2).
    "mnist": {"label": "MNIST", "eps": "0.3",
              "all": ["dataset=mnist", "eps=0.3", "crop_pad=2", "flip=false", "holdout=1000", "steps=5",
                      "eps_warmup=3", "epochs=10"],
              "ltd": ["teacher=small_cnn.mnist_partial"],
              "shipped": {"pgd-at": "small_cnn.mnist_pgd_at", "pgd-at+ltd": "ltd.mnist_partial",
                          "trades": "small_cnn.mnist_trades", "trades+ltd": "ltd.mnist_trades"}},
}
# A run in a dataset's "shipped" map was trained by exactly this comparison's command and shipped as that
# registered model: where the work folder has no checkpoint of the run (a fresh clone, another machine),
# the comparison evaluates the shipped file instead of retraining. A retrain is not bit-identical, so
# this is what makes the committed table reproducible from a clone, and the shipped card and the table
# describe the same weights.


def _run(cmd: list[str], log: Path) -> None:
    """Run a robustkit command, teeing its output into ``log`` (kept next to the artefacts)."""
    print("$ " + _shown(cmd), flush=True)
    with open(log, "a") as fh:
        fh.write("$ " + _shown(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        here = str(Path.cwd()) + "/"
        for line in proc.stdout:
            sys.stdout.write(line)
            fh.write(line.replace(here, ""))  # a warning's source path, say: no machine path in the log
        if proc.wait() != 0:
            raise SystemExit(f"command failed (exit {proc.returncode}); see {log}")


def _shown(cmd: list[str]) -> str:
    """``cmd`` as the committed log shows it: ``python`` for this interpreter, paths under the working
    directory relative to it (an absolute path would tie the log to one machine)."""
    cwd = Path.cwd()

    def one(arg: str) -> str:
        if arg == sys.executable:
            return "python"
        path = Path(arg)
        return path.relative_to(cwd).as_posix() if path.is_absolute() and path.is_relative_to(cwd) else arg

    return " ".join(shlex.quote(one(c)) for c in cmd)


def _train(trainer_name: str, recipe: str, overrides: list[str], stem: Path, args: argparse.Namespace,
           log: Path) -> Any:
    """Train one run in this process through the trainer registry: the recipe's config, then the
    overrides (every run gets the same shared ones: equal budget). ``log`` gets the equivalent command
    and the checkpoint written; the per-epoch log is in the checkpoint's ``training.epochs_log``."""
    import torch

    from robustkit.core.config import read_recipe, resolve_config
    from robustkit.core.provenance import require_device
    from robustkit.train import RunOptions, get_trainer

    trainer = get_trainer(trainer_name)
    _, fields = read_recipe(RECIPES / recipe)
    config = resolve_config(trainer.config, recipe=fields, recipe_source=f"recipe defenses/{recipe}",
                            overrides=overrides)
    shown = " ".join([f"robustkit train {trainer.name} --recipe defenses/{recipe}",
                      *(f"--set {shlex.quote(o)}" for o in overrides), f"--out {_shown([str(stem)])}"])
    print("$ " + shown, flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    checkpoint = trainer(config, RunOptions(out=stem, device=require_device(args.device), data_dir=args.data_dir,
                                            progress=not args.no_progress))
    with open(log, "a") as fh:
        fh.write(f"$ {shown}\nsaved {checkpoint.path.name} (sha256 {checkpoint.metadata['sha256']}) in "
                 f"{time.perf_counter() - t0:.0f}s\n")
    return checkpoint


def driver_parser(module: str, doc: str, out_dir: str, settings: Sequence[str]) -> argparse.ArgumentParser:
    """The flags the long-tailed comparison drivers share (score_compare, fedloge_compare), defined once."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="data root holding <dataset>/{train,test}.npz")
    p.add_argument("--out-dir", default=out_dir, help="results and tables (committed)")
    p.add_argument("--work-dir", default=None, help="checkpoints and AutoAttack records (default runs/<out-dir name>)")
    p.add_argument("--settings", default=",".join(settings), help=f"comma list from {', '.join(settings)}")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (the long-tailed view is the same for all)")
    p.add_argument("--aa-n", type=int, default=500, help="AutoAttack on the first N test images (0: skip)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="shared config override given to EVERY run (equal budget), e.g. epochs=10")
    p.add_argument("--no-progress", action="store_true")
    return p


def driver_command(module: str, argv: Sequence[str] | None) -> str:
    """The command line a driver's table records as its reproducing command."""
    return f"python -m {module} " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def checked_names(spec: str, known: Sequence[str], kind: str) -> list[str]:
    """A comma list of names, each one known (else the one-line error with close matches)."""
    from robustkit.core.errors import UnknownNameError

    names = [n for n in spec.split(",") if n]
    for n in names:
        if n not in known:
            raise UnknownNameError(kind, n, list(known))
    return names


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` while a shared table is read and rewritten: two driver processes
    given different settings (the CPU has two cores) share one table."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def merge_table(table_path: Path, lock: Path, rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any],
                build: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]], shared: list[str],
                autoattack: dict[str, Any]) -> dict[str, Any]:
    """Merge this process's ``rows`` and AutoAttack entries into ``table_path`` (rows from other
    processes with the same shared overrides are kept), write it atomically and return it;
    ``build(rows, autoattack)`` makes the table around them."""
    from robustkit.eval.results import write_json_atomic

    with locked(lock):
        on_disk = json.loads(table_path.read_text()) if table_path.exists() else {}
        same = on_disk.get("shared_overrides") == shared
        merged = {key(r): r for r in (on_disk.get("rows", []) if same else [])}
        merged.update({key(r): r for r in rows})
        table = build(list(merged.values()), {**(on_disk.get("autoattack", {}) if same else {}), **autoattack})
        write_json_atomic(table_path, table)
    return table


def _without_runs(command: str) -> str:
    """``command`` without its ``--runs`` selection (the comparison of every run)."""
    parts = shlex.split(command)
    out: list[str] = []
    skip = False
    for part in parts:
        if skip:
            skip = False
        elif part == "--runs":
            skip = True
        elif not part.startswith("--runs="):
            out.append(part)
    return shlex.join(out)


def _overrides(shared: list[str]) -> list[str]:
    """The shared ``--train-arg`` pairs, recorded as ``["--epochs", "5"]``, as config overrides."""
    return [f"{flag.lstrip('-').replace('-', '_')}={value}" for flag, value in zip(shared[::2], shared[1::2], strict=True)]


def _dataset_overrides(dataset: str, trainer: str) -> list[str]:
    """The config overrides ``dataset`` gives a run of ``trainer`` (LTD also gets its teacher)."""
    d = DATASETS[dataset]
    return [*d["all"], *(d["ltd"] if trainer == "ltd" else [])]


def _framework(training: dict[str, Any]) -> str | None:
    """The framework in the comparison's spelling (its run names): ``pgd-at`` or ``trades``."""
    framework = training.get("framework")
    return framework.replace("_", "-") if isinstance(framework, str) else None


def _checkpoint_facts(ckpt_json: Path) -> dict[str, Any]:
    """What a table row needs from a checkpoint's sidecar; table.json keeps it for rebuilds without it."""
    meta = json.loads(ckpt_json.read_text())
    training = meta.get("training", {})
    # A registered trainer records its config; a checkpoint from before the registry, training.recipe.
    config = meta.get("config") or training.get("recipe", {})
    return {
        "checkpoint": ckpt_json.with_suffix(".safetensors").name,
        "checkpoint_sha256": meta.get("sha256"),
        "architecture": meta.get("architecture"),
        "n_parameters": meta.get("n_parameters"),
        "framework": _framework(training),
        "ltd": meta.get("trainer", training.get("method")) == "ltd",
        "teacher": config.get("teacher"),
        "tau_t": config.get("tau_t"),
        "tau_s": config.get("tau_s"),
        "train_wall_s": total_wall_s(training),  # all processes of a resumed run, not the last one's
        "train_cpu_s": training.get("cpu_time_s"),  # the last process's only
        "val_curve": _val_curve(training),
    }


def _val_curve(training: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-epoch validation accuracies (clean, PGD-10) the trainer logged, one entry per epoch."""
    keys = ("epoch", "val_n", "val_clean_acc", "val_pgd10_acc")
    return [{k: e[k] for k in keys if k in e} for e in training.get("epochs_log", [])]


def _previous_rows(path: Path, shared: list[str]) -> list[dict[str, Any]]:
    """The rows of a table written earlier with the same shared training overrides (else none)."""
    if not path.exists():
        return []
    table = json.loads(path.read_text())
    return table.get("rows", []) if table.get("shared_train_overrides") == shared else []


def _work_dir(args: argparse.Namespace) -> Path:
    """Where checkpoints and resume state go: ``--work-dir``, else ``runs/<out-dir name>`` (ignored)."""
    return Path(args.work_dir) if args.work_dir else Path("runs") / Path(args.out_dir).name


def _checkpoint(args: argparse.Namespace, name: str) -> tuple[Path, str]:
    """The run's checkpoint sidecar and what ``robustkit eval --model`` takes for it: the work folder's
    if it has one, else the shipped file the dataset maps the run to (if any), else the work folder's
    path, which training will create."""
    from robustkit.models.base import WEIGHTS_DIR

    stem = _work_dir(args) / name.replace("+", "_")
    ckpt = stem.parent / (stem.name + ".json")
    shipped = DATASETS[args.dataset].get("shipped", {}).get(name)
    if not ckpt.exists() and shipped and (WEIGHTS_DIR / f"{shipped}.json").exists():
        return WEIGHTS_DIR / f"{shipped}.json", shipped  # by id: the registry checks its pin
    return ckpt, str(stem) + ".safetensors"


def _row(name: str, facts: dict[str, Any], result_json: Path) -> dict[str, Any]:
    from robustkit.core.errors import DataError
    from robustkit.eval.results import RESULT_SCHEMA, RESULT_SCHEMA_VERSION, read_versioned_json

    res = read_versioned_json(result_json, RESULT_SCHEMA, RESULT_SCHEMA_VERSION, "result")
    stages = {s["name"]: s for s in res["stages"]}
    evaluated = res.get("provenance", {}).get("checkpoint_sha256")
    if evaluated and facts.get("checkpoint_sha256") and evaluated != facts["checkpoint_sha256"]:
        raise DataError(f"{result_json} evaluated checkpoint {evaluated[:12]}…, but the training facts of run "
                        f"{name} are of {str(facts['checkpoint_sha256'])[:12]}…; delete the stale one")
    return {
        "run": name,
        **facts,
        "n_examples": res["n_examples"],
        "clean_acc": res["clean_accuracy"],
        "autoattack_acc": res["robust_accuracy"],
        "apgd_ce_acc": stages.get("apgd-ce", {}).get("accuracy"),
        "square_broke": stages.get("square", {}).get("n_broken"),
        "fab_t_broke": stages.get("fab-t", {}).get("n_broken"),
        "eval_wall_s": res.get("timing", {}).get("total_seconds"),
        "result": result_json.name,
        "robust_flags": res["robust_flags"],
        "clean_flags": res["clean_flags"],
    }


def paired_tests(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Framework vs framework+LTD, robust and clean flags, for every pair present in ``rows``."""
    by_name = {r["run"]: r for r in rows}
    out = []
    for base in ("pgd-at", "trades"):
        a, b = by_name.get(base), by_name.get(base + "+ltd")
        if a is None or b is None:
            continue
        pa = {k: _bools(a[k]) for k in ("robust_flags", "clean_flags")}
        pb = {k: _bools(b[k]) for k in ("robust_flags", "clean_flags")}
        out.append({"a": base, "b": base + "+ltd",
                    "robust": mcnemar_exact(pa["robust_flags"], pb["robust_flags"]),
                    "clean": mcnemar_exact(pa["clean_flags"], pb["clean_flags"])})
    return out


def render_markdown(rows: list[dict[str, Any]], command: str, dataset: str = "cifar10") -> str:
    lines = [
        "| run | clean | AutoAttack | APGD-CE | Square/FAB-T broke after APGD | train time |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        late = f"{r['square_broke'] or 0} / {r['fab_t_broke'] or 0}"
        lines.append(
            f"| {r['run']} | {100 * r['clean_acc']:.2f}% | **{100 * r['autoattack_acc']:.2f}%** | "
            f"{100 * r['apgd_ce_acc']:.2f}% | {late} | {r['train_wall_s'] or 0:.0f} s |"
        )
    n = rows[0]["n_examples"] if rows else 0
    d = DATASETS[dataset]
    lines += ["", f"Standard AutoAttack, Linf {d['eps']}, first {n} real {d['label']} test images, seed 0."]
    for t in paired_tests(rows):
        r, c = t["robust"], t["clean"]
        lines.append(
            f"{t['b']} vs {t['a']} on the same images (exact McNemar): robust under {t['b']} only "
            f"{r['only_b']}, under {t['a']} only {r['only_a']} (p = {r['p_value']:.2g}); clean: "
            f"{c['only_b']} vs {c['only_a']} (p = {c['p_value']:.2g}).")
    lines.append(f"Reproduce: `{command}`")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, dataset: str = "cifar10") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for r in rows:
        marker = "*" if r["ltd"] else "o"
        color = "tab:blue" if r["framework"] == "pgd-at" else "tab:orange"
        ax.scatter(100 * r["clean_acc"], 100 * r["autoattack_acc"], s=140 if r["ltd"] else 70,
                   marker=marker, color=color, label=r["run"], zorder=3)
    for fw, color in (("pgd-at", "tab:blue"), ("trades", "tab:orange")):
        pair = [r for r in rows if r["framework"] == fw]
        if len(pair) == 2:  # arrow from the base framework to +LTD
            a, b = sorted(pair, key=lambda r: r["ltd"])
            ax.annotate("", xy=(100 * b["clean_acc"], 100 * b["autoattack_acc"]),
                        xytext=(100 * a["clean_acc"], 100 * a["autoattack_acc"]),
                        arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6})
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("AutoAttack accuracy (%)")
    n = rows[0]["n_examples"] if rows else 0
    d = DATASETS[dataset]
    ax.set_title(f"LTD at equal budget ({d['label']} subset, n={n}, Linf {d['eps']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _floats(spec: str) -> list[float]:
    try:
        return [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"expected a comma list of numbers, got {spec!r}") from None


def ablation(args: argparse.Namespace, shared: list[str], command: str) -> int:
    """tau_t x tau_s grid of the LTD recipe, scored on a holdout of the TRAINING images.

    The test split is never used to choose: each run holds out the last ``--holdout`` train images
    and logs clean and PGD-10 accuracy on all of them after the last epoch; the pick is the highest
    PGD-10 accuracy (ties: higher clean accuracy).
    """
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    kept = {(r["tau_t"], r["tau_s"]): r for r in _previous_rows(out / "ablation.json", shared)
            if r.get("holdout_n") == args.holdout}
    rows = []
    for tau_t in _floats(args.tau_t):
        for tau_s in _floats(args.tau_s):
            stem = _work_dir(args) / f"ltd_tt{tau_t:g}_ts{tau_s:g}"
            ckpt = stem.parent / (stem.name + ".json")  # not with_suffix: "tt0.5" has a dot
            if not ckpt.exists() and (tau_t, tau_s) in kept:  # the committed row holds all the table needs
                rows.append(kept[(tau_t, tau_s)])
                continue
            if not ckpt.exists():
                _train("ltd", "ltd.toml", [*_dataset_overrides(args.dataset, "ltd"), f"tau_t={tau_t}",
                                           f"tau_s={tau_s}", f"holdout={args.holdout}", "val_pgd_n=0", "n_test=1",
                                           *_overrides(shared)], stem, args, log)
            training = json.loads(ckpt.read_text())["training"]
            last = training["epochs_log"][-1]
            rows.append({"tau_t": tau_t, "tau_s": tau_s, "framework": _framework(training),
                         "holdout_n": last["val_n"], "holdout_clean_acc": last["val_clean_acc"],
                         "holdout_pgd10_acc": last["val_pgd10_acc"],
                         "train_wall_s": training["wall_time_s"], "checkpoint": ckpt.name,
                         "holdout_curve": _val_curve(training)})
    best = max(rows, key=lambda r: (r["holdout_pgd10_acc"], r["holdout_clean_acc"]))
    lines = ["| tau_t | tau_s | holdout clean | holdout PGD-10 | train time |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        mark = " **(picked)**" if r is best else ""
        lines.append(f"| {r['tau_t']:g} | {r['tau_s']:g} | {100 * r['holdout_clean_acc']:.2f}% | "
                     f"{100 * r['holdout_pgd10_acc']:.2f}%{mark} | {r['train_wall_s']:.0f} s |")
    d = DATASETS[args.dataset]
    lines += ["", f"LTD-{rows[0]['framework'].upper()}, scored on the last {rows[0]['holdout_n']} real "
              f"{d['label']} *training* images (held out; the test split is not used), PGD-10 Linf {d['eps']}.",
              f"Reproduce: `{command}`"]
    md = "\n".join(lines) + "\n"
    from robustkit.eval.results import write_json_atomic

    write_json_atomic(out / "ablation.json", {
        "schema": "robustkit.ltd_ablation", "schema_version": 1, "command": command,
        "shared_train_overrides": shared, "selection": "max holdout PGD-10, then clean", "picked":
        {"tau_t": best["tau_t"], "tau_s": best["tau_s"]}, "rows": rows})
    (out / "ablation.md").write_text(md)
    print(md)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m robustkit.train.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="data root holding <dataset>/{train,test}.npz")
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--out-dir", default=None,
                   help="results and tables (committed; default defenses/ltd_comparison, _<dataset> unless CIFAR-10)")
    p.add_argument("--work-dir", default=None,
                   help="checkpoints and AutoAttack records (default: runs/<out-dir name>; not committed)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list from {', '.join(RUNS)}")
    p.add_argument("--n-examples", type=int, default=1000, help="AutoAttack on the first N test images")
    p.add_argument("--attack", default="autoattack")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train-arg", action="append", default=[], metavar="FLAG=VALUE",
                   help="shared training override given to EVERY run (equal budget), e.g. epochs=15")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action="store_true", help="evaluate through torch.compile (robustkit eval --compile)")
    p.add_argument("--train-only", action="store_true",
                   help="train the runs whose checkpoint is missing and stop: another process (core) can "
                        "evaluate the finished ones meanwhile")
    p.add_argument("--ablation", action="store_true",
                   help="instead of the comparison: the LTD tau_t x tau_s grid scored on a train holdout")
    p.add_argument("--tau-t", default="0.25,0.5,1,2", help="ablation: teacher temperatures")
    p.add_argument("--tau-s", default="1,2", help="ablation: student temperatures")
    p.add_argument("--holdout", type=int, default=500, help="ablation: held-out train images")
    args = p.parse_args(argv)
    checked_names(args.dataset, list(DATASETS), "comparison dataset")
    if args.out_dir is None:
        args.out_dir = "defenses/ltd_comparison" + ("" if args.dataset == "cifar10" else f"_{args.dataset}")

    command = "python -m robustkit.train.compare " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in names if r not in RUNS]
    if unknown:
        from robustkit.core.errors import UnknownNameError

        raise UnknownNameError("comparison run", unknown[0], list(RUNS))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    shared: list[str] = []
    for item in args.train_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--train-arg needs FLAG=VALUE, got {item!r}")
        shared += [f"--{key.strip().lstrip('-')}", value]
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    exe = [sys.executable, "-m", "robustkit"]
    if args.ablation:
        return ablation(args, shared, command)

    from robustkit.core.errors import DataError
    from robustkit.eval.results import result_stem, write_json_atomic

    kept = {r["run"]: r for r in _previous_rows(out / "table.json", shared)}
    rows = []
    t0 = time.perf_counter()
    for name in names:
        trainer, recipe, extra = RUNS[name]
        stem = _work_dir(args) / name.replace("+", "_")
        ckpt, model = _checkpoint(args, name)
        # the name `robustkit eval` gives (seed 0 is its default)
        result = out / f"{result_stem(stem.name, args.attack, args.dataset, args.n_examples, 0)}.json"
        if not result.exists():
            if not ckpt.exists():  # the checkpoint JSON is written last: its presence means "trained"
                _train(trainer, recipe, [*extra, *_dataset_overrides(args.dataset, trainer), *_overrides(shared)],
                       stem, args, log)
            if args.train_only:
                continue
            scratch = stem.parent / result.name  # its records (resume state) stay in the work folder
            scratch.parent.mkdir(parents=True, exist_ok=True)
            _run(exe + ["eval", "--model", model, "--dataset", args.dataset,
                        "--attack", args.attack, "--n-examples", str(args.n_examples), *data,
                        "--device", args.device, *(["--threads", str(args.threads)] if args.threads else []),
                        "--out", str(scratch)]
                 + (["--no-progress"] if args.no_progress else []) + (["--compile"] if args.compile else []), log)
            write_json_atomic(result, json.loads(scratch.read_text()))
        facts = _checkpoint_facts(ckpt) if ckpt.exists() else kept.get(name)
        if facts is None:
            raise DataError(f"{result} has neither its checkpoint {ckpt} nor a row in {out / 'table.json'} "
                            "with its training facts; delete the result to retrain and re-evaluate")
        rows.append(_row(name, facts, result))
    # The table holds every run with a result here, not only this invocation's: two processes given
    # different --runs (one per core) must not each overwrite the other's rows.
    for name in RUNS:
        if name in names or args.train_only:
            continue
        stem = _work_dir(args) / name.replace("+", "_")
        ckpt, _ = _checkpoint(args, name)
        result = out / f"{result_stem(stem.name, args.attack, args.dataset, args.n_examples, 0)}.json"
        facts = _checkpoint_facts(ckpt) if ckpt.exists() else kept.get(name)
        if result.exists() and facts is not None:
            rows.append(_row(name, facts, result))
    rows.sort(key=lambda r: list(RUNS).index(r["run"]))
    if len(rows) > len(names):  # the whole comparison's command reproduces the rows of other invocations too
        command = _without_runs(command)
    if args.train_only:
        print(f"trained: {', '.join(names)}; run without --train-only to evaluate them and write the table")
        return 0

    table = {"schema": "robustkit.ltd_comparison", "schema_version": 1, "command": command,
             "shared_train_overrides": shared, "device": args.device, "dataset": args.dataset,
             "dataset_train_overrides": {t: _dataset_overrides(args.dataset, t) for t in ("pgd_at", "ltd")},
             "rows": [{k: v for k, v in r.items() if not k.endswith("_flags")} for r in rows],
             "paired_tests": paired_tests(rows)}
    write_json_atomic(out / "table.json", table)
    md = render_markdown(rows, command, args.dataset)
    (out / "table.md").write_text(md)
    plot(rows, out / "table.png", args.dataset)
    print(md)
    print(f"done in {time.perf_counter() - t0:.0f}s; wrote {out / 'table.json'}, table.md, table.png")
    return 0


if __name__ == "__main__":
    from robustkit.cli import guarded

    raise SystemExit(guarded(main))

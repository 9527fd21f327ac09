"""``python eval/benchmarks/distributed.py``: wall time of one evaluation as a torchrun job of N
processes against one process, on this machine, with the per-example flags checked identical.

Each configuration is the real command line (``robustkit eval`` or ``torchrun ... -m robustkit
eval``) timed end to end, start-up and model loading included, in fresh output folders; the
configurations are interleaved over the repeats so drift favours none. On a CPU the honest
comparison is at equal cores: N processes of one thread each against one process of N threads
(and of one thread). It is a benchmark, never a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _configs(nproc: int) -> list[tuple[str, list[str], int]]:
    """(label, launcher prefix, threads per process)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "robustkit"]
    return [(f"1 process x {nproc} threads", [sys.executable, "-m", "robustkit"], nproc),
            ("1 process x 1 thread", [sys.executable, "-m", "robustkit"], 1),
            (f"torchrun {nproc} processes x 1 thread", torchrun, 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python eval/benchmarks/distributed.py", description=__doc__)
    p.add_argument("--model", default="ltd.cifar10_partial")
    p.add_argument("--attack", default="apgd-ce")
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n-examples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the figures as JSON here (and a .png beside it)")
    args = p.parse_args(argv)

    eval_args = ["eval", "--model", args.model, "--attack", args.attack, "--n-examples", str(args.n_examples),
                 "--batch-size", str(args.batch_size), "--device", args.device, "--no-progress",
                 *(["--dataset", args.dataset] if args.dataset else []),
                 *(["--data-dir", args.data_dir] if args.data_dir else [])]
    runs: list[dict[str, Any]] = []
    flags: dict[str, tuple[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="rk-dist-bench-") as tmp:
        for r in range(args.repeats):
            configs = _configs(args.nproc)
            for label, launcher, threads in (configs if r % 2 == 0 else configs[::-1]):
                out = Path(tmp) / f"r{r}-{len(runs)}.json"
                cmd = [*launcher, *eval_args, "--threads", str(threads), "--out", str(out)]
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                t0 = time.perf_counter()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if done.returncode != 0:
                    sys.stderr.write(done.stderr[-3000:])
                    return done.returncode
                res = json.loads(out.read_text())
                flags[label] = (res["clean_flags"], res["robust_flags"] or "")
                runs.append({"repeat": r, "config": label, "wall_s": wall,
                             # evaluate() from its first to its last batch on rank 0 (no start-up)
                             "evaluate_wall_s": res["timing"]["this_session_seconds"],
                             "busy_s": res["timing"]["total_seconds"],  # summed over ranks
                             "robust_accuracy": res["robust_accuracy"],
                             "forward_passes": res["passes"]["forward"],
                             "backward_passes": res["passes"]["backward"],
                             "ranks": (res.get("distributed") or {}).get("ranks")})
                print(f"repeat {r}: {label:<32} {wall:7.1f} s wall", flush=True)
    labels = [c[0] for c in _configs(args.nproc)]
    median = {lab: statistics.median(x["wall_s"] for x in runs if x["config"] == lab) for lab in labels}
    median_eval = {lab: statistics.median(x["evaluate_wall_s"] for x in runs if x["config"] == lab) for lab in labels}
    identical = len(set(flags.values())) == 1
    report = {
        "benchmark": "one evaluation: torchrun job vs one process (end-to-end wall time)",
        "command": "python eval/benchmarks/distributed.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "attack": args.attack, "n_examples": args.n_examples, "batch_size": args.batch_size,
        "nproc": args.nproc, "device": args.device, "cpu_count": os.cpu_count(),
        "median_wall_s": median,
        "median_evaluate_wall_s": median_eval,
        "speedup_vs_one_process_same_cores": median[labels[0]] / median[labels[2]],
        "speedup_vs_one_thread": median[labels[1]] / median[labels[2]],
        "evaluate_speedup_vs_one_process_same_cores": median_eval[labels[0]] / median_eval[labels[2]],
        "evaluate_speedup_vs_one_thread": median_eval[labels[1]] / median_eval[labels[2]],
        "flags_identical": identical, "runs": runs,
    }
    for lab in labels:
        print(f"{lab:<32} median {median[lab]:7.1f} s end to end, {median_eval[lab]:7.1f} s in evaluate()")
    print(f"flags identical across configurations: {identical}")
    if args.out:
        from robustkit.eval.results import write_json_atomic

        write_json_atomic(args.out, report)
        _plot(report, Path(args.out).with_suffix(".png"))
        print(f"wrote {args.out}")
    return 0 if identical else 1


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustkit.eval.curve import save_figure_atomic

    labels = list(report["median_wall_s"])[::-1]
    total = [report["median_wall_s"][k] for k in labels]
    inside = [report["median_evaluate_wall_s"][k] for k in labels]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    ax.barh(labels, inside, color="#4c72b0", label="evaluate()")
    ax.barh(labels, [t - i for t, i in zip(total, inside, strict=True)], left=inside, color="#bbbbbb",
            label="start-up, model and data loading")
    for i, t in enumerate(total):
        ax.text(t, i, f" {t:.0f} s", va="center")
    ax.legend(loc="upper center", bbox_to_anchor=(0.4, -0.28), ncol=2, fontsize=8, frameon=False)
    ax.set_xlabel("median wall time, end to end (s)")
    ax.set_title(f"{report['model']} | {report['attack']} | n={report['n_examples']} | "
                 f"{report['cpu_count']}-core CPU", fontsize=9)
    ax.margins(x=0.15)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

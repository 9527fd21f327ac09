"""``python eval/benchmarks/layout.py``: forward and forward+backward time of every shipped model on a
CPU as it is (NCHW), in channels-last layout, and as robustkit's AutoAttack engine runs it during a
stage (``robustkit.attacks.engine.lean``: channels-last with batch norms folded into convolutions).

Batch 29 (a typical batch of AutoAttack survivors), 1 thread, real test images; each timing is the
best of ``--repeats`` rounds of ``--calls`` calls, the layouts interleaved within every round.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from typing import Any

import torch

MODELS = [("small_cnn.cifar10_partial", "cifar10"), ("ltd.cifar10_partial", "cifar10"),
          ("adaptive_smoothing.cifar10_partial", "cifar10"), ("airbench94.cifar10_partial_tta0", "cifar10"),
          ("lightweight_cnn.cifar10_partial", "cifar10"), ("lightweight_cnn.mnist_partial", "mnist")]


# NCHW (PyTorch's default), channels-last only, and the engine's lean model (channels-last + folded norms).
LAYOUTS = ("nchw", "channels_last", "lean")


def _ms(fn: Any, x: torch.Tensor, calls: int) -> float:
    fn(x)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t0) / calls * 1000


def _forward(model: torch.nn.Module) -> Any:
    def run(x: torch.Tensor) -> None:
        with torch.no_grad():
            model(x)
    return run


def _gradient(model: torch.nn.Module) -> Any:
    def run(x: torch.Tensor) -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xg).logsumexp(1).sum(), [xg])
    return run


def main(argv: list[str] | None = None) -> int:
    from robustkit.attacks.engine.lean import _channels_last, foldable_pairs, lean_model
    from robustkit.data import load_split
    from robustkit.models import load_model

    p = argparse.ArgumentParser(prog="python eval/benchmarks/layout.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=29)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, dataset in MODELS:
        model = load_model(name, device="cpu").model.eval()
        x = load_split(dataset, "test", data_dir=args.data_dir).tensors(args.batch_size)[0]
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for kind, make in (("forward", _forward), ("forward+backward", _gradient)):
                for layout in LAYOUTS:
                    if layout == "nchw":
                        ms = _ms(make(model), x, args.calls)
                    elif layout == "channels_last":
                        with _channels_last(model):
                            ms = _ms(make(model), x.contiguous(memory_format=torch.channels_last), args.calls)
                    else:
                        with lean_model(model, x) as xc:
                            ms = _ms(make(model), xc, args.calls)
                    key = f"{kind} {layout}"
                    best[key] = min(best.get(key, float("inf")), ms)
        row = {"model": name, "folded_batch_norms": len(foldable_pairs(model)), "ms": best,
               "speedup_lean": {k: best[f"{k} nchw"] / best[f"{k} lean"] for k in ("forward", "forward+backward")}}
        rows.append(row)
        print(f"{name:<36} " + ", ".join(
            f"{kind} " + " / ".join(f"{best[f'{kind} {lay}']:.2f}" for lay in LAYOUTS) + " ms"
            for kind in ("forward", "forward+backward")), flush=True)
    if args.out:
        from robustkit.eval.results import write_json_atomic

        write_json_atomic(args.out, {
            "benchmark": "model time per call on a CPU: NCHW vs channels-last vs lean (channels-last + folded norms)",
            "command": "python eval/benchmarks/layout.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "batch_size": args.batch_size, "threads": 1, "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

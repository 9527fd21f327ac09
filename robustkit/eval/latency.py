"""``robustkit bench latency``: inference time per image of a model, at batch 1 and batch 256.

Model cards quote this for the tiny models, whose selling point is speed. Measured with the model
in eval mode under ``torch.inference_mode`` on random inputs of the model's shape (the time does
not depend on pixel values), after warm-up calls, as the median of repeated timed calls. A
benchmark, never a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from robustkit.eval.results import write_json_atomic


def measure_latency(model: torch.nn.Module, input_shape: tuple[int, ...], *, batch_size: int,
                    device: torch.device, repeats: int = 30, warmup: int = 5, min_seconds: float = 1.0
                    ) -> dict[str, Any]:
    """Median wall time of one forward call of ``batch_size`` images, and per image."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch_size, *input_shape), generator=gen).to(device)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        started = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - started < min_seconds:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch_size": batch_size, "calls": len(times), "median_call_ms": 1e3 * med,
            "per_image_ms": 1e3 * med / batch_size, "images_per_second": batch_size / med,
            "min_call_ms": 1e3 * min(times), "max_call_ms": 1e3 * max(times)}


def main(argv: list[str] | None = None) -> int:
    from robustkit.core.errors import ConfigError

    p = argparse.ArgumentParser(prog="robustkit bench latency", description=__doc__)
    p.add_argument("--model", required=True, help="registered id or checkpoint path")
    p.add_argument("--batch-sizes", default="1,256", help="comma list (default: 1,256)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls at least (default: 30)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: write e.g. 1,256") from None
    if not sizes or min(sizes) < 1 or args.repeats < 1:
        raise ConfigError("--batch-sizes and --repeats must be positive")
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, sizes)
    finally:  # the caller's thread setting (a test session, a notebook) is left as it was
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, argv: list[str] | None, sizes: list[int]) -> int:
    from robustkit.core.provenance import describe_device, package_versions, require_device
    from robustkit.data import DATASETS, dataset_info
    from robustkit.models import load_model, model_info

    device = require_device(args.device)
    loaded = load_model(args.model, device=device)
    # the input shape of the data the weights were trained on (one architecture serves 1x28x28
    # and 3x32x32 tags), else the architecture's registered shape
    if loaded.dataset and loaded.dataset in DATASETS:
        shape = tuple(dataset_info(loaded.dataset).shape)
    else:
        arch = loaded.metadata.get("architecture") or loaded.name.split(".")[0]
        shape = tuple(model_info(arch).input_shape)
    runs = [measure_latency(loaded.model, shape, batch_size=b, device=device, repeats=args.repeats)
            for b in sizes]
    n_params = sum(q.numel() for q in loaded.model.parameters())
    report = {"model": loaded.name, "checkpoint_sha256": loaded.checkpoint_sha256, "parameters": n_params,
              "input_shape": list(shape), "device": describe_device(device), "versions": package_versions(),
              "command": "robustkit bench latency " + " ".join(argv if argv is not None else []), "runs": runs}
    print(f"{loaded.name}: {n_params:,} parameters, {describe_device(device)}")
    for r in runs:
        print(f"  batch {r['batch_size']:>4}: {r['per_image_ms']:.4f} ms/image "
              f"({r['median_call_ms']:.3f} ms per call, {r['images_per_second']:,.0f} images/s, {r['calls']} calls)")
    if args.out:
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")
    return 0

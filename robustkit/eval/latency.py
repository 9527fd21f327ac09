"""Inference time per image of a model, at batch 1 and batch 256.

Model cards quote this for the tiny models, whose selling point is speed. Measured with the model
in eval mode under ``torch.inference_mode`` on random inputs of the model's shape (the time does
not depend on pixel values), after warm-up calls, as the median of repeated timed calls. A
benchmark, never a timed test.
"""

from __future__ import annotations

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


def latency_report(model: str, sizes: list[int], *, repeats: int, device: torch.device, out: str | None,
                   command: str) -> dict[str, Any]:
    """Measure ``model`` at each batch size, print a line each and write the report to ``out``."""
    from robustkit.core.provenance import describe_device, package_versions
    from robustkit.data import DATASETS, dataset_info
    from robustkit.models import load_model, model_info

    loaded = load_model(model, device=device)
    # the input shape of the data the weights were trained on (one architecture serves 1x28x28
    # and 3x32x32 tags), else the architecture's registered shape
    if loaded.dataset and loaded.dataset in DATASETS:
        shape = tuple(dataset_info(loaded.dataset).shape)
    else:
        arch = loaded.metadata.get("architecture") or loaded.name.split(".")[0]
        shape = tuple(model_info(arch).input_shape)
    runs = [measure_latency(loaded.model, shape, batch_size=b, device=device, repeats=repeats)
            for b in sizes]
    n_params = sum(q.numel() for q in loaded.model.parameters())
    report = {"model": loaded.name, "checkpoint_sha256": loaded.checkpoint_sha256, "parameters": n_params,
              "input_shape": list(shape), "device": describe_device(device), "versions": package_versions(),
              "command": command, "runs": runs}
    print(f"{loaded.name}: {n_params:,} parameters, {describe_device(device)}")
    for r in runs:
        print(f"  batch {r['batch_size']:>4}: {r['per_image_ms']:.4f} ms/image "
              f"({r['median_call_ms']:.3f} ms per call, {r['images_per_second']:,.0f} images/s, {r['calls']} calls)")
    if out:
        write_json_atomic(out, report)
        print(f"wrote {out}")
    return report

"""``python eval/benchmarks/airbench.py``: our airbench94 against the reference script, same GPU, same tensors.

Both implementations train airbench94's full schedule (9.9 epochs, batch 1024, 476 steps) and are
timed over exactly the paper's regions with CUDA events — whitening init, every epoch's training
loop (with the first epoch's preprocessing) and the final TTA-2 evaluation — after one untimed
warm-up run each (cuDNN autotuning, compilation). Runs alternate (ours, reference, ours, ...) so
clock and thermal drift spread over both. A benchmark, never a timed test.

Data: full CIFAR-10 is not available offline, so the 50,000 training images are the real CIFAR-10
subset (5,438 images) repeated, and the test set is 10 exact copies of the 1,017 real test images
(accuracy on it equals accuracy on the 1,017). Timing does not depend on pixel values; accuracy is
far below the paper's 94% because only 5,438 distinct images are seen. Both implementations get
the very same uint8 tensors; the JSON records all this.

How to run on the GPU
---------------------
1. The reference stays outside git (``.reference/`` is git-ignored)::

       mkdir -p .reference
       git -C <mirror of KellerJordan/cifar10-airbench> show HEAD:legacy/airbench94.py > .reference/airbench94.py

   (``legacy/airbench94_compiled.py`` works too: its two compiled copies are built as its own
   ``__main__`` does; then pass ``--compile`` so ours is compiled as well.)
2. Bring data and pure-Python packages: ``../shared/tools/offline-bundle`` builds ``.offline/``
   (``.offline/data`` holds the real partial datasets); on the GPU machine, from the repository root::

       export PYTHONPATH=$PWD:$PWD/.offline/site ROBUSTKIT_DATA=$PWD/.offline/data

3. Run (about 1 minute uncompiled; ``--compile`` adds minutes of max-autotune compilation)::

       python eval/benchmarks/airbench.py --reference .reference/airbench94.py --runs 5 --data-dir .offline/data

   It writes ``eval/benchmarks/airbench94_gpu.json`` and a Markdown summary next to it.

The reference file is imported by path (its ``if __name__ == "__main__"`` loop does not run) from
a temporary folder holding our tensors in its cache format (``cifar10/{train,test}.pt``), without
modifying it; its own timing and TTA accuracy are read from the ``locals()`` it hands to
``print_training_details``. It needs ``cuda:0`` (hard-wired there) and torchvision only for
``transforms.Normalize``; where torchvision is missing an equivalent stand-in is installed (recorded).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustkit.core.errors import ConfigError
from robustkit.eval.results import write_json_atomic

DEFAULT_OUT = "eval/benchmarks/airbench94_gpu.json"


def build_data(dataset: str, data_dir: str | None, n_train: int, test_copies: int,
               device: torch.device, n_test: int | None = None) -> dict[str, Any]:
    """uint8 N x H x W x C train/test tensors on ``device``: the real train images repeated up to
    ``n_train``, the (first ``n_test``) real test images ``test_copies`` times."""
    from robustkit.data import dataset_info, load_split

    train = load_split(dataset, "train", data_dir=data_dir)
    test = load_split(dataset, "test", data_dir=data_dir)
    idx = np.arange(n_train) % len(train.images)
    test_images, test_labels = test.images[:n_test], test.labels[:n_test]
    return {
        "x_train": torch.from_numpy(np.ascontiguousarray(train.images[idx])).to(device),
        "y_train": torch.from_numpy(train.labels[idx].astype(np.int64)).to(device),
        "x_test": torch.from_numpy(np.concatenate([test_images] * test_copies)).to(device),
        "y_test": torch.from_numpy(np.concatenate([test_labels] * test_copies).astype(np.int64)).to(device),
        "classes": list(dataset_info(dataset).classes),
        "description": {
            "dataset": dataset,
            "train_source": str(train.source),
            "test_source": str(test.source),
            "distinct_train_images": len(train.images),
            "n_train": n_train,
            "train": f"the {len(train.images)} real {dataset} train images repeated to {n_train} "
                     "(index i -> image i mod n)",
            "distinct_test_images": len(test_images),
            "test_copies": test_copies,
            "n_test": len(test_images) * test_copies,
            "test": f"{test_copies} exact copies of the {len(test_images)} real test images "
                    "(accuracy equals accuracy on them)",
            "note": "full CIFAR-10 is not available offline; timing does not depend on pixel values, "
                    "accuracy is not comparable with the paper's 94%",
        },
    }


# --------------------------------------------------------------------------------------------
# The reference script
# --------------------------------------------------------------------------------------------


def _torchvision_stand_in() -> types.ModuleType:
    """Just what the reference uses once its cache files exist: ``transforms.Normalize``
    (torchvision's arithmetic: subtract then divide, in the tensor's dtype)."""

    class Normalize:
        def __init__(self, mean: Any, std: Any) -> None:
            self.mean, self.std = mean, std

        def __call__(self, t: torch.Tensor) -> torch.Tensor:
            mean = torch.as_tensor(self.mean, dtype=t.dtype, device=t.device).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=t.dtype, device=t.device).view(-1, 1, 1)
            return t.clone().sub_(mean).div_(std)

    def no_download(*_: Any, **__: Any) -> None:
        raise RuntimeError("torchvision stand-in: the cached train.pt/test.pt should have been used")

    tv = types.ModuleType("torchvision")
    tv.__version__ = "stand-in"  # type: ignore[attr-defined]
    tv.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
    tv.transforms.Normalize = Normalize  # type: ignore[attr-defined]
    tv.datasets = types.ModuleType("torchvision.datasets")  # type: ignore[attr-defined]
    tv.datasets.CIFAR10 = no_download  # type: ignore[attr-defined]
    return tv


class Reference:
    """The public ``legacy/airbench94.py`` (or ``airbench94_compiled.py``), imported by path and run
    on our tensors; nothing in its file is changed."""

    NEEDLES = ("def print_training_details(variables, is_final_entry)", "total_time_seconds", "tta_val_acc",
               "CifarLoader('cifar10'", "def main(")

    def __init__(self, path: str | Path, data: dict[str, Any], workdir: Path) -> None:
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise ConfigError(f"--reference {path}: no such file (see `python eval/benchmarks/airbench.py --help`)")
        text = self.path.read_text()
        missing = [n for n in self.NEEDLES if n not in text]
        if missing:
            raise ConfigError(f"--reference {path} does not look like airbench94(_compiled).py: lacks {missing}")
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.workdir = workdir
        cache = workdir / "cifar10"  # the loader's hard-wired path, relative to the working directory
        cache.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            torch.save({"images": data[f"x_{split}"].cpu(), "labels": data[f"y_{split}"].cpu(),
                        "classes": data["classes"]}, cache / f"{split}.pt")
        try:
            import torchvision

            self.torchvision = str(torchvision.__version__)
        except ImportError:
            sys.modules["torchvision"] = tv = _torchvision_stand_in()
            sys.modules["torchvision.transforms"] = tv.transforms  # type: ignore[attr-defined]
            sys.modules["torchvision.datasets"] = tv.datasets  # type: ignore[attr-defined]
            self.torchvision = "stand-in (torchvision not installed): transforms.Normalize only"
        spec = importlib.util.spec_from_file_location("airbench_reference", self.path)
        assert spec is not None and spec.loader is not None
        self.module = importlib.util.module_from_spec(spec)
        with _cwd(workdir):
            spec.loader.exec_module(self.module)  # top level only: __name__ is not "__main__"
        self._final: dict[str, Any] | None = None
        self._epochs: list[dict[str, Any]] = []
        original = self.module.print_training_details

        def spy(variables: dict[str, Any], is_final_entry: bool) -> None:
            row = {k: variables.get(k) for k in ("epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc",
                                                 "total_time_seconds")}
            if is_final_entry:
                self._final = row
            else:
                self._epochs.append(row)
            original(variables, is_final_entry)

        self.module.print_training_details = spy
        self.compiled = len(inspect.signature(self.module.main).parameters) >= 3
        self._models: tuple[Any, Any] | None = None
        if self.compiled:  # as the compiled script's own __main__: one copy per whitening-bias state
            m = self.module
            train_bias, freeze_bias = m.make_net(), m.make_net()
            freeze_bias[0].bias.requires_grad = False
            self._models = (torch.compile(train_bias, mode="max-autotune"),
                            torch.compile(freeze_bias, mode="max-autotune"))

    def run(self, run: int | str, seed: int) -> dict[str, Any]:
        """One training run (``run="warmup"``: the script's own warm-up on random labels)."""
        self._final, self._epochs = None, []
        torch.manual_seed(seed)  # the script draws from the global RNG
        with _cwd(self.workdir):
            if self._models is not None:
                acc = self.module.main(run, *self._models)
            else:
                acc = self.module.main(run)
        if self._final is None or self._final.get("total_time_seconds") is None:
            raise RuntimeError(f"{self.path}: main() returned without its final print_training_details entry")
        return {"seconds": float(self._final["total_time_seconds"]), "tta_acc": float(acc),
                "epoch_val_acc": [e.get("val_acc") for e in self._epochs]}


class _cwd:
    def __init__(self, path: Path) -> None:
        self.path, self.old = path, ""

    def __enter__(self) -> None:
        self.old = os.getcwd()
        os.chdir(self.path)

    def __exit__(self, *exc: object) -> None:
        os.chdir(self.old)


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------


class Ours:
    """robustkit's airbench94 on the same tensors. Compiled: one model re-initialised every run (as
    the reference's compiled script), so compilation happens once, in the warm-up."""

    def __init__(self, data: dict[str, Any], hp: Any, device: torch.device) -> None:
        self.data, self.hp, self.device = data, hp, device  # hp: an AirbenchConfig, its dtype and compile set
        self._model: Any = None

    def run(self, seed: int) -> dict[str, Any]:
        from robustkit.models.airbench import AirbenchNet, arch_args_for
        from robustkit.train.airbench import fit

        torch.manual_seed(seed)
        if self.hp.compile and self._model is not None:
            self._model.reset_parameters()
            model = self._model
        else:
            model = AirbenchNet(**arch_args_for(self.hp, num_classes=len(self.data["classes"])))
            self._model = model
        d = self.data
        res = fit(model, d["x_train"], d["y_train"], d["x_test"], d["y_test"], replace(self.hp, seed=seed),
                  device=self.device, progress=False)
        return {"seconds": res["timed_seconds"], "tta_acc": res["final_eval_acc"],
                "regions": {r["name"]: round(r["seconds"], 5) for r in res["regions"]},
                "epoch_val_acc": [e.get("eval_acc_tta0") for e in res["epochs"]],
                "dtype": res["dtype"], "total_steps": res["total_steps"]}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values) if values else None, "max": max(values) if values else None}


def environment(device: torch.device) -> dict[str, Any]:
    from robustkit.core.provenance import describe_device

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": describe_device(device),
                           "python": sys.version.split()[0]}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(gpu=torch.cuda.get_device_name(index), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    return env


def main(argv: Sequence[str] | None = None) -> int:
    from robustkit.core.provenance import require_device
    from robustkit.train.airbench import AIRBENCH94

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python eval/benchmarks/airbench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", default=None, metavar="PATH",
                   help="the reference legacy/airbench94.py or airbench94_compiled.py (kept outside git, e.g. "
                        ".reference/); without it only ours runs")
    p.add_argument("--runs", type=int, default=5, help="timed runs of each implementation (default: 5)")
    p.add_argument("--data-dir", default=None, help="root holding cifar10/{train,test}.npz")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--n-train", type=int, default=50_000, help="training images (the real ones repeated)")
    p.add_argument("--test-copies", type=int, default=10, help="copies of the real test images (default: 10)")
    p.add_argument("--n-test", type=int, default=None, help="use only the first N real test images (smoke tests)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="ours: auto (float16 on CUDA, as the reference), bfloat16, float32")
    p.add_argument("--compile", nargs="?", const="max-autotune", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile ours (default mode max-autotune, as airbench94_compiled.py)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs (smoke tests only)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run ours on the CPU (smoke test; the reference is CUDA-only and is not run)")
    p.add_argument("--epochs", type=float, default=None, help="override airbench94's 9.9 (smoke tests)")
    p.add_argument("--batch-size", type=int, default=None, help="override airbench94's 1024 (smoke tests)")
    p.add_argument("--widths", default=None, metavar="A,B,C", help="override 64,256,256 (smoke tests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON path (default: {DEFAULT_OUT}); Markdown next to it")
    args = p.parse_args(argv)

    if args.runs < 1 or args.n_train < 1 or args.test_copies < 1:
        raise ConfigError("--runs, --n-train and --test-copies must be positive")
    wants_cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    device = require_device(args.device) if wants_cuda else torch.device("cpu")
    if device.type != "cuda":
        if not args.allow_cpu:
            raise ConfigError("python eval/benchmarks/airbench.py times GPU training and needs CUDA (none here); "
                              "--allow-cpu runs ours alone on the CPU as a smoke test")
        device = torch.device("cpu")
        if args.reference:
            raise ConfigError("--reference needs CUDA: the reference script is hard-wired to cuda:0")
    elif args.reference and device.index not in (None, 0):
        raise ConfigError("--reference runs on cuda:0 (its loader hard-wires device 0); use --device cuda:0 or "
                          "CUDA_VISIBLE_DEVICES")
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.widths is not None:
        try:
            overrides["widths"] = tuple(int(w) for w in args.widths.split(","))
        except ValueError:
            raise ConfigError(f"--widths {args.widths!r}: write e.g. 64,256,256") from None
    if overrides and args.reference:
        raise ConfigError("--epochs/--batch-size/--widths change ours only; they do not combine with --reference")
    hp = replace(AIRBENCH94, dtype=args.dtype, compile=args.compile, **overrides)

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, device, hp, overrides)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, argv: list[str], device: torch.device, hp: Any,
         overrides: dict[str, Any]) -> int:
    data = build_data(args.dataset, args.data_dir, args.n_train, args.test_copies, device, args.n_test)
    ours = Ours(data, hp, device)
    env = environment(device)
    print(f"airbench94 benchmark on {env['device']}, torch {env['torch']} (CUDA {env['cuda']}); "
          f"{args.n_train} train ({data['description']['distinct_train_images']} distinct) / "
          f"{data['description']['n_test']} test images", flush=True)
    with tempfile.TemporaryDirectory(prefix="airbench_ref_") as tmp:
        ref = Reference(args.reference, data, Path(tmp)) if args.reference else None
        warmup: dict[str, Any] = {}
        if not args.no_warmup:
            t0 = time.perf_counter()
            warmup["ours"] = ours.run(seed=10_000)
            warmup["ours_wall_s"] = round(time.perf_counter() - t0, 1)
            print(f"warm-up ours: {warmup['ours_wall_s']} s wall (untimed)", flush=True)
            if ref is not None:
                t0 = time.perf_counter()
                warmup["reference"] = ref.run("warmup", seed=10_000)
                warmup["reference_wall_s"] = round(time.perf_counter() - t0, 1)
                print(f"warm-up reference: {warmup['reference_wall_s']} s wall (untimed)", flush=True)
        runs_ours: list[dict[str, Any]] = []
        runs_ref: list[dict[str, Any]] = []
        for i in range(args.runs):  # interleaved, so drift hits both alike
            runs_ours.append(ours.run(seed=i))
            print(f"run {i + 1}/{args.runs} ours:      {runs_ours[-1]['seconds']:.4f} s  "
                  f"TTA acc {runs_ours[-1]['tta_acc']:.4f}", flush=True)
            if ref is not None:
                runs_ref.append(ref.run(i, seed=i))
                print(f"run {i + 1}/{args.runs} reference: {runs_ref[-1]['seconds']:.4f} s  "
                      f"TTA acc {runs_ref[-1]['tta_acc']:.4f}", flush=True)

    t_ours = _stats([r["seconds"] for r in runs_ours])
    a_ours = _stats([r["tta_acc"] for r in runs_ours])
    report: dict[str, Any] = {
        "benchmark": "airbench94: robustkit vs the reference script, same device and tensors",
        "timed_regions": "whitening init + each epoch's training loop (incl. first-epoch preprocessing) + final "
                         "TTA-2 evaluation; CUDA events (perf_counter on CPU); warm-up run excluded",
        "data": data["description"],
        "environment": env,
        "command": "python eval/benchmarks/airbench.py " + " ".join(argv),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": args.runs,
        "ours": {"implementation": "robustkit.train.airbench.fit", "hyperparameters": _jsonable(asdict(hp)),
                 "overrides": _jsonable(overrides), "dtype": runs_ours[0]["dtype"],
                 "compile": args.compile, "runs": runs_ours, "seconds": t_ours, "tta_acc": a_ours},
        "warmup": warmup,
    }
    if ref is not None:
        t_ref = _stats([r["seconds"] for r in runs_ref])
        report["reference"] = {"path": str(ref.path), "sha256": ref.sha256, "compiled": ref.compiled,
                               "torchvision": ref.torchvision, "runs": runs_ref, "seconds": t_ref,
                               "tta_acc": _stats([r["tta_acc"] for r in runs_ref])}
        report["ratio_mean_seconds_ours_over_reference"] = (
            t_ours["mean"] / t_ref["mean"] if t_ours["mean"] and t_ref["mean"] else None)
    out = Path(args.out)
    write_json_atomic(out, report)
    md = out.with_suffix(".md")
    md.write_text(render_markdown(report))
    print(render_markdown(report))
    print(f"wrote {out} and {md}")
    return 0


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _fmt(s: dict[str, float | None], scale: float = 1.0, digits: int = 3) -> str:
    if s["mean"] is None:
        return "-"
    std = f" ± {s['std'] * scale:.{digits}f}" if s["std"] is not None else ""
    return f"{s['mean'] * scale:.{digits}f}{std}"


def render_markdown(report: dict[str, Any]) -> str:
    """A short human summary of the JSON report."""
    env, ours, ref = report["environment"], report["ours"], report.get("reference")
    lines = [
        "# airbench94: robustkit vs reference",
        "",
        f"{env['device']}, torch {env['torch']}, CUDA {env['cuda']}, {report['date_utc']}.",
        f"Command: `{report['command']}`",
        "",
        f"Data: {report['data']['train']}; test: {report['data']['test']}. {report['data']['note']}.",
        f"Timed: {report['timed_regions']}.",
        "",
    ]
    if ours["overrides"]:
        lines += [f"**Not the airbench94 schedule**: overrides {ours['overrides']}.", ""]
    head = "| run | ours (s) | ours TTA acc |" + (" reference (s) | reference TTA acc |" if ref else "")
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for i, r in enumerate(ours["runs"]):
        row = f"| {i + 1} | {r['seconds']:.4f} | {r['tta_acc']:.4f} |"
        if ref:
            rr = ref["runs"][i]
            row += f" {rr['seconds']:.4f} | {rr['tta_acc']:.4f} |"
        lines.append(row)
    mean_row = f"| mean ± std | {_fmt(ours['seconds'], digits=4)} | {_fmt(ours['tta_acc'], digits=4)} |"
    if ref:
        mean_row += f" {_fmt(ref['seconds'], digits=4)} | {_fmt(ref['tta_acc'], digits=4)} |"
    lines += [mean_row, ""]
    lines.append(f"Ours: dtype {ours['dtype']}, compile {ours['compile'] or 'off'}.")
    if ref:
        lines.append(f"Reference: `{ref['path']}` (sha256 {ref['sha256'][:12]}…, "
                     f"{'compiled' if ref['compiled'] else 'uncompiled'}; torchvision {ref['torchvision']}).")
        ratio = report.get("ratio_mean_seconds_ours_over_reference")
        if ratio is not None:
            lines.append(f"**Mean time ours / reference: {ratio:.3f}** ({'faster' if ratio < 1 else 'slower'}).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

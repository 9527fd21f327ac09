"""Pieces every trainer's epoch loop shares, written once: which weights decay, the order of an
epoch's batches, setting the learning rate of a step, the running loss and accuracy of an epoch, the
crop-and-flip augmentation, the index ranges a checkpoint's training block records and the per-epoch
resume state (the adversarial loop's and airbench's).

Each trainer keeps its own loop (airbench style: the loop is where a method's tricks are, and one
reads it in one sitting); these are the lines that were the same in all of them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.core.errors import CheckpointError, ConfigError
from robustkit.distributed import Dist
from robustkit.train import _ddp


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Optimizer parameter groups with weight decay on conv/linear weights only (``ndim > 1``):
    decaying BatchNorm scales and biases only fights BatchNorm, which undoes any rescaling."""
    params = list(params)
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def epoch_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch's index batches: a permutation of ``range(n)`` drawn from ``gen`` (on the
    generator's device, so a CUDA generator stays reproducible), cut into ``batch_size`` pieces
    (the last may be smaller), returned on the CPU."""
    perm = torch.randperm(n, generator=gen, device=gen.device).cpu()
    for b in range(math.ceil(n / batch_size)):
        yield perm[b * batch_size : (b + 1) * batch_size]


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate: schedules here are functions of the step, applied per batch."""
    for group in opt.param_groups:
        group["lr"] = lr


class RunningStats:
    """Mean loss and accuracy over an epoch's batches, weighted by batch size."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Count one batch (``loss`` its mean loss; ``.item()`` syncs once per batch, as a log must)."""
        self.loss_sum += loss.item() * len(y)
        self.correct += int((logits.argmax(1) == y).sum())
        self.seen += len(y)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.seen)

    @property
    def acc(self) -> float:
        return self.correct / max(1, self.seen)


def crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator, *, flip: bool = True) -> torch.Tensor:
    """Random crop (reflect-padded by ``pad``; 0 = none) + horizontal flip of a batch, tensor ops only.

    One gather per batch instead of a per-image Python loop: every image gets its own offset.
    ``flip=False`` for data whose mirror images are other things (digits); it draws nothing for it.
    """
    n, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # n,1,h,1
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # n,1,1,w
        idx = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[idx, chans, rows, cols]
    if not flip:
        return x
    flipped = torch.rand(n, generator=gen, device=x.device) < 0.5
    return torch.where(flipped[:, None, None, None], x.flip(3), x)


def index_ranges(indices: Iterable[int]) -> str:
    """Compact ``0-1101,10000-11016`` description of (sorted) official indices, for training blocks."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive indices
    for i in sorted(int(i) for i in indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# --------------------------------------------------------------------------------------------
# Resume: the state of a run at the end of an epoch
# --------------------------------------------------------------------------------------------

RESUME_FORMAT = "robustkit.resume"


def resume_path(stem: Path) -> Path:
    """Where a run writing the checkpoint ``stem`` keeps its resume state: ``stem.resume.safetensors``."""
    return stem.with_name(stem.name + ".resume.safetensors")


def run_identity(config: Any, device: torch.device, **more: Any) -> dict[str, Any]:
    """What a resume state must match to be continued: the config, whatever else fixes the run
    (``more``: the method, the data size) and the device type (generator states differ between CPU
    and CUDA). Not the number of processes: the random stream does not depend on it."""
    from robustkit.core.config import config_to_dict

    run = {"config": config_to_dict(config), **more, "device_type": device.type}
    return json.loads(json.dumps(run))  # as the file will hold it (tuples become lists)


def save_resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                info: dict[str, Any], extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write the weights, buffers, optimizer state and generator state, plus the trainer's ``extra``
    tensors (an EMA) and ``info`` (JSON), to ``path`` in one safetensors file, atomically: a run
    killed while writing leaves the previous epoch's file whole. Tensors only, never a pickle, so
    loading it cannot run code."""
    from safetensors.torch import save_file

    opt_state = opt.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"opt.{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    tensors |= {f"extra.{k}": v for k, v in (extra or {}).items()}
    tensors["generator"] = gen.get_state()
    info = info | {"param_groups": opt_state["param_groups"]}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": RESUME_FORMAT, "info": json.dumps(info)})
    os.replace(tmp, path)


def read_resume(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and ``info`` of a resume file, or None when there is none."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        if meta.get("format") != RESUME_FORMAT:
            raise ValueError("not a robustkit resume file")
        return tensors, json.loads(meta["info"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read the resume state {path}: {e}; delete it to start the run over") from None


def _this_runs(path: Path | None, identity: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """:func:`read_resume`, or a one-line error naming the first field of ``identity`` the file's
    run differs in."""
    found = read_resume(path) if path is not None else None
    if found is None:
        return None
    for key, value in identity.items():
        there = found[1].get(key)
        if isinstance(value, dict) and isinstance(there, dict):
            differs = sorted(k for k in value.keys() | there.keys() if value.get(k) != there.get(k))
        else:
            differs = [] if there == value else [""]
        if differs:
            name = f"{key}.{differs[0]}".rstrip(".")
            raise ConfigError(f"{path} holds the state of another run (its {name} differs from this run's); "
                              "delete it to start over, or choose another --out")
    return found


def find_resume(path: Path | None, identity: dict[str, Any], job: Dist | None, *, epochs: int,
                speak: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and info of this run's resume state at ``path`` (the run's ``identity`` must
    match the file's), or None when there is none. Every rank reads it and all must find the same
    epoch; ``speak`` says on stderr where the run continues."""
    found = _ddp.agree(job, lambda: _this_runs(path, identity), lambda f: None if f is None else f[1]["epochs_done"],
                       "the ranks would resume after different epochs: every rank must read the same resume "
                       "state (on several machines, put --out on a filesystem they share)")
    if found is not None and speak:
        print(f"resuming from {path}: {found[1]['epochs_done']} of {epochs} epochs done", file=sys.stderr, flush=True)
    return found


def load_resume(tensors: dict[str, torch.Tensor], info: dict[str, Any], model: nn.Module,
                opt: torch.optim.Optimizer, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Put what :func:`save_resume` wrote back into ``model``, ``opt`` and ``gen``; return its ``extra``."""
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value  # load_state_dict moves it to the parameter's device
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    gen.set_state(tensors["generator"])
    return {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}

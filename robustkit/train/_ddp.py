"""Data-parallel training under ``torchrun``: W processes train the model one process would.

``torchrun --nproc-per-node W -m robustkit train NAME ...`` joins the job before the trainer runs
(:func:`robustkit.distributed.session`); the trainers then follow three rules, written here once:

* **one random stream.** The config's ``batch_size`` is the *global* batch. Every rank draws the
  random numbers of the whole global batch (the epoch's permutation, crops and flips, the attack's
  random starts) from the same seeded generator in the same order, then keeps its contiguous share
  (:func:`share`). A rank's examples, augmentations and adversarial examples are therefore the
  single-process ones, and with W = 1 nothing changes at all;
* **the global mean.** DDP averages gradients over ranks, so a rank's mean loss is weighted by
  :func:`loss_weight` to make that average the mean over the global batch, also when the batch does
  not split evenly;
* **one writer.** Rank 0 alone measures and writes (checkpoint, resume state, log lines):
  :func:`on_main` runs a step there and hands its result, or its error, to every rank, so a failure
  on rank 0 stops the others at once instead of at the collective timeout.

BatchNorm: each rank normalises with its own share's batch statistics (running statistics follow
rank 0's, which DDP broadcasts before each forward pass), so a model with BatchNorm trains a little
differently than one process would; ``sync_bn = true`` uses statistics of the global batch instead
(``torch.nn.SyncBatchNorm``, CUDA only).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from robustkit.core.errors import ConfigError
from robustkit.distributed import Dist

T = TypeVar("T")


def share(n: int, job: Dist | None) -> slice:
    """This rank's contiguous part of a global batch of ``n``: sizes differ by at most one, the
    first ``n % W`` ranks taking the larger ones (``torch.tensor_split``'s rule)."""
    if job is None:
        return slice(0, n)
    q, extra = divmod(n, job.world_size)
    start = job.rank * q + min(job.rank, extra)
    return slice(start, start + q + (job.rank < extra))


def loss_weight(n_local: int, n_global: int, job: Dist | None) -> float:
    """The factor on a rank's *mean* loss that makes DDP's gradient average (sum over ranks / W)
    the mean over the global batch: ``n_local * W / n_global``."""
    return 1.0 if job is None else n_local * job.world_size / n_global


def check_shares(n: int, batch_size: int, job: Dist | None, *, drop_last: bool = False) -> None:
    """A one-line error unless every global batch of an epoch gives every rank an example (a rank
    with none would have no loss to take the mean of)."""
    if job is None:
        return
    sizes = [min(batch_size, n)] + ([] if drop_last or n % batch_size == 0 else [n % batch_size])
    if min(sizes) < job.world_size:
        raise ConfigError(f"a global batch of {min(sizes)} image(s) (batch_size {batch_size}, {n} training images) "
                          f"cannot be shared by {job.world_size} processes; change batch_size or n_train")


def wrap(model: nn.Module, device: torch.device, job: Dist | None, sync_bn: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel when in a job (else itself), its BatchNorm layers
    turned into SyncBatchNorm first when ``sync_bn`` (without it, each rank's BatchNorm normalises
    with its own share's statistics). Parameters and buffers stay the same objects,
    so optimizers and EMAs built on ``model`` keep working; attacks use ``model`` itself
    (:func:`unwrap`), since their input gradients need no reduction."""
    if job is None:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ConfigError(f"sync_bn = true needs CUDA devices (torch's SyncBatchNorm runs on GPUs only; "
                              f"device is {device}); set sync_bn = false")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def collect(job: Dist | None) -> None:
    """Free DDP's garbage at the end of training, while the process group still exists.

    Training leaves reference cycles holding gloo's work objects; collected only at interpreter
    exit, after :func:`robustkit.distributed.session` destroyed the group, they abort the process
    now and then (torch 2.14: "terminate called without an active exception", 2 of 24 runs of a
    plain-torch DDP script; 0 of 24 with ``gc.collect()`` before ``destroy_process_group``)."""
    if job is not None:
        gc.collect()


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``net`` itself)."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def all_reduce_sum_(tensors: Sequence[torch.Tensor], job: Dist | None) -> None:
    """Sum ``tensors`` over the ranks in place, on the training group (NCCL on GPUs)."""
    if job is not None:
        for t in tensors:
            dist.all_reduce(t)


def sum_over_ranks(values: Sequence[float], job: Dist | None) -> list[float]:
    """Per-position sums of every rank's ``values`` (epoch statistics: once per epoch, so the
    object exchange's cost does not matter)."""
    if job is None:
        return list(values)
    return [sum(v) for v in zip(*job.gather(list(values)), strict=True)]


def on_main(job: Dist | None, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; its result on every rank. An error raised there is raised on rank
    0 and as :class:`~robustkit.distributed.PeerFailedError` on the others."""
    if job is None:
        return fn()
    result: Any = None
    error: Exception | None = None
    if job.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - handed to every rank by exchange()
            error = e
    return job.exchange(result, error)[0]


def agree(job: Dist | None, fn: Callable[[], T], key: Callable[[T], Any], mismatch: str) -> T:
    """``fn()`` on every rank, whose ``key`` must be the same on all of them: otherwise every rank
    raises a one-line error (``mismatch``, then the values by rank); an error on one rank is raised
    on all (what every rank decided alone, such as where to resume, must not silently differ)."""
    if job is None:
        return fn()
    result: Any = None
    error: Exception | None = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - handed to every rank by exchange()
        error = e
    keys = job.exchange(None if error else key(result), error)
    if any(k != keys[0] for k in keys):
        raise ConfigError(f"{mismatch} (by rank: {', '.join(map(str, keys))})")
    return result


def main_first(job: Dist | None, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first, then on the others: a dataset download or cache write happens once,
    and the other ranks read what rank 0 left."""
    if job is None:
        return fn()
    if job.is_main:
        result: T | None = None
        error: Exception | None = None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - handed to every rank by exchange()
            error = e
        job.exchange(None, error)
        return result  # type: ignore[return-value]
    job.exchange(None, None)
    return fn()


def describe(job: Dist | None, sync_bn: bool) -> dict[str, Any]:
    """What a checkpoint's training block records about the processes that trained it."""
    if job is None:
        return {"world_size": 1, "backend": None, "sync_bn": False}
    return {"world_size": job.world_size, "backend": job.backend, "sync_bn": bool(sync_bn),
            "batch": "global batch_size, each rank a contiguous share; random draws of the whole batch on every rank"}

"""robustkit on ``torch.distributed``: one process group per ``torchrun`` job, shared by evaluation
(sharded batches, :mod:`robustkit.eval.harness`) and training (DistributedDataParallel).

Nothing here launches processes: ``torchrun`` does (its rendezvous for several nodes, its elastic
restarts); robustkit reads the environment it sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``...). A command started under ``torchrun`` with more than one process joins the
group in :func:`session`; one started without it never touches ``torch.distributed``.

Failure model: every collective has a timeout (``ROBUSTKIT_DIST_TIMEOUT`` seconds, default 1800),
so a peer that died without torchrun noticing ends the job with an error instead of a hang; and a
rank that raises tells the others at the next exchange (:meth:`Dist.exchange`), so every rank stops
with the failing rank's message at once rather than at the timeout.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from robustkit.core.errors import ConfigError, RobustkitError

TIMEOUT_ENV = "ROBUSTKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class PeerFailedError(RobustkitError):
    """Another rank of the job failed; this one stops too (its message names the rank and error)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Dist:
    """This process's place in the job, and the group robustkit exchanges Python objects on.

    ``group`` is always a gloo group (objects travel through CPU memory), even when the training
    group is NCCL: record exchange is small and must not depend on a CUDA device being set.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str  # of the default group (what DDP uses): nccl or gloo
    group: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def exchange(self, obj: Any, error: BaseException | None) -> list[Any]:
        """:meth:`gather` that also carries failures: if any rank passes an ``error``, every rank
        raises (the failing rank its own exception, the others :class:`PeerFailedError`)."""
        status = None if error is None else {
            "message": f"{type(error).__name__}: {error}" if not isinstance(error, RobustkitError) else str(error),
            "exit_code": int(getattr(error, "exit_code", 1)) if isinstance(error, RobustkitError) else 1,
        }
        got = self.gather({"error": status, "payload": None if error else obj})
        if error is not None:
            raise error
        for r, g in enumerate(got):
            if g["error"] is not None:
                raise PeerFailedError(f"rank {r} of {self.world_size} failed: {g['error']['message']}",
                                      g["error"]["exit_code"])
        return [g["payload"] for g in got]


_CURRENT: list[Dist] = []  # the job this process joined (at most one)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or the like) as one of several."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"${TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def current() -> Dist | None:
    """The job this process is part of, or None when it runs alone.

    A caller that initialised ``torch.distributed`` itself (the Python API) is picked up here: its
    default group becomes the job, with a gloo group beside it for robustkit's exchanges."""
    if _CURRENT:
        return _CURRENT[0]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return _join_existing()


def _join_existing() -> Dist:
    backend = str(dist.get_backend())
    group = dist.group.WORLD if backend == "gloo" else dist.new_group(
        backend="gloo", timeout=timedelta(seconds=timeout_seconds()))
    ctx = Dist(rank=dist.get_rank(), world_size=dist.get_world_size(),
               local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=backend, group=group)
    _CURRENT.append(ctx)
    return ctx


@contextmanager
def session(device: str | None = "auto") -> Iterator[Dist | None]:
    """Join the ``torchrun`` job for the duration of a command (yields None when not launched).

    The backend follows ``device``: NCCL when it means CUDA and CUDA exists (each rank then uses
    ``cuda:LOCAL_RANK``), gloo otherwise. The group is destroyed on the way out, so the process
    exits cleanly even after an error."""
    if not launched() or current() is not None:
        yield current()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=timeout_seconds())
    dist.init_process_group(backend=backend, timeout=timeout, **_attempt_store(timeout))
    try:
        yield _join_existing()
    finally:
        _CURRENT.clear()
        # Drop what still references the group's buffers first: torch 2.14's gloo sometimes aborts
        # at exit ("terminate called without an active exception") without it (seen 2 in 24 runs).
        gc.collect()
        dist.destroy_process_group()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others do (alone: just runs it): a first download of data
    or weights into a shared cache happens once, not once per rank into the same file."""
    job = current()
    if job is None:
        yield
        return
    if not job.is_main:
        job.exchange(None, None)  # raises PeerFailedError when rank 0's turn failed
        yield
        return
    try:
        yield
    except Exception as e:
        job.exchange(None, e)  # the others learn why and stop too; re-raises e here
    job.exchange(None, None)


def is_follower() -> bool:
    """True on every rank but 0 of a job: those compute their share and write no output file."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and dist.get_rank() != 0


def backend_for(device: str | None) -> str:
    """NCCL when ``--device`` means CUDA (``auto`` on a CUDA machine, ``cuda``, ``cuda:N``), else gloo."""
    wants_cuda = str(device or "auto") == "auto" or str(device).startswith("cuda")
    return "nccl" if wants_cuda and torch.cuda.is_available() else "gloo"


def _attempt_store(timeout: timedelta) -> dict[str, Any]:
    """Under torchrun, the group's rendezvous keys in a namespace of their own per restart attempt.

    After an elastic restart (``--max-restarts``) the agent's store still holds the killed attempt's
    addresses; with the default ``env://`` init a restarted gloo rank that starts later than its
    peer can read a dead peer's address and hang or fail to connect (seen with torch 2.14 on CPU).
    Keys under ``robustkit/attempt<N>`` cannot be confused across attempts. Any other launcher that
    sets ``MASTER_ADDR``/``MASTER_PORT`` gets the plain ``env://`` init."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return {"store": dist.PrefixStore(f"robustkit/attempt{attempt}", store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def rank_device(device: torch.device) -> torch.device:
    """A CUDA device without an index means this rank's own GPU (``cuda:LOCAL_RANK``) in a job."""
    in_job = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if in_job and device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return device

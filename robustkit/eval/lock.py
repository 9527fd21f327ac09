"""One writer per records file: an exclusive, non-blocking ``flock`` on a ``<records>.lock`` sidecar.

Two runs with the same ``--out`` used to both exit 0 and commit every batch twice. Now the first
holds the lock for as long as it writes; the second refuses at once with one line naming the first
one's pid. The kernel drops a ``flock`` when its process dies (even by SIGKILL), so a crash never
leaves a stale lock: a file left behind by a killed run is simply locked again by the next one.

The lock is a sidecar and not the records file itself because ``--no-resume`` replaces the records
file: a lock on the old inode would not exclude a writer of the new one. The holder unlinks the
sidecar on release while still holding it; a waiter that locked an unlinked inode sees that
(its inode is no longer the path's) and retries, so two holders can never coexist.

Within one process the lock is re-entrant (the CLI holds it across ``evaluate`` and the result's
save, and :class:`~robustkit.eval.records.RecordStore` takes it again inside ``evaluate``).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from robustkit.core.errors import ConfigError

LOCK_SUFFIX = ".lock"


@dataclass
class _Held:
    fd: int
    path: Path
    count: int


_HELD: dict[str, _Held] = {}  # realpath of the lock file -> this process's hold on it


def lock_path(target: str | Path) -> Path:
    """The sidecar lock file of ``target`` (``r.records.jsonl`` -> ``r.records.jsonl.lock``)."""
    t = Path(target)
    return t.with_name(t.name + LOCK_SUFFIX)


def acquire(target: str | Path) -> str:
    """Take the lock of ``target`` or raise ConfigError naming the process that holds it; returns
    the key to :func:`release` it with."""
    path = lock_path(target)
    key = os.path.realpath(path)
    held = _HELD.get(key)
    if held is not None:
        held.count += 1
        return key
    path.parent.mkdir(parents=True, exist_ok=True)  # the default results/ folder of a fresh directory
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"pid {pid}" if pid else "pid unknown"
            raise ConfigError(f"{target} is being written by another robustkit process ({who}); wait for it "
                              "or use another --out") from None
        if _is_current(fd, path):
            break
        os.close(fd)  # locked a sidecar its holder unlinked on release: lock the path's new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = _Held(fd, path, 1)
    return key


def release(key: str) -> None:
    """Give back one hold; the last one removes the sidecar (still locked, so no one else has it)."""
    held = _HELD[key]
    held.count -= 1
    if held.count:
        return
    del _HELD[key]
    try:
        held.path.unlink(missing_ok=True)
    finally:
        os.close(held.fd)


@contextmanager
def locked(target: str | Path) -> Iterator[None]:
    """Hold the lock of ``target`` for the ``with`` block."""
    key = acquire(target)
    try:
        yield
    finally:
        release(key)


def refuse_if_locked(folder: str | Path) -> None:
    """Before a folder of records is deleted (``--no-resume``): no other process may be writing in it."""
    for sidecar in sorted(Path(folder).rglob(f"*{LOCK_SUFFIX}")):
        with locked(sidecar.with_name(sidecar.name[: -len(LOCK_SUFFIX)])):
            pass


def create_exclusive(path: str | Path, data: bytes) -> None:
    """Write a new file with exclusive creation (O_EXCL), fsync'd; a file already there is replaced
    only by the caller holding its lock. On any failure nothing is left behind."""
    p = Path(path)
    p.unlink(missing_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        p.unlink(missing_ok=True)
        raise
    os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is_current(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

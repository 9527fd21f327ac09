"""Append-only per-example records (JSONL) that make an evaluation resumable.

Layout: one ``header`` line (the evaluation protocol and its hash), then for every finished
batch its per-example lines followed by one ``commit`` line, all written with a single
``os.write`` and fsync'd. A run killed mid-batch leaves at most a tail without a commit; on
resume that tail is cut off, so each example is recorded exactly once per stage and a resumed
run replays exactly the batches that were not finished. (AutoAttack's own resume file never
loads and only saves every 60 s; see toolkits.md §2.3.)

The file fails closed: every commit carries its batch's record count and a chained sha256, and
a resume trusts a batch only after :mod:`robustkit.eval.record_check` has verified it against
its checksum, the data's labels, the threat model and the batches of the earlier stages. A
batch that fails is reported with its line and recomputed (a new version of it is appended; the
last valid version of a batch wins); the good batches around it are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustkit.core.errors import ConfigError
from robustkit.eval import lock
from robustkit.eval.record_check import Batch, RecordCheck, batch_checksum, scan

RECORDS_VERSION = 2  # 2: per-commit count and chained sha256 (record_check.py); 1 still resumes


def protocol_hash(protocol: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the protocol (what must match for a resume)."""
    blob = json.dumps(protocol, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def rank_path(path: str | Path, rank: int) -> Path:
    """The records file rank ``rank`` of a torchrun job writes: rank 0 the path given, rank r
    ``<stem>.rank<r><suffix>`` beside it (``r.records.jsonl`` -> ``r.records.rank1.jsonl``)."""
    p = Path(path)
    return p if rank == 0 else p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def rank_files(path: str | Path) -> list[tuple[int, Path]]:
    """The rank files (r >= 1) beside ``path`` that exist, as (rank, path) by rank: what a job left."""
    p = Path(path)
    pattern = re.compile(re.escape(p.stem) + r"\.rank([1-9][0-9]*)" + re.escape(p.suffix))
    found = [(int(m.group(1)), q) for q in p.parent.glob(f"{p.stem}.rank*{p.suffix}")
             if (m := pattern.fullmatch(q.name))] if p.parent.is_dir() else []
    return sorted(found)


class RecordStore:
    """Committed batches and per-example records of one evaluation, optionally on disk.

    In a torchrun job every rank writes its own file (:func:`rank_path`) and reads the others'
    (:meth:`load_peers`): the batches any rank committed count for all, so a job relaunched with
    another world size, or a single process after a job, resumes from all of them.
    """

    def __init__(self, path: str | Path | None, protocol: dict[str, Any], *, resume: bool = True,
                 rank: int = 0, world_size: int = 1, replace_other: bool = False):
        self.base = Path(path) if path is not None else None
        self.path = rank_path(path, rank) if path is not None else None
        self.resume = resume
        self._new: list[tuple[str, int, list[dict[str, Any]], dict[str, Any]]] = []  # written here, unshared
        self.dealt = 0  # batches the ranks of a job were dealt so far (the harness's round-robin)
        self.protocol = protocol
        self.hash = protocol_hash(protocol)
        self.examples: dict[tuple[str, int], dict[str, Any]] = {}
        self.commits: dict[tuple[str, int], dict[str, Any]] = {}
        self.resumed_batches = 0
        self.warnings: list[str] = []  # what a resume found untrustworthy (each also warned once)
        self._candidates: dict[tuple[str, int], list[Batch]] = {}  # loaded; settle() adopts them
        self._last_sha = self.hash  # ``prev`` of the next commit written
        self._fd: int | None = None
        self._lock: str | None = None  # the key of this store's hold on the file's lock
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = lock.acquire(self.path)  # one writer per file; a second run refuses
        try:
            if resume and self.path.exists() and self.path.stat().st_size > 0 and not (
                    replace_other and not self._records_this()):
                self._load()
            else:
                if rank == 0 and not resume:  # starting over: no earlier job's rank file may be resumed later
                    for r, stale in rank_files(self.path):
                        if r >= world_size:
                            with lock.locked(stale):
                                stale.unlink(missing_ok=True)
                header = {"type": "header", "version": RECORDS_VERSION, "protocol_hash": self.hash,
                          "protocol": protocol}
                lock.create_exclusive(self.path, (json.dumps(header, sort_keys=True) + "\n").encode())
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except BaseException:
            self._release_lock()
            raise

    def _records_this(self) -> bool:
        """Does the file's header record this evaluation? (``replace_other``: the user asked to replace
        another evaluation's output, e.g. at another eps, so its records start over instead of refusing.)"""
        assert self.path is not None
        with open(self.path, "rb") as f:
            first = f.readline()
        try:
            header = json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        return isinstance(header, dict) and header.get("protocol_hash") == self.hash

    def _load(self) -> None:
        """Check the header (refusing another evaluation's file), cut the uncommitted tail, and keep
        every batch found for :meth:`settle` to check; nothing is trusted yet."""
        assert self.path is not None
        raw = self.path.read_bytes()
        found = self._read(self.path, raw)
        if found.keep_bytes < len(raw):  # drop an uncommitted tail left by a killed run
            with open(self.path, "r+b") as f:
                f.truncate(found.keep_bytes)
        self._last_sha = found.last_sha

    def load_peers(self) -> None:
        """Take, as candidates like our own, the batches the other ranks' files committed (read only:
        a peer's uncommitted tail is its own to cut). In a job every rank calls this after all have
        opened their own file and before any writes (the harness puts barriers around it)."""
        if self.base is None or not self.resume:
            return
        for peer in [self.base, *(q for _, q in rank_files(self.base))]:
            if peer != self.path and peer.exists() and peer.stat().st_size > 0:
                self._read(peer, peer.read_bytes())

    def _read(self, path: Path, raw: bytes) -> Any:
        """Scan one records file of this evaluation into the candidates; returns the scan."""
        found = scan(raw, str(path), self.hash, self._check_header(raw, path))
        for b in found.batches:
            self._candidates.setdefault((b.stage, b.batch), []).append(b)
        for msg in found.problems:
            self._warn(msg)
        if found.unverified:
            self._warn(f"{path}: {found.unverified} batch(es) in records format 1 carry no checksum: they "
                       "are checked against the data, the threat model and each other, but an edit that keeps "
                       "them consistent cannot be detected")
        return found

    def _check_header(self, raw: bytes, path: Path) -> int:
        """The records format version of ``raw``, whose header must record this evaluation."""
        first, newline, _ = raw.partition(b"\n")
        try:
            header = json.loads(first) if newline else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("type") != "header":
            raise ConfigError(
                f"{path}:1: not a robustkit records header; choose another --out or pass --no-resume"
            )
        version = header.get("version")
        if version not in (1, RECORDS_VERSION) or isinstance(version, bool):
            raise ConfigError(f"{path}:1: records format {version!r} is not one this robustkit reads "
                              f"(1 to {RECORDS_VERSION}); use another --out, or --no-resume to start over")
        if header.get("protocol_hash") != self.hash:
            old = header.get("protocol") if isinstance(header.get("protocol"), dict) else {}
            diff = sorted(k for k in set(old) | set(self.protocol) if old.get(k) != self.protocol.get(k))
            raise ConfigError(
                f"{path} records a different evaluation (differs in: {', '.join(diff) or 'format'}); "
                "use another --out, or --no-resume to start over"
            )
        return int(version)

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        warnings.warn(msg, stacklevel=4)

    def settle(self, stage: str, batches: Sequence[Sequence[int]], check: RecordCheck) -> None:
        """Adopt, for each batch of ``stage``, the last loaded copy that passes ``check`` and holds
        exactly ``batches[b]``; report the copies that fail (their batch is then recomputed).

        Called once per stage right before it runs: which examples a batch must hold depends on
        the results of the earlier stages, so a recomputed earlier batch that changed them also
        invalidates what was attacked on the old survivors. A failing copy earlier in the file than
        the adopted one was reported when it was replaced and is passed over quietly.
        """
        for key in sorted(k for k in self._candidates if k[0] == stage):
            b = key[1]
            expected = batches[b] if b < len(batches) else None
            rejected: list[tuple[int, str]] = []
            adopted: Batch | None = None
            for cand in reversed(self._candidates.pop(key)):
                bad = check.batch_problem(cand, expected, clean=stage == "clean")
                if bad is None:
                    adopted = cand
                    break
                rejected.append(bad)
            if adopted is not None:
                for _, r in adopted.records:
                    self.examples[(stage, r["i"])] = r
                self.commits[key] = adopted.commit
                self.resumed_batches += 1
            then = f"the valid copy at line {adopted.line} is used" if adopted else "the batch is recomputed"
            for line, why in reversed(rejected):
                self._warn(f"{self.path}:{line}: {why}; not trusted, {then}")

    def is_committed(self, stage: str, batch: int) -> bool:
        return (stage, batch) in self.commits

    def write_batch(self, stage: str, batch: int, records: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        """Record one finished batch atomically (examples first, then the commit line)."""
        for r in records:
            r["stage"], r["batch"] = stage, batch
            self.examples[(stage, r["i"])] = r
        commit = {"type": "commit", "stage": stage, "batch": batch, "n": len(records), **stats,
                  "prev": self._last_sha}
        commit["sha256"] = self._last_sha = batch_checksum(records, commit)
        self.commits[(stage, batch)] = commit
        self._new.append((stage, batch, records, commit))
        if self._fd is None:
            return
        payload = "".join(json.dumps(r, sort_keys=True) + "\n" for r in [*records, commit]).encode()
        view = memoryview(payload)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def take_new(self) -> list[tuple[str, int, list[dict[str, Any]], dict[str, Any]]]:
        """The batches written since the last call (what this rank shares at the end of a stage)."""
        new, self._new = self._new, []
        return new

    def adopt(self, batches: Sequence[tuple[str, int, list[dict[str, Any]], dict[str, Any]]]) -> None:
        """Take batches another rank of the job computed (they are in its own file, not ours)."""
        for stage, batch, records, commit in batches:
            for r in records:
                self.examples[(stage, r["i"])] = r
            self.commits[(stage, batch)] = commit

    def stage_commits(self, stage: str) -> list[dict[str, Any]]:
        return [c for (s, _), c in sorted(self.commits.items(), key=lambda kv: kv[0][1]) if s == stage]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            lock.release(self._lock)
            self._lock = None

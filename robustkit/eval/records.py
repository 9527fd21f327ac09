"""Append-only per-example records (JSONL) that make an evaluation resumable.

Layout: one ``header`` line (the evaluation protocol and its hash), then for every finished
batch its per-example lines followed by one ``commit`` line, all written with a single
``os.write`` and fsync'd. A run killed mid-batch leaves at most a tail without a commit; on
resume that tail is cut off, so each example is recorded exactly once per stage and a resumed
run replays exactly the batches that were not finished. (AutoAttack's own resume file never
loads and only saves every 60 s; see toolkits.md §2.3.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from robustkit.core.errors import ConfigError

RECORDS_VERSION = 1


def protocol_hash(protocol: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the protocol (what must match for a resume)."""
    blob = json.dumps(protocol, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class RecordStore:
    """Committed batches and per-example records of one evaluation, optionally on disk."""

    def __init__(self, path: str | Path | None, protocol: dict[str, Any], *, resume: bool = True):
        self.path = Path(path) if path is not None else None
        self.protocol = protocol
        self.hash = protocol_hash(protocol)
        self.examples: dict[tuple[str, int], dict[str, Any]] = {}
        self.commits: dict[tuple[str, int], dict[str, Any]] = {}
        self.resumed_batches = 0
        self._fd: int | None = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            header = {"type": "header", "version": RECORDS_VERSION, "protocol_hash": self.hash,
                      "protocol": protocol}
            self.path.write_text(json.dumps(header, sort_keys=True) + "\n")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def _load(self) -> None:
        assert self.path is not None
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            raise ConfigError(
                f"{self.path} is not a robustkit records file; choose another --out or pass --no-resume"
            ) from None
        if header.get("type") != "header" or header.get("protocol_hash") != self.hash:
            old = header.get("protocol", {}) if isinstance(header, dict) else {}
            diff = sorted(k for k in set(old) | set(self.protocol) if old.get(k) != self.protocol.get(k))
            raise ConfigError(
                f"{self.path} records a different evaluation (differs in: {', '.join(diff) or 'format'}); "
                "use another --out, or --no-resume to start over"
            )
        good_end = len(lines[0]) + 1
        pending: list[dict[str, Any]] = []
        offset = good_end
        for line in lines[1:]:
            end = offset + len(line) + 1
            if end > len(raw) or not line:
                break  # unterminated tail (killed mid-write) or the final empty split
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if rec.get("type") == "commit":
                for ex in pending:
                    self.examples[(ex["stage"], ex["i"])] = ex
                self.commits[(rec["stage"], rec["batch"])] = rec
                pending = []
                good_end = end
            else:
                pending.append(rec)
            offset = end
        if good_end < len(raw):  # drop an uncommitted tail left by a killed run
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
        self.resumed_batches = len(self.commits)

    def is_committed(self, stage: str, batch: int) -> bool:
        return (stage, batch) in self.commits

    def write_batch(self, stage: str, batch: int, records: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        """Record one finished batch atomically (examples first, then the commit line)."""
        for r in records:
            r["stage"] = stage
            self.examples[(stage, r["i"])] = r
        commit = {"type": "commit", "stage": stage, "batch": batch, "n": len(records), **stats}
        self.commits[(stage, batch)] = commit
        if self._fd is None:
            return
        payload = "".join(json.dumps(r, sort_keys=True) + "\n" for r in [*records, commit]).encode()
        view = memoryview(payload)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def stage_commits(self, stage: str) -> list[dict[str, Any]]:
        return [c for (s, _), c in sorted(self.commits.items(), key=lambda kv: kv[0][1]) if s == stage]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

"""What a resume may trust in a records file: checksums, shapes, labels, flags and the budget.

Format 2 (this version) makes every commit line self-verifying. A commit carries ``n`` (its
batch's record count), ``prev`` (the ``sha256`` of the commit line before it in the file, or the
protocol hash for the first) and ``sha256``: the sha256 of the batch's records and of the commit
itself without ``sha256``, each as canonical JSON (sorted keys, no spaces), one per line, in file
order. Every record names its ``stage`` and ``batch``, so a batch is found by its key, not by its
position. Each batch therefore verifies on its own (a damaged batch never takes the good batches
after it down with it), and ``prev`` chains the batches, so one removed from the middle is
noticed. A checksum is not a signature — whoever recomputes sha256 can forge a batch — which is
why the semantic checks of :class:`RecordCheck` hold whatever the checksums say.

Loading fails closed in two steps, and nothing that fails is ever trusted:

1. :func:`scan` (when the file is opened): every complete line must be a record or a commit of the
   right shape, and a commit must match its records' count and its checksum. Each failure is
   reported with its line; the uncommitted tail a killed write leaves is cut off.
2. :meth:`RecordCheck.batch_problem` (before each stage runs): every record must agree with the
   data and the threat model (its label; ``correct``/``robust`` equal to ``pred == label``; the
   perturbation within eps) and a batch must hold exactly the examples the already settled
   earlier stages leave to it. A batch that fails is recomputed, and with it what depended on it.

Format 1 files (no checksums) still resume: their batches get every check but the checksum, and
the file is reported as unverified.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Record = dict[str, Any]


def canonical(obj: Any) -> str:
    """The one JSON spelling a checksum is computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def batch_checksum(records: Sequence[Record], commit: Record) -> str:
    """sha256 over a batch's records and its commit (less ``sha256``, but with ``prev``)."""
    body = {k: v for k, v in commit.items() if k != "sha256"}
    text = "\n".join([*(canonical(r) for r in records), canonical(body)])
    return hashlib.sha256(text.encode()).hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _is_sha(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


@dataclass
class Batch:
    """One committed batch as found in the file (not yet trusted: see :class:`RecordCheck`)."""

    stage: str
    batch: int
    line: int  # the commit's line number, 1-based
    commit: Record
    records: list[tuple[int, Record]]  # (line number, record) in file order
    problem: str | None = None  # why its count or checksum does not match (never adopted then)


@dataclass
class Scan:
    """What :func:`scan` found: the batches (to be checked), the lines that belong to no batch,
    where the uncommitted tail starts."""

    where: str  # the file, as problems name it
    batches: list[Batch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # lines no batch can answer for
    keep_bytes: int = 0  # the file's length without the uncommitted tail
    last_sha: str = ""  # ``prev`` of the next commit written
    unverified: int = 0  # format-1 batches: no checksum to check


def _commit_problem(c: Record, version: int) -> str | None:
    if not isinstance(c.get("stage"), str) or not c["stage"] or not _is_int(c.get("batch")) or c["batch"] < 0:
        return "commit without a valid stage and batch number"
    if not _is_int(c.get("n")) or c["n"] < 0:
        return "commit without a valid record count n"
    if not all(_is_int(c.get(k)) and c[k] >= 0 for k in ("forward", "backward")) or \
            not (_is_number(c.get("seconds")) and c["seconds"] >= 0):
        return "commit without valid seconds/forward/backward counts"
    if "sha256" in c or version >= 2:
        if not _is_sha(c.get("sha256")) or not _is_sha(c.get("prev")):
            return "commit without a valid sha256 checksum and prev hash"
    return None


def _record_problem(r: Record, version: int) -> str | None:
    if not isinstance(r.get("stage"), str) or not _is_int(r.get("i")):
        return "record without a valid stage and example index"
    if ("batch" in r or version >= 2) and not (_is_int(r.get("batch")) and r["batch"] >= 0):
        return "record without a valid batch number"
    return None


def _parse(line: bytes) -> tuple[str, Record | None, str | None]:
    """(kind, object, problem) of one complete line: kind is 'commit', 'record' or 'bad'."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "bad", None, "not valid JSON"
    if not isinstance(obj, dict):
        return "bad", None, f"a JSON {type(obj).__name__}, not a record or commit"
    if obj.get("type") == "commit":
        return "commit", obj, None
    if "type" in obj:
        return "bad", None, f"unexpected line type {obj['type']!r}"
    return "record", obj, None


def scan(raw: bytes, where: str, protocol_hash: str, version: int) -> Scan:
    """Split the lines after the header into batches and report every line that belongs to none.

    ``where`` names the file in problems (``where:line: ...``). Records are matched to the
    commit of their own stage and batch (format 1: any batch of the stage, as written in order).
    A batch whose count or checksum fails is kept with its ``problem``: whether that needs a
    report depends on whether a valid copy of it follows (:meth:`RecordStore.settle`).
    """
    lines = raw.split(b"\n")
    out = Scan(where, keep_bytes=len(lines[0]) + 1, last_sha=protocol_hash)
    pending: list[tuple[int, Record]] = []
    offset, reported = out.keep_bytes, 0  # problems reported up to the last commit
    for lineno, line in enumerate(lines[1:], start=2):
        end = offset + len(line) + 1
        if end > len(raw):
            break  # an unterminated last line: a write the kill interrupted
        offset = end
        kind, obj, why = _parse(line)
        if kind == "record":
            assert obj is not None
            why = _record_problem(obj, version)
            if why is None:
                pending.append((lineno, obj))
        elif kind == "commit":
            assert obj is not None
            out.keep_bytes = end
            why = _commit_problem(obj, version)
            if why is None:
                _take_batch(obj, lineno, pending, out, explained=len(out.problems) > reported)
                reported = len(out.problems)
        if why is not None:
            out.problems.append(f"{where}:{lineno}: {why}; ignored (what it belongs to is recomputed)")
    return out


def _take_batch(c: Record, lineno: int, pending: list[tuple[int, Record]], out: Scan, *,
                explained: bool) -> None:
    """Move the commit's records out of ``pending`` into a batch, noting a count or checksum mismatch.

    ``explained``: a problem was reported since the previous commit, so a broken chain link here
    needs no report of its own."""
    stage, b = c["stage"], c["batch"]
    mine = [(ln, r) for ln, r in pending if r["stage"] == stage and r.get("batch", b) == b]
    # A batch is written with its commit in one write, so records still pending that are not this
    # commit's lost theirs (to a damaged line, reported where it is): no later commit may take them.
    pending.clear()
    prev_sha, problem = out.last_sha, None
    if "sha256" in c:
        out.last_sha = c["sha256"]
    if len(mine) != c["n"]:
        problem = f"batch {b} of {stage} has {len(mine)} record(s) but its commit says n={c['n']}"
    elif "sha256" not in c:
        out.unverified += 1
    elif batch_checksum([r for _, r in mine], c) != c["sha256"]:
        problem = f"batch {b} of {stage}: checksum mismatch (its records or commit were altered)"
    elif c["prev"] != prev_sha and not explained:
        # The batch itself verifies, so it is kept; what is missing before it is recomputed.
        out.problems.append(f"{out.where}:{lineno}: hash chain broken before this commit (a committed "
                            "batch before it was removed or altered); missing batches are recomputed")
    out.batches.append(Batch(stage, b, lineno, c, mine, problem))


@dataclass(frozen=True)
class RecordCheck:
    """What every record of a batch must agree with: the data's labels and the threat model."""

    labels: Sequence[int]
    norm: str | None = None  # None: a clean-only evaluation (no attack stage to check)
    eps: float | None = None
    tolerance: float = 0.0

    def record_problem(self, r: Record, clean: bool) -> str | None:
        """Why record ``r`` cannot be trusted, or None."""
        i = r["i"]
        if not 0 <= i < len(self.labels):
            return f"example index {i} outside the {len(self.labels)} examples"
        label = self.labels[i]
        if not _is_int(r.get("pred")):
            return f"example {i}: no valid prediction"
        if clean:
            if not _is_int(r.get("y")) or r["y"] != label:
                return f"example {i}: label {r.get('y')!r} differs from the data's {label}"
            if r.get("correct") is not (r["pred"] == label):
                return f"example {i}: 'correct' {r.get('correct')!r} contradicts prediction {r['pred']}"
            return None
        if r.get("robust") is not (r["pred"] == label):
            return f"example {i}: 'robust' {r.get('robust')!r} contradicts prediction {r['pred']}"
        if not all(_is_number(r.get(k)) and r[k] >= 0 for k in ("linf", "l2")):
            return f"example {i}: no valid perturbation norms"
        dist = r["linf"] if self.norm == "Linf" else r["l2"]
        if self.eps is None or dist > self.eps + self.tolerance:
            return f"example {i}: {self.norm} distance {dist:.7f} exceeds eps {self.eps} (+{self.tolerance:g})"
        return None

    def batch_problem(self, batch: Batch, expected: Sequence[int] | None, clean: bool) -> tuple[int, str] | None:
        """(line, why) the batch cannot be trusted, or None; ``expected``: its example indices."""
        if batch.problem is not None:
            return batch.line, batch.problem
        for ln, r in batch.records:
            why = self.record_problem(r, clean)
            if why is not None:
                return ln, why
        if expected is None:
            return batch.line, f"batch {batch.batch} of {batch.stage} lies past the stage's last batch"
        if [r["i"] for _, r in batch.records] != list(expected):
            return batch.line, (f"batch {batch.batch} of {batch.stage} holds other examples than the earlier "
                                "stages leave to it")
        return None

"""The result JSON: a versioned, self-describing record of one evaluation.

Accuracies are fractions in [0, 1] (RobustBench's percentage strings are produced only when an
entry is written). Per-example robust flags are stored as a compact ``0``/``1`` string so paired
tests between two results (regression gating) need nothing but the two JSON files.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from robustkit.core.errors import ConfigError
from robustkit.core.threat import format_eps
from robustkit.eval.per_class import summary_lines as _per_class_lines
from robustkit.eval.subject import Subject

RESULT_SCHEMA = "robustkit.eval-result"
RESULT_SCHEMA_VERSION = 1


@dataclass
class StageResult:
    """Accuracy after one stage of the survivor cascade (``clean`` first)."""

    name: str
    accuracy: float  # fraction of all n examples still correct after this stage
    n_attacked: int  # examples this stage was run on
    n_broken: int  # of those, how many it broke
    seconds: float
    forward_passes: int
    backward_passes: int


@dataclass
class EvalResult:
    """One evaluation; ``to_dict`` is the on-disk JSON."""

    model: str
    attack: str | None
    attack_config: dict[str, Any] | None
    dataset: str | None
    norm: str | None
    eps: float | None
    seed: int
    batch_size: int
    n_examples: int
    clean_accuracy: float
    robust_accuracy: float | None
    stages: list[StageResult]
    clean_flags: str
    robust_flags: str | None
    passes: dict[str, int]
    timing: dict[str, Any]
    budget: dict[str, Any] | None
    checks: dict[str, Any]
    data: dict[str, Any]
    provenance: dict[str, Any]
    records_path: str | None = None
    warnings: list[str] = field(default_factory=list)
    # architecture, parameter count and test-time forward passes per input: what a leaderboard
    # entry needs and the evaluation config cannot say (absent in results written before it existed)
    model_info: dict[str, Any] = field(default_factory=dict)
    # clean/robust accuracy per class, balanced accuracy and many/medium/few-shot groups
    # (robustkit.eval.per_class); None in results written before it existed
    per_class: dict[str, Any] | None = None
    # a torchrun job: world size, backend and each rank's share (batches, passes, seconds); absent
    # from a one-process result (robustkit.eval.harness)
    distributed: dict[str, Any] | None = None
    # one part of a --shard i/N run: which examples; `robustkit merge` joins the parts
    shard: dict[str, Any] | None = None
    # the AutoAttack engine (Attack.engine: reference, rk, fast, custom); absent for other attacks
    engine: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("distributed", "shard", "engine"):  # absent when None: results keep the keys they had
            if d[key] is None:
                del d[key]
        out: dict[str, Any] = {"schema": RESULT_SCHEMA, "schema_version": RESULT_SCHEMA_VERSION}
        out.update(d)
        out["eps_str"] = format_eps(self.eps) if self.eps is not None else None
        return out

    def save(self, path: str | Path) -> Path:
        """Write atomically so a kill never leaves half a JSON.

        ``records_path`` is stored relative to the result's folder (``<name>.records.jsonl`` when
        the records lie beside it): a result can be moved or committed without carrying a path of
        the machine that wrote it. Resume never reads it back (``--out`` names the records file).
        """
        d = self.to_dict()
        if self.records_path:
            d["records_path"] = relative_to_folder_of(self.records_path, path)
        return write_json_atomic(path, d)

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read a result JSON written by :meth:`save` (schema-checked)."""
        d = read_versioned_json(path, RESULT_SCHEMA, RESULT_SCHEMA_VERSION, "result")
        d.pop("eps_str", None)
        d["stages"] = [StageResult(**s) for s in d["stages"]]
        return cls(**d)

    def summary(self) -> str:
        """A terminal table: accuracy after each stage, cost, and the headline numbers."""
        rows = [("stage", "accuracy", "attacked", "broken", "time", "fwd", "bwd")]
        for s in self.stages:
            rows.append((
                s.name, f"{100 * s.accuracy:.2f}%", str(s.n_attacked), str(s.n_broken),
                _fmt_seconds(s.seconds), _fmt_count(s.forward_passes), _fmt_count(s.backward_passes),
            ))
        lines = text_table(rows)
        threat = f"{self.norm} eps={format_eps(self.eps)}" if self.eps is not None else "none"
        head = (
            f"model {self.model} | data {self.dataset} (n={self.n_examples}) | attack "
            f"{self.attack or 'none'} | {threat} | seed {self.seed}"
        )
        tail = f"clean accuracy  {100 * self.clean_accuracy:6.2f}%"
        if self.robust_accuracy is not None:
            tail += f"\nrobust accuracy {100 * self.robust_accuracy:6.2f}%"
        tail += f"   ({_fmt_seconds(self.timing['total_seconds'])} on {self.provenance.get('device')})"
        if self.distributed:
            ranks = self.distributed["ranks"]
            tail += (f"\n{self.distributed['world_size']} ranks ({self.distributed['backend']}), "
                     f"{_fmt_seconds(self.distributed['wall_seconds'])} wall; batches per rank "
                     + " / ".join(str(r["batches"]) for r in ranks) + ", busy "
                     + " / ".join(_fmt_seconds(r["seconds"]) for r in ranks))
        if self.shard:
            lo, hi = self.shard["examples"]
            tail += (f"\nshard {self.shard['index']}/{self.shard['count']}: examples {lo}..{hi - 1} of "
                     f"{self.shard['n_total']} (`robustkit merge` joins the parts)")
        return "\n".join([head, "", *lines, "", tail, *_per_class_lines(self.per_class)])


def subject_fields(subject: Subject, model: nn.Module, fingerprint: str,
                   environment: dict[str, Any]) -> dict[str, Any]:
    """The result keys that say what was evaluated (``model``, ``dataset``, ``data``,
    ``provenance``, ``model_info``): one place, so every producer records a subject alike."""
    return {
        "model": subject.name_for(model),
        "dataset": subject.dataset,
        "data": {**subject.data_info, "fingerprint": fingerprint},
        "provenance": {**environment, "checkpoint_sha256": subject.checkpoint_sha256},
        "model_info": {
            "class": type(model).__name__,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "number_forward_passes": int(getattr(model, "number_forward_passes", 1)),
            **subject.model_info,
        },
    }


def result_stem(model: str, attack: str, dataset: str, n: int, seed: int) -> str:
    """``<model>__<attack>__<dataset>-n<N>-s<seed>``: the one name every result file is given.

    A checkpoint path counts by its stem and anything that is not ``[A-Za-z0-9._+-]`` becomes
    ``_``, so the name is safe on every file system and says what was evaluated without opening
    the file. Reports built on several evaluations prefix their kind (``curve__``, ``tradeoff__``).
    """
    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", Path(s).stem if s.endswith((".safetensors", ".toml")) else s)

    return f"{clean(model)}__{clean(attack)}__{clean(dataset)}-n{n}-s{seed}"


def relative_to_folder_of(target: str | Path, anchor: str | Path) -> str:
    """``target`` as a POSIX path relative to ``anchor``'s folder (absolute only across drives)."""
    try:
        return Path(os.path.relpath(Path(target).resolve(), Path(anchor).resolve().parent)).as_posix()
    except ValueError:  # Windows: another drive has no relative path
        return str(target)


def read_versioned_json(path: str | Path, schema: str, version: int, kind: str) -> dict[str, Any]:
    """A robustkit JSON file's body, after checking its ``schema`` and ``schema_version``."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {kind} {path}: {e}") from None
    if not isinstance(d, dict) or d.get("schema") != schema:
        found = d.get("schema") if isinstance(d, dict) else None
        raise ConfigError(f"{path} is not a robustkit {kind} (schema {found!r})")
    if d.get("schema_version") != version:
        raise ConfigError(f"{path}: unsupported {kind} schema_version {d.get('schema_version')}")
    return {k: v for k, v in d.items() if k not in ("schema", "schema_version")}


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """JSON to a temp file in the same folder, then rename: readers see the old file or the new one.

    Whatever fails (a folder in the way, a full disk, an object JSON cannot hold) leaves no temp
    file behind; a file system error is one line (ConfigError), not a traceback after the work.
    In a torchrun job only rank 0 writes (every rank holds the same merged result).
    """
    from robustkit.distributed import is_follower

    p = Path(path)
    if is_follower():
        return p
    tmp: str | None = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result is for sharing, like any new file
        os.replace(tmp, p)
    except OSError as e:
        raise ConfigError(f"cannot write {p}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
    return p


def text_table(rows: list[tuple[str, ...]], note_column: bool = False) -> list[str]:
    """Rows as aligned terminal lines, the header underlined: the first column left-aligned, the
    numbers right-aligned, and (``note_column``) a last free-text column left as it is."""
    aligned = len(rows[0]) - (1 if note_column else 0)
    widths = [max(len(r[i]) for r in rows) for i in range(aligned)]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:aligned], widths[1:], strict=True)]
        lines.append("  ".join([*cells, *r[aligned:]]).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


def _fmt_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)

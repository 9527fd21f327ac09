"""The result JSON: a versioned, self-describing record of one evaluation.

Accuracies are fractions in [0, 1] (RobustBench's percentage strings are produced only when an
entry is written). Per-example robust flags are stored as a compact ``0``/``1`` string so paired
tests between two results (regression gating) need nothing but the two JSON files.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from robustkit.core.errors import ConfigError
from robustkit.core.threat import format_eps

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        out: dict[str, Any] = {"schema": RESULT_SCHEMA, "schema_version": RESULT_SCHEMA_VERSION}
        out.update(d)
        out["eps_str"] = format_eps(self.eps) if self.eps is not None else None
        return out

    def save(self, path: str | Path) -> Path:
        """Write atomically so a kill never leaves half a JSON."""
        return write_json_atomic(path, self.to_dict())

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
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for j, r in enumerate(rows):
            cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
            lines.append("  ".join(cells))
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        threat = f"{self.norm} eps={format_eps(self.eps)}" if self.eps is not None else "none"
        head = (
            f"model {self.model} | data {self.dataset} (n={self.n_examples}) | attack "
            f"{self.attack or 'none'} | {threat} | seed {self.seed}"
        )
        tail = f"clean accuracy  {100 * self.clean_accuracy:6.2f}%"
        if self.robust_accuracy is not None:
            tail += f"\nrobust accuracy {100 * self.robust_accuracy:6.2f}%"
        tail += f"   ({_fmt_seconds(self.timing['total_seconds'])} on {self.provenance.get('device')})"
        return "\n".join([head, "", *lines, "", tail])


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
    """JSON to a temp file in the same folder, then rename: readers see the old file or the new one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result is for sharing, like any new file
    os.replace(tmp, p)
    return p


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}min"


def _fmt_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)

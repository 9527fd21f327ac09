"""Robustness curves: accuracy under attack as a function of eps, with a monotonicity check.

A robust accuracy at one eps says little about how a defence degrades; a curve over a grid of
budgets does, and it doubles as a sanity check of the attack. The eps-ball grows with eps, so an
adversarial example found at a small eps is also one at every larger eps: true robust accuracy is
non-increasing in eps, and so is every example's robustness. A measured curve that rises, or an
example broken at a small eps but "robust" at a larger one, means the attack failed at the larger
eps (gradient masking, too few steps, a bad step size). Both are flagged, and each point also gets
``accuracy_envelope``: an example counts as broken at eps_k when it was broken at any eps_j <= eps_k.
The envelope is the honest upper bound on robust accuracy the measurements support.

How the work is split, and what is deliberately *not* skipped:

- the clean pass runs once over all examples; an eps 0 point is that clean accuracy (no attack);
- every eps > 0 runs the attack through :func:`robustkit.eval.evaluate` on *all* clean-correct
  examples. Attacking at eps_k only the examples still robust at eps_{k-1} would be cheaper and
  would still give the envelope, but it takes monotonicity for granted and so could never detect
  the attack failures this curve exists to expose. The harness re-predicts the clean-correct subset
  at each eps (one forward pass per example, small next to an attack's steps x (forward + backward));
  in exchange each point's flags equal those of ``robustkit eval`` at that eps with the same seed and
  batch size, because the survivor batches, and so the per-batch attack seeds, are the same;
- no registered attack is a minimum-norm attack that reports each example's smallest adversarial
  perturbation (FAB runs at a fixed eps inside AutoAttack), so there is no one-pass shortcut: each
  eps is its own attack run. The same seed at every eps gives common random numbers (PGD's random
  starts are the same noise scaled by eps), which keeps the curve smooth without hiding failures.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit.attacks.base import Attack
from robustkit.core.errors import ConfigError
from robustkit.core.threat import format_eps, parse_eps
from robustkit.eval.harness import evaluate
from robustkit.eval.results import (
    EvalResult,
    _fmt_seconds,
    read_versioned_json,
    text_table,
    write_json_atomic,
)
from robustkit.eval.subject import Subject

CURVE_SCHEMA = "robustkit.curve"
CURVE_SCHEMA_VERSION = 1
MAX_POINTS = 100
RANGE_TOLERANCE = 1e-6  # a grid point within this fraction of a step of ``stop`` still counts


class CurveWarning(UserWarning):
    """A robustness curve that is not monotone: the attack failed somewhere."""


# --------------------------------------------------------------------------- eps grids


def parse_eps_spec(spec: str) -> list[float]:
    """``start:stop:step`` (stop inclusive) or a comma list, e.g. ``0:8/255:2/255`` or ``0,2/255,0.1``.

    Range arithmetic is exact (fractions), so ``0:8/255:2/255`` ends at exactly 8/255 and
    ``0:0.3:0.05`` at 0.3. Anything malformed is a one-line :class:`ConfigError`.
    """
    text = str(spec).strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3 or "," in text:
            raise ConfigError(f"eps grid {spec!r}: write start:stop:step (e.g. 0:8/255:2/255) or a comma list")
        start, stop, step = (_exact(p, spec) for p in parts)
        if step <= 0:
            raise ConfigError(f"eps grid {spec!r}: step must be > 0")
        if stop < start:
            raise ConfigError(f"eps grid {spec!r}: stop must be >= start")
        ratio = (stop - start) / step
        count = math.floor(ratio + Fraction(RANGE_TOLERANCE)) + 1
        if count > MAX_POINTS:
            raise ConfigError(f"eps grid {spec!r} has {count} points; at most {MAX_POINTS}")
        values = [min(start + k * step, stop) for k in range(count)]
        return validate_eps_list([float(v) for v in values], spec)
    items = text.split(",")
    if any(not i.strip() for i in items):
        raise ConfigError(f"eps grid {spec!r}: empty value in the comma list")
    if len(items) > MAX_POINTS:
        raise ConfigError(f"eps grid {spec!r} has {len(items)} points; at most {MAX_POINTS}")
    return validate_eps_list([float(_exact(i, spec)) for i in items], spec)


def validate_eps_list(values: Sequence[float | str], what: object = None) -> list[float]:
    """Parse each value and require a strictly increasing grid of 1..100 values with one eps > 0."""
    label = f"eps grid {what!r}" if what is not None else "eps grid"
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError(f"{label}: expected a list of eps values")
    try:
        out = [parse_eps(v) for v in values]
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from None
    if not out:
        raise ConfigError(f"{label}: no eps values")
    if len(out) > MAX_POINTS:
        raise ConfigError(f"{label} has {len(out)} points; at most {MAX_POINTS}")
    for a, b in zip(out, out[1:], strict=False):
        if not b > a:
            raise ConfigError(f"{label}: eps values must be strictly increasing, but {format_eps(b)} "
                              f"follows {format_eps(a)}")
    if out[-1] <= 0:
        raise ConfigError(f"{label}: needs at least one eps > 0")
    return out


def _exact(text: str, spec: str) -> Fraction:
    """One eps as an exact fraction ("2/255" stays 2/255), validated by :func:`parse_eps`."""
    try:
        parse_eps(text)
    except ConfigError as e:
        raise ConfigError(f"eps grid {spec!r}: {e}") from None
    num, _, den = text.strip().partition("/")
    return Fraction(num.strip()) / (Fraction(den.strip()) if den else 1)


# --------------------------------------------------------------------------- result


@dataclass
class CurvePoint:
    """Accuracy at one eps; ``robust_flags`` has one 0/1 per example (all n, in order)."""

    eps: float
    eps_str: str
    accuracy: float
    accuracy_envelope: float
    robust_flags: str
    seconds: float
    forward_passes: int
    backward_passes: int
    n_inconsistent: int = 0  # robust here although broken at a smaller eps
    attack_config: dict[str, Any] | None = None  # None at eps 0 (no attack runs)


@dataclass
class Curve:
    """A robustness curve; ``to_dict`` is the on-disk JSON (schema ``robustkit.curve``)."""

    model: str
    attack: str
    attack_config: dict[str, Any]  # parameters shared by every point (per-point configs hold the rest)
    norm: str
    dataset: str | None
    n_examples: int
    seed: int
    batch_size: int
    points: list[CurvePoint]
    clean_accuracy: float
    clean_flags: str
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": CURVE_SCHEMA, "schema_version": CURVE_SCHEMA_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write atomically, like a result: a kill never leaves half a JSON."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Curve:
        """Read a curve JSON written by :meth:`save` (schema-checked)."""
        d = read_versioned_json(path, CURVE_SCHEMA, CURVE_SCHEMA_VERSION, "curve")
        d["points"] = [CurvePoint(**p) for p in d["points"]]
        return cls(**d)

    def rising_points(self) -> list[int]:
        """Indices of points whose accuracy exceeds that of some smaller eps."""
        out, best = [], math.inf
        for k, p in enumerate(self.points):
            if p.robust_flags.count("1") > best:
                out.append(k)
            best = min(best, p.robust_flags.count("1"))
        return out

    def summary(self) -> str:
        """A terminal table: eps | accuracy | envelope | time, flagged rows marked."""
        rising = set(self.rising_points())
        rows = [("eps", "accuracy", "envelope", "time", "flag")]
        for k, p in enumerate(self.points):
            flag = "rises" if k in rising else (f"{p.n_inconsistent} broken earlier" if p.n_inconsistent else "")
            rows.append((p.eps_str, f"{100 * p.accuracy:.2f}%", f"{100 * p.accuracy_envelope:.2f}%",
                         _fmt_seconds(p.seconds), flag))
        lines = text_table(rows, note_column=True)
        head = (f"model {self.model} | data {self.dataset} (n={self.n_examples}) | attack {self.attack} | "
                f"{self.norm} | seed {self.seed}")
        tail = f"clean accuracy {100 * self.clean_accuracy:.2f}%"
        if self.warnings:
            tail += f" | {len(self.warnings)} warning(s): the curve is not monotone, see the JSON's 'warnings'"
        tail += f"   ({_fmt_seconds(self.timing.get('total_seconds', 0.0))} on {self.provenance.get('device')})"
        return "\n".join([head, "", *lines, "", tail])

    def plot(self, path: str | Path) -> Path:
        """Accuracy (%) vs eps as a PNG (Agg, no display); written atomically."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        eps = [p.eps for p in self.points]
        acc = [100 * p.accuracy for p in self.points]
        env = [100 * p.accuracy_envelope for p in self.points]
        fig = Figure(figsize=(6.4, 4.4), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(eps, acc, marker="o", color="tab:blue", label=f"{self.attack} (measured)")
        if env != acc:
            ax.plot(eps, env, linestyle="--", color="tab:orange", label="monotone envelope (upper bound)")
        ax.plot([0.0], [100 * self.clean_accuracy], marker="*", markersize=13, linestyle="none",
                color="tab:green", label=f"clean accuracy {100 * self.clean_accuracy:.1f}%", zorder=3)
        rising = self.rising_points()
        if rising:
            ax.plot([eps[k] for k in rising], [acc[k] for k in rising], marker="o", markersize=14,
                    markerfacecolor="none", markeredgecolor="red", markeredgewidth=2, linestyle="none",
                    label="accuracy rises: attack failed", zorder=4)
        if eps_labels(eps)[-1].endswith("/255"):
            step = max(1, math.ceil(len(eps) / 12))
            ax.set_xticks(eps[::step], [p.eps_str for p in self.points][::step])
        ax.set_xlabel(f"eps ({self.norm})")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_xlim(left=min(0.0, eps[0]) - 0.02 * (eps[-1] or 1.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
        ax.set_title(f"{self.model} | {self.attack} | {self.dataset} (n={self.n_examples})", fontsize="medium")
        fig.tight_layout()
        return save_figure_atomic(fig, path)


# --------------------------------------------------------------------------- running


def save_figure_atomic(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG via a temp file + rename: a killed run never leaves half a plot
    (in a torchrun job only rank 0 writes)."""
    from robustkit.distributed import is_follower

    p = Path(path)
    if is_follower():
        return p
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a plot is for sharing
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def robustness_curve(
    model: nn.Module,
    attack_factory: Callable[[float], Attack],
    eps_list: Sequence[float | str] | str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    subject: Subject | None = None,
    records_dir: str | Path | None = None,
    **evaluate_kwargs: Any,
) -> Curve:
    """Accuracy of ``model`` on ``(x, y)`` at every eps of ``eps_list`` (a list or a grid spec).

    ``attack_factory(eps)`` builds the attack at one eps; ``subject`` and ``evaluate_kwargs`` go to
    :func:`robustkit.eval.evaluate` (attack_name, batch_size, device, seed, progress).
    With ``records_dir`` every point keeps its own per-example records file there, so a killed
    curve re-run with the same folder resumes: finished points and batches are not attacked again.
    """
    for key in ("records_path", "resume"):
        if key in evaluate_kwargs:
            raise TypeError(f"robustness_curve() does not take {key!r}")
    grid = parse_eps_spec(eps_list) if isinstance(eps_list, str) else validate_eps_list(eps_list)
    progress = bool(evaluate_kwargs.get("progress", True))
    started = time.time()
    n = int(x.shape[0])

    rec_dir = Path(records_dir) if records_dir is not None else None

    def records(name: str) -> dict[str, Any]:
        return {} if rec_dir is None else {"records_path": rec_dir / f"{name}.records.jsonl", "resume": True}

    subject = subject or Subject()
    base = evaluate(model, None, x, y, subject=subject, **evaluate_kwargs, **records("clean"))
    clean_flags = base.clean_flags
    correct = [i for i, c in enumerate(clean_flags) if c == "1"]
    idx = torch.tensor(correct, dtype=torch.long)
    results: list[EvalResult] = [base]

    raw: list[dict[str, Any]] = []
    attacks: list[Attack] = []
    for k, eps in enumerate(grid):
        if eps == 0:
            clean = base.stages[0]
            raw.append({"eps": eps, "flags": clean_flags, "seconds": clean.seconds,
                        "forward": clean.forward_passes, "backward": clean.backward_passes, "config": None})
            continue
        attack = attack_factory(eps)
        if not math.isclose(attack.eps, eps, rel_tol=1e-9, abs_tol=1e-12):
            raise ConfigError(f"the attack factory built eps {attack.eps!r} when asked for {eps!r}")
        if attacks and attack.norm != attacks[0].norm:
            raise ConfigError(f"the attack factory changed the norm from {attacks[0].norm} to {attack.norm}")
        attacks.append(attack)
        if progress:
            print(f"eps {eps_labels(grid)[k]} ({k + 1}/{len(grid)})", file=sys.stderr)
        flags = ["0"] * n
        seconds, fwd, bwd = 0.0, 0, 0
        if correct:
            res = evaluate(model, attack, x[idx], y[idx], subject=subject.on_subset(), **evaluate_kwargs,
                           **records(f"eps_{eps:.8g}"))
            results.append(res)
            for j, i in enumerate(correct):
                flags[i] = res.robust_flags[j] if res.robust_flags else "0"
            seconds, fwd, bwd = res.timing["total_seconds"], res.passes["forward"], res.passes["backward"]
        raw.append({"eps": eps, "flags": "".join(flags), "seconds": seconds, "forward": fwd,
                    "backward": bwd, "config": attack.config()})

    points, curve_warnings = analyse(clean_flags, raw)
    harness_warnings = list(dict.fromkeys(w for r in results for w in r.warnings))
    for msg in curve_warnings:
        warnings.warn(msg, CurveWarning, stacklevel=2)
    configs = [p.attack_config for p in points if p.attack_config is not None]
    shared = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs)}
    return Curve(
        model=base.model,
        attack=evaluate_kwargs.get("attack_name") or attacks[0].name,
        attack_config=shared,
        norm=attacks[0].norm,
        dataset=base.dataset,
        n_examples=n,
        seed=base.seed,
        batch_size=base.batch_size,
        points=points,
        clean_accuracy=base.clean_accuracy,
        clean_flags=clean_flags,
        warnings=[*harness_warnings, *curve_warnings],
        provenance=base.provenance,
        data=base.data,
        timing={"total_seconds": time.time() - started,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))},
    )


def analyse(clean_flags: str, raw: list[dict[str, Any]]) -> tuple[list[CurvePoint], list[str]]:
    """Envelope and monotonicity warnings from per-eps flags (``raw``: eps, flags, cost, config).

    Pure, so a planted non-monotone curve can be checked without running an attack.
    """
    n = len(clean_flags)
    alive = [c == "1" for c in clean_flags]  # robust at every eps so far (clean counts as eps 0)
    points: list[CurvePoint] = []
    msgs: list[str] = []
    labels = eps_labels([r["eps"] for r in raw])
    best_k: int | None = None  # the smallest accuracy so far, at the earliest eps it occurred
    for r, s in zip(raw, labels, strict=True):
        flags = r["flags"]
        if len(flags) != n:
            raise ValueError(f"eps {r['eps']}: {len(flags)} flags for {n} examples")
        # clean-wrong examples cannot be robust; only examples broken at an attacked eps count
        inconsistent = [i for i, f in enumerate(flags) if f == "1" and not alive[i]]
        alive = [a and f == "1" for a, f in zip(alive, flags, strict=True)]
        p = CurvePoint(eps=float(r["eps"]), eps_str=s, accuracy=flags.count("1") / n,
                       accuracy_envelope=sum(alive) / n, robust_flags=flags, seconds=float(r["seconds"]),
                       forward_passes=int(r["forward"]), backward_passes=int(r["backward"]),
                       n_inconsistent=len(inconsistent), attack_config=r["config"])
        examples = ", ".join(f"#{i}" for i in inconsistent[:5]) + (", ..." if len(inconsistent) > 5 else "")
        if best_k is not None and flags.count("1") > points[best_k].robust_flags.count("1"):
            low = points[best_k]
            msgs.append(
                f"accuracy rises from {100 * low.accuracy:.2f}% at eps {low.eps_str} to {100 * p.accuracy:.2f}% "
                f"at eps {s}: the attack failed at the larger eps (gradient masking or too few steps); "
                f"{len(inconsistent)} example(s) broken at a smaller eps are robust here ({examples}); robust "
                f"accuracy at eps {s} is at most {100 * p.accuracy_envelope:.2f}% (the monotone envelope)"
            )
        elif inconsistent:
            msgs.append(
                f"{len(inconsistent)} example(s) broken at a smaller eps are robust at eps {s} ({examples}): "
                f"the larger ball contains those adversarial examples, so the attack failed there (gradient "
                f"masking or too few steps); the envelope counts them as broken: "
                f"{100 * p.accuracy_envelope:.2f}% instead of {100 * p.accuracy:.2f}%"
            )
        points.append(p)
        if best_k is None or flags.count("1") < points[best_k].robust_flags.count("1"):
            best_k = len(points) - 1
    return points, msgs


def eps_labels(grid: Sequence[float]) -> list[str]:
    """k/255 labels when the whole grid is in /255 units, else decimals.

    ``format_eps`` alone would write 0.2 as 51/255 in a 0:0.3:0.05 grid; a grid of short decimals
    is labelled as decimals even when each happens to be some k/255.
    """
    fractions = all(e == 0 or format_eps(e).endswith("/255") for e in grid)
    if fractions and not all(len(f"{e:g}") <= 5 for e in grid):
        return [format_eps(e) if e else "0" for e in grid]
    return [f"{e:g}" for e in grid]

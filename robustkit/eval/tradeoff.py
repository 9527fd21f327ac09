"""The accuracy-robustness trade-off of a mixed classifier (Adaptive Smoothing, Bai et al. 2023).

The paper's claim: the adaptive mixture (alpha(x) from the mixing network) lies *above* the curve
traced by fixed-alpha mixtures in the (clean accuracy, robust accuracy) plane. To check it, every
point is evaluated on the same images with the same attack and seed through
:func:`robustkit.eval.evaluate`: g alone, h alone, ``model.fixed_alpha(a)`` for each requested a,
and the adaptive model. Each point keeps its own result JSON and per-example records, so a killed
run resumes point by point (and batch by batch inside a point).

The verdict interpolates the curve; ``paired`` adds a per-image test: the fixed mixture whose clean
accuracy matches the adaptive model's (the largest alpha at least as accurate, :func:`matched_alpha`)
is attacked too, and the two models' robust flags on the same images go through an exact McNemar
test (:func:`paired_test`), so "above the curve" can be told from noise.

Endpoints: the fixed-alpha curve always runs from g (alpha = 0) to h (alpha = 1). Those endpoints
are the g and h rows themselves: alpha = 0/1 of the mixed form has g's/h's argmax on every input,
hence the same clean flags; only the attack's CE loss sees a temperature (s_g, s_h), so robust
accuracy can differ slightly. Evaluating alpha = 0 and 1 again costs two full attack runs (h's is
the most expensive of all), so it is skipped unless ``check_endpoints`` asks for that consistency
check; then the mixed-form rows are the endpoints and their agreement with g/h is recorded.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit.attacks.base import Attack
from robustkit.core.errors import ConfigError, RobustkitError
from robustkit.core.threat import format_eps
from robustkit.distributed import current
from robustkit.eval.curve import save_figure_atomic
from robustkit.eval.harness import evaluate
from robustkit.eval.lock import acquire, release
from robustkit.eval.results import (
    EvalResult,
    _fmt_seconds,
    read_versioned_json,
    result_stem,
    text_table,
    write_json_atomic,
)
from robustkit.eval.subject import Subject

TRADEOFF_SCHEMA = "robustkit.tradeoff"
TRADEOFF_SCHEMA_VERSION = 1
MAX_ALPHAS = 50
_ON_CURVE_TOL = 1e-12


# --------------------------------------------------------------------------- inputs


def parse_alphas(spec: str | Sequence[float]) -> list[float]:
    """``"0,0.25,0.5,1"`` (or a list) as sorted distinct floats in [0, 1]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[float] = []
    for item in items:
        text = str(item).strip()
        if not text:
            raise ConfigError(f"alphas {spec!r}: empty value")
        try:
            a = float(text)
        except ValueError:
            raise ConfigError(f"alphas {spec!r}: {text!r} is not a number") from None
        if not (0.0 <= a <= 1.0):
            raise ConfigError(f"alphas {spec!r}: {text} is outside [0, 1]")
        if a in out:
            raise ConfigError(f"alphas {spec!r}: {text} appears twice")
        out.append(a)
    if not out:
        raise ConfigError("alphas: no values")
    if len(out) > MAX_ALPHAS:
        raise ConfigError(f"alphas: {len(out)} values; at most {MAX_ALPHAS}")
    return sorted(out)


def require_mixed(model: nn.Module, name: str) -> None:
    """A trade-off needs g, h and fixed_alpha (robustkit.models.adaptive_smoothing.MixedClassifier)."""
    missing = [a for a in ("g", "h", "fixed_alpha") if not hasattr(model, a)]
    if missing or not all(isinstance(getattr(model, a), nn.Module) for a in ("g", "h")):
        raise ConfigError(
            f"{name} is a {type(model).__name__}, not a MixedClassifier "
            f"(robustkit.models.adaptive_smoothing): a trade-off needs a mixture of two base models "
            f"g and h with fixed_alpha() (missing: {', '.join(missing) or 'g/h modules'})"
        )


# --------------------------------------------------------------------------- verdict


def verdict(curve: Sequence[tuple[float, float]], point: tuple[float, float],
            n_examples: int | None = None) -> dict[str, Any]:
    """Is ``point`` (clean, robust) above the piecewise-linear ``curve`` (points in alpha order)?

    The curve's robust accuracy at the point's clean accuracy is interpolated on every segment
    whose clean range holds it; when a non-monotone curve crosses that clean accuracy more than
    once the highest value counts (the adaptive model must beat the best fixed mixture there).
    Pure, so the arithmetic is testable on hand-made numbers.
    """
    clean, robust = float(point[0]), float(point[1])
    cleans = [float(c) for c, _ in curve]
    out: dict[str, Any] = {
        "clean_acc": clean, "robust_acc": robust,
        "curve_clean_range": [min(cleans), max(cleans)] if cleans else None,
        "curve_robust_acc": None, "gap_points": None,
        "one_example_points": (100.0 / n_examples) if n_examples else None,
    }
    candidates: list[float] = []
    for (c0, r0), (c1, r1) in zip(curve, list(curve)[1:], strict=False):
        lo, hi = min(c0, c1), max(c0, c1)
        if not (lo - _ON_CURVE_TOL <= clean <= hi + _ON_CURVE_TOL):
            continue
        if math.isclose(c0, c1, abs_tol=_ON_CURVE_TOL):  # a vertical segment: its top counts
            candidates.append(max(r0, r1))
        else:
            candidates.append(r0 + (r1 - r0) * (clean - c0) / (c1 - c0))
    if len(curve) == 1 and math.isclose(cleans[0], clean, abs_tol=_ON_CURVE_TOL):
        candidates.append(float(curve[0][1]))
    if not candidates:
        lo_hi = out["curve_clean_range"]
        rng = f"[{100 * lo_hi[0]:.2f}%, {100 * lo_hi[1]:.2f}%]" if lo_hi else "(empty)"
        out["status"] = "outside"
        out["text"] = (f"outside the curve's clean range: adaptive clean accuracy {100 * clean:.2f}% is not "
                       f"in {rng}, so the curve cannot be interpolated there")
        return out
    ref = max(candidates)
    gap = 100.0 * (robust - ref)
    status = "on" if abs(gap) <= 100.0 * _ON_CURVE_TOL else ("above" if gap > 0 else "below")
    out.update(curve_robust_acc=ref, gap_points=gap, status=status)
    text = (f"adaptive is {status} the fixed-alpha curve: robust {100 * robust:.2f}% vs {100 * ref:.2f}% "
            f"interpolated at clean {100 * clean:.2f}% (gap {gap:+.2f} points")
    if out["one_example_points"] is not None:
        text += f"; one example = {out['one_example_points']:.2f} points"
    out["text"] = text + ")"
    return out


# --------------------------------------------------------------------------- result


@dataclass
class TradeoffRow:
    """One evaluated point: ``kind`` g, h, fixed or adaptive; ``alpha`` None for adaptive."""

    kind: str
    alpha: float | None
    label: str
    clean_acc: float
    robust_acc: float
    result: str | None  # the point's result JSON (None when nothing is saved)
    seconds: float  # attack + clean time over all sessions (the result's total_seconds)
    reused: bool = False  # taken from a finished point's JSON in this session
    imported: bool = False  # an endpoint taken from an existing evaluation of that base (``endpoint_results``)


@dataclass
class Tradeoff:
    """A trade-off figure's data; ``to_dict`` is the on-disk JSON (schema ``robustkit.tradeoff``)."""

    model: str
    attack: str
    attack_config: dict[str, Any]
    norm: str
    eps: float
    dataset: str | None
    n_examples: int
    seed: int
    batch_size: int
    alphas: list[float]
    check_endpoints: bool
    rows: list[TradeoffRow]
    verdict: dict[str, Any]
    endpoint_checks: list[dict[str, Any]] = field(default_factory=list)
    # The paired test at the adaptive point's clean accuracy (``paired=True``), else None.
    paired: dict[str, Any] | None = None
    command: str | None = None
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"schema": TRADEOFF_SCHEMA, "schema_version": TRADEOFF_SCHEMA_VERSION, **d,
                "eps_str": format_eps(self.eps)}

    def save(self, path: str | Path) -> Path:
        """Atomic, like every robustkit JSON."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Tradeoff:
        d = read_versioned_json(path, TRADEOFF_SCHEMA, TRADEOFF_SCHEMA_VERSION, "tradeoff")
        d.pop("eps_str", None)
        d["rows"] = [TradeoffRow(**r) for r in d["rows"]]
        return cls(**d)

    def curve_rows(self) -> list[TradeoffRow]:
        """The fixed-alpha curve in alpha order, g and h as its endpoints unless re-evaluated."""
        fixed = {r.alpha: r for r in self.rows if r.kind == "fixed"}
        by_kind = {r.kind: r for r in self.rows}
        ends = [fixed.get(0.0, by_kind["g"]), fixed.get(1.0, by_kind["h"])]
        inner = [fixed[a] for a in sorted(fixed) if 0.0 < a < 1.0]
        return [ends[0], *inner, ends[1]]

    def summary(self) -> str:
        """A terminal table (kind | alpha | clean | robust | time) and the verdict."""
        rows = [("point", "alpha", "clean", "robust", "time", "")]
        for r in self.rows:
            rows.append((r.kind, "alpha(x)" if r.alpha is None else f"{r.alpha:g}",
                         f"{100 * r.clean_acc:.2f}%", f"{100 * r.robust_acc:.2f}%", _fmt_seconds(r.seconds),
                         "imported" if r.imported else "reused" if r.reused else ""))
        lines = text_table(rows, note_column=True)
        head = (f"model {self.model} | data {self.dataset} (n={self.n_examples}) | attack {self.attack} | "
                f"{self.norm} eps={format_eps(self.eps)} | seed {self.seed}")
        tail = [f"verdict: {self.verdict['text']}"]
        if self.paired is not None:
            tail.append(f"paired: {self.paired['text']}")
        tail += [f"endpoint check: {c['text']}" for c in self.endpoint_checks]
        tail.append(f"({_fmt_seconds(self.timing.get('total_seconds', 0.0))} on {self.provenance.get('device')})")
        return "\n".join([head, "", *lines, "", *tail])

    def plot(self, path: str | Path) -> Path:
        """Clean (x) vs robust (y) accuracy as a PNG (Agg, no display); written atomically."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.8), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        curve = self.curve_rows()
        ax.plot([100 * r.clean_acc for r in curve], [100 * r.robust_acc for r in curve], marker="o",
                color="tab:blue", label="fixed alpha (g -> h)", zorder=2)
        labels: dict[tuple[float, float], list[str]] = {}  # coinciding points share one label
        for r in curve:
            labels.setdefault((100 * r.clean_acc, 100 * r.robust_acc), []).append(f"{r.alpha:g}")
        for xy, names in labels.items():
            ax.annotate("a=" + ", ".join(names), xy, textcoords="offset points", xytext=(5, 4),
                        fontsize="x-small", color="tab:blue")
        by_kind = {r.kind: r for r in self.rows}
        for kind, marker, color, text in (("g", "s", "tab:green", "g (standard)"), ("h", "^", "tab:purple",
                                                                                    "h (robust)")):
            r = by_kind[kind]
            ax.plot([100 * r.clean_acc], [100 * r.robust_acc], marker=marker, markersize=10, linestyle="none",
                    color=color, label=f"{text}: {100 * r.clean_acc:.1f}% / {100 * r.robust_acc:.1f}%", zorder=3)
        if self.paired is not None:
            m = next(r for r in curve if r.alpha == self.paired["alpha"])
            ax.plot([100 * m.clean_acc], [100 * m.robust_acc], marker="o", markersize=13, linestyle="none",
                    markerfacecolor="none", color="tab:orange", zorder=3,
                    label=f"matched fixed alpha {m.alpha:g} (paired p = {self.paired['p_value']:.2g})")
        a = by_kind["adaptive"]
        gap = self.verdict.get("gap_points")
        ax.plot([100 * a.clean_acc], [100 * a.robust_acc], marker="*", markersize=16, linestyle="none",
                color="tab:red", zorder=4,
                label=f"adaptive: {self.verdict['status']}" + (f" ({gap:+.2f} pts)" if gap is not None else ""))
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"robust accuracy (%), {self.attack} {self.norm} eps={format_eps(self.eps)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
        ax.set_title(f"{self.model} | {self.attack} | {self.dataset} (n={self.n_examples})", fontsize="medium")
        fig.tight_layout()
        return save_figure_atomic(fig, path)


# --------------------------------------------------------------------------- running


def accuracy_tradeoff(
    model: nn.Module,
    attack_factory: Callable[[], Attack],
    alphas: Sequence[float] | str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    subject: Subject | None = None,
    points_dir: str | Path | None = None,
    check_endpoints: bool = False,
    paired: bool = False,
    command: str | None = None,
    endpoint_results: dict[str, tuple[str | Path, str | None]] | None = None,
    **evaluate_kwargs: Any,
) -> Tradeoff:
    """Evaluate g, h, each ``model.fixed_alpha(a)`` and ``model`` itself on the same ``(x, y)``.

    ``attack_factory()`` builds a fresh attack per point (same config, same seed: the attacks'
    randomness depends only on seed, stage and batch). ``subject`` (each point is recorded under
    ``<model>:<label>``) and ``evaluate_kwargs`` go to :func:`robustkit.eval.evaluate` (attack_name,
    batch_size, device, seed, progress). With ``points_dir`` each point writes ``<label>.json`` and
    ``<label>.records.jsonl`` there; a re-run reuses a finished point's JSON when it records the
    same evaluation (model, attack config, data, seed, batch size) and resumes an unfinished one
    from its records.

    ``endpoint_results``: ``{"g" or "h": (result JSON, that base's checkpoint sha256)}``, an existing
    evaluation of the base model alone (``robustkit eval``, possibly merged from shards) that stands
    for the endpoint instead of attacking it again: h's is the most expensive point, and a study that
    already measured h (the LTD comparison) should not pay for it twice. It must be of that checkpoint,
    on these images, with this attack, its config and seed (:func:`_imported`); another batch size is
    allowed and said in the warnings (the reference re-seeds per batch: valid flags, not batch-exact).
    """
    for key in ("records_path", "resume"):
        if key in evaluate_kwargs:
            raise TypeError(f"accuracy_tradeoff() does not take {key!r}")
    subject = subject or Subject()
    base_name = subject.name_for(model)
    require_mixed(model, base_name)
    grid = parse_alphas(alphas) if isinstance(alphas, str) else parse_alphas(list(alphas))
    progress = bool(evaluate_kwargs.get("progress", True))
    started = time.time()
    pdir = Path(points_dir) if points_dir is not None else None
    fingerprint = subject.fingerprint(x, y)

    plan: list[tuple[str, float | None, str, Callable[[], nn.Module]]] = [
        ("g", 0.0, "g", lambda: model.g),
        ("h", 1.0, "h", lambda: model.h),
    ]
    matched = None
    if paired:  # one more fixed mixture: the most robust one at least as accurate as the adaptive model
        matched = matched_alpha(model, x, y, batch_size=int(evaluate_kwargs.get("batch_size", 256)),
                                device=evaluate_kwargs.get("device", "cpu"))
        grid = sorted({*grid, matched["alpha"]})
        if progress:
            print(f"paired: fixed alpha {matched['alpha']:g} is the largest at least as accurate as the adaptive "
                  f"model on these images ({matched['clean_correct']} vs {matched['adaptive_clean_correct']} "
                  "correct)", file=sys.stderr)
    for a in grid:
        if a in (0.0, 1.0) and not check_endpoints:
            continue  # g and h are these endpoints (module docstring)
        plan.append(("fixed", a, f"alpha_{a:.6g}", lambda a=a: model.fixed_alpha(a)))
    plan.append(("adaptive", None, "adaptive", lambda: model))

    rows: list[TradeoffRow] = []
    results: dict[str, EvalResult] = {}
    attack: Attack | None = None
    busy: list[str] = []  # points another process is evaluating right now (their records are locked)
    imports = dict(endpoint_results or {})
    unknown = sorted(set(imports) - {"g", "h"})
    if unknown:
        raise ConfigError(f"an imported endpoint is g or h, got {unknown[0]!r}")
    notes: list[str] = []
    for k, (kind, alpha, label, build) in enumerate(plan):
        attack = attack_factory()
        name = f"{base_name}:{label}" if kind != "adaptive" else base_name
        if kind in imports:
            path, sha = imports[kind]
            res = _imported(kind, Path(path), sha, attack, evaluate_kwargs.get("attack_name") or attack.name,
                            fingerprint, int(x.shape[0]), evaluate_kwargs)
            if res.batch_size != int(evaluate_kwargs.get("batch_size", 256)):
                notes.append(f"{kind}: imported from {path}, evaluated at batch size {res.batch_size} (the "
                             "reference engine re-seeds per batch: valid flags, not the batch-exact ones of this run)")
            results[label] = res
            rows.append(TradeoffRow(kind=kind, alpha=alpha, label=label, clean_acc=res.clean_accuracy,
                                    robust_acc=float(res.robust_accuracy or 0.0), result=str(path),
                                    seconds=float(res.timing.get("total_seconds", 0.0)), reused=True, imported=True))
            continue
        if progress:
            print(f"{label} ({k + 1}/{len(plan)})", file=sys.stderr)
        json_path = pdir / f"{label}.json" if pdir is not None else None
        finished = partial(_finished, json_path, subject.renamed(name), attack, fingerprint, int(x.shape[0]),
                           evaluate_kwargs)
        res = finished()
        reused = res is not None
        if res is None:
            records = {} if pdir is None else {"records_path": pdir / f"{label}.records.jsonl", "resume": True}
            # The same command started twice shares the points: a point whose records another process
            # holds is left to it (that is how a 2-core machine runs two points at once).
            key = None
            # A multi-process job's ranks evaluate every point together (evaluate() joins the same job),
            # each with its own records file: they must not take turns.
            if pdir is not None and current() is None:
                try:
                    key = acquire(records["records_path"])
                except ConfigError:
                    busy.append(label)
                    if progress:
                        print(f"{label}: being evaluated by another process; skipped here", file=sys.stderr)
                    continue
            try:
                res = finished()  # the other process may have finished it while this one worked
                reused = res is not None
                if res is None:
                    res = evaluate(build(), attack, x, y, subject=subject.renamed(name), **evaluate_kwargs,
                                   **records)
                    if json_path is not None:
                        res.save(json_path)
            finally:
                if key is not None:
                    release(key)
        results[label] = res
        rows.append(TradeoffRow(kind=kind, alpha=alpha, label=label, clean_acc=res.clean_accuracy,
                                robust_acc=float(res.robust_accuracy or 0.0),
                                result=str(json_path) if json_path is not None else None,
                                seconds=float(res.timing.get("total_seconds", 0.0)), reused=reused))

    assert attack is not None
    for label in list(busy):  # finished by the other process meanwhile?
        kind, alpha, _, _ = next(p for p in plan if p[2] == label)
        name = f"{base_name}:{label}" if kind != "adaptive" else base_name
        res = _finished(pdir / f"{label}.json" if pdir is not None else None, subject.renamed(name), attack,
                        fingerprint, int(x.shape[0]), evaluate_kwargs)
        if res is not None:
            busy.remove(label)
            results[label] = res
            rows.append(TradeoffRow(kind=kind, alpha=alpha, label=label, clean_acc=res.clean_accuracy,
                                    robust_acc=float(res.robust_accuracy or 0.0), result=str(pdir / f"{label}.json"),
                                    seconds=float(res.timing.get("total_seconds", 0.0)), reused=True))
    if busy:
        raise PointsInProgress(busy)
    order = [p[2] for p in plan]
    rows.sort(key=lambda r: order.index(r.label))
    base = results["adaptive"]
    out = Tradeoff(
        model=base_name, attack=evaluate_kwargs.get("attack_name") or attack.name,
        attack_config=attack.config(), norm=attack.norm, eps=attack.eps, dataset=base.dataset,
        n_examples=base.n_examples, seed=base.seed, batch_size=base.batch_size, alphas=grid,
        check_endpoints=check_endpoints, rows=rows, verdict={}, command=command,
        warnings=list(dict.fromkeys([*notes, *(f"{lbl}: {w}" for lbl, r in results.items() for w in r.warnings)])),
        provenance=base.provenance, data=base.data,
        timing={"total_seconds": sum(r.seconds for r in rows), "this_session_seconds": time.time() - started,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))},
    )
    adaptive = rows[-1]
    out.verdict = verdict([(r.clean_acc, r.robust_acc) for r in out.curve_rows()],
                          (adaptive.clean_acc, adaptive.robust_acc), base.n_examples)
    out.endpoint_checks = _endpoint_checks(results) if check_endpoints else []
    if matched is not None:
        a = matched["alpha"]
        label = "g" if a == 0.0 and not check_endpoints else "h" if a == 1.0 and not check_endpoints else f"alpha_{a:.6g}"
        out.paired = paired_test(results[label], base, a) | {"search": matched}
    return out


def matched_alpha(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
                  device: str | torch.device = "cpu", steps: int = 30) -> dict[str, Any]:
    """The largest fixed alpha whose mixture classifies at least as many of ``(x, y)`` correctly as
    the adaptive model: the fixed mixture to pair the adaptive point with.

    Why this one: the claim is "more robust at the same clean accuracy". Among the fixed mixtures no
    less accurate than the adaptive model, the largest alpha is the most robust (robustness grows
    with alpha along the curve), so it is the hardest fair opponent. Found by bisection on clean
    counts (cheap: no attack), assuming the count falls as alpha grows, and rounded down to 1e-4 so
    the point's name is short; the rounded alpha is re-checked.
    """
    def correct(m: nn.Module) -> int:
        m.eval()
        with torch.no_grad():
            return sum(int((m(xb.to(device)).argmax(1).cpu() == yb).sum())
                       for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True))

    target = correct(model)
    out: dict[str, Any] = {"adaptive_clean_correct": target, "n": int(y.shape[0]), "steps": steps}
    at_h = correct(model.fixed_alpha(1.0))
    if at_h >= target:
        return out | {"alpha": 1.0, "clean_correct": at_h}
    at_g = correct(model.fixed_alpha(0.0))
    if at_g < target:  # more accurate than g: nothing to pair at its accuracy
        return out | {"alpha": 0.0, "clean_correct": at_g}
    lo, hi = 0.0, 1.0  # correct(lo) >= target > correct(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if correct(model.fixed_alpha(mid)) >= target:
            lo = mid
        else:
            hi = mid
    a = math.floor(lo * 1e4) / 1e4
    n_a = correct(model.fixed_alpha(a))
    if n_a < target:  # a non-monotone count between the rounded and the exact alpha
        a, n_a = lo, correct(model.fixed_alpha(lo))
    return out | {"alpha": a, "clean_correct": n_a}


def paired_test(fixed: EvalResult, adaptive: EvalResult, alpha: float) -> dict[str, Any]:
    """Exact McNemar tests of the adaptive model against one fixed mixture on the same images:
    robust flags (the claim) and clean flags (how well the accuracies were matched)."""
    from robustkit.eval.paired import as_bools, mcnemar_exact

    robust = mcnemar_exact(as_bools(fixed.robust_flags or ""), as_bools(adaptive.robust_flags or ""))
    clean = mcnemar_exact(as_bools(fixed.clean_flags), as_bools(adaptive.clean_flags))
    better = robust["only_b"] - robust["only_a"]
    word = "more" if better > 0 else "fewer" if better < 0 else "as many"
    text = (f"against fixed alpha {alpha:g} ({100 * fixed.clean_accuracy:.2f}% clean, "
            f"{100 * float(fixed.robust_accuracy or 0):.2f}% robust), the adaptive model "
            f"({100 * adaptive.clean_accuracy:.2f}% / {100 * float(adaptive.robust_accuracy or 0):.2f}%) is robust on "
            f"{robust['only_b']} images the fixed mixture is not and the reverse on {robust['only_a']}: {word} robust "
            f"examples, exact McNemar p = {robust['p_value']:.3g}")
    return {"alpha": alpha, "fixed_clean_acc": fixed.clean_accuracy,
            "fixed_robust_acc": float(fixed.robust_accuracy or 0.0), "adaptive_clean_acc": adaptive.clean_accuracy,
            "adaptive_robust_acc": float(adaptive.robust_accuracy or 0.0),
            "only_adaptive": robust["only_b"], "only_fixed": robust["only_a"], "p_value": robust["p_value"],
            "clean": {"only_adaptive": clean["only_b"], "only_fixed": clean["only_a"], "p_value": clean["p_value"]},
            "text": text}


class PointsInProgress(RobustkitError):
    """Some points are being evaluated by another process: this one did its share, and the same
    command run again once that process ends writes the figure (exit 3: not an error, not done)."""

    exit_code = 3

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        super().__init__(f"{len(self.labels)} point(s) ({', '.join(self.labels)}) are being evaluated by another "
                         "process; this one finished the rest. Run the same command again when it ends: it "
                         "reuses every finished point and writes the figure")


def _finished(path: Path | None, subject: Subject, attack: Attack, fingerprint: str, n: int,
              kwargs: dict[str, Any]) -> EvalResult | None:
    """A point's saved result when it records exactly this evaluation, else None (evaluate again)."""
    if path is None or not path.exists():
        return None
    try:
        res = EvalResult.load(path)
    except ConfigError:
        return None
    same = (
        res.model == subject.model
        and res.attack_config == json.loads(json.dumps(attack.config()))
        and res.n_examples == n
        and res.seed == int(kwargs.get("seed", 0))
        and res.batch_size == int(kwargs.get("batch_size", 256))
        and res.data.get("fingerprint") == fingerprint
        and res.provenance.get("checkpoint_sha256") == subject.checkpoint_sha256
        and res.robust_accuracy is not None
    )
    return res if same else None


def _imported(label: str, path: Path, sha256: str | None, attack: Attack, attack_name: str, fingerprint: str,
              n: int, kwargs: dict[str, Any]) -> EvalResult:
    """The existing evaluation of base ``label`` at ``path``, refused unless it is of that checkpoint, on
    these images, with this attack, config and seed (a one-line error says what differs)."""
    if not path.exists():
        raise ConfigError(f"--endpoint-result {label}={path}: no such file")
    res = EvalResult.load(path)
    differs = [what for what, bad in (
        ("checkpoint", sha256 is not None and res.provenance.get("checkpoint_sha256") != sha256),
        ("attack", res.attack != attack_name),
        ("attack config", res.attack_config != json.loads(json.dumps(attack.config()))),
        ("number of images", res.n_examples != n),
        ("images", res.data.get("fingerprint") != fingerprint),
        ("seed", res.seed != int(kwargs.get("seed", 0))),
        ("shard (merge the parts first)", res.shard is not None),
        ("robust accuracy (none recorded)", res.robust_accuracy is None),
    ) if bad]
    if differs:
        raise ConfigError(f"--endpoint-result {label}={path} is not an evaluation of this composite's {label} on "
                          f"these images with this attack (differs in: {', '.join(differs)})")
    return res


def _endpoint_checks(results: dict[str, EvalResult]) -> list[dict[str, Any]]:
    """alpha = 0/1 of the mixed form against g/h: clean flags must agree exactly."""
    checks = []
    for label, ref in (("alpha_0", "g"), ("alpha_1", "h")):
        if label not in results:
            continue
        mixed, base = results[label], results[ref]
        clean_equal = mixed.clean_flags == base.clean_flags
        diff = 100.0 * (float(mixed.robust_accuracy or 0.0) - float(base.robust_accuracy or 0.0))
        text = (f"alpha={label[-1]} vs {ref}: clean flags {'identical' if clean_equal else 'DIFFER'}, robust "
                f"accuracy differs by {diff:+.2f} points (the attack's CE loss sees the temperature)")
        checks.append({"alpha": float(label[-1]), "reference": ref, "clean_flags_equal": clean_equal,
                       "robust_diff_points": diff, "text": text})
    return checks


def tradeoff_stem(model: str, attack: str, dataset: str, n: int, seed: int) -> str:
    """``tradeoff__<model>__<attack>__<dataset>-n<N>-s<seed>``: the result-file name, kind in front."""
    return "tradeoff__" + result_stem(model, attack, dataset, n, seed)

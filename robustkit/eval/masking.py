"""Gradient-masking checks: is a robust accuracy measured by gradient attacks believable?

A defence that hides or breaks its input gradients (shattered or zero gradients, softmax
saturation, randomness) makes gradient attacks fail without making the model robust
(Athalye et al., 2018; Carlini et al., 2019). Three symptoms are cheap to test and go with every
robust model (robustkit issue 5):

- **zero gradients**: correctly classified examples whose input gradient is zero, negligible or
  non-finite. Exactly zero in float32 happens either because the model ignores small input
  changes (quantisation, ``detach``: no gradient attack can move it) or because the softmax
  saturates (the cross-entropy gradient underflows while the logit margin still has a gradient:
  defensive distillation's failure mode). Both are reported, separately, since the fix differs;
- **eps sweep**: robust accuracy under APGD-CE on the same examples at a grid of budgets. It can
  only fall as eps grows (a bigger ball contains every smaller one), and with a budget of 4x eps it
  should be near 0: an attack that cannot get there is being misled, not stopped;
- **APGD vs Square**: Square is a black-box attack that never reads a gradient, so a point Square
  breaks after the gradient attacks failed on it means the gradients were misleading (AutoAttack's
  own flag). Read from a standard AutoAttack result, run here, or checked directly and cheaply:
  APGD-CE and Square each run on the same examples, and APGD-T (AutoAttack's targeted stage) on
  the few points only Square broke, so that what is flagged is what AutoAttack would flag.

The report is a versioned JSON (schema ``robustkit.masking``) with an overall verdict;
:func:`render_markdown` turns it into a model-card section. Passing every check does not prove the
absence of masking (an adaptive attack is the real test); failing one is a reason to distrust a
gradient-attack number.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.attacks import create_attack
from robustkit.attacks.autoattack import AutoAttack
from robustkit.attacks.pgd import per_example_loss
from robustkit.core.errors import ConfigError
from robustkit.core.provenance import provenance, resolve_device
from robustkit.core.threat import ThreatModel, format_eps, parse_norm
from robustkit.eval.curve import analyse, eps_labels, parse_eps_spec, robustness_curve, validate_eps_list
from robustkit.eval.harness import _evaluation_mode, _model_checks, _validate_inputs, evaluate
from robustkit.eval.results import (
    EvalResult,
    _fmt_seconds,
    read_versioned_json,
    subject_fields,
    write_json_atomic,
)
from robustkit.eval.subject import Subject

MASKING_SCHEMA = "robustkit.masking"
MARKDOWN_HEAD = "## Gradient-masking checks"  # the Markdown section's first line (how a re-run knows its file)
MASKING_SCHEMA_VERSION = 1
CLEAN_VERDICT = "no sign of gradient masking"

DEFAULT_MULTIPLIERS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # the sweep, in units of eps
ZERO_GRAD_THRESHOLD = 0.01  # flag when more than 1% of the correct examples have unusable gradients
GRAD_TOL = 1e-12  # L2: a gradient this small gets no step (APGD and PGD normalise by norm + 1e-12)
LARGE_EPS_MAX_ACCURACY = 0.05  # accuracy allowed at the sweep's largest eps
SQUARE_QUERIES = 5000  # AutoAttack's standard Square budget
GRADIENT_STAGES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t")
SHOW = 5  # example indices quoted in a message


# --------------------------------------------------------------------------- the report


def masking_report(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: str | float,
    norm: str = "Linf",
    device: str | torch.device | None = "auto",
    eps_grid: Sequence[float | str] | str | None = None,
    unbounded: bool = False,
    sweep_attack: str = "apgd-ce",
    sweep_params: dict[str, Any] | None = None,
    autoattack_result: EvalResult | str | Path | None = None,
    run_autoattack: bool = False,
    square_queries: int = SQUARE_QUERIES,
    confirm_attack: str | None = "apgd-t",
    confirm_params: dict[str, Any] | None = None,
    zero_grad_threshold: float = ZERO_GRAD_THRESHOLD,
    grad_tol: float = GRAD_TOL,
    large_eps_max_accuracy: float = LARGE_EPS_MAX_ACCURACY,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    subject: Subject | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Run the gradient-masking checks on ``(x, y)`` and return the report (a JSON-able dict).

    Args:
        eps, norm: the threat model the robust accuracy is claimed for.
        eps_grid: the sweep's budgets (a list or a :func:`parse_eps_spec` string); default
            ``eps x (0, 1/4, 1/2, 1, 2, 4)``, capped at 1 for Linf. ``eps`` is always included.
        unbounded: Linf only: add eps = 1 (any image is reachable, so accuracy must reach 0).
        sweep_attack, sweep_params: the gradient attack of the sweep (a registered name) and
            parameter overrides, e.g. ``{"overrides": {"apgd.n_iter": 20}}``.
        autoattack_result: a standard AutoAttack result (object or JSON path) of this model at
            this eps, read for the APGD vs Square gap; with ``run_autoattack`` one is run here;
            with neither, APGD (the sweep's run at eps) is compared with Square run on its own
            with ``square_queries`` queries (0 skips the gap check); the points only Square broke
            are then attacked with ``confirm_attack`` (None: not; ``confirm_params`` override its
            parameters), and flagged if it fails too.
        zero_grad_threshold: largest tolerated fraction of correct examples without a gradient.
        grad_tol: L2 only: an input gradient of L2 norm <= it counts as no gradient.
        large_eps_max_accuracy: largest tolerated accuracy at the sweep's largest eps.
        batch_size, seed, progress, subject, compile: as for :func:`robustkit.eval.evaluate` (every
            attack run goes through it; the report records the subject like a result).
    """
    started = time.time()
    inputs = _validate_inputs(model, x, y, batch_size, subject, resolve_device(device))
    x, y = inputs.x, inputs.y  # unambiguous conversions (float64 images, int32 labels) done once, here
    threat = ThreatModel.create(parse_norm(norm), eps)
    _check_settings(threat, square_queries, zero_grad_threshold, large_eps_max_accuracy,
                    autoattack_given=autoattack_result is not None, run_autoattack=run_autoattack)
    create_attack(sweep_attack, norm=threat.norm, eps=threat.eps, **(sweep_params or {}))  # fail before any run
    if confirm_attack is not None:
        create_attack(confirm_attack, norm=threat.norm, eps=threat.eps, **(confirm_params or {}))
    subject = subject or Subject()
    aa_given = _load_aa_result(autoattack_result, threat, subject.checkpoint_sha256)
    given_gap = square_gap_from_result(aa_given) if aa_given is not None else None  # bad results fail now
    grid = sweep_grid(threat, eps_grid, unbounded=unbounded)
    dev = resolve_device(device)
    run_kwargs: dict[str, Any] = dict(batch_size=batch_size, device=dev, seed=seed, progress=progress,
                                      subject=subject, compile=compile)
    said: set[str] = set()  # warnings of the evaluations, which the checks below restate
    with warnings.catch_warnings(record=True) as caught:  # everything said goes into the report
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        with _evaluation_mode(model, dev):
            model_part = _model_part(_model_checks(model, x[:batch_size].to(dev)))
        model_part["seconds"] = time.perf_counter() - t0
        zero = zero_gradient_check(model, x, y, norm=threat.norm, device=dev, batch_size=batch_size,
                                   threshold=zero_grad_threshold, grad_tol=grad_tol)
        sweep = _sweep(model, x, y, threat, grid, sweep_attack, sweep_params or {}, large_eps_max_accuracy,
                       run_kwargs, said)
        if given_gap is not None:
            gap = given_gap
        elif square_queries == 0 and not run_autoattack:
            gap = {"status": "skipped", "source": None, "flags": [],
                   "reason": "square queries 0: the APGD vs Square check was not run"}
        else:
            gap = _run_square_gap(model, x, y, threat, sweep, run_autoattack, square_queries, confirm_attack,
                                  confirm_params or {}, model_part["num_classes"], run_kwargs, said)
    notes = _notes([str(w.message) for w in caught], said, gap, sweep, int(x.shape[0]))

    who = subject_fields(subject, model, sweep.pop("data_fingerprint"), provenance(dev))
    checks = {"model": model_part, "zero_gradient": zero, "eps_sweep": sweep, "square_gap": gap}
    flags = [{"check": k, "message": m} for k, c in checks.items() for m in c["flags"]]
    return {
        "schema": MASKING_SCHEMA,
        "schema_version": MASKING_SCHEMA_VERSION,
        "verdict": CLEAN_VERDICT if not flags else f"possible gradient masking: {len(flags)} flag(s)",
        "flagged": bool(flags),
        "flags": flags,
        "notes": notes,
        "model": who["model"],
        "dataset": who["dataset"],
        "norm": threat.norm,
        "eps": threat.eps,
        "eps_str": format_eps(threat.eps),
        "n_examples": int(x.shape[0]),
        "clean_accuracy": sweep["clean_accuracy"],
        "seed": int(seed),
        "batch_size": int(batch_size),
        "checks": checks,
        "data": who["data"],
        "provenance": who["provenance"],
        "timing": {"total_seconds": time.time() - started,
                   "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))},
    }


def _run_square_gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                    sweep: dict[str, Any], run_autoattack: bool, square_queries: int, confirm_attack: str | None,
                    confirm_params: dict[str, Any], num_classes: int, run_kwargs: dict[str, Any],
                    said: set[str]) -> dict[str, Any]:
    """The APGD vs Square gap from a standard AutoAttack run here, else from Square run on its own."""
    if not run_autoattack:
        return _direct_square_gap(model, x, y, threat, sweep, square_queries, confirm_attack, confirm_params,
                                  num_classes, run_kwargs, said)
    t0 = time.perf_counter()
    aa = evaluate(model, create_attack("autoattack", norm=threat.norm, eps=threat.eps), x, y,
                  attack_name="autoattack", **run_kwargs)
    said.update(aa.warnings)
    gap = square_gap_from_result(aa, source="autoattack-run")
    gap["seconds"] = time.perf_counter() - t0
    return gap


def _check_settings(threat: ThreatModel, square_queries: int, zero_grad_threshold: float,
                    large_eps_max_accuracy: float, *, autoattack_given: bool, run_autoattack: bool) -> None:
    """Refuse settings the checks cannot use, before any attack runs."""
    if threat.eps <= 0:
        raise ConfigError("the masking checks need eps > 0")
    if isinstance(square_queries, bool) or not isinstance(square_queries, int) or square_queries < 0:
        raise ConfigError(f"square queries must be an integer >= 0, got {square_queries!r}")
    for label, value in (("zero-gradient threshold", zero_grad_threshold),
                         ("large-eps accuracy threshold", large_eps_max_accuracy)):
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"{label} must be in [0, 1), got {value!r}")
    if autoattack_given and run_autoattack:
        raise ConfigError("give an AutoAttack result or ask to run AutoAttack, not both")


def _notes(caught: list[str], said: set[str], gap: dict[str, Any], sweep: dict[str, Any], n: int) -> list[str]:
    """What the report says besides its flags: warnings nobody restated, and caveats of the checks."""
    notes: list[str] = []
    for msg in caught:  # pyautoattack's or torch's; the harness's own are part of the checks
        if msg not in said and msg not in notes:
            notes.append(msg)
    notes += gap.pop("notes", [])
    if gap.get("data_fingerprint") not in (None, sweep["data_fingerprint"]):
        notes.append(f"the AutoAttack result is on other examples (n={gap['n_examples']}) than the other checks "
                     f"(n={n}): its Square gap is about those")
    if sweep["n_inconsistent"] and sweep["monotone"]:
        notes.append(f"{sweep['n_inconsistent']} example(s) in the sweep were broken at a smaller eps but not at "
                     "a larger one (the accuracy never rose, so not flagged); the envelope counts them as broken")
    return notes


def save_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write atomically, like every robustkit result."""
    return write_json_atomic(path, report)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report written by :func:`save_report` (schema-checked); the schema keys are kept."""
    body = read_versioned_json(path, MASKING_SCHEMA, MASKING_SCHEMA_VERSION, "masking report")
    return {"schema": MASKING_SCHEMA, "schema_version": MASKING_SCHEMA_VERSION, **body}


def sweep_grid(threat: ThreatModel, eps_grid: Sequence[float | str] | str | None = None, *,
               unbounded: bool = False) -> list[float]:
    """The sweep's eps values: the given grid or eps x :data:`DEFAULT_MULTIPLIERS`, plus eps itself.

    Linf budgets are capped at 1 (the whole image box); ``unbounded`` adds that point.
    """
    if eps_grid is None:
        values = [m * threat.eps for m in DEFAULT_MULTIPLIERS]
    elif isinstance(eps_grid, str):
        values = parse_eps_spec(eps_grid)
    else:
        values = validate_eps_list(eps_grid)
    values = [*values, threat.eps]
    if threat.norm == "Linf":
        values = [min(v, 1.0) for v in values] + ([1.0] if unbounded else [])
    elif unbounded:
        raise ConfigError("an unbounded point needs the Linf norm (eps = 1 covers the image box)")
    return validate_eps_list(sorted(set(values)))


# --------------------------------------------------------------------------- model checks


def _model_part(checks: dict[str, Any]) -> dict[str, Any]:
    """The harness's first-batch checks: randomness and probability outputs also defeat gradients."""
    flags = []
    if not checks["deterministic"]:
        flags.append("the model is randomized (two identical forward passes differ): its gradients are noisy, "
                     "so attack it with expectation over transformation (--attack autoattack-rand)")
    if checks["outputs_are_probabilities"]:
        flags.append("the model returns probabilities, not logits: the softmax saturates and weakens "
                     "cross-entropy gradients; return logits")
    return {"status": "flag" if flags else "ok", "deterministic": checks["deterministic"],
            "outputs_are_probabilities": checks["outputs_are_probabilities"],
            "num_classes": checks["num_classes"], "flags": flags}


# --------------------------------------------------------------------------- zero gradients


def zero_gradient_check(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "Linf",
    device: str | torch.device | None = "auto",
    batch_size: int = 256,
    threshold: float = ZERO_GRAD_THRESHOLD,
    grad_tol: float = GRAD_TOL,
) -> dict[str, Any]:
    """Input gradients of the CE and the margin loss at every correctly classified example.

    A gradient is *unusable* when it is non-finite or exactly zero: a sign step (Linf) or a
    normalised step (L2) then goes nowhere. For L2 a gradient whose norm is <= ``grad_tol`` is
    unusable too, since APGD and PGD divide by ``norm + 1e-12`` and the step all but vanishes;
    a Linf sign step is whole for any non-zero gradient, so there tiny ones are only counted.
    Unusable for both losses: the logits do not respond to the input (no gradient attack can move
    the example). For CE only: the softmax saturated in float32, so CE-based attacks (PGD,
    APGD-CE) stall where a margin/DLR loss would not. Each is flagged when it concerns more than
    ``threshold`` of the correct examples.
    """
    started = time.perf_counter()
    norm = parse_norm(norm)
    dev = resolve_device(device)
    n = int(x.shape[0])
    norms: dict[str, list[torch.Tensor]] = {"ce": [], "margin": []}
    finite: dict[str, list[torch.Tensor]] = {"ce": [], "margin": []}
    correct = []
    with _evaluation_mode(model, dev), torch.enable_grad():
        for lo in range(0, n, batch_size):
            xb = x[lo:lo + batch_size].to(dev).detach().requires_grad_(True)
            yb = y[lo:lo + batch_size].to(dev)
            logits = model(xb).float()
            correct.append((logits.detach().argmax(1) == yb).cpu())
            losses = {"ce": F.cross_entropy(logits, yb, reduction="none"),
                      "margin": per_example_loss(logits, yb, "margin")}
            for key, loss in losses.items():
                g = _input_grad(loss, xb, retain=key == "ce").flatten(1).double()
                finite[key].append(torch.isfinite(g).all(1).cpu())
                norms[key].append(torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).norm(dim=1).cpu())
    ok = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    idx = ok.nonzero().flatten().tolist()
    per_loss, usable = {}, {}
    for key in ("ce", "margin"):
        size, fin = torch.cat(norms[key])[ok], torch.cat(finite[key])[ok]
        zero = fin & (size == 0)
        tiny = fin & (size > 0) & (size <= grad_tol)
        usable[key] = fin & (size > (grad_tol if norm == "L2" else 0.0))
        per_loss[key] = {"zero": int(zero.sum()), "tiny": int(tiny.sum()), "nonfinite": int((~fin).sum()),
                         "median_l2": statistics.median(size[fin].tolist()) if bool(fin.any()) else None}
    dead = ~usable["ce"] & ~usable["margin"]
    saturated = ~usable["ce"] & usable["margin"]
    n_correct = len(idx)

    def frac(mask: torch.Tensor) -> float:
        return int(mask.sum()) / n_correct if n_correct else 0.0

    out: dict[str, Any] = {
        "status": "ok", "norm": norm, "n_examples": n, "n_correct": n_correct, "threshold": threshold,
        "grad_tol": grad_tol, "ce": per_loss["ce"], "margin": per_loss["margin"],
        "no_gradient": int(dead.sum()), "no_gradient_fraction": frac(dead),
        "no_gradient_examples": [idx[j] for j in dead.nonzero().flatten().tolist()],
        "ce_saturated": int(saturated.sum()), "ce_saturated_fraction": frac(saturated),
        "ce_saturated_examples": [idx[j] for j in saturated.nonzero().flatten().tolist()],
        "flags": [],
    }
    what = "zero or non-finite" + (f", or of L2 norm <= {grad_tol:g}" if norm == "L2" else "")
    if not n_correct:
        out["status"] = "skipped"
        out["reason"] = "no correctly classified example"
    if out["no_gradient_fraction"] > threshold:
        out["flags"].append(
            f"{100 * out['no_gradient_fraction']:.1f}% of the {n_correct} correctly classified examples have no "
            f"usable input gradient ({what}) for the CE and the margin loss "
            f"({_examples(out['no_gradient_examples'])}): gradient attacks cannot move them, so gradient-attack "
            "accuracy is not robustness; use a black-box (Square) or an adaptive attack (e.g. BPDA)")
    if out["ce_saturated_fraction"] > threshold:
        out["flags"].append(
            f"{100 * out['ce_saturated_fraction']:.1f}% of the {n_correct} correctly classified examples have no "
            f"usable cross-entropy gradient ({what}) although the margin loss has one "
            f"({_examples(out['ce_saturated_examples'])}): the softmax saturates in float32 (over-confident "
            "logits), so CE attacks (PGD, APGD-CE) stall; use a margin/DLR loss (APGD-T, autoattack)")
    out["status"] = "flag" if out["flags"] else out["status"]
    out["seconds"] = time.perf_counter() - started
    return out


def _input_grad(loss: torch.Tensor, x: torch.Tensor, retain: bool) -> torch.Tensor:
    """d(sum of per-example losses)/dx; zeros when the output does not depend on x at all."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(loss.sum(), x, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(x) if g is None else g.detach()


# --------------------------------------------------------------------------- eps sweep


def _sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, grid: list[float],
           attack_name: str, params: dict[str, Any], max_accuracy: float,
           run_kwargs: dict[str, Any], said: set[str]) -> dict[str, Any]:
    """Accuracy under the gradient attack at every eps of the grid (a robustness curve)."""
    started = time.perf_counter()

    def factory(e: float) -> Any:
        return create_attack(attack_name, norm=threat.norm, eps=e, **params)

    curve = robustness_curve(model, factory, grid, x, y, attack_name=attack_name, **run_kwargs)
    said.update(curve.warnings)
    raw = [{"eps": p.eps, "flags": p.robust_flags, "seconds": p.seconds, "forward": p.forward_passes,
            "backward": p.backward_passes, "config": p.attack_config} for p in curve.points]
    _, curve_msgs = analyse(curve.clean_flags, raw)
    rising = curve.rising_points()
    flags = [m for m in curve_msgs if m.startswith("accuracy rises")]
    if threat.norm == "Linf" and grid[-1] >= 1.0:  # label the rest as if the box point were not there
        labels = [*eps_labels(grid[:-1]), "1 (unbounded)"] if len(grid) > 1 else ["1 (unbounded)"]
    else:
        labels = eps_labels(grid)
    last = curve.points[-1]
    large: dict[str, Any] = {"eps": last.eps, "eps_str": labels[-1], "accuracy": last.accuracy,
                             "max_accuracy": max_accuracy}
    if last.eps <= threat.eps:
        large["status"] = "skipped"
        large["reason"] = "the sweep's largest eps is not above eps"
    elif last.accuracy > max_accuracy:
        large["status"] = "flag"
        flags.append(
            f"{100 * last.accuracy:.1f}% of the examples survive {attack_name} at eps {labels[-1]} "
            f"({last.eps / threat.eps:.3g}x eps {format_eps(threat.eps)}; expected <= {100 * max_accuracy:g}%): "
            "a gradient attack that cannot break a model with a huge budget is being misled (gradient masking) "
            "or is too weak; try a black-box attack (Square) at that eps")
    else:
        large["status"] = "ok"
    points = [{"eps": p.eps, "eps_str": s, "accuracy": p.accuracy, "accuracy_envelope": p.accuracy_envelope,
               "n_robust": p.robust_flags.count("1"), "n_inconsistent": p.n_inconsistent,
               "robust_flags": p.robust_flags, "seconds": p.seconds}
              for p, s in zip(curve.points, labels, strict=True)]
    return {
        "status": "flag" if flags else "ok",
        "attack": attack_name,
        "attack_config": curve.attack_config,
        "points": points,
        "monotone": not rising,
        "rising_points": [labels[k] for k in rising],
        "n_inconsistent": sum(p.n_inconsistent for p in curve.points),
        "large_eps": large,
        "clean_accuracy": curve.clean_accuracy,
        "clean_flags": curve.clean_flags,
        "data_fingerprint": curve.data.get("fingerprint"),
        "flags": flags,
        "seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------- APGD vs Square


def square_gap_from_result(result: EvalResult, *, source: str = "autoattack-result") -> dict[str, Any]:
    """AutoAttack's own flag, from a result's survivor cascade: Square's ``n_broken`` counts the
    points it broke after every gradient stage before it had failed on them."""
    names = [s.name for s in result.stages]
    if "square" not in names:
        raise ConfigError(f"the AutoAttack result ({result.attack}, stages {', '.join(names[1:]) or 'none'}) "
                          "has no Square stage; use a standard AutoAttack result (robustkit eval --attack "
                          "autoattack), or none for the direct APGD-CE vs Square check")
    k = names.index("square")
    before = [s for s in result.stages[1:k] if s.name in GRADIENT_STAGES]
    if not before:
        raise ConfigError("the AutoAttack result runs no gradient stage before Square: nothing to compare")
    square = result.stages[k]
    apgd = [s for s in before if s.name.startswith("apgd")]
    fab = [s for s in before if s.name.startswith("fab")]
    out: dict[str, Any] = {
        "status": "ok", "source": source, "model": result.model, "attack": result.attack,
        "stages": [{"name": s.name, "accuracy": s.accuracy, "n_attacked": s.n_attacked, "n_broken": s.n_broken}
                   for s in result.stages],
        "accuracy_after_apgd": apgd[-1].accuracy if apgd else None,
        "accuracy_before_square": result.stages[k - 1].accuracy,
        "accuracy_after_square": square.accuracy,
        "robust_accuracy": result.robust_accuracy,
        "square_broken": square.n_broken,
        "fab_broken_after_apgd": sum(s.n_broken for s in fab) if apgd else None,
        "n_examples": result.n_examples,
        "data_fingerprint": result.data.get("fingerprint"),
        "flags": [],
    }
    if square.n_broken > 0:
        out["status"] = "flag"
        stages = ", ".join(s.name.upper() for s in before)
        out["flags"].append(
            f"Square (black-box) broke {square.n_broken} example(s) after {stages} had failed on them "
            f"(robust accuracy {100 * out['accuracy_before_square']:.2f}% -> {100 * square.accuracy:.2f}%): the "
            "gradients mislead the gradient attacks, a sign of gradient masking; consider an adaptive attack")
    return out


def _direct_square_gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                       sweep: dict[str, Any], queries: int, confirm: str | None, confirm_params: dict[str, Any],
                       num_classes: int, run_kwargs: dict[str, Any], said: set[str]) -> dict[str, Any]:
    """Square alone on the same examples, against the sweep's gradient attack at eps.

    Square runs on every clean-correct example, not only on the gradient attack's survivors, so
    its own accuracy is reported too. A point Square breaks and APGD-CE does not is not yet
    masking: APGD-CE alone is weaker than AutoAttack's gradient stages (on small_cnn, APGD-T breaks
    every such point). So ``confirm`` (APGD-T, AutoAttack's second stage) runs on those few points
    and the flag is what survives it: the points Square breaks after APGD-CE + APGD-T, AutoAttack's
    own criterion, at a fraction of its cost. (Square alone is one stage, so the harness's
    "Square broke ..." warning, which assumes gradient stages ran first, is dropped.)
    """
    started = time.perf_counter()
    square = AutoAttack(threat, version="custom", attacks=["square"], overrides={"square.n_queries": queries})
    res = evaluate(model, square, x, y, attack_name="square", **run_kwargs)
    said.update(res.warnings)
    at_eps = next(p for p in sweep["points"] if math.isclose(p["eps"], threat.eps, rel_tol=1e-12))
    grad, sq, clean = at_eps["robust_flags"], res.robust_flags or "", sweep["clean_flags"]
    only_square = [i for i, (c, g, s) in enumerate(zip(clean, grad, sq, strict=True))
                   if c == "1" and g == "1" and s == "0"]
    only_grad = [i for i, (c, g, s) in enumerate(zip(clean, grad, sq, strict=True))
                 if c == "1" and g == "0" and s == "1"]
    n = len(clean)
    both = sum(1 for g, s in zip(grad, sq, strict=True) if g == "1" and s == "1")
    attack = sweep["attack"]
    survivors, confirm_used = list(only_square), None
    if only_square and confirm is not None and (confirm != "apgd-t" or num_classes > 3):  # targeted DLR: 4+
        params = dict(confirm_params)
        if confirm == "apgd-t" and num_classes < 10:  # the preset targets 9 classes
            params["overrides"] = {"apgd_targeted.n_target_classes": num_classes - 1, **params.get("overrides", {})}
        extra = create_attack(confirm, norm=threat.norm, eps=threat.eps, **params)
        idx = torch.tensor(only_square, dtype=torch.long)
        kwargs = {**run_kwargs, "subject": run_kwargs["subject"].on_subset()}
        conf = evaluate(model, extra, x[idx], y[idx], attack_name=confirm, **kwargs)
        said.update(conf.warnings)
        survivors = [i for i, f in zip(only_square, conf.robust_flags or "", strict=True) if f == "1"]
        confirm_used = confirm
    out: dict[str, Any] = {
        "status": "ok", "source": "direct", "gradient_attack": attack, "square_queries": queries,
        "square_config": res.attack_config,
        "gradient_accuracy": grad.count("1") / n, "square_accuracy": sq.count("1") / n,
        "combined_accuracy": both / n,
        "square_only": len(only_square), "square_only_examples": only_square,
        "gradient_only": len(only_grad),
        "confirm_attack": confirm_used,
        "square_only_confirmed": len(survivors), "square_only_confirmed_examples": survivors,
        "flags": [], "notes": [], "seconds": time.perf_counter() - started,
    }
    then = f" and {confirm_used}" if confirm_used else ""
    if survivors:
        out["status"] = "flag"
        out["flags"].append(
            f"Square (black-box, {queries} queries) broke {len(survivors)} example(s) {attack}{then} could not at "
            f"eps {format_eps(threat.eps)} ({_examples(survivors)}; accuracy {100 * out['gradient_accuracy']:.2f}% "
            f"under {attack}, {100 * out['square_accuracy']:.2f}% under Square): the gradients mislead the "
            "gradient attacks, a sign of gradient masking; confirm with the full AutoAttack (--run-autoattack) "
            "and consider an adaptive attack")
    if len(survivors) < len(only_square):
        cleared = len(only_square) - len(survivors)
        out["notes"].append(
            f"Square broke {len(only_square)} example(s) {attack} could not; {confirm_used} (AutoAttack's targeted "
            f"gradient stage) broke {cleared} of them: {attack} alone underestimates the attack there, which is "
            f"not gradient masking (report AutoAttack, not {attack} alone)")
    return out


def _load_aa_result(result: EvalResult | str | Path | None, threat: ThreatModel,
                    checkpoint_sha256: str | None) -> EvalResult | None:
    if result is None:
        return None
    where = "the AutoAttack result"
    if not isinstance(result, EvalResult):
        where = str(result)
        result = EvalResult.load(result)
    if result.eps is None or result.norm is None:
        raise ConfigError(f"{where} is a clean evaluation (no attack): give an AutoAttack result")
    if result.norm != threat.norm or not math.isclose(result.eps, threat.eps, rel_tol=1e-9, abs_tol=1e-12):
        raise ConfigError(f"{where} was measured at {result.norm} eps={format_eps(result.eps)}, not {threat}: "
                          "pass the matching --norm/--eps")
    if checkpoint_sha256 and result.provenance.get("checkpoint_sha256") not in (None, checkpoint_sha256):
        raise ConfigError(f"{where} is of another checkpoint (sha256 "
                          f"{result.provenance.get('checkpoint_sha256')}, not {checkpoint_sha256})")
    return result


def _examples(idx: list[int]) -> str:
    return "#" + ", #".join(str(i) for i in idx[:SHOW]) + (", ..." if len(idx) > SHOW else "")


# --------------------------------------------------------------------------- markdown


def render_markdown(report: dict[str, Any]) -> str:
    """A model-card section: the verdict, one row per check, the sweep, flags and notes."""
    c = report["checks"]
    zero, sweep, gap, model = c["zero_gradient"], c["eps_sweep"], c["square_gap"], c["model"]
    lines = [
        MARKDOWN_HEAD,
        "",
        f"**Verdict: {report['verdict']}.**" if report["flagged"] else f"**Verdict: {report['verdict']}** "
        "(a necessary check, not a proof of robustness: only an adaptive attack can show that).",
        "",
        f"Model `{report['model']}` on {report['dataset'] or 'the given data'} (first {report['n_examples']} "
        f"examples, clean accuracy {100 * report['clean_accuracy']:.2f}%), {report['norm']} eps "
        f"{report['eps_str']}, seed {report['seed']}; `robustkit check masking`, robustkit "
        f"{(report['provenance'].get('versions') or {}).get('robustkit')}, on "
        f"{report['provenance'].get('device')} ({_fmt_seconds(report['timing']['total_seconds'])}).",
        "",
        "| check | result | status |",
        "|---|---|---|",
        f"| zero gradient | {_zero_cell(zero)} | {zero['status']} |",
        f"| eps sweep ({sweep['attack']}) | {_sweep_cell(sweep)} | {sweep['status']} |",
        f"| APGD vs Square | {_gap_cell(gap)} | {gap['status']} |",
        f"| model outputs | {'deterministic' if model['deterministic'] else 'randomized'}, "
        f"{'probabilities' if model['outputs_are_probabilities'] else 'logits'} | {model['status']} |",
        "",
        f"Accuracy under {sweep['attack']} on the same examples (envelope: an example broken at a smaller eps "
        "counts as broken):",
        "",
        "| eps | accuracy | envelope |",
        "|---|---|---|",
        *[f"| {p['eps_str']} | {100 * p['accuracy']:.2f}% | {100 * p['accuracy_envelope']:.2f}% |"
          for p in sweep["points"]],
    ]
    if report["flags"]:
        lines += ["", "Flags:", "", *[f"- **{f['check']}**: {f['message']}" for f in report["flags"]]]
    if report["notes"]:
        lines += ["", "Notes:", "", *[f"- {m}" for m in report["notes"]]]
    return "\n".join(lines) + "\n"


def _zero_cell(zero: dict[str, Any]) -> str:
    if zero["status"] == "skipped":
        return zero["reason"]
    return (f"{zero['no_gradient']} of {zero['n_correct']} correct examples without a usable input gradient "
            f"({100 * zero['no_gradient_fraction']:.1f}%), {zero['ce_saturated']} with a saturated CE only "
            f"({100 * zero['ce_saturated_fraction']:.1f}%); limit {100 * zero['threshold']:g}%")


def _sweep_cell(sweep: dict[str, Any]) -> str:
    mono = "monotone" if sweep["monotone"] else f"rises at eps {', '.join(sweep['rising_points'])}"
    large = sweep["large_eps"]
    if large["status"] == "skipped":
        return f"{mono}; large-eps check skipped ({large['reason']})"
    return (f"{mono}; {100 * large['accuracy']:.2f}% at eps {large['eps_str']} "
            f"(limit {100 * large['max_accuracy']:g}%)")


def _gap_cell(gap: dict[str, Any]) -> str:
    if gap["status"] == "skipped":
        return gap["reason"]
    if gap["source"] == "direct":
        confirmed = (f", {gap['square_only_confirmed']} of which survive {gap['confirm_attack']}"
                     if gap["confirm_attack"] else "")
        return (f"{gap['gradient_attack']} {100 * gap['gradient_accuracy']:.2f}%, Square ({gap['square_queries']} "
                f"queries) {100 * gap['square_accuracy']:.2f}%; {gap['square_only']} example(s) broken by Square "
                f"only{confirmed}")
    origin = "AutoAttack result" if gap["source"] == "autoattack-result" else "AutoAttack run here"
    return (f"{origin}: {100 * gap['accuracy_before_square']:.2f}% after the gradient stages, "
            f"{100 * gap['accuracy_after_square']:.2f}% after Square ({gap['square_broken']} broken by Square)")

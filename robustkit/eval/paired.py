"""Paired statistics on per-example flags: two models (or two mixtures) scored on the same images.

Shared by the comparison drivers (``robustkit.train.*compare``) and ``robustkit tradeoff``: one
implementation of the exact McNemar test, so every "paired p" in a card is computed the same way.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustkit.core.errors import ConfigError
from robustkit.eval.results import EvalResult


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test on paired per-example flags (same images, two models).

    Why paired: on the same 1,000 images most examples are robust (or not) for both models, so the
    unpaired +-2.7-point binomial interval of each accuracy badly overstates the noise of a difference.
    Only the discordant examples carry information: ``only_b`` robust under b alone, ``only_a`` under a.
    """
    if len(a) != len(b):
        raise ValueError("paired flags must have the same length")
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        p = 1.0
    elif n <= 1000:  # exact: integers, one correctly rounded division
        p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    else:  # 2.0**n overflows from n = 1,024 (several seeds of 7,000 images get there): log space
        terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                 for i in range(k + 1)]
        top = max(terms)
        p = min(1.0, 2 * math.exp(top) * sum(math.exp(t - top) for t in terms))
    return {"only_a": only_a, "only_b": only_b, "p_value": p}


def as_bools(flags: str | Sequence[Any]) -> list[bool]:
    """Result JSONs store per-example flags as a '0'/'1' string."""
    return [c == "1" for c in flags] if isinstance(flags, str) else [bool(v) for v in flags]


def per_example_worst(flags: Sequence[str | Sequence[Any]]) -> list[bool]:
    """Robust under every attack: the worst case over attacks of one model on the same examples
    (never above the lowest single robust accuracy)."""
    return [all(col) for col in zip(*(as_bools(f) for f in flags), strict=True)]


# --------------------------------------------------------------------------- result files


PAIRED_SCHEMA = "robustkit.paired"
PAIRED_SCHEMA_VERSION = 1


def compare_results(paths: Sequence[str], labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Paired statistics of result JSONs scored on the same images: every pair's exact McNemar on
    robust (and clean) flags, and, when all are one model, the per-example worst case.

    Why a command and not arithmetic in a card: "the worst case of standard and adaptive AutoAttack"
    and "p = 0.005 against h" are numbers users quote, and they are only meaningful when the files
    are the same images (data fingerprint, count) at the same threat (norm, eps); this refuses
    anything else. The worst case counts an example robust only if every attack left it robust, so it
    is never above the lowest single robust accuracy; it is computed only when all files evaluate
    one model (name and checkpoint), where it is the number to quote.
    """
    if len(paths) < 2:
        raise ConfigError("paired statistics need at least two result JSONs")
    if labels is not None and len(labels) != len(paths):
        raise ConfigError(f"--label given {len(labels)} times for {len(paths)} results: give one per result or none")
    results = [EvalResult.load(p) for p in paths]
    if labels is not None:
        names = list(labels)
    elif len({r.model for r in results}) == 1:  # attacks on one model: the attack names it
        names = [str(r.attack) for r in results]
    elif len({r.attack for r in results}) == 1:  # models under one attack: the model names it
        names = [r.model for r in results]
    else:
        names = [f"{r.model} {r.attack}" for r in results]
    if len(set(names)) < len(names):  # two runs of one model and attack: their file names tell them apart
        names = [Path(p).stem for p in paths] if labels is None and len({Path(p).stem for p in paths}) == len(paths) \
            else [f"{k + 1}: {n}" for k, n in enumerate(names)]
    first, first_path = results[0], paths[0]
    for r, p in zip(results[1:], paths[1:], strict=True):
        for what, a, b in (("data fingerprint", first.data.get("fingerprint"), r.data.get("fingerprint")),
                           ("number of examples", first.n_examples, r.n_examples),
                           ("norm", first.norm, r.norm), ("eps", first.eps, r.eps)):
            if a != b:
                raise ConfigError(f"{p} is not paired with {first_path}: {what} {b!r} vs {a!r} "
                                  "(paired statistics need the same images at the same threat)")
    for r, p in zip(results, paths, strict=True):
        if r.robust_flags is None:
            raise ConfigError(f"{p} has no robust flags (an --attack none result): nothing to pair")
    robust = [as_bools(r.robust_flags or "") for r in results]
    clean = [as_bools(r.clean_flags) for r in results]
    rows = [{"label": n, "path": str(p), "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest(),
             "model": r.model, "attack": r.attack, "engine": r.engine,
             "clean_acc": r.clean_accuracy, "robust_acc": r.robust_accuracy}
            for n, p, r in zip(names, paths, results, strict=True)]
    pairs = []
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            pairs.append({"a": names[i], "b": names[j], "robust": mcnemar_exact(robust[i], robust[j]),
                          "clean": mcnemar_exact(clean[i], clean[j])})
    out: dict[str, Any] = {"schema": PAIRED_SCHEMA, "schema_version": PAIRED_SCHEMA_VERSION,
                           "n_examples": first.n_examples, "dataset": first.dataset, "norm": first.norm,
                           "eps": first.eps, "data_fingerprint": first.data.get("fingerprint"),
                           "results": rows, "pairs": pairs, "worst_case": None}
    models = {(r.model, r.provenance.get("checkpoint_sha256")) for r in results}
    if len(models) == 1:
        worst = per_example_worst(robust)
        out["worst_case"] = {"robust_acc": sum(worst) / len(worst), "n_robust": sum(worst),
                             "lowest_single": min(float(r.robust_accuracy or 0.0) for r in results)}
    else:
        out["worst_case_note"] = ("not computed: the results evaluate different models "
                                  f"({', '.join(sorted({m for m, _ in models}))})")
    return out


def format_comparison(report: dict[str, Any]) -> str:
    """The terminal view of :func:`compare_results`: one row per result, one line per pair."""
    n = report["n_examples"]
    width = max(len(r["label"]) for r in report["results"])
    lines = [f"{n} paired examples ({report['dataset']}, {report['norm']} eps {report['eps']:.6g}); "
             "exact McNemar on the discordant examples"]
    for r in report["results"]:
        lines.append(f"  {r['label']:<{width}}  clean {100 * r['clean_acc']:6.2f}%  robust "
                     f"{100 * r['robust_acc']:6.2f}%   {r['path']}")
    for p in report["pairs"]:
        rb, cl = p["robust"], p["clean"]
        lines.append(f"{p['a']} vs {p['b']}: robust only under {p['a']} {rb['only_a']}, only under {p['b']} "
                     f"{rb['only_b']} (p = {rb['p_value']:.2g}); clean {cl['only_a']} vs {cl['only_b']} "
                     f"(p = {cl['p_value']:.2g})")
    w = report["worst_case"]
    if w is not None:
        lines.append(f"per-example worst case: {100 * w['robust_acc']:.2f}% ({w['n_robust']} of {n} robust under "
                     f"every attack; the lowest single result {100 * w['lowest_single']:.2f}%): the number to quote")
    else:
        lines.append(f"per-example worst case {report['worst_case_note']}")
    return "\n".join(lines)

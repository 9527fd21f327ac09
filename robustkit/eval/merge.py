"""``robustkit merge``: the parts of a ``--shard i/N`` evaluation joined into one result.

A scheduler's job array runs the parts independently (no collectives, any order, any machines);
each part is one evaluation of a contiguous block of the examples with the full survivor cascade.
Merging checks that the parts are one evaluation split N ways (same model, checkpoint, attack
config, data fingerprint, seed, batch size; every part exactly once) and rebuilds the result a
single run writes: flags in example order, stage counts and passes summed, per-class accuracy
recomputed from the labels each part records.

Whether the merged flags equal a single run's depends on the attack. For one whose per-example
result does not depend on the batch (``Attack.batch_invariant``: robustkit's ``pgd``, ``fgsm`` and
``square``, which draw each example's randomness from (seed, stage, example)) they are identical. The
reference AutoAttack re-seeds every batch, so an example's random start depends on its batch
neighbours: merged flags are valid worst-case flags (every example attacked by the whole protocol,
within budget) but not the batch-exact flags of a single run; a torchrun job gives those.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from robustkit.core.errors import ConfigError
from robustkit.eval.per_class import result_per_class
from robustkit.eval.results import EvalResult, StageResult

__all__ = ["merge_results"]

# What every part must share: together they are one evaluation.
_SAME = ("model", "attack", "attack_config", "dataset", "norm", "eps", "seed", "batch_size")


def merge_results(paths: list[str | Path]) -> tuple[EvalResult, dict[str, Any]]:
    """The merged result and the ``merge`` block recorded in its checks (``batch_exact`` and why)."""
    if not paths:
        raise ConfigError("merge needs the result JSON of every shard")
    parts = [(Path(p), EvalResult.load(p)) for p in paths]
    first_path, first = parts[0]
    for path, r in parts:
        if r.shard is None:
            raise ConfigError(f"{path} is not the result of a --shard run (no shard block)")
        for key in _SAME:
            if getattr(r, key) != getattr(first, key):
                raise ConfigError(f"{path} and {first_path} are not parts of one evaluation (differ in {key})")
        for key, a, b in (("data fingerprint", r.data.get("fingerprint"), first.data.get("fingerprint")),
                          ("checkpoint", r.provenance.get("checkpoint_sha256"),
                           first.provenance.get("checkpoint_sha256")),
                          ("number of shards", r.shard["count"], first.shard["count"]),
                          ("number of examples", r.shard["n_total"], first.shard["n_total"])):
            if a != b:
                raise ConfigError(f"{path} and {first_path} are not parts of one evaluation (differ in {key})")
    count = int(first.shard["count"])
    by_index: dict[int, tuple[Path, EvalResult]] = {}
    for path, r in parts:
        i = int(r.shard["index"])
        if i in by_index:
            raise ConfigError(f"{path} and {by_index[i][0]} are both shard {i}/{count}")
        by_index[i] = (path, r)
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise ConfigError(f"missing shard(s) {', '.join(f'{i}/{count}' for i in missing)} of {count}")
    ordered = [by_index[i][1] for i in range(count)]
    _check_coverage(ordered, int(first.shard["n_total"]))
    return _joined(ordered, [by_index[i][0] for i in range(count)])


def _check_coverage(parts: list[EvalResult], n: int) -> None:
    """The parts' example ranges tile [0, n) and each part's flags fit its range."""
    at = 0
    for r in parts:
        lo, hi = r.shard["examples"]
        if lo != at or len(r.clean_flags) != hi - lo or len(r.shard["labels"]) != hi - lo:
            raise ConfigError(f"shard {r.shard['index']}/{r.shard['count']} covers examples [{lo}, {hi}) with "
                              f"{len(r.clean_flags)} flags; the parts must tile [0, {n}) in order")
        at = hi
    if at != n:
        raise ConfigError(f"the shards cover {at} of {n} examples")


def _joined(parts: list[EvalResult], paths: list[Path]) -> tuple[EvalResult, dict[str, Any]]:
    first = parts[0]
    n = sum(r.n_examples for r in parts)
    clean = "".join(r.clean_flags for r in parts)
    robust = "".join(r.robust_flags for r in parts) if first.robust_flags is not None else None
    labels = [int(v) for r in parts for v in r.shard["labels"]]
    stages = []
    for k, s in enumerate(first.stages):
        each = [r.stages[k] for r in parts]
        alive = sum(round(e.accuracy * r.n_examples) for e, r in zip(each, parts, strict=True))
        stages.append(StageResult(name=s.name, accuracy=alive / n, n_attacked=sum(e.n_attacked for e in each),
                                  n_broken=sum(e.n_broken for e in each), seconds=sum(e.seconds for e in each),
                                  forward_passes=sum(e.forward_passes for e in each),
                                  backward_passes=sum(e.backward_passes for e in each)))
    exact, why = _batch_exact(first)
    merge = {"batch_exact": exact, "why": why, "parts": [p.name for p in paths],
             "devices": [r.provenance.get("device") for r in parts]}
    per_class = None
    if first.per_class is not None:
        import torch

        num_classes = len(first.per_class["classes"])
        per_class, _ = result_per_class(torch.tensor(labels), [c == "1" for c in clean],
                                        None if robust is None else [c == "1" for c in robust], num_classes,
                                        first.dataset, first.per_class.get("train_counts"))
    budget = None
    if first.budget is not None:
        budget = {**first.budget, "max_linf": max(r.budget["max_linf"] for r in parts),
                  "max_l2": max(r.budget["max_l2"] for r in parts),
                  "checked": sum(r.budget["checked"] for r in parts)}
    warnings = list(dict.fromkeys(w for r in parts for w in r.warnings))
    merged = replace(
        first, n_examples=n, clean_accuracy=clean.count("1") / n,
        robust_accuracy=robust.count("1") / n if robust is not None else None, stages=stages,
        clean_flags=clean, robust_flags=robust,
        passes={k: sum(r.passes[k] for r in parts) for k in ("forward", "backward")},
        timing={"total_seconds": sum(r.timing["total_seconds"] for r in parts),
                "this_session_seconds": sum(r.timing["this_session_seconds"] for r in parts),
                "resumed_batches": sum(r.timing.get("resumed_batches", 0) for r in parts),
                "started_at": min(r.timing["started_at"] for r in parts)},
        budget=budget, checks={**first.checks, "merge": merge}, records_path=None, warnings=warnings,
        per_class=per_class, shard=None, distributed=None,
    )
    return merged, merge


def _batch_exact(r: EvalResult) -> tuple[bool, str]:
    """Whether merged flags equal a single run's, and the reason, from the attack's recorded config."""
    if r.attack_config is None:
        return True, "clean accuracy only: each example's prediction does not depend on its batch"
    from robustkit.attacks import attack_from_config

    attack = attack_from_config(dict(r.attack_config))
    if attack.batch_invariant:
        return True, (f"{r.attack} draws each example's randomness from (seed, stage, example): its flags do "
                      "not depend on the batches, so they equal a single run's")
    return False, (f"{r.attack} draws its randomness per batch, so an example's result depends on its batch "
                   "neighbours: the merged flags are valid worst-case flags (every example attacked by the whole "
                   "protocol, within budget) but not the batch-exact flags of a single run with batch size "
                   f"{r.batch_size}; run one torchrun job for those")

"""``evaluate()``: clean and robust accuracy with resume, budget checks and provenance.

The survivor cascade is AutoAttack's: the clean pass runs over all examples in order, in
batches; each attack stage then runs only on the examples every earlier stage failed to break,
re-batched in index order. With AutoAttack that reproduces ``run_standard_evaluation`` batch for
batch, which is why per-example results equal the reference's; with any other attack it is
simply the cheapest correct way to compute point-wise worst-case accuracy.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robustkit.attacks.base import Attack, perturbation_norms
from robustkit.core.errors import BudgetViolationError, ConfigError
from robustkit.core.modes import module_modes, restore_modes
from robustkit.core.provenance import provenance, resolve_device
from robustkit.distributed import Dist, current
from robustkit.eval.counting import PassCounter
from robustkit.eval.inputs import CheckedInputs, check_inputs, check_labels_fit
from robustkit.eval.per_class import result_per_class
from robustkit.eval.record_check import RecordCheck
from robustkit.eval.records import RecordStore
from robustkit.eval.results import EvalResult, StageResult, subject_fields
from robustkit.eval.subject import Subject, tensor_fingerprint

__all__ = ["evaluate", "example_seeds", "shard_examples", "tensor_fingerprint"]

BUDGET_TOLERANCE = 1e-5


def evaluate(
    model: nn.Module,
    attack: Attack | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    subject: Subject | None = None,
    attack_name: str | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
    seed: int = 0,
    records_path: str | Path | None = None,
    resume: bool = True,
    replace_other_records: bool = False,
    progress: bool = True,
    distributed: bool | None = None,
    shard: tuple[int, int] | None = None,
    compile: bool = False,
) -> EvalResult:
    """Evaluate ``model`` on ``(x, y)``, clean and (when ``attack`` is given) under attack.

    Args:
        model: [0,1] NCHW images -> logits. Put in eval mode for the run (and restored after);
            its parameters get no ``.grad`` from the attacks. A model that runs several networks
            per input (an ensemble) says so with an ``number_forward_passes`` attribute.
        attack: a registered attack (see :func:`robustkit.create_attack`) or None for clean only.
        subject: what is evaluated (model name, checkpoint, data provenance), written into the
            result; default: the model's class name and a fingerprint of ``(x, y)``.
        attack_name: the attack as the result names it (default: the attack's own name).
        x, y: float images in [0, 1] (N, C, H, W) and int labels (N,), kept on CPU; batches
            move to ``device``. Other float and integer dtypes are converted (recorded in
            ``checks.input_conversions``), anything ambiguous refused: :mod:`robustkit.eval.inputs`.
        records_path: JSONL file of per-example records; with ``resume`` a run that was killed
            continues where it stopped and produces the same final numbers. A file that records
            another evaluation is refused, or started over with ``replace_other_records``.
        seed: the only source of randomness; the caller's global RNG state is left untouched.
        distributed: share the batches among the ranks of a ``torch.distributed`` job (every rank
            calls ``evaluate`` with the same arguments and gets the same result). None: when the
            process is in a job of several (``torchrun``); False: alone even then. Each rank writes
            its own records file beside ``records_path`` (records.py), and the flags equal a
            one-process run with the same batch size: the batch plan is the same.
        shard: ``(i, N)``: evaluate only the i-th of N contiguous blocks of the examples (0-based),
            independently of the other blocks (a job array); ``robustkit merge`` joins the parts.
        compile: run the model through ``torch.compile`` (:class:`PassCounter`): how, not what, is
            evaluated, like the device, so records resume across it; the result's provenance says which.
    """
    started = time.time()
    job = _job(distributed)
    dev = resolve_device(device)
    inputs = _validate_inputs(model, x, y, batch_size, subject, dev)
    x, y = inputs.x, inputs.y
    n = int(x.shape[0])
    examples = shard_examples(n, shard)
    subject = subject or Subject()
    protocol = {  # what a records file must match to be resumed
        "model": subject.name_for(model),
        "checkpoint_sha256": subject.checkpoint_sha256,
        "attack": attack_name or (attack.name if attack else None),
        "attack_config": attack.config() if attack else None,
        "dataset": subject.dataset,
        "data_fingerprint": subject.fingerprint(x, y),
        "n_examples": n,
        "seed": int(seed),
        "batch_size": int(batch_size),
    }
    if shard is not None:  # a part is another evaluation: its records never mix with the whole's
        protocol["shard"] = [int(shard[0]), int(shard[1])]
    progress = progress and (job is None or job.is_main)
    store = RecordStore(records_path, protocol, resume=resume, rank=job.rank if job else 0,
                        world_size=job.world_size if job else 1, replace_other=replace_other_records)
    try:
        _load_peers(store, job)
    except BaseException:
        store.close()
        raise
    counter = PassCounter(model, compile=compile)
    stage_names = ["clean", *(attack.stages() if attack else [])]
    # What a resumed batch must agree with before it is trusted (records.py, record_check.py).
    trust = RecordCheck(y.tolist(), attack.norm if attack else None, attack.eps if attack else None,
                        BUDGET_TOLERANCE)
    checks: dict[str, Any] = {"input_conversions": inputs.conversions} if inputs.conversions else {}
    run_warnings: list[str] = []

    try:
        with _evaluation_mode(model, dev), _isolated_rng(dev):
            counter.to(dev)
            checks.update(_model_checks(model, x[:batch_size].to(dev)))
            for msg in checks.get("warnings", []):
                run_warnings.append(msg)
                warnings.warn(msg, stacklevel=2)
            store.settle("clean", _batches(examples, batch_size), trust)
            _shared(job, store, lambda: _run_clean(counter, examples, x, y, dev, batch_size, store, progress,
                                                   _share_of(job, store, "clean", examples, batch_size), job))
            if attack is not None:
                attack.prepare(counter, dev, seed=int(seed))
                for k, stage in enumerate(stage_names[1:], start=1):
                    survivors = _survivors(store, stage_names[:k], examples)
                    store.settle(stage, _batches(survivors, batch_size), trust)
                    mine = _share_of(job, store, stage, survivors, batch_size)
                    _shared(job, store, lambda stage=stage, survivors=survivors, mine=mine: _run_stage(
                        attack, counter, stage, survivors, x, y, dev, batch_size, seed, store, progress, mine, job))
    finally:  # the records file stays valid for a resume whatever happened
        store.close()
    run_warnings.extend(store.warnings)

    stages = _stage_results(store, stage_names, examples)
    clean = [bool(store.examples[("clean", i)]["correct"]) for i in examples]
    robust = _final_flags(store, stage_names, examples) if attack else None
    budget = _budget_from_records(store, stage_names[1:], attack) if attack else None
    if attack is not None and budget is not None:
        _gradient_masking_hints(attack, stages, checks, run_warnings)
    per_class, notes = result_per_class(y[examples], clean, robust, int(checks["num_classes"]), subject.dataset,
                                        subject.model_info.get("train_class_counts"))
    for msg in notes:
        run_warnings.append(msg)
        warnings.warn(msg, stacklevel=2)
    elapsed = time.time() - started
    stage_seconds = sum(s.seconds for s in stages)
    return EvalResult(
        **subject_fields(subject, model, protocol["data_fingerprint"], provenance(dev) | {"torch_compile": compile}),
        attack=protocol["attack"],
        attack_config=protocol["attack_config"],
        engine=attack.engine if attack else None,
        norm=attack.norm if attack else None,
        eps=attack.eps if attack else None,
        seed=int(seed),
        batch_size=int(batch_size),
        n_examples=len(examples),
        clean_accuracy=sum(clean) / len(examples),
        robust_accuracy=(sum(robust) / len(examples)) if robust is not None else None,
        stages=stages,
        clean_flags="".join("1" if c else "0" for c in clean),
        robust_flags="".join("1" if r else "0" for r in robust) if robust is not None else None,
        passes={"forward": sum(s.forward_passes for s in stages),
                "backward": sum(s.backward_passes for s in stages)},
        timing={"total_seconds": stage_seconds, "this_session_seconds": elapsed,
                "resumed_batches": store.resumed_batches,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))},
        budget=budget,
        checks=checks,
        records_path=str(records_path) if records_path else None,
        warnings=run_warnings,
        per_class=per_class,
        distributed=_job_summary(job, store, stage_names, elapsed) if job else None,
        shard=({"index": int(shard[0]), "count": int(shard[1]), "examples": [examples[0], examples[-1] + 1],
                "n_total": n, "labels": y[examples].tolist()}  # labels: merge recomputes per_class
               if shard is not None else None),
    )


# --------------------------------------------------------------------------- stages


def _run_clean(model: PassCounter, examples: list[int], x: torch.Tensor, y: torch.Tensor, dev: torch.device,
               batch_size: int, store: RecordStore, progress: bool, mine: list[int], job: Dist | None) -> None:
    """The clean pass over this process's batches ``mine`` of ``examples`` cut into batches."""
    with _bar(len(mine), "clean", progress) as bar:
        for b in mine:
            t0, (f0, b0) = time.perf_counter(), model.snapshot()
            idx = examples[b * batch_size:(b + 1) * batch_size]
            idx_t = torch.tensor(idx, dtype=torch.long)
            xb, yb = x[idx_t].to(dev), y[idx_t].to(dev)
            with torch.no_grad():
                pred = model(xb).max(dim=1)[1]
            recs = [{"i": i, "y": int(yb[j]), "pred": int(pred[j]), "correct": bool(pred[j] == yb[j])}
                    for j, i in enumerate(idx)]
            f1, b1 = model.snapshot()
            store.write_batch("clean", b, recs, _stats(t0, f0, b0, model, job))
            bar.update(1)


def _survivors(store: RecordStore, done: list[str], examples: list[int]) -> list[int]:
    """Indices correct after every stage in ``done`` (in index order: AutoAttack's batching)."""
    alive = {i: bool(store.examples[("clean", i)]["correct"]) for i in examples}
    for stage in done[1:]:
        for i in examples:
            rec = store.examples.get((stage, i))
            if alive[i] and rec is not None and not rec["robust"]:
                alive[i] = False
    return [i for i in examples if alive[i]]


def _run_stage(attack: Attack, model: PassCounter, stage: str, survivors: list[int],
               x: torch.Tensor, y: torch.Tensor, dev: torch.device, batch_size: int, seed: int,
               store: RecordStore, progress: bool, mine: list[int], job: Dist | None) -> None:
    """One attack stage over this process's batches ``mine`` of the survivors cut into batches."""
    with _bar(len(mine), stage, progress) as bar:
        model.on_forward = _liveness(bar, model) if progress and mine else None
        try:
            for b in mine:
                t0, (f0, b0) = time.perf_counter(), model.snapshot()
                idx = survivors[b * batch_size:(b + 1) * batch_size]
                idx_t = torch.tensor(idx, dtype=torch.long)
                xb, yb = x[idx_t].to(dev), y[idx_t].to(dev)
                extra = {"example_seeds": example_seeds(seed, stage, idx)} if attack.batch_invariant else {}
                x_adv = attack.perturb(model, xb, yb, stage=stage, seed=_batch_seed(seed, stage, b), **extra)
                x_adv = x_adv.detach()
                linf, l2 = _check_budget(x_adv, xb, attack, stage, idx)
                with torch.no_grad():
                    pred = model(x_adv).max(dim=1)[1]
                recs = [{"i": i, "pred": int(pred[j]), "robust": bool(pred[j] == yb[j]),
                         "linf": float(linf[j]), "l2": float(l2[j])} for j, i in enumerate(idx)]
                store.write_batch(stage, b, recs, _stats(t0, f0, b0, model, job))
                bar.update(1)
        finally:  # never leave a callback to a closed bar behind
            model.on_forward = None


def _stats(t0: float, f0: int, b0: int, model: PassCounter, job: Dist | None) -> dict[str, Any]:
    """A batch's commit statistics (and, in a job, the rank that computed it)."""
    f1, b1 = model.snapshot()
    out: dict[str, Any] = {"seconds": time.perf_counter() - t0, "forward": f1 - f0, "backward": b1 - b0}
    if job is not None:
        out["rank"] = job.rank
    return out


# --------------------------------------------------------------------------- sharing the work


def _job(distributed: bool | None) -> Dist | None:
    """The job whose ranks share this evaluation, or None to run alone (see ``evaluate``)."""
    if distributed is False:
        return None
    job = current()
    if distributed and job is None:
        raise ConfigError("evaluate(distributed=True) needs torch.distributed initialised with 2 or more "
                          "processes: launch with torchrun (see the README, 'More than one GPU or machine')")
    return job


def _load_peers(store: RecordStore, job: Dist | None) -> None:
    """Every rank reads what every other rank committed, once each has cut its own file's
    uncommitted tail (barrier before) and before anyone appends to one (barrier after)."""
    if job is None:
        store.load_peers()
        return
    hashes = job.exchange(store.hash, None)
    if len(set(hashes)) > 1:  # same command on every rank, or the shared batches would mix two runs
        other = next(r for r, h in enumerate(hashes) if h != hashes[0])
        raise ConfigError(f"rank {other} of {job.world_size} evaluates something else than rank 0 (another "
                          "model, attack, data, seed or batch size): every rank must run the same command")
    error: BaseException | None = None
    try:
        store.load_peers()
    except Exception as e:  # a peer file of another evaluation: every rank stops with the reason
        error = e
    job.exchange(None, error)


def _share_of(job: Dist | None, store: RecordStore, stage: str, examples: list[int],
              batch_size: int) -> list[int]:
    """This process's batches of a stage: the uncommitted ones of the single-process batch plan,
    dealt round-robin over the ranks (every rank derives the same plan from the same records).

    The deal goes on where the previous stage's left off, so the late stages of AutoAttack, often a
    single batch of survivors each, fall to different ranks instead of all to rank 0."""
    unfinished = [b for b in range(-(-len(examples) // batch_size)) if not store.is_committed(stage, b)]
    if job is None:
        return unfinished
    start = store.dealt
    store.dealt += len(unfinished)
    return [b for j, b in enumerate(unfinished) if (start + j) % job.world_size == job.rank]


def _shared(job: Dist | None, store: RecordStore, work: Callable[[], None]) -> None:
    """Run this process's share of a stage; in a job, then give every rank every rank's batches, or
    stop every rank with the error one of them raised (no rank is left waiting for the timeout)."""
    if job is None:
        work()
        return
    error: BaseException | None = None
    try:
        work()
    except Exception as e:
        error = e
    for rank, batches in enumerate(job.exchange(store.take_new(), error)):
        if rank != job.rank:
            store.adopt(batches)


def _job_summary(job: Dist, store: RecordStore, stage_names: list[str], elapsed: float) -> dict[str, Any]:
    """World size and each rank's share of the batches (resumed ones under the rank that did them)."""
    shares = {r: {"rank": r, "batches": 0, "forward": 0, "backward": 0, "seconds": 0.0}
              for r in range(job.world_size)}
    for (stage, _), c in store.commits.items():
        if stage in stage_names:
            share = shares.setdefault(int(c.get("rank", 0)), {"rank": int(c.get("rank", 0)), "batches": 0,
                                                              "forward": 0, "backward": 0, "seconds": 0.0})
            share["batches"] += 1
            share["forward"] += int(c["forward"])
            share["backward"] += int(c["backward"])
            share["seconds"] += float(c["seconds"])
    return {"world_size": job.world_size, "backend": job.backend, "wall_seconds": elapsed,
            "ranks": [shares[r] for r in sorted(shares)]}


def shard_examples(n: int, shard: tuple[int, int] | None) -> list[int]:
    """The examples of part ``i`` of ``N`` (contiguous, sizes differing by at most one), or all."""
    if shard is None:
        return list(range(n))
    i, parts = shard
    if isinstance(i, bool) or isinstance(parts, bool) or not (0 <= int(i) < int(parts) <= n):
        raise ConfigError(f"shard {i}/{parts}: need 0 <= i < N <= the {n} examples")
    return list(range(int(i) * n // int(parts), (int(i) + 1) * n // int(parts)))


def example_seeds(seed: int, stage: str, idx: list[int]) -> torch.Tensor:
    """One 63-bit seed per example from (run seed, stage, example index): randomness that does not
    depend on the batch an example lands in, so its result is the same at any batch size, order or
    sharding (for attacks that declare ``batch_invariant``)."""
    return torch.tensor([_batch_seed(seed, stage, f"example-{i}") for i in idx], dtype=torch.long)


def _liveness(bar: Any, model: PassCounter, every: float = 0.5) -> Callable[[], None]:
    """Refresh the bar's pass count at most every ``every`` seconds while a batch runs."""
    last = [0.0]

    def tick() -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            bar.set_postfix_str(f"{model.forward_passes:,} fwd / {model.backward_passes:,} bwd image-passes")

    return tick


def _check_budget(x_adv: torch.Tensor, x: torch.Tensor, attack: Attack, stage: str,
                  idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fail loudly on any example outside the eps-ball (+1e-5) or outside [0, 1]."""
    if x_adv.shape != x.shape:
        raise BudgetViolationError(f"{stage} returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}")
    if not torch.isfinite(x_adv).all():
        raise BudgetViolationError(f"{stage} returned non-finite values")
    linf, l2 = perturbation_norms(x_adv, x)
    dist = linf if attack.norm == "Linf" else l2
    over = (dist > attack.eps + BUDGET_TOLERANCE).nonzero().flatten()
    if len(over):
        j = int(over[0])
        raise BudgetViolationError(
            f"{stage} produced example {idx[j]} at {attack.norm} distance {float(dist[j]):.7f} > eps "
            f"{attack.eps:.7f} (+{BUDGET_TOLERANCE:g}); the result would be invalid, so the run stops"
        )
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if lo < 0.0 or hi > 1.0:
        raise BudgetViolationError(f"{stage} produced pixel values outside [0, 1] (min {lo:.6g}, max {hi:.6g})")
    return linf, l2


def _budget_from_records(store: RecordStore, attack_stages: list[str], attack: Attack) -> dict[str, Any]:
    """The result's budget section, from the records of every attacked example: a function of the
    records, so a resumed or re-run evaluation reports what all its batches checked, not what this
    process happened to compute (every record's norm was re-checked against eps when it was loaded)."""
    recs = [r for (s, _), r in store.examples.items() if s in attack_stages]
    return {"norm": attack.norm, "eps": attack.eps, "tolerance": BUDGET_TOLERANCE,
            "max_linf": max((float(r["linf"]) for r in recs), default=0.0),
            "max_l2": max((float(r["l2"]) for r in recs), default=0.0), "checked": len(recs)}


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    """``indices`` cut into the run's batches, in order (what each committed batch must hold)."""
    return [indices[lo:lo + batch_size] for lo in range(0, len(indices), batch_size)]


def _batch_seed(seed: int, stage: str, batch: int | str) -> int:
    digest = hashlib.sha256(f"{seed}:{stage}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------- summaries


def _final_flags(store: RecordStore, stage_names: list[str], examples: list[int]) -> list[bool]:
    alive = set(_survivors(store, stage_names, examples))
    return [i in alive for i in examples]


def _stage_results(store: RecordStore, stage_names: list[str], examples: list[int]) -> list[StageResult]:
    out = []
    for k, stage in enumerate(stage_names):
        commits = store.stage_commits(stage)
        alive = _survivors(store, stage_names[: k + 1], examples)
        attacked = [r for (s, _), r in store.examples.items() if s == stage]
        out.append(StageResult(
            name=stage,
            accuracy=len(alive) / len(examples),
            n_attacked=len(attacked),
            n_broken=sum(1 for r in attacked if not r.get("robust", r.get("correct", True))),
            seconds=sum(c["seconds"] for c in commits),
            forward_passes=sum(c["forward"] for c in commits),
            backward_passes=sum(c["backward"] for c in commits),
        ))
    return out


def _gradient_masking_hints(attack: Attack, stages: list[StageResult], checks: dict[str, Any],
                            run_warnings: list[str]) -> None:
    """AutoAttack's own flag: a black-box attack that beats the gradient attacks hints at masking."""
    by_name = {s.name: s for s in stages}
    square = by_name.get("square")
    # only after gradient stages: a standalone Square (robustkit's own `--attack square`) proves nothing
    after_gradients = [s.name for s in stages[1:]][:1] != ["square"]
    if square is not None and square.n_broken > 0 and after_gradients:
        msg = (f"Square (black-box) broke {square.n_broken} example(s) the gradient attacks could not: "
               "a sign of gradient masking; consider an adaptive attack")
        checks["square_broke_points"] = square.n_broken
        run_warnings.append(msg)
        warnings.warn(msg, stacklevel=3)


# --------------------------------------------------------------------------- context


def _validate_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                     subject: Subject | None, dev: torch.device) -> CheckedInputs:
    """Inputs checked and unambiguously converted (:mod:`robustkit.eval.inputs`), and the labels
    checked against the model's class count, all before a records file or a batch is touched.

    The class count comes from one extra forward of one input, in eval mode with private RNG state,
    so it changes nothing the run computes afterwards (a randomized model included)."""
    inputs = check_inputs(x, y, batch_size, model=model,
                          input_shape=subject.model_info.get("input_shape") if subject else None)
    with _evaluation_mode(model, dev), _isolated_rng(dev), torch.no_grad():
        check_labels_fit(inputs.y, model(inputs.x[:1].to(dev)))
    return inputs


@contextmanager
def _evaluation_mode(model: nn.Module, dev: torch.device) -> Iterator[None]:
    """Eval mode and frozen parameters for the run; both restored afterwards.

    Freezing parameters means FAB's ``.backward()`` cannot leave gradients in the model (a known
    AutoAttack side effect) and no weight gradients are computed at all.
    """
    modes = module_modes(model)  # each submodule's own: a frozen BatchNorm stays frozen
    flags = [(p, p.requires_grad) for p in model.parameters()]
    grads = [(p, p.grad) for p in model.parameters()]
    model.to(dev).eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, rg in flags:
            p.requires_grad_(rg)
        for p, g in grads:
            p.grad = g
        restore_modes(modes)


@contextmanager
def _isolated_rng(dev: torch.device) -> Iterator[None]:
    """Run with private RNG state: AutoAttack reseeds torch's global RNG on every batch."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _model_checks(model: nn.Module, xb: torch.Tensor) -> dict[str, Any]:
    """Cheap sanity checks on the first batch: determinism and logits (not probabilities)."""
    out: dict[str, Any] = {"warnings": []}
    with torch.no_grad():
        a, b = model(xb), model(xb)
    out["deterministic"] = bool(torch.equal(a, b))
    if not out["deterministic"]:
        out["warnings"].append("the model's outputs differ between two identical forward passes: it is "
                               "randomized; use --attack autoattack-rand (EOT) for a meaningful number")
    probs_like = bool((a >= -1e-5).all() and (a <= 1 + 1e-5).all() and
                      torch.allclose(a.sum(1), torch.ones_like(a[:, 0]), atol=1e-4))
    out["outputs_are_probabilities"] = probs_like
    if probs_like:
        out["warnings"].append("the model seems to output probabilities, not logits: gradient attacks "
                               "are weakened by the softmax; return logits")
    out["num_classes"] = int(a.shape[1])
    return out


@contextmanager
def _bar(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"{desc:>8}", unit="batch", disable=not enabled or total == 0,
               file=sys.stderr, dynamic_ncols=True, leave=True)
    try:
        yield bar
    finally:
        bar.close()

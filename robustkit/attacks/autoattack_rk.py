"""AutoAttack on robustkit's own engine: ``autoattack-rk`` (the standard protocol) and ``autoattack-fast``.

The reference (:mod:`robustkit.attacks.autoattack`, pyautoattack driven stage by stage) stays what
RobustBench-comparable numbers come from. This attack runs the same protocol on
:mod:`robustkit.attacks.engine`, which changes three things and keeps the algorithms:

- every random draw of an example comes from its own seed (the harness's ``example_seeds``, one per
  example and stage; restarts and targets take distinct streams), so its result is the same at any
  batch size, order or ``--shard`` split;
- an example leaves the working batch the moment it is broken, inside APGD's iterations and FAB's
  and Square's loops (the reference keeps iterating on broken points until a run ends);
- only input gradients are computed, with no host synchronisation per example.

Two versions:

``standard`` (preset ``autoattack-rk``): APGD-CE (1 restart, 100 iterations), APGD-T (targets the
9 classes of highest clean logit, 100 iterations each), FAB-T (the same 9 targets) and Square
(5,000 queries) — AutoAttack's standard version, stage for stage.

``fast`` (preset ``autoattack-fast``): a screening mode. APGD-CE; targeted APGD on the 5 classes
that a linear model of the logits puts closest (MALT, Melamed et al., NeurIPS 2024): for each
candidate class ``t``, ``(z_y - z_t) / ||grad (z_y - z_t)||_*`` with the dual norm of the threat (L1
for Linf, L2 for L2), smallest first; FAB-T on the one class of highest clean logit. No Square: on
the models robustkit ships it broke one point the gradient stages had left (1 of 64 on adaptive
smoothing), for most of AutoAttack's time; FAB-T broke up to 4, always with that first target
(``eval/engines/README.md``).

``w > 0`` is the adaptive attack on adaptive-smoothing models (as ``autoattack-adaptive``): the
APGD losses add ``w * BCEWithLogits(gamma, 1)``; FAB-T and Square attack the plain forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from robustkit.attacks import engine
from robustkit.attacks.adaptive import require_gamma
from robustkit.attacks.base import Attack, register_attack
from robustkit.attacks.engine import rng
from robustkit.attacks.engine.apgd import apgd, apgd_targets
from robustkit.attacks.engine.fab import fab_targeted
from robustkit.attacks.engine.lean import lean_model
from robustkit.attacks.engine.square import check_square_params, square_l2, square_linf
from robustkit.core.errors import ConfigError
from robustkit.core.threat import ThreatModel

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
RANKINGS = ("logit", "malt")
# What each version runs unless told otherwise: the protocol a result names by its version.
VERSIONS: dict[str, dict[str, Any]] = {
    "standard": {"stages": list(STAGES), "n_iter": 100, "n_target_classes": 9, "target_ranking": "logit",
                 "fab_iter": 100, "fab_target_classes": 9, "n_queries": 5000},
    "fast": {"stages": ["apgd-ce", "apgd-t", "fab-t"], "n_iter": 100, "n_target_classes": 5,
             "target_ranking": "malt", "fab_iter": 100, "fab_target_classes": 1, "n_queries": 5000},
}
# The preset that runs each engine, for the standard attack and the adaptive one (adaptive smoothing).
ENGINE_PRESETS: dict[str, dict[str, str]] = {
    "standard": {"reference": "autoattack", "rk": "autoattack-rk", "fast": "autoattack-fast"},
    "adaptive": {"reference": "autoattack-adaptive", "rk": "autoattack-rk-adaptive",
                 "fast": "autoattack-fast-adaptive"},
}
# Every stage reduced to a couple of iterations: what the registry tests run.
SMOKE = {"n_iter": 2, "n_target_classes": 1, "fab_iter": 2, "fab_target_classes": 1, "n_queries": 5}


@register_attack("autoattack-rk", smoke=SMOKE,
                 description="AutoAttack on robustkit's own engine: per-example randomness, early exit "
                             "(standard protocol, or the fast screening version)")
class EngineAutoAttack(Attack):
    """AutoAttack's standard protocol (or the ``fast`` screening version) on robustkit's engine.

    Args:
        threat: Linf or L2 ball.
        version: ``standard`` or ``fast``; sets the defaults of every argument below.
        w: weight of the adaptive term on an adaptive-smoothing mixer (0: the plain attack).
        stages: a subset of apgd-ce, apgd-t, fab-t, square, in that order.
        n_iter: APGD iterations per run (APGD-CE and each APGD-T target).
        n_target_classes: APGD-T's targets per example (at most classes - 1).
        target_ranking: ``logit`` (the reference: highest clean logits) or ``malt``.
        fab_iter: FAB-T iterations per target.
        fab_target_classes: FAB-T's targets per example, by clean logit (at most classes - 1).
        n_queries: Square's queries after the first.
    """

    name = "autoattack-rk"
    batch_invariant = True

    def __init__(self, threat: ThreatModel, *, version: str = "standard", w: float = 0.0,
                 stages: list[str] | None = None, n_iter: int | None = None,
                 n_target_classes: int | None = None, target_ranking: str | None = None,
                 fab_iter: int | None = None, fab_target_classes: int | None = None,
                 n_queries: int | None = None) -> None:
        super().__init__(threat)
        if threat.norm not in ("Linf", "L2"):
            raise ConfigError(f"autoattack-rk supports the Linf and L2 threat models, got {threat.norm}")
        if version not in VERSIONS:
            raise ConfigError(f"unknown autoattack-rk version {version!r}; use {' or '.join(VERSIONS)}")
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"autoattack-rk: w must be a finite number >= 0, got {w!r}")
        given = {"stages": stages, "n_iter": n_iter, "n_target_classes": n_target_classes,
                 "target_ranking": target_ranking, "fab_iter": fab_iter, "fab_target_classes": fab_target_classes,
                 "n_queries": n_queries}
        p = {k: (v if v is not None else VERSIONS[version][k]) for k, v in given.items()}
        self.version, self.w = version, float(w)
        self._stages = _check_stages(p["stages"])
        self.n_iter = _positive("n_iter", p["n_iter"])
        self.n_target_classes = _positive("n_target_classes", p["n_target_classes"])
        self.fab_iter = _positive("fab_iter", p["fab_iter"])
        self.fab_target_classes = _positive("fab_target_classes", p["fab_target_classes"])
        if p["target_ranking"] not in RANKINGS:
            raise ConfigError(f"target_ranking must be one of {', '.join(RANKINGS)}, got {p['target_ranking']!r}")
        self.target_ranking = str(p["target_ranking"])
        self.n_queries = check_square_params(p["n_queries"], 0.8, "margin")[0]

    @property
    def engine(self) -> str:
        """``rk`` when this is AutoAttack's standard protocol on our engine, ``fast`` for the screening
        version as shipped, ``custom`` for anything else (what leaderboard and regress key on)."""
        mine = {"stages": self._stages, "n_iter": self.n_iter, "n_target_classes": self.n_target_classes,
                "target_ranking": self.target_ranking, "fab_iter": self.fab_iter,
                "fab_target_classes": self.fab_target_classes, "n_queries": self.n_queries}
        for label, version in (("rk", "standard"), ("fast", "fast")):
            if self.version == version and mine == VERSIONS[version]:
                return label
        return "custom"

    def stages(self) -> list[str]:
        return list(self._stages)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "version": self.version, "w": self.w, "stages": self.stages(),
                "n_iter": self.n_iter, "n_target_classes": self.n_target_classes,
                "target_ranking": self.target_ranking, "fab_iter": self.fab_iter,
                "fab_target_classes": self.fab_target_classes, "n_queries": self.n_queries,
                "implementation": f"robustkit engine {engine.ENGINE_VERSION}"}

    def check_model(self, model: nn.Module) -> None:
        """Called by the CLI before data loads, so a model without a mixer fails at once when w > 0."""
        if self.w > 0:
            require_gamma(model, self.name)

    def prepare(self, model: nn.Module, device: torch.device, *, seed: int = 0) -> None:
        self.check_model(model)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, stage: str, seed: int,
                example_seeds: torch.Tensor | None = None) -> torch.Tensor:
        """One stage on one batch; each example draws only from its ``example_seeds`` entry (derived
        from ``seed`` and its position in the batch when called without them)."""
        if stage not in self._stages:
            raise ValueError(f"{self.name} has the stages {self._stages}, got {stage!r}")
        seeds = example_seeds if example_seeds is not None else rng.derive_seeds(seed, x.shape[0])
        seeds = seeds.to(x.device)
        with lean_model(model, x.detach()) as x:  # faster on a CPU, the same function
            if stage == "apgd-ce":
                x_adv = apgd(model, x, y, norm=self.norm, eps=self.eps, seeds=seeds, loss="ce", n_iter=self.n_iter,
                             gamma_weight=self.w)[0]
            elif stage == "square":
                run = square_linf if self.norm == "Linf" else square_l2
                x_adv = run(model, x, y, eps=self.eps, seeds=seeds, n_queries=self.n_queries)[0]
            else:
                x_adv = self._targeted(model, x, y, seeds, stage)
        return x_adv.contiguous()

    def _targeted(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor,
                  stage: str) -> torch.Tensor:
        """APGD-T or FAB-T over the targets in rank order; an example broken by one target is not
        attacked with the next (the reference's survivor loop, per example)."""
        if stage == "apgd-t":
            targets = self._targets(model, x, y, self.n_target_classes, ranking=self.target_ranking)
        else:
            targets = self._targets(model, x, y, self.fab_target_classes, ranking="logit")
        x_adv = x.clone()
        alive = torch.arange(x.shape[0], device=x.device)
        for k in range(targets.shape[1]):
            if alive.numel() == 0:
                break
            xs, ys, ts = x[alive], y[alive], targets[alive, k]
            if stage == "apgd-t":
                adv, _ = apgd(model, xs, ys, norm=self.norm, eps=self.eps, seeds=seeds[alive], loss="dlr-targeted",
                              target=ts, n_iter=self.n_iter, gamma_weight=self.w, stream=k)
                with torch.no_grad():
                    broken = model(adv).argmax(dim=1) != ys
            else:
                adv, broken, _ = fab_targeted(model, xs, ys, ts, norm=self.norm, eps=self.eps, n_iter=self.fab_iter)
            x_adv[alive[broken]] = adv[broken]
            alive = alive[~broken]
        return x_adv

    def _targets(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, *,
                 ranking: str) -> torch.Tensor:
        """``[n, k]`` target classes, best first (at most classes - 1 of them)."""
        with torch.no_grad():
            logits = model(x)
        k = min(k, logits.shape[1] - 1)
        if ranking == "logit":
            return apgd_targets(logits, k)
        return malt_targets(model, x, y, k, norm=self.norm, n_candidates=logits.shape[1] - 1)


def malt_targets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, *, norm: str,
                 n_candidates: int) -> torch.Tensor:
    """The ``k`` classes a linearisation of the logits puts nearest (MALT's ranking), nearest first.

    For each of the ``n_candidates`` classes of highest clean logit, the distance to its decision
    boundary under a first-order model is ``(z_y - z_t) / ||grad_x (z_y - z_t)||_*`` (dual norm of the
    threat: L1 for Linf, L2 for L2). One forward and ``n_candidates`` input-gradient backward passes.
    """
    rows = torch.arange(x.shape[0], device=x.device)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        candidates = apgd_targets(logits.detach(), n_candidates)  # highest logits first, y excluded
        dist = torch.empty(candidates.shape, dtype=x.dtype, device=x.device)
        for j in range(candidates.shape[1]):
            gap = logits[rows, y] - logits[rows, candidates[:, j]]
            grad = torch.autograd.grad(gap.sum(), [xg], retain_graph=j + 1 < candidates.shape[1])[0].flatten(1)
            dual = grad.abs().sum(dim=1) if norm == "Linf" else grad.norm(dim=1)
            dist[:, j] = gap.detach() / (dual + 1e-12)
    # A stable sort keeps the logit order among equal distances (e.g. zero gradients).
    order = dist.argsort(dim=1, stable=True)[:, :k]
    return candidates.gather(1, order)


def _check_stages(stages: object) -> list[str]:
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        raise ConfigError(f"stages must be a non-empty list of {', '.join(STAGES)}, got {stages!r}")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ConfigError(f"unknown autoattack-rk stage(s) {bad}; choose from {', '.join(STAGES)}")
    if sorted(stages, key=STAGES.index) != stages or len(set(stages)) != len(stages):
        raise ConfigError(f"stages must be distinct and in the order {', '.join(STAGES)}, got {stages}")
    return list(stages)


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"autoattack-rk: {name} must be an integer >= 1, got {value!r}")
    return value

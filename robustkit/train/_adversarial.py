"""The one adversarial-training loop behind ``pgd_at``, ``trades``, ``fast_at`` and ``ltd``.

Every method is the same min-max recipe with different parts swapped in, so the parts live here once
and each trainer file only says which ones it takes (a :class:`Method`) plus its own config fields:

* **inner maximisation**: PGD with a random start (:func:`inner_max`, Madry et al. 2018) or one
  FGSM step from a uniform random start (:func:`fgsm_rs`, "fast AT", Wong, Rice & Kolter 2020), in
  Linf or L2, maximising cross-entropy (PGD-AT) or KL(p(x) || p(x')) (TRADES, Zhang et al. 2019);
* **framework** (:func:`framework_loss`): ``pgd_at`` trains on CE(f(x'), y); ``trades`` on
  CE(f(x), y) + beta * KL(f(x) || f(x'));
* **targets**: class indices or soft label distributions, interchangeably. LTD (Chen & Lee,
  :mod:`robustkit.train.ltd`) is "an existing framework with a teacher's soft labels as y", so it
  is a ``targets_fn`` passed to :func:`fit`, not a separate loop;
* **AWP** (:class:`AWP`, Wu, Xia & Wang 2020): an adversarial *weight* perturbation applied for the
  gradient step only.

:func:`fit` is the loop; :func:`load_data`, :func:`build_model` and :func:`fit_and_save` turn a
config into a measured checkpoint around it. The loop is device-agnostic and reproducible: one
local ``torch.Generator`` drives data order, augmentation and attack starts, so two runs with the
same seed give the same weights on the same machine without touching the global RNG.

Under ``torchrun`` the loop is data-parallel (:mod:`robustkit.train._ddp`): ``batch_size`` is the
global batch, every rank draws the whole batch's random numbers and trains on its share, so W
processes give one process's weights up to float rounding (exactly so without BatchNorm). A run
writing a checkpoint keeps a per-epoch resume state beside it; the same command continues a killed
run from its last finished epoch, with the weights an uninterrupted run gives.
"""

from __future__ import annotations

import copy
import inspect
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.core.checkpoint import Checkpoint, save_checkpoint
from robustkit.core.errors import ConfigError, close_matches_hint
from robustkit.core.modes import kept_modes, module_modes, restore_modes
from robustkit.core.provenance import training_run
from robustkit.core.threat import format_eps, parse_eps
from robustkit.distributed import Dist, current
from robustkit.train import _ddp
from robustkit.train._loop import (
    RunningStats,
    crop_flip,
    decay_groups,
    epoch_batches,
    find_resume,
    index_ranges,
    load_resume,
    resume_path,
    run_identity,
    save_resume,
    set_lr,
)
from robustkit.train.base import RunOptions

FRAMEWORKS = ("pgd_at", "trades")

# targets_fn(x_clean, x_adv, y) -> targets: what the outer loss trains towards (LTD's soft labels).
TargetsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Overrides that make any adversarial trainer run in seconds (the registry tests add dataset =
# "synthetic"): a 4-channel TinyCNN, 32 training images, one epoch of two batches.
SMOKE: dict[str, Any] = {"arch": "tiny_cnn", "arch_args": {"width": 4}, "n_train": 32, "n_test": 16, "epochs": 1,
                         "batch_size": 16, "val_pgd_n": 8}


# --------------------------------------------------------------------------------------------
# Config: the fields every adversarial trainer shares, and what a trainer fixes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdversarialConfig:
    """Model, data, optimisation and threat model: the fields pgd_at, trades, fast_at and ltd share.

    The defaults are a CPU-sized CIFAR-10 run of the 73k-parameter SmallCNN; the recipes in
    ``defenses/`` set the fields they rely on.
    """

    # Model: a registered architecture with a seeded random init, or `init`'s weights.
    arch: str = "small_cnn"  # `robustkit list models`
    # Constructor arguments, e.g. { width = 16 }; in_channels, num_classes, mean and std come from the
    # dataset unless given here.
    arch_args: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # start from this model id or checkpoint (arch must be its architecture)

    # Data: the first n_train training images in order; the test split is measured at the end.
    dataset: str = "cifar10"
    n_train: int | None = None  # None: all
    n_test: int | None = None  # test images of the final clean + PGD-10 measurement (None: all)
    # Hold out the last N training images as the logged val set (tuning without the test split);
    # 0: log the test split. Logging only: nothing is selected on it.
    holdout: int = 0
    val_pgd_n: int = 256  # logged val images per epoch (clean and PGD-10); 0 = all

    # Optimisation: SGD, the learning rate set every step.
    epochs: int = 15
    batch_size: int = 128
    lr_max: float = 0.1  # peak (onecycle) or initial (piecewise) learning rate
    # onecycle: linear 0 -> lr_max over the first lr_peak_frac of the steps, then linear to 0 (Wong et
    # al.'s fast-AT schedule: good accuracy in few epochs); piecewise: x0.1 after each milestone.
    schedule: Literal["onecycle", "piecewise"] = "onecycle"
    lr_peak_frac: float = 0.3
    milestones: tuple[int, ...] | None = None  # epochs; None: 1/2 and 3/4 of them (TRADES-AWP's 100, 150 of 200)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # conv/linear weights only: decaying BN scales and biases just fights BN
    crop_pad: int = 4  # random crop from this reflect padding (0: none)
    flip: bool = True  # random horizontal flips; off for digits, whose mirror images are not digits
    seed: int = 0  # init, data order, augmentation and attack starts

    # Threat model of training and of the final measurement.
    norm: Literal["Linf", "L2"] = "Linf"
    eps: str | float = "8/255"  # a number or a fraction like 8/255
    # Step size; "auto": 2.5 * eps / steps for PGD (Madry et al.'s rule: 2.5 eps of travel, so the
    # random start can be walked back across the ball) and 1.25 * eps for one FGSM step (Wong et al.:
    # larger steps overfit catastrophically).
    alpha: str | float = "auto"
    eps_warmup: int = 0  # ramp eps (and alpha) linearly over this many epochs; 0 = full eps at once

    # AWP (Wu, Xia & Wang 2020): the gradient is taken at weights perturbed by awp_gamma of each layer's
    # norm, from epoch awp_warmup (0-based) on. Counters robust overfitting of large models on long
    # schedules; costs one more forward/backward per batch.
    awp: bool = False
    awp_gamma: float = 5e-3
    awp_warmup: int = 0

    # Under torchrun: BatchNorm statistics of the whole global batch (SyncBatchNorm, CUDA only) instead
    # of each process's share of it. Ignored by a single process.
    sync_bn: bool = False

    def __post_init__(self) -> None:
        parse_eps_field("eps", self.eps)
        if self.alpha != "auto":
            parse_eps_field("alpha", self.alpha)
        for name, low in (("epochs", 1), ("batch_size", 1), ("holdout", 0), ("val_pgd_n", 0),
                          ("crop_pad", 0), ("eps_warmup", 0), ("awp_warmup", 0), ("n_train", 1),
                          ("n_test", 1)):
            at_least(self, name, low)
        if not 0 < self.lr_peak_frac < 1:
            raise ConfigError(f"lr_peak_frac = {self.lr_peak_frac}: must be in (0, 1)")
        if self.awp_gamma < 0:
            raise ConfigError(f"awp_gamma = {self.awp_gamma}: must be >= 0")

    @property
    def eps_value(self) -> float:
        return parse_eps(self.eps)

    def alpha_value(self, method: Method) -> float:
        """The step size: ``alpha``, or the rule of ``method``'s inner maximisation when "auto"."""
        if self.alpha != "auto":
            return parse_eps(self.alpha)
        return 1.25 * self.eps_value if method.inner == "fgsm-rs" else 2.5 * self.eps_value / max(method.steps, 1)


def parse_eps_field(name: str, value: str | float) -> float:
    """``value`` as an eps (8/255, 0.5), or a one-line error naming the field."""
    try:
        return parse_eps(value)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def at_least(config: Any, name: str, low: int) -> None:
    """A one-line error unless ``config.name`` (when set) is at least ``low``."""
    value = getattr(config, name)
    if value is not None and value < low:
        raise ConfigError(f"{name} = {value}: must be >= {low}")


@dataclass(frozen=True)
class Method:
    """What a trainer fixes about the min-max problem; its config holds everything else."""

    framework: Literal["pgd_at", "trades"]
    inner: Literal["pgd", "fgsm-rs"] = "pgd"
    steps: int = 10  # PGD steps (fgsm-rs: one)
    beta: float = 6.0  # trades: weight of KL(f(x) || f(x'))
    # BatchNorm during the inner maximisation: "eval" (running statistics; the attack neither depends
    # on nor updates batch statistics, standard practice) or "train" (batch statistics, running
    # statistics updated by the attack's forward pass too).
    attack_bn: Literal["eval", "train"] = "eval"

    @property
    def start(self) -> str:
        # TRADES starts at x + 0.001 N(0, 1); PGD-AT and FGSM-RS uniformly in the ball.
        return "trades" if self.framework == "trades" and self.inner == "pgd" else "uniform"


# --------------------------------------------------------------------------------------------
# Losses: one code path for class indices and soft labels
# --------------------------------------------------------------------------------------------


def batch_mean(per_example: torch.Tensor, mean_over: int | None = None) -> torch.Tensor:
    """The mean of ``per_example``, or its sum divided by ``mean_over``: a data-parallel rank
    attacking its share of a global batch of ``mean_over`` then gets, bit for bit, the input
    gradients one process gets from the global batch's mean (both backward passes hand each example
    ``1 / mean_over``; a mean over the share would hand it ``1 / share``, and TRADES' KL gradients
    near x' = x are small enough for that rounding to flip signs)."""
    return per_example.mean() if mean_over is None else per_example.sum() / mean_over


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mean_over: int | None = None) -> torch.Tensor:
    """Batch mean of ``-sum_k p_k log q_k`` with ``q = softmax(logits)`` (``mean_over``: :func:`batch_mean`).

    ``targets`` are class indices (int, shape N) or distributions (float, N x K). Indices become
    one-hot rows and go through the *same* arithmetic, so one-hot soft labels give bit-identical
    losses and gradients: LTD with one-hot labels is exactly PGD-AT / TRADES, not approximately.
    """
    log_q = F.log_softmax(logits, dim=1)
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        p = F.one_hot(targets.long(), logits.shape[1]).to(log_q.dtype)
    else:
        p = targets.to(log_q.dtype)
    # where(): a zero-probability class must add 0, not 0 * (-inf) = nan, when a logit saturates.
    return batch_mean(-torch.where(p > 0, p * log_q, torch.zeros_like(log_q)).sum(1), mean_over)


def kl_div(logits_p: torch.Tensor, logits_q: torch.Tensor, mean_over: int | None = None) -> torch.Tensor:
    """Batch mean of KL(softmax(logits_p) || softmax(logits_q)), TRADES' robustness term
    (``mean_over``: :func:`batch_mean`).

    Written out in log space (not ``F.kl_div``) so the direction is unambiguous: p is the clean
    prediction, q the adversarial one; gradients flow into both unless the caller detaches p.
    """
    log_p = F.log_softmax(logits_p, dim=1)
    log_q = F.log_softmax(logits_q, dim=1)
    return batch_mean((log_p.exp() * (log_p - log_q)).sum(1), mean_over)


def framework_loss(model: nn.Module, framework: str, x: torch.Tensor, x_adv: torch.Tensor,
                   targets: torch.Tensor, beta: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The outer (training) loss of ``framework`` and the logits on ``x_adv`` (for train accuracy).

    ``pgd_at``: CE(f(x'), targets). ``trades``: CE(f(x), targets) + beta * KL(f(x) || f(x')), with
    two separate forward passes (as in the TRADES code: BatchNorm sees clean and adversarial
    batches separately).
    """
    if framework == "pgd_at":
        out_adv = model(x_adv)
        return soft_cross_entropy(out_adv, targets), out_adv
    if framework == "trades":
        out_clean, out_adv = model(x), model(x_adv)
        return soft_cross_entropy(out_clean, targets) + beta * kl_div(out_clean, out_adv), out_adv
    raise ConfigError(f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}")


# --------------------------------------------------------------------------------------------
# Inner maximisation
# --------------------------------------------------------------------------------------------


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def _project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project onto the eps-ball around ``x``, then onto the image box [0, 1].

    Clipping to [0, 1] after the ball only moves coordinates towards ``x``, so the result stays
    inside both sets (for L2 too: each |delta_i| shrinks).
    """
    if norm == "Linf":
        x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
    else:
        delta = x_adv - x
        x_adv = x + delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return x_adv.clamp(0.0, 1.0)


def _ascent(g: torch.Tensor, norm: str, alpha: float) -> torch.Tensor:
    """A step of size ``alpha`` up the gradient: ``alpha * sign(g)`` (Linf), ``alpha * g / ||g||`` (L2)."""
    return alpha * g.sign() if norm == "Linf" else alpha * g / _flat_norm(g).clamp_min(1e-12)


def random_start(x: torch.Tensor, norm: str, eps: float, start: str = "uniform",
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """Starting point of the inner maximisation, inside the eps-ball and [0, 1].

    ``uniform``: uniform in the Linf ball, or uniform in the L2 ball (Gaussian direction, radius
    eps * U^(1/d)). ``trades``: x + 0.001 * N(0, 1), TRADES' start (a tiny offset so the KL
    gradient is not exactly zero at x' = x). ``none``: x itself.
    """
    if start == "none":
        return x.clone()
    if start == "trades":
        noise = 0.001 * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    elif start == "uniform" and norm == "Linf":
        noise = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    elif start == "uniform":
        direction = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        direction = direction / _flat_norm(direction).clamp_min(1e-12)
        u = torch.rand((len(x),) + (1,) * (x.ndim - 1), generator=gen, device=x.device, dtype=x.dtype)
        noise = direction * eps * u.pow(1.0 / x[0].numel())
    else:
        raise ConfigError(f"unknown random start {start!r}; choose uniform, trades or none")
    return _project(x + noise, x, norm, eps)


@contextmanager
def attack_mode(model: nn.Module, bn: str = "eval") -> Iterator[None]:
    """The model in the attack's BatchNorm mode (see :attr:`Method.attack_bn`); its mode is restored."""
    if bn not in ("eval", "train"):
        raise ConfigError(f"unknown attack_bn {bn!r}; choose eval or train")
    with kept_modes(model, bn == "train"):  # every submodule's own mode back, a frozen BN included
        yield


def inner_max(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, objective: str = "ce", norm: str = "Linf",
              eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, start: str = "uniform",
              gen: torch.Generator | None = None, bn: str = "eval", x_init: torch.Tensor | None = None,
              mean_over: int | None = None) -> torch.Tensor:
    """PGD: adversarial inputs in the ``norm`` eps-ball around ``x`` and in [0, 1] (detached).

    ``objective="ce"`` maximises CE(f(x'), y) (``y``: indices or distributions); ``"kl"`` maximises
    KL(f(x) || f(x')) (TRADES; ``y`` unused). Each step (see :func:`_ascent`) is followed by the
    projection. BatchNorm runs in mode ``bn`` (:func:`attack_mode`). Gradients are taken w.r.t. the
    input only (``torch.autograd.grad``), so the parameters' ``.grad`` are untouched. ``x_init``: the
    random start, drawn by the caller (a data-parallel rank draws the whole global batch's starts and
    passes its share); None draws ``start`` from ``gen`` here. ``mean_over``: the global batch size
    of such a share (:func:`batch_mean`).
    """
    if objective not in ("ce", "kl"):
        raise ConfigError(f"unknown inner objective {objective!r}; choose ce or kl")
    if eps == 0 or steps == 0:
        return x.detach().clone()
    x = x.detach()
    with attack_mode(model, bn):
        clean_logits = None
        if objective == "kl":
            with torch.no_grad():
                clean_logits = model(x)
        x_adv = random_start(x, norm, eps, start, gen) if x_init is None else x_init.detach().clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            out = model(x_adv)
            loss = (soft_cross_entropy(out, y, mean_over) if clean_logits is None
                    else kl_div(clean_logits, out, mean_over))
            (g,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = _project(x_adv + _ascent(g, norm, alpha), x, norm, eps)
    return x_adv.detach()


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = "Linf", eps: float = 8 / 255,
            alpha: float = 10 / 255, gen: torch.Generator | None = None, bn: str = "eval",
            x_init: torch.Tensor | None = None, mean_over: int | None = None) -> torch.Tensor:
    """Fast AT's attack (Wong, Rice & Kolter 2020): one step up CE(f(x + delta), y) from a uniform
    random start delta in the eps-ball; the random start is what makes a single step work.
    ``x_init``, ``mean_over``: the start drawn by the caller and the global batch size, as in :func:`inner_max`.

    Written in delta space as their code is (start clipped to the image box, step clipped to the
    ball, x + delta clipped to the box), which is the arithmetic the shipped
    ``small_cnn.cifar10_partial`` was trained with: its recipe reproduces it bit for bit.
    """
    if eps == 0:
        return x.detach().clone()
    x = x.detach()
    with attack_mode(model, bn):
        start = random_start(x, norm, eps, "uniform", gen) if x_init is None else x_init.detach()
        delta = (start - x).requires_grad_(True)
        (g,) = torch.autograd.grad(soft_cross_entropy(model(x + delta), y, mean_over), delta)
    with torch.no_grad():
        delta = delta.detach() + _ascent(g, norm, alpha)
        if norm == "Linf":
            delta = delta.clamp(-eps, eps)
        else:
            delta = delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# AWP: adversarial weight perturbation
# --------------------------------------------------------------------------------------------


class AWP:
    """Adversarial weight perturbation (Wu, Xia & Wang, NeurIPS 2020), one ascent step per batch.

    For each conv/linear weight W (ndim > 1; BN and biases are left alone, as in the paper's
    code) the perturbation is ``v = gamma * ||W|| * g / ||g||`` with g the gradient of the
    framework's adversarial loss: a step *up* the loss whose size is relative to each layer's
    norm. The training gradient is then taken at W + v, which flattens the robust loss landscape
    in weight space (a remedy for robust overfitting).

    The gradient is computed on a *proxy* copy so the model's BatchNorm running statistics are not
    updated by the extra forward pass. The originals are stored and copied back by
    :meth:`restore`, so perturb + restore round-trips bit-exactly (adding and subtracting v would
    not). Use it around forward + backward, *before* ``optimizer.step()``, so the update lands on
    the original weights::

        with awp.perturbed(loss_fn):
            loss = loss_fn(model); loss.backward()
        optimizer.step()
    """

    def __init__(self, model: nn.Module, gamma: float = 5e-3,
                 reduce: Callable[[Sequence[torch.Tensor]], None] | None = None) -> None:
        if gamma < 0:
            raise ConfigError(f"AWP gamma must be >= 0, got {gamma}")
        self.model = model
        self.gamma = gamma
        self.proxy = copy.deepcopy(model)
        # Data-parallel: sums the ranks' (weighted) gradients in place, so every rank perturbs by the
        # global batch's gradient, as one process would.
        self.reduce = reduce
        self._saved: list[tuple[nn.Parameter, torch.Tensor]] = []

    @staticmethod
    def _weights(model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.ndim > 1]

    def perturb(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        """Add the perturbation maximising ``loss_fn(model)`` to the model's weights."""
        if self._saved:
            raise RuntimeError("AWP.perturb called twice without restore()")
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train(self.model.training)
        grads = torch.autograd.grad(loss_fn(self.proxy), self._weights(self.proxy))
        if self.reduce is not None:
            self.reduce(grads)
        with torch.no_grad():
            for w, g in zip(self._weights(self.model), grads, strict=True):
                self._saved.append((w, w.detach().clone()))
                w.add_(g * (self.gamma * w.norm() / (g.norm() + 1e-20)))

    def restore(self) -> None:
        """Copy the stored original weights back (exactly)."""
        with torch.no_grad():
            for w, original in self._saved:
                w.copy_(original)
        self._saved.clear()

    @contextmanager
    def perturbed(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> Iterator[None]:
        """Weights perturbed inside the block, restored on exit (also on error)."""
        self.perturb(loss_fn)
        try:
            yield
        finally:
            self.restore()


# --------------------------------------------------------------------------------------------
# Measurement (logging and final metrics)
# --------------------------------------------------------------------------------------------


def evaluate_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = "Linf", eps: float = 8 / 255,
                 steps: int = 10, alpha: float | None = None, batch_size: int = 500, seed: int = 0,
                 device: str | torch.device | None = None) -> dict[str, float]:
    """Clean and PGD-``steps`` (CE, random start, alpha 2.5 * eps / steps) accuracy in eval mode.

    An example counts as robust only if the clean *and* the adversarial prediction are right. A
    fixed seed makes successive epochs' numbers comparable. This is a training log, not a
    robustness claim: claims come from ``robustkit eval`` (AutoAttack).
    """
    modes = module_modes(model)
    model.eval()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    alpha = 2.5 * eps / max(steps, 1) if alpha is None else alpha
    clean = robust = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
        x_adv = inner_max(model, xb, yb, norm=norm, eps=eps, alpha=alpha, steps=steps, gen=gen)
        with torch.no_grad():
            ok = model(xb).argmax(1) == yb
            clean += int(ok.sum())
            robust += int((ok & (model(x_adv).argmax(1) == yb)).sum())
    restore_modes(modes)
    n = max(len(x), 1)
    return {"clean_acc": clean / n, "pgd_acc": robust / n}


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def lr_schedule(schedule: str, lr_max: float, epochs: int, steps_per_epoch: int, lr_peak_frac: float = 0.3,
                milestones: Sequence[int] | None = None) -> Callable[[int], float]:
    """Learning rate as a function of the global step (see :attr:`AdversarialConfig.schedule`)."""
    total = epochs * steps_per_epoch
    if schedule == "onecycle":

        def onecycle(step: int) -> float:
            t = step / total
            if t < lr_peak_frac:
                return lr_max * t / lr_peak_frac
            return lr_max * (1 - t) / (1 - lr_peak_frac)

        return onecycle
    if schedule == "piecewise":
        marks = sorted(default_milestones(epochs) if milestones is None else milestones)

        def piecewise(step: int) -> float:
            done = step // steps_per_epoch  # completed epochs
            return lr_max * 0.1 ** sum(done >= m for m in marks)

        return piecewise
    raise ConfigError(f"unknown schedule {schedule!r}; choose onecycle or piecewise")


def default_milestones(epochs: int) -> list[int]:
    """x0.1 after 1/2 and 3/4 of the epochs (100 and 150 of TRADES-AWP's 200)."""
    return [epochs // 2, (3 * epochs) // 4]


def draw_start(x: torch.Tensor, norm: str, eps: float, method: Method, gen: torch.Generator) -> torch.Tensor | None:
    """The random starts of ``method``'s inner maximisation for a whole (global) batch, drawn from
    ``gen`` exactly when and as :func:`inner_max` / :func:`fgsm_rs` would draw them (None: they
    draw nothing). Every rank draws them all and attacks from its share of them."""
    if eps == 0 or (method.inner == "pgd" and method.steps == 0):
        return None
    return random_start(x.detach(), norm, eps, method.start, gen)


def _train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *, norm: str,
                eps: float, alpha: float, method: Method, gen: torch.Generator, targets_fn: TargetsFn | None,
                awp: AWP | None, job: Dist | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One global batch: draw its attack starts, attack this rank's share, take the framework's loss
    (at AWP-perturbed weights), step. Returns the share's mean loss, its logits on the adversarial
    inputs and its labels. ``net`` is the model, or its DDP wrapper in a job."""
    model = _ddp.unwrap(net)  # attacks need input gradients only: nothing to reduce across ranks
    start = draw_start(x, norm, eps, method, gen)
    part = _ddp.share(len(x), job)
    weight = _ddp.loss_weight(len(x[part]), len(x), job)
    mean_over = None if job is None else len(x)
    x, y, x_init = x[part], y[part], None if start is None else start[part]
    if method.inner == "fgsm-rs":
        x_adv = fgsm_rs(model, x, y, norm=norm, eps=eps, alpha=alpha, gen=gen, bn=method.attack_bn, x_init=x_init,
                        mean_over=mean_over)
    else:
        x_adv = inner_max(model, x, y, objective="kl" if method.framework == "trades" else "ce", norm=norm,
                          eps=eps, alpha=alpha, steps=method.steps, start=method.start, gen=gen,
                          bn=method.attack_bn, x_init=x_init, mean_over=mean_over)
    # The inner maximisation attacks the true labels (or TRADES' clean prediction); soft targets
    # replace the labels in the outer loss only.
    targets = y if targets_fn is None else targets_fn(x, x_adv, y)

    def loss_fn(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return framework_loss(m, method.framework, x, x_adv, targets, method.beta)

    def weighted(loss: torch.Tensor) -> torch.Tensor:  # the share's part of the global batch mean
        return loss if job is None else loss * weight

    opt.zero_grad(set_to_none=True)
    if awp is None:
        loss, out = loss_fn(net)
        weighted(loss).backward()
    else:
        # Gradient at the perturbed weights, step from the restored (original) ones.
        with awp.perturbed(lambda m: weighted(loss_fn(m)[0])):
            loss, out = loss_fn(net)
            weighted(loss).backward()
    opt.step()
    return loss.detach(), out.detach(), y


def _validate(model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, config: AdversarialConfig,
              device: torch.device) -> dict[str, float]:
    """The epoch's log on the val images: clean and PGD-10 accuracy at the run's full eps."""
    t0 = time.perf_counter()
    k = len(x_val) if not config.val_pgd_n else min(config.val_pgd_n, len(x_val))
    val = evaluate_pgd(model, x_val[:k], y_val[:k], norm=config.norm, eps=config.eps_value, steps=10, device=device)
    return {"val_n": k, "val_clean_acc": val["clean_acc"], "val_pgd10_acc": val["pgd_acc"],
            "val_seconds": time.perf_counter() - t0}


def fit(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, config: AdversarialConfig, method: Method,
        *, val: tuple[torch.Tensor, torch.Tensor] | None = None, targets_fn: TargetsFn | None = None,
        device: str | torch.device = "cpu", progress: bool = True, log_lines: bool = True,
        resume: Path | None = None) -> list[dict[str, float]]:
    """Adversarially train ``model`` in place; return per-epoch logs (``progress``: a bar; ``log_lines``: a
    line per epoch on stderr, also without the bar).

    ``x_*``: float32 NCHW in [0, 1], ``y_*``: int64 labels, on any device (batches move to
    ``device``). ``targets_fn(x, x_adv, y)``, if given, replaces the labels in the *outer* loss only
    (LTD's soft labels). ``val`` is only *logged* each epoch: nothing is selected on it.
    ``resume``: a file for the state at the end of each epoch but the last; when it holds this
    run's state, training continues after its epoch. In a ``torchrun`` job the model trains in
    DistributedDataParallel on each rank's share of every global batch (:mod:`robustkit.train._ddp`)
    and rank 0 alone logs, validates and writes ``resume``.
    """
    from tqdm.auto import tqdm

    dev = torch.device(device)
    job = current()
    main = job is None or job.is_main
    _ddp.check_shares(len(x_train), config.batch_size, job)
    # One local generator drives data order, augmentation and attack starts: reproducible runs
    # without touching the global RNG (the model's init is seeded by whoever builds it).
    gen = torch.Generator(device=dev).manual_seed(config.seed)
    model.to(dev).train()
    net = _ddp.wrap(model, dev, job, config.sync_bn)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    lr_at = lr_schedule(config.schedule, config.lr_max, config.epochs, steps_per_epoch, config.lr_peak_frac,
                        config.milestones)
    opt = torch.optim.SGD(decay_groups(model.parameters(), config.weight_decay), lr=0.0,
                          momentum=config.momentum, nesterov=config.nesterov)
    reduce = None if job is None else partial(_ddp.all_reduce_sum_, job=job)
    weight_adversary = AWP(model, config.awp_gamma, reduce) if config.awp else None
    eps, alpha = config.eps_value, config.alpha_value(method)
    identity = run_identity(config, dev, method=asdict(method), n_train=len(x_train))
    found = find_resume(resume, identity, job, epochs=config.epochs, speak=log_lines and main)
    first, logs = 0, []
    if found is not None:
        load_resume(*found, model, opt, gen)
        first, logs = int(found[1]["epochs_done"]), list(found[1]["logs"])
    step = first * steps_per_epoch
    bar = tqdm(total=config.epochs * steps_per_epoch, initial=step, disable=not (progress and main), unit="batch",
               dynamic_ncols=True)
    for epoch in range(first, config.epochs):
        t0 = time.perf_counter()
        ramp = min(1.0, (epoch + 1) / config.eps_warmup) if config.eps_warmup else 1.0
        awp = weight_adversary if epoch >= config.awp_warmup else None
        stats = RunningStats()
        bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
        for idx in epoch_batches(len(x_train), config.batch_size, gen):
            x = crop_flip(x_train[idx].to(dev), config.crop_pad, gen, flip=config.flip)  # the global batch's draws
            y = y_train[idx].to(dev)
            set_lr(opt, lr_at(step))
            loss, out, y_part = _train_step(net, opt, x, y, norm=config.norm, eps=eps * ramp, alpha=alpha * ramp,
                                            method=method, gen=gen, targets_fn=targets_fn, awp=awp, job=job)
            step += 1
            stats.add(loss, out, y_part)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.3f}", adv_acc=f"{stats.acc:.3f}")
        if job is not None:  # the epoch's statistics over the global batches, not rank 0's shares
            stats.loss_sum, stats.correct, stats.seen = _ddp.sum_over_ranks(
                [stats.loss_sum, stats.correct, stats.seen], job)
        log: dict[str, float] = {"epoch": epoch + 1, "eps": eps * ramp, "lr_end": lr_at(step - 1),
                                 "awp": float(awp is not None), "train_loss": stats.loss,
                                 # on the training batches' own adversarial inputs
                                 "train_adv_acc": stats.acc, "seconds": time.perf_counter() - t0}
        if epoch == first and first:
            log["resumed_from_epoch"] = first
        if main and val is not None and len(val[0]):
            log.update(_validate(model, *val, config, dev))
        if log_lines and main:
            tqdm.write(_epoch_line(log, config.epochs), file=sys.stderr)
        logs.append(log)
        if resume is not None and epoch + 1 < config.epochs:
            state = identity | {"epochs_done": epoch + 1, "logs": logs}
            _ddp.on_main(job, partial(save_resume, resume, model, opt, gen, state))
    bar.close()
    del net
    _ddp.collect(job)
    model.eval()
    return logs


def _epoch_line(log: dict[str, float], epochs: int) -> str:
    line = (f"epoch {log['epoch']:3d}/{epochs}  eps {log['eps'] * 255:5.2f}/255  loss {log['train_loss']:.4f}"
            f"  train_adv_acc {log['train_adv_acc']:.4f}")
    if "val_n" in log:
        line += f"  val(n={log['val_n']}) clean {log['val_clean_acc']:.4f} pgd10 {log['val_pgd10_acc']:.4f}"
    return line + f"  {log['seconds']:.1f}s"


# --------------------------------------------------------------------------------------------
# From a config to a measured checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """A run's images: training, logged val (a train holdout or the test split) and test."""

    info: Any  # robustkit.data.DatasetInfo
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    record: dict[str, Any]  # what the checkpoint's training block says about the data


def load_data(config: AdversarialConfig, run: RunOptions) -> Data:
    """The first ``n_train`` training images in order (minus the holdout) and the test split."""
    from robustkit.data import dataset_info, load_split

    info = dataset_info(config.dataset)
    train_split = load_split(config.dataset, "train", data_dir=run.data_dir, download=run.download)
    test_split = load_split(config.dataset, "test", data_dir=run.data_dir, download=run.download)
    x_train, y_train = train_split.tensors(config.n_train)
    x_test, y_test = test_split.tensors(config.n_test)
    indices = [int(i) for i in train_split.indices][: len(x_train)]
    h = config.holdout
    if h:
        if not h < len(x_train):
            raise ConfigError(f"holdout = {h}: must be below the {len(x_train)} training images")
        x_val, y_val, x_train, y_train, indices = x_train[-h:], y_train[-h:], x_train[:-h], y_train[:-h], indices[:-h]
        logged = f"train[-{h}:] (held out; logged each epoch, no selection)"
    else:
        x_val, y_val = x_test, y_test
        logged = f"{config.dataset} test split, first {len(x_test)} (logged each epoch only; no selection)"
    record = {"dataset": config.dataset, "source": str(train_split.source), "n_train": len(x_train),
              "train_indices": index_ranges(indices), "holdout": h, "logged_val": logged,
              "test_source": str(test_split.source), "n_test": len(x_test)}
    return Data(info, x_train, y_train, x_val, y_val, x_test, y_test, record)


@dataclass(frozen=True)
class Built:
    """The model to train, the architecture and arguments its checkpoint records, and its init."""

    model: nn.Module
    architecture: str
    arch_args: dict[str, Any]
    init: dict[str, Any] | None  # the init model's id and sha256, or None for a seeded random init


def _dataset_args(arch: str, arch_args: dict[str, Any], info: Any) -> dict[str, Any]:
    """Give the architecture the dataset's channels, classes and normalisation when its
    constructor takes them and the config does not set them (so ``dataset = "mnist"`` just works)."""
    from robustkit.models.base import model_info

    params = inspect.signature(model_info(arch).builder).parameters
    fill = {"in_channels": int(info.shape[0]), "num_classes": int(info.num_classes),
            "mean": [float(m) for m in info.mean], "std": [float(s) for s in info.std]}
    out = {k: v for k, v in fill.items() if k in params and k not in arch_args} | dict(arch_args)
    for k in out:
        if k not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise ConfigError(f"arch_args: architecture {arch} has no argument {k!r}"
                              f"{close_matches_hint(k, params)}; it takes {', '.join(params)}")
    return out


def build_model(config: AdversarialConfig, info: Any, *, tau_s: float | None = None) -> Built:
    """A seeded random init of ``config.arch`` (filled in from the dataset), or ``config.init``'s
    weights; with ``tau_s`` (LTD) the base goes inside an ``LTDStudent`` of that temperature (an
    LTD checkpoint as init contributes its base and base weights, not its temperature)."""
    from robustkit.models import load_model

    if config.init:
        return _from_init(config, tau_s)
    arch_args = _dataset_args(config.arch, config.arch_args, info)
    name, kwargs = f"{config.arch}.init", arch_args
    if tau_s is not None:
        name, kwargs = "ltd.init", {"base": config.arch, "base_args": arch_args, "tau_s": tau_s}
    try:
        model = load_model(name, seed=config.seed, **kwargs).model
    except TypeError as e:
        raise ConfigError(f"cannot build {config.arch} with {arch_args}: {e}") from None
    return Built(model, name.removesuffix(".init"), kwargs, None)


def _from_init(config: AdversarialConfig, tau_s: float | None) -> Built:
    from robustkit.models import load_model
    from robustkit.models.ltd_student import LTDStudent

    loaded = load_model(config.init)  # type: ignore[arg-type]
    arch, args = loaded.metadata.get("architecture"), dict(loaded.metadata.get("arch_args") or {})
    source = loaded.model
    if tau_s is not None and arch == "ltd":  # keep its base and base weights, take this run's tau_s
        arch, args, source = args["base"], dict(args.get("base_args") or {}), loaded.model.base  # type: ignore[union-attr]
    # The config must say what is trained: init fixes the architecture, so arch has to name it.
    if arch != config.arch or config.arch_args:
        raise ConfigError(f"init {config.init} is a {arch}: set arch = {arch!r} and no arch_args "
                          f"(--set arch={arch} --set 'arch_args={{}}'); the init fixes the architecture")
    record = {"model": config.init, "architecture": arch, "checkpoint_sha256": loaded.checkpoint_sha256}
    if tau_s is None:
        return Built(loaded.model, arch, args, record)
    student = LTDStudent(arch, args, tau_s)
    student.base.load_state_dict(source.state_dict())
    return Built(student, "ltd", {"base": arch, "base_args": args, "tau_s": tau_s}, record)


def check_logits(model: nn.Module, what: str, x: torch.Tensor, num_classes: int) -> None:
    """A one-line error unless ``model`` maps the dataset's images to ``num_classes`` logits."""
    with torch.no_grad():
        out = model.eval()(x[:2])
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise ConfigError(f"{what} outputs shape {tuple(out.shape)} on this dataset's images; "
                          f"expected (N, {num_classes}) logits")


def say(run: RunOptions, message: str) -> None:
    """A log line on stderr (``--quiet`` silences it)."""
    if run.log:
        print(message, file=sys.stderr, flush=True)


def measure(model: nn.Module, data: Data, config: AdversarialConfig, device: torch.device) -> dict[str, Any]:
    """Clean and PGD-10 accuracy on the test images, as the checkpoint's ``metrics`` record them."""
    eps = config.eps_value
    res = evaluate_pgd(model, data.x_test, data.y_test, norm=config.norm, eps=eps, steps=10, device=device)
    tag = format_eps(eps).replace("/", "_").replace(".", "p")
    return {"split": "test", "n": len(data.x_test), "clean_acc": res["clean_acc"],
            f"pgd10_{config.norm.lower()}_{tag}_acc": res["pgd_acc"],
            "pgd": {"norm": config.norm, "eps": str(config.eps), "steps": 10, "alpha": format_eps(eps / 4),
                    "random_start": True, "seed": 0, "loss": "ce", "counted": "clean and adversarial correct"},
            "source": "robustkit.train._adversarial.measure (local PGD in eval mode; robustness claims use "
                      "robustkit eval)"}


def fit_and_save(trainer: str, config: AdversarialConfig, run: RunOptions, method: Method, data: Data, built: Built,
                 *, targets_fn: TargetsFn | None = None, extra: dict[str, Any] | None = None) -> Checkpoint:
    """Train ``built.model`` with ``method``, measure it on the test images, save the checkpoint
    with the resolved config and a training block (data, timings, per-epoch log, ``extra``).

    The run keeps its resume state beside the checkpoint (``OUT.resume.safetensors``) until the
    checkpoint is written. In a ``torchrun`` job rank 0 alone measures and writes; every rank
    returns its checkpoint."""
    job = current()
    check_logits(built.model, f"model {built.architecture}", data.x_train, data.info.num_classes)
    alpha = config.alpha_value(method)
    inner = "fgsm-rs" if method.inner == "fgsm-rs" else f"pgd-{method.steps}"
    say(run, f"robustkit train {trainer}: {built.architecture} ({sum(p.numel() for p in built.model.parameters()):,} "
             f"parameters); {len(data.x_train)} train / {len(data.x_val)} logged val images; {method.framework} + "
             f"{inner} {config.norm} eps {config.eps}, alpha {alpha * 255:.2f}/255{', AWP' if config.awp else ''}; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0, c0 = time.perf_counter(), time.process_time()
    resume = resume_path(run.stem)
    logs = fit(built.model, data.x_train, data.y_train, config, method, val=(data.x_val, data.y_val),
               targets_fn=targets_fn, device=run.device, progress=run.progress, log_lines=run.log, resume=resume)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    training = {**(extra or {}), "distributed": _ddp.describe(job, config.sync_bn), **training_run(run.device, wall, cpu),
                "epochs_log": logs}
    checkpoint = _ddp.on_main(job, lambda: _measure_and_save(trainer, config, run, method, data, built, training))
    if job is None or job.is_main:
        resume.unlink(missing_ok=True)  # the checkpoint is written: nothing left to resume
    return checkpoint


def _measure_and_save(trainer: str, config: AdversarialConfig, run: RunOptions, method: Method, data: Data,
                      built: Built, run_record: dict[str, Any]) -> Checkpoint:
    """The end of :func:`fit_and_save` (rank 0's alone in a job): test metrics, then the checkpoint
    whose training block ends with ``run_record`` (``extra``, processes, timings, per-epoch log)."""
    alpha = config.alpha_value(method)
    metrics = measure(built.model, data, config, run.device)
    robust = next(v for k, v in metrics.items() if k.startswith("pgd10_"))
    say(run, f"test (n={metrics['n']}): clean {metrics['clean_acc']:.4f}  PGD-10 {config.norm} {config.eps} "
             f"{robust:.4f}  training {run_record['wall_time_s']:.0f}s")
    training: dict[str, Any] = {
        # What the config implies, spelled out (the config itself is recorded beside this block).
        "framework": method.framework, "inner": method.inner, "steps": 1 if method.inner == "fgsm-rs" else method.steps,
        "eps_value": config.eps_value, "alpha_value": alpha, "attack_bn": method.attack_bn,
        "inner_start": {"trades": "x + 0.001*N(0,1) (TRADES)", "uniform": "uniform in the eps-ball"}[method.start],
        "inner_objective": "KL(p(x) || p(x'))" if method.framework == "trades" else "CE(true labels)",
        "init": built.init, "data": data.record, "seed": config.seed, **run_record,
    }
    base_args = built.arch_args.get("base_args", built.arch_args) if built.architecture == "ltd" else built.arch_args
    normalization = ({"mean": list(base_args["mean"]), "std": list(base_args["std"])}
                     if "mean" in base_args and "std" in base_args else None)
    return save_checkpoint(built.model, run.out, architecture=built.architecture, arch_args=built.arch_args,
                           normalization=normalization, dataset=config.dataset, num_classes=int(data.info.num_classes),
                           training=training, metrics=metrics, trainer=trainer, config=config)


def train_and_save(trainer: str, config: AdversarialConfig, run: RunOptions, method: Method) -> Checkpoint:
    """A whole run of a method that needs nothing beyond the shared loop (pgd_at, trades, fast_at)."""

    def prepare() -> tuple[Data, Built]:
        data = load_data(config, run)
        return data, build_model(config, data.info)

    data, built = _ddp.main_first(current(), prepare)  # a download happens once, on rank 0
    return fit_and_save(trainer, config, run, method, data, built)

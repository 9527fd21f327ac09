"""Trainer ``ltd``: Low Temperature Distillation (Chen & Lee, arXiv 2111.02331) on top of PGD-AT or TRADES.

What is established (paper abstract, RobustBench logs): a teacher's soft labels
``softmax(f_T(x) / tau_t)`` at a *relatively low* temperature replace the one-hot labels of an
existing adversarial-training objective, and the student divides its logits by its own fixed
``tau_s`` in training *and* inference (:class:`~robustkit.models.ltd_student.LTDStudent`,
architecture ``ltd``), which is why it does not mask gradients the way defensive distillation
does. The paper's exact temperatures are not public; ``tau_t``/``tau_s`` are config fields, and the
shipped recipe (``defenses/ltd.cifar10_partial.toml``) is decided by an ablation.

With TRADES as the framework the loss is

    CE(softmax(z_s(x)), p_T) + beta * KL(softmax(z_s(x)) || softmax(z_s(x'))),  z_s = f_S / tau_s

and x' comes from TRADES' own inner maximisation (which uses no labels). Soft labels enter only
the outer loss; with PGD-AT the inner maximisation still attacks the true labels. So LTD is the
shared loop (:mod:`robustkit.train._adversarial`) with a ``targets_fn``, not a loop of its own.

Which input the teacher sees is a field (``teacher_input``): ``"clean"`` (default) labels the
clean augmented image x, as knowledge distillation does and as the TRADES loss above reads (its
CE term is on the clean input); ``"adv"`` labels the student's adversarial example x' instead
(the teacher's view of the perturbed image; a teacher that is itself not robust then hands out
labels it got wrong under attack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.core.checkpoint import Checkpoint
from robustkit.core.errors import ConfigError
from robustkit.core.modes import kept_modes
from robustkit.distributed import current
from robustkit.train._adversarial import (
    SMOKE,
    AdversarialConfig,
    Built,
    Data,
    Method,
    TargetsFn,
    at_least,
    build_model,
    check_logits,
    fit_and_save,
    load_data,
    say,
)
from robustkit.train._ddp import main_first
from robustkit.train.base import RunOptions, register_trainer

TEACHER_INPUTS = ("clean", "adv")


@dataclass(frozen=True)
class LTDConfig(AdversarialConfig):
    """LTD: the shared adversarial-training fields, the framework it plugs into, teacher and temperatures.

    ``arch``/``arch_args`` are the student's base architecture: the checkpoint is an ``ltd`` model
    (base / tau_s), so ``robustkit eval`` attacks exactly the function that was trained.
    """

    # The framework LTD plugs into (the RobustBench LTD models come from a TRADES-AWP code base).
    framework: Literal["pgd_at", "trades"] = "trades"
    steps: int = 10  # PGD steps of the framework's inner maximisation
    beta: float = 6.0  # trades: weight of KL(f(x) || f(x'))
    teacher: str = "small_cnn.cifar10_partial"  # model id or checkpoint path; frozen, always in eval mode
    # Teacher temperature: lower sharpens the soft labels towards the teacher's argmax (one-hot as
    # tau_t -> 0), higher flattens them; an adversarially trained teacher is unconfident, so LTD
    # needs a "relatively low" one for its labels to carry signal.
    tau_t: float = 0.5
    tau_s: float = 2.0  # student temperature: logits / tau_s in training AND at inference (inside the model)
    teacher_input: Literal["clean", "adv"] = "clean"  # what the teacher labels: x (as in KD) or the student's x'

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, "steps", 1)
        _check_tau("tau_t", self.tau_t)
        _check_tau("tau_s", self.tau_s)


def _check_tau(name: str, tau: float) -> float:
    tau = float(tau)
    if not tau > 0 or not math.isfinite(tau):
        raise ConfigError(f"{name} must be a finite number > 0, got {tau!r}")
    return tau


@torch.no_grad()
def soft_labels(teacher: nn.Module, x: torch.Tensor, tau_t: float) -> torch.Tensor:
    """``softmax(teacher(x) / tau_t)`` with the teacher in eval mode and no gradient.

    The softmax runs in float32 even for a half-precision teacher, so very low temperatures do not
    round small probabilities away unevenly.
    """
    tau_t = _check_tau("tau_t", tau_t)
    with kept_modes(teacher, False):
        logits = teacher(x).float()
    return F.softmax(logits / tau_t, dim=1)


def ltd_targets(teacher: nn.Module, tau_t: float, teacher_input: str = "clean") -> TargetsFn:
    """The ``targets_fn`` that turns :func:`~robustkit.train._adversarial.fit` into LTD."""
    if teacher_input not in TEACHER_INPUTS:
        raise ConfigError(f"unknown teacher_input {teacher_input!r}; choose clean or adv")
    _check_tau("tau_t", tau_t)
    teacher.eval().requires_grad_(False)  # frozen: never trained, never in train mode

    def targets(x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return soft_labels(teacher, x if teacher_input == "clean" else x_adv, tau_t)

    return targets


@torch.no_grad()
def teacher_stats(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, tau_t: float,
                  batch_size: int = 500) -> dict[str, float]:
    """How good and how sharp the teacher's labels are on ``x``: accuracy, mean max probability
    and mean entropy (nats) of ``softmax(f_T / tau_t)``. Logged so an ablation over tau_t can be
    read against what the student was actually shown."""
    dev = next(teacher.parameters()).device
    correct, max_p, entropy = 0, 0.0, 0.0
    for i in range(0, len(x), batch_size):
        p = soft_labels(teacher, x[i : i + batch_size].to(dev), tau_t)
        yb = y[i : i + batch_size].to(dev)
        correct += int((p.argmax(1) == yb).sum())
        max_p += float(p.max(1).values.sum())
        entropy += float(-(p * p.clamp_min(1e-30).log()).sum())
    n = max(len(x), 1)
    return {"acc": correct / n, "mean_max_prob": max_p / n, "mean_entropy": entropy / n}


def load_teacher(config: LTDConfig, data: Data, run: RunOptions) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher on ``run.device`` and what the checkpoint records about it."""
    from robustkit.models import load_model

    loaded = load_model(config.teacher, device=run.device)
    teacher = loaded.model
    check_logits(teacher, f"teacher {config.teacher}", data.x_train.to(run.device), data.info.num_classes)
    record = {
        "model": config.teacher,
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "architecture": loaded.metadata.get("architecture"),
        "arch_args": loaded.metadata.get("arch_args"),
        # accuracy and sharpness of the soft labels the student is trained towards
        "train_stats_at_tau_t": teacher_stats(teacher, data.x_train, data.y_train, config.tau_t),
        "test_stats_at_tau_t": teacher_stats(teacher, data.x_test, data.y_test, config.tau_t),
    }
    say(run, f"teacher {config.teacher}: train acc {record['train_stats_at_tau_t']['acc']:.4f}, mean max prob "
             f"at tau_t={config.tau_t:g}: {record['train_stats_at_tau_t']['mean_max_prob']:.3f}")
    return teacher, record


@register_trainer("ltd", LTDConfig, description="Low Temperature Distillation (Chen & Lee): a teacher's soft "
                  "labels in PGD-AT or TRADES, student logits / tau_s", smoke=SMOKE | {"steps": 1, "teacher": "tiny_cnn.init"})
def train(config: LTDConfig, run: RunOptions) -> Checkpoint:
    def prepare() -> tuple[Data, Built, nn.Module, dict[str, Any]]:
        data = load_data(config, run)
        return data, build_model(config, data.info, tau_s=config.tau_s), *load_teacher(config, data, run)

    data, built, teacher, record = main_first(current(), prepare)  # a download happens once, on rank 0
    method = Method(config.framework, "pgd", steps=config.steps, beta=config.beta)
    return fit_and_save("ltd", config, run, method, data, built,
                        targets_fn=ltd_targets(teacher, config.tau_t, config.teacher_input), extra={"teacher": record})

"""LTD: Low Temperature Distillation (Chen & Lee, arXiv 2111.02331) on top of PGD-AT or TRADES.

What is established (paper abstract, RobustBench logs): a teacher's soft labels
``softmax(f_T(x) / tau_t)`` at a *relatively low* temperature replace the one-hot labels of an
existing adversarial-training objective, and the student divides its logits by its own fixed
``tau_s`` in training *and* inference (:class:`~robustkit.models.ltd_student.LTDStudent`,
architecture ``ltd``), which is why it does not mask gradients the way defensive distillation
does. The paper's exact temperatures are not public; ``tau_t``/``tau_s`` are options, and the
shipped recipe (``defenses/ltd.toml``) is decided by an ablation.

With TRADES as the framework the loss is

    CE(softmax(z_s(x)), p_T) + beta * KL(softmax(z_s(x)) || softmax(z_s(x'))),  z_s = f_S / tau_s

and x' comes from TRADES' own inner maximisation (which uses no labels). Soft labels enter only
the outer loss; with PGD-AT the inner maximisation still attacks the true labels.

Which input the teacher sees is an option (``teacher_input``): ``"clean"`` (default) labels the
clean augmented image x, as knowledge distillation does and as the TRADES loss above reads (its
CE term is on the clean input); ``"adv"`` labels the student's adversarial example x' instead
(the teacher's view of the perturbed image; a teacher that is itself not robust then hands out
labels it got wrong under attack).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.core.errors import ConfigError
from robustkit.models.ltd_student import LTDStudent
from robustkit.train.adversarial import TargetsFn, train

TEACHER_INPUTS = ("clean", "adv")

__all__ = ["TEACHER_INPUTS", "LTDStudent", "ltd_targets", "soft_labels", "teacher_stats", "train_ltd"]


def _check_tau(name: str, tau: float) -> float:
    tau = float(tau)
    if not tau > 0 or tau == float("inf"):
        raise ConfigError(f"{name} must be a finite number > 0, got {tau!r}")
    return tau


@torch.no_grad()
def soft_labels(teacher: nn.Module, x: torch.Tensor, tau_t: float) -> torch.Tensor:
    """``softmax(teacher(x) / tau_t)`` with the teacher in eval mode and no gradient.

    Lower ``tau_t`` sharpens the labels towards the teacher's argmax (one-hot as tau_t -> 0);
    higher flattens them towards uniform. The softmax runs in float32 even for a half-precision
    teacher, so very low temperatures do not round small probabilities away unevenly.
    """
    tau_t = _check_tau("tau_t", tau_t)
    was_training = teacher.training
    teacher.eval()
    try:
        logits = teacher(x).float()
    finally:
        teacher.train(was_training)
    return F.softmax(logits / tau_t, dim=1)


def ltd_targets(teacher: nn.Module, tau_t: float, teacher_input: str = "clean") -> TargetsFn:
    """The ``targets_fn`` that turns :func:`~robustkit.train.adversarial.train` into LTD."""
    if teacher_input not in TEACHER_INPUTS:
        raise ConfigError(f"unknown teacher_input {teacher_input!r}; choose clean or adv")
    _check_tau("tau_t", tau_t)
    teacher.eval().requires_grad_(False)  # frozen: never trained, never in train mode

    def targets(x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return soft_labels(teacher, x if teacher_input == "clean" else x_adv, tau_t)

    return targets


def train_ltd(
    student: nn.Module,
    teacher: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    *,
    tau_t: float = 1.0,
    teacher_input: str = "clean",
    framework: str = "trades",
    **train_kwargs: Any,
) -> list[dict[str, float]]:
    """LTD training of ``student`` (normally an :class:`LTDStudent`, which applies ``tau_s``).

    Everything else (inner maximisation, AWP, schedule) is :func:`train`'s, via ``train_kwargs``.
    """
    device = train_kwargs.get("device", "cpu")
    teacher.to(device)
    return train(student, x_train, y_train, x_val, y_val, framework=framework,
                 targets_fn=ltd_targets(teacher, tau_t, teacher_input), **train_kwargs)


@torch.no_grad()
def teacher_stats(
    teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, tau_t: float, batch_size: int = 500
) -> dict[str, float]:
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

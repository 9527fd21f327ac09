"""One adversarial-training loop for PGD-AT, TRADES and fast AT, with AWP and soft targets as plug-ins.

Every method here is the same min-max recipe with different parts swapped in:

* **inner maximisation** (:func:`inner_max`): PGD with a random start (Madry et al. 2018) or a
  single FGSM step from a uniform random start ("fast AT", Wong, Rice & Kolter 2020), in Linf or
  L2, maximising either cross-entropy (PGD-AT) or KL(p(x) || p(x')) (TRADES, Zhang et al. 2019);
* **framework** (:func:`framework_loss`): ``pgd-at`` trains on CE(f(x'), y); ``trades`` on
  CE(f(x), y) + beta * KL(f(x) || f(x'));
* **targets**: class indices or soft label distributions, interchangeably. LTD (Chen & Lee,
  :mod:`robustkit.train.ltd`) is "an existing framework with a teacher's soft labels as y",
  so it is a ``targets_fn`` passed to :func:`train`, not a separate loop;
* **AWP** (:class:`AWP`, Wu, Xia & Wang 2020): an adversarial *weight* perturbation applied for
  the gradient step only.

The loop (:func:`train`) is device-agnostic and reproducible: one local ``torch.Generator``
drives data order, augmentation and attack starts, so two runs with the same seed give the same
weights on the same machine without touching the global RNG.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.core.errors import ConfigError
from robustkit.models.small_cnn import augment

NORMS = ("Linf", "L2")
FRAMEWORKS = ("pgd-at", "trades")
INNERS = ("pgd", "fgsm-rs")
STARTS = ("uniform", "trades", "none")
SCHEDULES = ("onecycle", "piecewise")

# targets_fn(x_clean, x_adv, y) -> targets: what the outer loss trains towards (LTD's soft labels).
TargetsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def canonical_norm(norm: str) -> str:
    """``"linf"``/``"Linf"``/``"inf"`` -> ``"Linf"``; ``"l2"`` -> ``"L2"``; anything else is an error."""
    key = str(norm).strip().lower()
    if key in ("linf", "inf", "l_inf"):
        return "Linf"
    if key in ("l2", "2"):
        return "L2"
    raise ConfigError(f"unknown norm {norm!r}; choose Linf or L2")


def default_alpha(inner: str, eps: float, steps: int) -> float:
    """Step size when none is given: 2.5 * eps / steps for PGD (Madry et al.'s rule; 2/255 for
    PGD-10 at 8/255) and 1.25 * eps for FGSM-RS (Wong et al.: larger steps overfit catastrophically)."""
    if inner == "fgsm-rs":
        return 1.25 * eps
    return 2.5 * eps / max(steps, 1)


# --------------------------------------------------------------------------------------------
# Losses: one code path for class indices and soft labels
# --------------------------------------------------------------------------------------------


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``-sum_k p_k log q_k`` with ``q = softmax(logits)``.

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
    return -torch.where(p > 0, p * log_q, torch.zeros_like(log_q)).sum(1).mean()


def kl_div(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(softmax(logits_p) || softmax(logits_q)), TRADES' robustness term.

    Written out in log space (not ``F.kl_div``) so the direction is unambiguous: p is the clean
    prediction, q the adversarial one; gradients flow into both unless the caller detaches p.
    """
    log_p = F.log_softmax(logits_p, dim=1)
    log_q = F.log_softmax(logits_q, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def framework_loss(
    model: nn.Module,
    framework: str,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    targets: torch.Tensor,
    beta: float = 6.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The outer (training) loss of ``framework`` and the logits on ``x_adv`` (for train accuracy).

    ``pgd-at``: CE(f(x'), targets). ``trades``: CE(f(x), targets) + beta * KL(f(x) || f(x')), with
    two separate forward passes (as in the TRADES code: BatchNorm sees clean and adversarial
    batches separately).
    """
    if framework == "pgd-at":
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
        delta = delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        x_adv = x + delta
    return x_adv.clamp(0.0, 1.0)


def random_start(
    x: torch.Tensor, norm: str, eps: float, start: str = "uniform", gen: torch.Generator | None = None
) -> torch.Tensor:
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
        d = x[0].numel()
        u = torch.rand((len(x),) + (1,) * (x.ndim - 1), generator=gen, device=x.device, dtype=x.dtype)
        noise = direction * eps * u.pow(1.0 / d)
    else:
        raise ConfigError(f"unknown random start {start!r}; choose one of {', '.join(STARTS)}")
    return _project(x + noise, x, norm, eps)


def inner_max(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    objective: str = "ce",
    norm: str = "Linf",
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    start: str = "uniform",
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial inputs in the ``norm`` eps-ball around ``x`` and in [0, 1] (detached).

    ``objective="ce"`` maximises CE(f(x'), y) (``y``: indices or distributions);
    ``objective="kl"`` maximises KL(f(x) || f(x')) (TRADES; ``y`` unused). Linf steps are
    ``alpha * sign(grad)``; L2 steps ``alpha * grad / ||grad||_2``; each step is followed by the
    projection. FGSM-RS is ``steps=1`` from a uniform start.

    The model runs in ``eval()`` mode (BatchNorm uses running statistics, so the attack neither
    depends on nor updates batch statistics; standard practice) and its previous mode is restored
    afterwards. Gradients are taken w.r.t. the input only (``torch.autograd.grad``), so the
    parameters' ``.grad`` are untouched.
    """
    if objective not in ("ce", "kl"):
        raise ConfigError(f"unknown inner objective {objective!r}; choose ce or kl")
    if eps == 0 or steps == 0:
        return x.detach().clone()
    x = x.detach()
    was_training = model.training
    model.eval()
    try:
        clean_logits = None
        if objective == "kl":
            with torch.no_grad():
                clean_logits = model(x)
        x_adv = random_start(x, norm, eps, start, gen)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            out = model(x_adv)
            loss = soft_cross_entropy(out, y) if clean_logits is None else kl_div(clean_logits, out)
            (g,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                if norm == "Linf":
                    x_adv = x_adv + alpha * g.sign()
                else:
                    x_adv = x_adv + alpha * g / _flat_norm(g).clamp_min(1e-12)
                x_adv = _project(x_adv, x, norm, eps)
    finally:
        model.train(was_training)
    return x_adv.detach()


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

    def __init__(self, model: nn.Module, gamma: float = 5e-3) -> None:
        if gamma < 0:
            raise ConfigError(f"AWP gamma must be >= 0, got {gamma}")
        self.model = model
        self.gamma = gamma
        self.proxy = copy.deepcopy(model)
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
        proxy_weights = self._weights(self.proxy)
        grads = torch.autograd.grad(loss_fn(self.proxy), proxy_weights)
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


def evaluate_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "Linf",
    eps: float = 8 / 255,
    steps: int = 10,
    alpha: float | None = None,
    batch_size: int = 500,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Clean and PGD-``steps`` (CE, random start, alpha 2.5 * eps / steps) accuracy in eval mode.

    An example counts as robust only if the clean *and* the adversarial prediction are right. A
    fixed seed makes successive epochs' numbers comparable. This is a training log, not a
    robustness claim: claims come from ``robustkit eval`` (AutoAttack).
    """
    was_training = model.training
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
    model.train(was_training)
    n = max(len(x), 1)
    return {"clean_acc": clean / n, "pgd_acc": robust / n}


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def lr_schedule(
    schedule: str,
    lr_max: float,
    epochs: int,
    steps_per_epoch: int,
    lr_peak_frac: float = 0.3,
    milestones: Sequence[int] | None = None,
) -> Callable[[int], float]:
    """Learning rate as a function of the global step.

    ``onecycle``: linear 0 -> lr_max over the first ``lr_peak_frac`` of the steps, then linear to
    0, per step (Wong et al.'s fast-AT schedule; good accuracy in few epochs). ``piecewise``:
    lr_max, divided by 10 once ``m`` epochs have been completed, for each ``m`` in ``milestones``
    (default half and three quarters of the epochs: TRADES-AWP's 100 and 150 of 200).
    """
    total = epochs * steps_per_epoch
    if schedule == "onecycle":
        if not 0 < lr_peak_frac < 1:
            raise ConfigError(f"lr_peak_frac must be in (0, 1), got {lr_peak_frac}")

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
    raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def default_milestones(epochs: int) -> list[int]:
    """x0.1 after 1/2 and 3/4 of the epochs (100 and 150 of TRADES-AWP's 200)."""
    return [epochs // 2, (3 * epochs) // 4]


def train(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    *,
    framework: str = "pgd-at",
    inner: str = "pgd",
    norm: str = "Linf",
    eps: float = 8 / 255,
    alpha: float | None = None,
    steps: int = 10,
    eps_warmup: int = 0,
    beta: float = 6.0,
    awp: bool = False,
    awp_gamma: float = 5e-3,
    awp_warmup: int = 0,
    targets_fn: TargetsFn | None = None,
    epochs: int = 15,
    batch_size: int = 128,
    lr_max: float = 0.1,
    schedule: str = "onecycle",
    lr_peak_frac: float = 0.3,
    milestones: Sequence[int] | None = None,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    crop_pad: int = 4,
    val_pgd_n: int = 256,
    val_pgd_steps: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[dict[str, float]]:
    """Adversarially train ``model`` in place; return per-epoch logs.

    ``x_*``: float32 NCHW in [0, 1], ``y_*``: int64 labels, on any device (batches move to
    ``device``). ``alpha=None`` picks :func:`default_alpha`. The inner maximisation attacks the
    true labels (CE) or the clean prediction (TRADES' KL); ``targets_fn(x, x_adv, y)``, if given,
    replaces the labels in the *outer* loss only (LTD's soft labels). ``inner="fgsm-rs"`` always
    starts uniformly in the ball (the random start is what makes one step work); PGD starts
    uniformly for ``pgd-at`` and at x + 0.001 N(0, 1) for ``trades``.

    ``eps_warmup``: eps (and alpha) ramp linearly over that many epochs. ``awp``: AWP with
    relative size ``awp_gamma`` from epoch ``awp_warmup`` on (0-based; the first ``awp_warmup``
    epochs train without it). ``x_val`` is only *logged* each epoch (clean and PGD-10 accuracy at
    the run's eps on its first ``val_pgd_n`` images, 0 = all): nothing is selected on it.
    """
    from tqdm.auto import tqdm

    norm = canonical_norm(norm)
    for name, value, allowed in (("framework", framework, FRAMEWORKS), ("inner", inner, INNERS)):
        if value not in allowed:
            raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
    if inner == "fgsm-rs":
        steps = 1
    if steps < 1 or epochs < 1 or batch_size < 1:
        raise ConfigError(f"steps, epochs and batch_size must be >= 1 (got {steps}, {epochs}, {batch_size})")
    alpha = default_alpha(inner, eps, steps) if alpha is None else alpha
    start = "trades" if framework == "trades" and inner == "pgd" else "uniform"
    objective = "kl" if framework == "trades" else "ce"

    dev = torch.device(device)
    # One local generator drives data order, augmentation and attack starts: reproducible runs
    # without touching the global RNG (seed the global RNG yourself before building the model).
    gen = torch.Generator(device=dev).manual_seed(seed)
    model.to(dev).train()
    n = len(x_train)
    steps_per_epoch = math.ceil(n / batch_size)
    lr_at = lr_schedule(schedule, lr_max, epochs, steps_per_epoch, lr_peak_frac, milestones)

    # Weight decay on conv/linear weights only: decaying BN scales and biases just fights BN.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.0, momentum=momentum, nesterov=nesterov,
    )
    weight_adversary = AWP(model, awp_gamma) if awp else None

    logs: list[dict[str, float]] = []
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="batch", dynamic_ncols=True)
    step = 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        ramp = min(1.0, (epoch + 1) / eps_warmup) if eps_warmup else 1.0
        eps_e, alpha_e = eps * ramp, alpha * ramp
        use_awp = weight_adversary is not None and epoch >= awp_warmup
        perm = torch.randperm(n, generator=gen, device=dev).cpu()
        loss_sum, correct, seen = 0.0, 0, 0
        bar.set_description(f"epoch {epoch + 1}/{epochs}")
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            x = augment(x_train[idx].to(dev), crop_pad, gen)
            y = y_train[idx].to(dev)
            x_adv = inner_max(model, x, y, objective=objective, norm=norm, eps=eps_e, alpha=alpha_e,
                              steps=steps, start=start, gen=gen)
            targets = y if targets_fn is None else targets_fn(x, x_adv, y)

            def loss_fn(m: nn.Module, x=x, x_adv=x_adv, targets=targets) -> torch.Tensor:  # noqa: ANN001
                # This batch's outer loss as a function of the weights: what AWP maximises.
                return framework_loss(m, framework, x, x_adv, targets, beta)[0]

            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            if use_awp:
                # Gradient at the perturbed weights, step from the restored (original) ones.
                with weight_adversary.perturbed(loss_fn):  # type: ignore[union-attr]
                    loss, out = framework_loss(model, framework, x, x_adv, targets, beta)
                    loss.backward()
            else:
                loss, out = framework_loss(model, framework, x, x_adv, targets, beta)
                loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", adv_acc=f"{correct / seen:.3f}")
        log: dict[str, float] = {
            "epoch": epoch + 1,
            "eps": eps_e,
            "lr_end": lr_at(step - 1),
            "awp": float(use_awp),
            "train_loss": loss_sum / seen,
            "train_adv_acc": correct / seen,  # on the training batch's own adversarial inputs
            "seconds": time.perf_counter() - t0,
        }
        line = (f"epoch {epoch + 1:3d}/{epochs}  eps {eps_e * 255:5.2f}/255  loss {log['train_loss']:.4f}"
                f"  train_adv_acc {log['train_adv_acc']:.4f}")
        if x_val is not None and y_val is not None and len(x_val):
            t1 = time.perf_counter()
            k = len(x_val) if not val_pgd_n else min(val_pgd_n, len(x_val))
            val = evaluate_pgd(model, x_val[:k], y_val[:k], norm=norm, eps=eps, steps=val_pgd_steps,
                               device=dev)
            log["val_n"] = k
            log["val_clean_acc"] = val["clean_acc"]
            log[f"val_pgd{val_pgd_steps}_acc"] = val["pgd_acc"]
            log["val_seconds"] = time.perf_counter() - t1
            line += (f"  val(n={k}) clean {val['clean_acc']:.4f} pgd{val_pgd_steps} {val['pgd_acc']:.4f}")
        line += f"  {log['seconds']:.1f}s"
        if progress:
            tqdm.write(line)
        else:
            print(line, flush=True)
        logs.append(log)
    bar.close()
    model.eval()
    return logs

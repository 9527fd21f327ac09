"""Trainer ``score``: SCoRe (Majee et al., ICML 2024), submodular representation learning, two stages.

Stage 1 trains an encoder and a projection head on two augmented views of each image with a
set-based loss over the batch's class sets (:mod:`robustkit.losses`: Facility Location, Graph Cut,
Log-Det, or SupCon as the baseline the paper derives); stage 2 freezes the encoder and fits a linear
classifier with cross-entropy. ``loss = "ce"`` is the baseline at equal budget: the same network,
data, views, epochs and optimiser, trained end to end with cross-entropy on both views (one stage).

Long-tailed data is a view of the training split (``longtail = "exp:100"``, :mod:`robustkit.longtail`)
whose class counts go into the checkpoint, so ``robustkit eval`` reports many/medium/few accuracy.

``adversarial = true`` is what no one ships: robust long-tailed representations. Stage 1 then runs on
adversarial views (PGD in the eps-ball maximising the stage's own loss: the representation loss, or
CE for the baseline, which makes the baseline PGD-AT), and stage 2 is PGD-AT of the linear classifier
on the frozen encoder::

    robustkit train score --recipe defenses/score.toml --set loss=fl --data-dir ../shared/data/partial

Scaled down for a CPU (research notes §4d): SmallCNN instead of ResNet-50, tens of epochs instead of
1,000, and stage 2 on the encoder's features of un-augmented images (computed once; the reference
re-augments for 100 epochs) unless it is adversarial.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.core.checkpoint import Checkpoint, save_checkpoint
from robustkit.core.errors import ConfigError
from robustkit.core.provenance import training_run
from robustkit.core.threat import parse_eps
from robustkit.losses import LOSSES, LossSpec, representation_loss
from robustkit.models.score import ScoreNet
from robustkit.train._adversarial import _ascent, _project, attack_mode, parse_eps_field, random_start, say
from robustkit.train._loop import RunningStats, decay_groups, epoch_batches, set_lr
from robustkit.train._lt import LTData, load_longtail
from robustkit.train.base import RunOptions, register_trainer


@dataclass(frozen=True)
class ScoreConfig:
    """Data view, network, stage-1 loss and optimiser, stage-2 probe, and the adversarial option."""

    # Data: a long-tailed view of the training split (robustkit.longtail); the test split stays balanced.
    dataset: str = "cifar10"
    longtail: str | None = "exp:100"  # PROFILE:RATIO (exp or step); None: the whole split
    longtail_n_max: int | None = None  # images of the head class (None: the smallest class count)
    data_seed: int = 0  # which images the view keeps: fixed across training seeds, so results pair up
    n_train: int | None = None  # first N images of the split before the view (None: all)
    n_test: int | None = None  # test images measured at the end (None: all)

    # Network: ScoreNet (SmallCNN trunk = encoder, 4*width features) + an MLP projection head in stage 1.
    width: int = 16
    proj_dim: int = 64  # projection output (the reference: 128 from ResNet-50's 2,048)

    # Stage 1. loss: "ce" (the baseline, one stage) or a representation loss of robustkit.losses.
    loss: str = "fl"
    form: Literal["c", "s"] = "c"  # total correlation C_f or total information S_f (gc, logdet)
    kernel: Literal["cosine", "rbf", "euclidean"] = "cosine"
    kernel_width: float = 1.0  # rbf bandwidth
    lam: float = 1.0  # Graph Cut's lambda, Log-Det's regulariser
    fl_scale: float = 10.0  # sharpness t of FL's soft max (1/t) log sum exp(t s); the reference's is 1
    temperature: float = 0.1  # SupCon's temperature
    loss_scale: float = 1.0  # multiplies the loss (the reference's "temperature / 0.07" is only this)
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05  # SGD peak learning rate; linear warm-up over the first epoch, cosine to 0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # Two views per image, torchvision tensor transforms (the reference's SupCon augmentation):
    crop_scale: float = 0.2  # RandomResizedCrop scale (crop_scale, 1)
    jitter: float = 0.4  # ColorJitter strength (brightness, contrast, saturation; hue = jitter / 4), p = 0.8
    grayscale_p: float = 0.2  # RandomGrayscale (colour images only)

    # Stage 2: linear classifier on the frozen encoder (SGD, cosine schedule).
    probe_epochs: int = 20
    probe_lr: float = 0.5
    probe_batch_size: int = 256

    # Robust representations: PGD on the views (stage 1) and PGD-AT of the classifier (stage 2).
    adversarial: bool = False
    norm: Literal["Linf", "L2"] = "Linf"
    eps: str | float = "8/255"
    steps: int = 3
    alpha: str | float = "auto"  # "auto": 2.5 * eps / steps
    seed: int = 0  # init, data order, augmentation and attack starts

    def __post_init__(self) -> None:
        if self.loss != "ce":
            self.loss_spec()  # a typo in loss, form or kernel is a one-line error before any data loads
        parse_eps_field("eps", self.eps)
        if self.alpha != "auto":
            parse_eps_field("alpha", self.alpha)
        for name, low in (("width", 1), ("proj_dim", 1), ("epochs", 1), ("batch_size", 2), ("probe_epochs", 0),
                          ("probe_batch_size", 1), ("steps", 1), ("n_train", 1), ("n_test", 1),
                          ("longtail_n_max", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} = {value}: must be >= {low}")
        if self.longtail is not None:
            from robustkit.longtail import LongTail

            LongTail.parse(self.longtail)
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"crop_scale = {self.crop_scale}: must be in (0, 1]")

    def loss_spec(self) -> LossSpec:
        if self.loss not in LOSSES:
            from robustkit.core.errors import close_matches_hint

            raise ConfigError(f"unknown loss {self.loss!r}{close_matches_hint(self.loss, ('ce', *LOSSES))}; "
                              f"choose ce, {', '.join(LOSSES)}")
        return LossSpec(loss=self.loss, form=self.form, kernel=self.kernel, kernel_width=self.kernel_width,
                        lam=self.lam, fl_scale=self.fl_scale, temperature=self.temperature,
                        loss_scale=self.loss_scale)

    @property
    def alpha_value(self) -> float:
        return 2.5 * parse_eps(self.eps) / self.steps if self.alpha == "auto" else parse_eps(self.alpha)


SMOKE: dict[str, Any] = {"longtail": "exp:2", "n_train": 160, "n_test": 16, "width": 4, "proj_dim": 8, "epochs": 1,
                         "batch_size": 16, "probe_epochs": 1}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def make_augment(config: ScoreConfig, channels: int, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """One random view of each image of a batch (torchvision v2 transforms draw once per call, so
    they are applied image by image: every image gets its own crop, flip and colour change)."""
    from torchvision.transforms import v2

    ops: list[Any] = [v2.RandomResizedCrop(size, scale=(config.crop_scale, 1.0), antialias=True),
                      v2.RandomHorizontalFlip()]
    j = config.jitter
    if j > 0:
        jitter = v2.ColorJitter(j, j, j, j / 4) if channels == 3 else v2.ColorJitter(j, j)
        ops.append(v2.RandomApply([jitter], p=0.8))
    if channels == 3 and config.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=config.grayscale_p))
    transform = v2.Compose(ops)

    def augment(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([transform(img) for img in x]).clamp_(0.0, 1.0)

    return augment


# --------------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """The stage-1 MLP (features -> features -> proj_dim), L2-normalised output: the losses compare
    directions. Discarded after stage 1, as in SupCon and SCoRe."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(h), dim=1)


def pgd_views(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, config: ScoreConfig,
              gen: torch.Generator) -> torch.Tensor:
    """PGD maximising ``loss_of(x')`` over x' in the eps-ball of ``x`` and [0, 1] (uniform random start,
    input gradients only). For a representation loss all views of the batch move together: the loss
    is a function of the whole set, so the attack is too."""
    eps, alpha = parse_eps(config.eps), config.alpha_value
    x_adv = random_start(x, config.norm, eps, "uniform", gen)
    for _ in range(config.steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(x_adv), x_adv)
        with torch.no_grad():
            x_adv = _project(x_adv + _ascent(g, config.norm, alpha), x, config.norm, eps)
    return x_adv.detach()


def stage1(model: ScoreNet, data: LTData, config: ScoreConfig, device: torch.device, gen: torch.Generator,
           progress: bool, log_lines: bool = False) -> list[dict[str, float]]:
    """Train the encoder (with the projection head, or with the classifier for ``ce``) on two views
    (``progress``: a bar; ``log_lines``: a line per epoch on stderr)."""
    from tqdm.auto import tqdm

    ce = config.loss == "ce"
    spec = None if ce else config.loss_spec()
    head = ProjectionHead(model.feature_dim, config.proj_dim).to(device)
    params = list(model.parameters()) + ([] if ce else list(head.parameters()))
    opt = torch.optim.SGD(decay_groups(params, config.weight_decay), lr=0.0, momentum=config.momentum)
    per_epoch = math.ceil(len(data.y_train) / config.batch_size)
    total = config.epochs * per_epoch

    def lr_at(step: int) -> float:  # linear warm-up over the first epoch, then cosine to 0
        if step < per_epoch:
            return config.lr * (step + 1) / per_epoch
        return 0.5 * config.lr * (1 + math.cos(math.pi * (step - per_epoch) / max(1, total - per_epoch)))

    def loss_of(views: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage's loss on ``views`` (2B images: view 1 then view 2) and the logits/embeddings."""
        if ce:
            logits = model(views)
            return F.cross_entropy(logits, y.repeat(2)), logits
        z = head(model.embed(views))
        b = len(y)
        return representation_loss(torch.stack([z[:b], z[b:]], dim=1), y, spec), z

    augment = make_augment(config, data.x_train.shape[1], data.x_train.shape[-1])
    logs, step = [], 0
    bar = tqdm(total=total, disable=not progress, unit="batch", dynamic_ncols=True)
    model.train()
    head.train()
    for epoch in range(config.epochs):
        t0, stats = time.perf_counter(), RunningStats()
        bar.set_description(f"stage 1 ({config.loss}) epoch {epoch + 1}/{config.epochs}")
        for idx in epoch_batches(len(data.y_train), config.batch_size, gen):
            if len(idx) < 2:  # a set loss needs a set; the last batch of one image is skipped
                continue
            x = data.x_train[idx]
            views = torch.cat([augment(x), augment(x)]).to(device)
            y = data.y_train[idx].to(device)
            if config.adversarial:
                with attack_mode(model), attack_mode(head):
                    views = pgd_views(lambda v: loss_of(v, y)[0], views, config, gen)  # noqa: B023
            set_lr(opt, lr_at(step))
            opt.zero_grad(set_to_none=True)
            loss, out = loss_of(views, y)
            loss.backward()
            opt.step()
            step += 1
            if ce:
                stats.add(loss.detach(), out.detach(), y.repeat(2))
            else:
                stats.loss_sum += loss.item() * len(y)
                stats.seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.4f}")
        logs.append({"epoch": epoch + 1, "stage": 1, "train_loss": stats.loss, "lr_end": lr_at(step - 1),
                     "seconds": time.perf_counter() - t0} | ({"train_acc": stats.acc} if ce else {}))
        if log_lines:
            last = logs[-1]
            tqdm.write(f"stage 1 epoch {epoch + 1:3d}/{config.epochs}  loss {last['train_loss']:.4f}"
                       + (f"  train acc {last['train_acc']:.4f}" if ce else "") + f"  {last['seconds']:.0f}s",
                       file=sys.stderr)
    bar.close()
    model.eval()
    return logs


# --------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------


def stage2(model: ScoreNet, data: LTData, config: ScoreConfig, device: torch.device, gen: torch.Generator,
           progress: bool, log_lines: bool = False) -> list[dict[str, float]]:
    """A fresh linear classifier on the frozen encoder (eval mode: BatchNorm statistics frozen too).

    Standard: CE on the features of the un-augmented training images, computed once. Adversarial:
    PGD-AT of the classifier, the attack going through the frozen encoder every batch."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    model.head.reset_parameters()
    for p in model.head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.0, momentum=0.9, weight_decay=0.0)
    feats = None
    if not config.adversarial:
        with torch.no_grad():
            feats = torch.cat([model.embed(data.x_train[i : i + 512].to(device))
                               for i in range(0, len(data.y_train), 512)])
    per_epoch = math.ceil(len(data.y_train) / config.probe_batch_size)
    total, step, logs = config.probe_epochs * per_epoch, 0, []
    for epoch in range(config.probe_epochs):
        t0, stats = time.perf_counter(), RunningStats()
        for idx in epoch_batches(len(data.y_train), config.probe_batch_size, gen):
            y = data.y_train[idx].to(device)
            if feats is not None:
                h = feats[idx.to(device)]
            else:
                x = data.x_train[idx].to(device)
                x = pgd_views(lambda v: F.cross_entropy(model(v), y), x, config, gen)  # noqa: B023
                with torch.no_grad():
                    h = model.embed(x)
            set_lr(opt, 0.5 * config.probe_lr * (1 + math.cos(math.pi * step / total)))
            opt.zero_grad(set_to_none=True)
            logits = model.head(h)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            step += 1
            stats.add(loss.detach(), logits.detach(), y)
        logs.append({"epoch": epoch + 1, "stage": 2, "train_loss": stats.loss, "train_acc": stats.acc,
                     "seconds": time.perf_counter() - t0})
    if log_lines and logs:
        print(f"stage 2: {config.probe_epochs} epochs, train acc {logs[-1]['train_acc']:.4f}", file=sys.stderr)
    for p in model.parameters():
        p.requires_grad_(True)
    return logs


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def measure(model: ScoreNet, data: LTData, config: ScoreConfig, device: torch.device) -> dict[str, Any]:
    """Clean test accuracy, balanced and per class, with the per-example flags (the comparison's
    paired tests read them); with ``adversarial``, PGD-10 accuracy too (a log; claims use AutoAttack)."""
    from robustkit.eval.per_class import per_class_report

    with torch.no_grad():
        pred = torch.cat([model(data.x_test[i : i + 500].to(device)).argmax(1).cpu()
                          for i in range(0, len(data.y_test), 500)])
    ok = pred == data.y_test
    report = per_class_report(data.y_test, ok, None, data.info.num_classes, class_names=data.info.classes,
                              train_counts=data.record["class_counts"])
    metrics: dict[str, Any] = {"split": "test", "n": len(ok), "clean_acc": float(ok.float().mean()),
                               "balanced_clean_acc": report["balanced_clean_acc"],
                               "clean_flags": "".join("1" if v else "0" for v in ok.tolist()), "per_class": report}
    if config.adversarial:
        from robustkit.train._adversarial import evaluate_pgd

        res = evaluate_pgd(model, data.x_test, data.y_test, norm=config.norm, eps=parse_eps(config.eps), steps=10,
                           device=device)
        metrics["pgd10_acc"] = res["pgd_acc"]
    return metrics


@register_trainer("score", ScoreConfig, smoke=SMOKE,
                  description="SCoRe (Majee et al. 2024): submodular representation loss, then a linear probe")
def train(config: ScoreConfig, run: RunOptions) -> Checkpoint:
    data = load_longtail(config, run)
    dev = run.device
    info = data.info
    with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from the global RNG
        torch.manual_seed(config.seed)
        arch_args = {"in_channels": int(info.shape[0]), "num_classes": int(info.num_classes), "width": config.width,
                     "mean": [float(m) for m in info.mean], "std": [float(s) for s in info.std]}
        model = ScoreNet(**arch_args).to(dev)
        gen = torch.Generator(device=dev).manual_seed(config.seed)
        counts = data.record["class_counts"]
        say(run, f"robustkit train score: loss {config.loss}{' (adversarial views)' if config.adversarial else ''}; "
                 f"{len(data.y_train)} train images ({config.longtail or 'as given'}: {counts[0]} ... {counts[-1]} "
                 f"per class), {len(data.y_test)} test; ScoreNet width {config.width}, "
                 f"{sum(p.numel() for p in model.parameters()):,} parameters; {torch.get_num_threads()} threads")
        t0, c0 = time.perf_counter(), time.process_time()
        logs = stage1(model, data, config, dev, gen, run.progress, run.log)
        if config.loss != "ce":
            logs += stage2(model, data, config, dev, gen, run.progress, run.log)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    metrics = measure(model, data, config, dev)
    say(run, f"test (n={metrics['n']}): clean {metrics['clean_acc']:.4f}, balanced {metrics['balanced_clean_acc']:.4f}"
             + (f", PGD-10 {metrics['pgd10_acc']:.4f}" if "pgd10_acc" in metrics else "") + f"; training {wall:.0f}s")
    training = {"loss": config.loss, "stages": 1 if config.loss == "ce" else 2, "adversarial": config.adversarial,
                "data": data.record, "seed": config.seed, **training_run(dev, wall, cpu), "epochs_log": logs}
    return save_checkpoint(model, run.out, architecture="score", arch_args=arch_args,
                           normalization={"mean": arch_args["mean"], "std": arch_args["std"]}, dataset=config.dataset,
                           num_classes=int(info.num_classes), training=training, metrics=metrics, trainer="score",
                           config=config)

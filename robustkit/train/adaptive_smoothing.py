"""``robustkit train adaptive_smoothing``: train the mixing network of an Adaptive Smoothing composite.

Bai, Anderson, Kim & Sojoudi (arXiv 2301.12554). The two base models are frozen; only the mixing
network (and its BatchNorm statistics) learns, so the composite can be no better than its bases at
either end and the training job is cheap compared with adversarial training.

One step, on a batch of clean images x with labels y:

1. Attack the *composite* (gradients flow through the mixing network) with the randomized attacks
   of :func:`robustkit.attacks.apgd.randomized_attack`: APGD-CE plus targeted-DLR APGD, per-sample
   eps ~ U(0.4, 1.1) * eps, random iteration counts, and a random w * BCE(gamma, 1) term in the
   attack loss so the adversary also tries to make the mixer trust g. Variety matters here: the
   mixer must detect attacks of any strength, not one fixed PGD.
2. Loss on clean (gamma label 0: "use g") and attacked (label 1: "use h") copies, mixer in train mode:
   ``c_bce * BCE(gamma, label) + c_ce * CE(mixed, y) + c_prod * BCE * CE`` (the product weighs the
   detection error by how much it costs in classification). The clean group gets its own weight.

Defaults are the paper's TRADES/ResNet-18 configuration (c_bce 1, c_ce 0.5, c_prod 0.1, AdamW,
weight decay 1e-5, cosine schedule with warmup, gradient clip 10) scaled to a 2-core CPU: fewer
attack iterations and one targeted attack instead of nine; the shipped recipe says so.

The deployed constants (``eval_*``, ``alpha_*``) never affect training, so ``mixer_from`` re-deploys
an already trained mixer with new ones instead of training again (how the shipped model got its
alpha floor)::

    robustkit train --recipe defenses/adaptive_smoothing.cifar10_partial.toml --set mixer_from="" \
        --data-dir ../shared/data/partial --out runs/adaptive_smoothing          # train the mixer
    robustkit train --recipe defenses/adaptive_smoothing.cifar10_partial.toml \
        --data-dir ../shared/data/partial --out runs/adaptive_smoothing_floor    # re-deploy it, as shipped
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from robustkit.core.checkpoint import Checkpoint, save_checkpoint
from robustkit.core.config import config_to_dict
from robustkit.core.errors import CheckpointError, ConfigError
from robustkit.core.threat import parse_eps
from robustkit.train.base import RunOptions, register_trainer

# The mixer's post-processing constants (robustkit.models.adaptive_smoothing.MixingConfig).
MIXING_FIELDS = ("train_scale", "train_bias", "eval_scale", "eval_bias", "alpha_min", "alpha_max", "bn_momentum")
# What a re-deploy (mixer_from) may change: nothing here touches the trained mixer. The base models
# may be renamed (moved files): their sha256 are compared instead.
REDEPLOY_FIELDS = ("eval_scale", "eval_bias", "alpha_min", "alpha_max", "val_n", "mixer_from", "std", "robust")


@dataclass(frozen=True)
class AdaptiveSmoothingConfig:
    """Train only the mixing network between a frozen standard model g and a frozen robust model h."""

    # The composite. Base models are registry ids or checkpoint paths; their sha256 are recorded.
    std: str = "airbench94.cifar10_partial_tta0"  # standard (accurate) base model g
    robust: str = "ltd.cifar10_partial"  # robust base model h
    dataset: str = "cifar10"  # training data; validation scores its test split
    train_n: int = 0  # use only the first N training images (0 = all)
    # Leave the last N training images out of the mixer's training: the held-out images on which
    # `python -m robustkit.train.as_constants` chooses the deployed constants (never the test split).
    holdout: int = 0
    s_g: float = 1.0  # logit temperature of g inside the mixture
    s_h: float = 1.0  # logit temperature of h inside the mixture
    width: int = 32  # mixing-network width (channels of its first block)

    # gamma = BN(raw) * scale + bias; alpha = sigmoid(gamma). The paper trains with (2, 0.4).
    train_scale: float = 2.0
    train_bias: float = 0.4
    # Deployed constants: they do not change training (attacks during training use the training
    # constants), only the shipped model; deployed alpha is squeezed into [alpha_min, alpha_max].
    eval_scale: float = 2.0
    eval_bias: float = 0.4  # larger = more weight on h
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    bn_momentum: float = 0.01  # momentum of the mixer's BatchNorm1d on gamma

    epochs: int = 1  # passes over the training images
    batch_size: int = 64  # clean images per step (each also attacked 1 + n_targets times)
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 1e-5
    warmup_frac: float = 0.04  # fraction of steps of linear warmup before the cosine decay
    grad_clip: float = 10.0  # gradient-norm clip

    # The training attack: each attacked sample draws eps * U(eps_lo, eps_hi) (nominal Linf radius eps).
    eps: str = "8/255"
    eps_lo: float = 0.4
    eps_hi: float = 1.1
    n_targets: int = 1  # targeted-DLR attacks per step (the paper: 9)
    iter_lo: int = 2  # APGD iterations drawn uniformly in [iter_lo, iter_hi] per attack (paper: chi2(75))
    iter_hi: int = 6
    w_max: float = 0.4  # attack loss (1-w) base + w BCE(gamma, 1), w ~ U(0, w_max)

    # Loss weights (the paper's TRADES config: 1, 0.5, 0.1).
    c_bce: float = 1.0
    c_ce: float = 0.5
    c_prod: float = 0.1
    clean_weight: float = 1.0  # weight of the clean group's loss relative to the attacked group's
    seed: int = 0
    val_n: int = 200  # first N test images scored after training (clean, APGD-CE 10 steps, mean alpha)

    # "" trains the mixer. Else a checkpoint (or model id) of this composite whose trained mixer is
    # re-deployed with this config's deployed constants, without training; every other field must
    # equal what that mixer was trained with (refused otherwise), so this config stays the truth.
    mixer_from: str = ""

    def __post_init__(self) -> None:
        from robustkit.models.adaptive_smoothing import MixingConfig

        parse_eps(self.eps)  # a malformed eps fails now, not after the base models have loaded
        for name in ("epochs", "batch_size", "width", "val_n", "iter_lo"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.train_n < 0 or self.n_targets < 0 or self.holdout < 0:
            raise ConfigError(f"train_n, n_targets and holdout must be >= 0, got {self.train_n}, {self.n_targets}, "
                              f"{self.holdout}")
        if self.iter_hi < self.iter_lo or not 0 < self.eps_lo <= self.eps_hi:
            raise ConfigError(f"need iter_lo <= iter_hi and 0 < eps_lo <= eps_hi, got [{self.iter_lo}, "
                              f"{self.iter_hi}], [{self.eps_lo}, {self.eps_hi}]")
        MixingConfig(**self.mixing())  # the alpha range and BN momentum, checked where they are used

    def mixing(self) -> dict[str, float]:
        """The constants of the composite's :class:`MixingConfig` (``clamp_std`` keeps its default)."""
        return {k: getattr(self, k) for k in MIXING_FIELDS}


def comp_loss(
    gamma: torch.Tensor, is_adv: torch.Tensor, log_probs: torch.Tensor, y: torch.Tensor,
    *, c_bce: float, c_ce: float, c_prod: float, weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's CompLoss, per sample then (weighted) mean: BCE(gamma, label), CE of the mixture,
    and their product. ``is_adv``: 1.0 for attacked copies (h should decide), 0.0 for clean ones."""
    bce = F.binary_cross_entropy_with_logits(gamma, is_adv.to(gamma.dtype), reduction="none")
    ce = F.nll_loss(log_probs, y, reduction="none")  # the mixture already is a log-probability
    per = c_bce * bce + c_ce * ce + c_prod * bce * ce
    w = torch.ones_like(per) if weight is None else weight
    loss = (per * w).sum() / w.sum()
    return loss, {"bce": float(bce.detach().mean()), "ce": float(ce.detach().mean())}


def _lr_at(step: int, total: int, warmup_frac: float) -> float:
    warm = max(1, int(round(total * warmup_frac)))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * t))


def train_mixing(
    model: Any, x: torch.Tensor, y: torch.Tensor, config: AdaptiveSmoothingConfig, *,
    device: torch.device | str = "cpu", progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model.mixing_net`` (a :class:`MixedClassifier`) in place; return per-epoch logs."""
    from robustkit.attacks.apgd import randomized_attack

    c, dev, eps = config, torch.device(device), parse_eps(config.eps)
    model.to(dev)
    params = [p for p in model.mixing_net.parameters()]
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(c.seed)
    attack_gen = torch.Generator(device=dev).manual_seed(c.seed + 1)
    n = int(x.shape[0])
    steps_per_epoch = math.ceil(n / c.batch_size)
    total = c.epochs * steps_per_epoch
    logs: list[dict[str, float]] = []
    step = 0
    for epoch in range(c.epochs):
        order = torch.randperm(n, generator=gen)
        sums = {"loss": 0.0, "bce": 0.0, "ce": 0.0, "alpha_clean": 0.0, "alpha_adv": 0.0}
        t0 = time.perf_counter()
        bar = _bar(steps_per_epoch, f"epoch {epoch + 1}/{c.epochs}", progress)
        for b in range(steps_per_epoch):
            idx = order[b * c.batch_size:(b + 1) * c.batch_size]
            xb, yb = x[idx].to(dev), y[idx].to(dev)
            # 1. Attack the composite: mixer in eval mode (running BN stats), training constants.
            model.eval()
            model.attack_view = True
            try:
                advs = randomized_attack(
                    model.forward_with_gamma, xb, yb, eps=eps, generator=attack_gen,
                    n_targets=c.n_targets, iter_range=(c.iter_lo, c.iter_hi), eps_range=(c.eps_lo, c.eps_hi),
                    w_max=c.w_max)
            finally:
                model.attack_view = False
            # 2. Train the mixer on clean (label 0) + attacked (label 1) copies in one batch.
            model.train()
            xs = torch.cat([xb] + [a.detach() for _, a in advs])
            ys = yb.repeat(1 + len(advs))
            is_adv = torch.cat([torch.zeros(len(yb)), torch.ones(len(yb) * len(advs))]).to(dev)
            weight = torch.where(is_adv > 0, torch.ones_like(is_adv), torch.full_like(is_adv, c.clean_weight))
            for group in opt.param_groups:
                group["lr"] = c.lr * _lr_at(step, total, c.warmup_frac)
            log_probs, gamma = model.forward_with_gamma(xs)
            loss, parts = comp_loss(gamma, is_adv, log_probs, ys, c_bce=c.c_bce, c_ce=c.c_ce, c_prod=c.c_prod,
                                    weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
            opt.step()
            step += 1
            with torch.no_grad():
                alpha = torch.sigmoid(gamma)
                sums["alpha_clean"] += float(alpha[is_adv == 0].mean())
                sums["alpha_adv"] += float(alpha[is_adv == 1].mean())
            sums["loss"] += float(loss.detach())
            sums["bce"] += parts["bce"]
            sums["ce"] += parts["ce"]
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / (b + 1):.3f}", a_clean=f"{sums['alpha_clean'] / (b + 1):.2f}",
                            a_adv=f"{sums['alpha_adv'] / (b + 1):.2f}")
        bar.close()
        log = {k: v / steps_per_epoch for k, v in sums.items()}
        log.update(epoch=epoch + 1, seconds=time.perf_counter() - t0)
        logs.append(log)
        print(f"epoch {epoch + 1}/{c.epochs}  loss {log['loss']:.4f}  bce {log['bce']:.4f}  ce {log['ce']:.4f}  "
              f"alpha clean {log['alpha_clean']:.3f} attacked {log['alpha_adv']:.3f}  {log['seconds']:.0f}s",
              flush=True)
    model.eval()
    return logs


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


@torch.no_grad()
def _accuracy(model: Any, x: torch.Tensor, y: torch.Tensor, dev: torch.device) -> float:
    return float((model(x.to(dev)).argmax(1) == y.to(dev)).float().mean())


def validate(model: Any, x: torch.Tensor, y: torch.Tensor, eps: float, device: torch.device | str = "cpu",
             seed: int = 0) -> dict[str, float]:
    """Quick deployed-mode scores (a sanity log, not a robustness claim; that is `robustkit eval`):
    clean and APGD-CE-10 accuracy of g, h and the composite, and the mean deployed alpha."""
    from robustkit.attacks.apgd import apgd

    dev = torch.device(device)
    model.eval()
    x, y = x.to(dev), y.to(dev)
    out: dict[str, float] = {"n": float(len(y))}
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, net in (("std", model.g), ("robust", model.h), ("mixed", model)):
        adv = apgd(lambda z, net=net: F.cross_entropy(net(z), y, reduction="none"), x, eps, n_iter=10,
                   generator=gen)
        out[f"{name}_clean_acc"] = _accuracy(net, x, y, dev)
        out[f"{name}_apgd10_acc"] = _accuracy(net, adv, y, dev)
        if name == "mixed":
            out["alpha_clean"] = float(model.mixing_weight(x).mean())
            out["alpha_adv"] = float(model.mixing_weight(adv).mean())
    return out


def reuse_mixer(model: Any, config: AdaptiveSmoothingConfig) -> dict[str, Any]:
    """Load the trained mixing network of ``config.mixer_from`` into ``model`` and return the
    training record it came with. Refused when the source is another composite (base sha256, taps,
    width) or was trained with other settings than ``config`` (anything outside
    :data:`REDEPLOY_FIELDS`), so the re-deployed checkpoint's recorded config stays true."""
    from robustkit.models.base import load_model

    where = f"mixer_from = {config.mixer_from!r}"
    try:
        src = load_model(config.mixer_from)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e} (mixer_from = \"\" trains a new mixer instead)") from None
    if src.metadata.get("architecture") != "adaptive_smoothing":
        raise ConfigError(f"{where} is not an adaptive_smoothing checkpoint")
    # The rebuilt source's arch args hold its base models' identities as verified on load (whatever its
    # file recorded): every one, and the mixer's shape, must match this composite's.
    theirs = getattr(src.model, "arch_args", src.metadata["arch_args"])
    for key, value in model.arch_args.items():
        if key not in ("std", "robust", "mixing") and theirs.get(key) != value:
            raise ConfigError(f"{where}: its {key} differs from this config's composite ({theirs.get(key)!r} "
                              f"vs {value!r})")
    src_training = src.metadata.get("training") or {}
    # Older checkpoints record their settings as training.recipe rather than a config.
    trained_with = src.metadata.get("config") or src_training.get("recipe") or {}
    ours = config_to_dict(config)
    for key, value in trained_with.items():
        if key in ours and key not in REDEPLOY_FIELDS and value != ours[key]:
            raise ConfigError(f"{where}: its mixer was trained with {key} = {value!r}, this config says "
                              f"{ours[key]!r}; a re-deploy changes only {', '.join(REDEPLOY_FIELDS[:5])}")
    model.load_state_dict(src.model.state_dict())
    print(f"mixing network taken from {config.mixer_from} (sha256 {src.checkpoint_sha256}); no training",
          flush=True)
    command = src_training.get("command") or (src_training.get("provenance") or {}).get("command")
    return {
        "epochs_log": src_training.get("epochs_log", []),
        "train_seconds": float(src_training.get("train_seconds", 0.0)),
        "data": src_training.get("data"),
        "mixer_from": {"path": config.mixer_from, "sha256": src.checkpoint_sha256, "training_command": command},
    }


@register_trainer(
    "adaptive_smoothing", AdaptiveSmoothingConfig,
    description="Adaptive Smoothing: the mixing network between a frozen standard and a frozen robust model",
    # Two seeded-random TinyCNNs as g and h, one 16-image step with 1-iteration attacks.
    smoke={"std": "tiny_cnn.init", "robust": "tiny_cnn.init", "dataset": "synthetic", "width": 8,
           "train_n": 16, "batch_size": 16, "iter_lo": 1, "iter_hi": 1, "val_n": 8},
)
def train(config: AdaptiveSmoothingConfig, run: RunOptions) -> Checkpoint:
    """Train (or, with ``mixer_from``, re-deploy) the mixing network, score it, save the composite."""
    from robustkit.core.provenance import provenance, training_run
    from robustkit.data import dataset_info, load_split
    from robustkit.models.adaptive_smoothing import build_adaptive_smoothing

    eps = parse_eps(config.eps)
    wall, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(config.seed)  # the mixing network's initial weights
    # The taps are found by a dummy forward at the dataset's image shape (1 x 28 x 28 on Fashion-MNIST).
    model = build_adaptive_smoothing(config.std, config.robust, s_g=config.s_g, s_h=config.s_h,
                                     width=config.width, mixing=config.mixing(),
                                     input_shape=dataset_info(config.dataset).shape).to(run.device)
    print(f"robustkit train adaptive_smoothing: g={config.std} h={config.robust} taps "
          f"{model.arch_args['taps_std']} / {model.arch_args['taps_robust']}; mixing net "
          f"{sum(p.numel() for p in model.mixing_net.parameters()):,} parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    if config.mixer_from:
        record = reuse_mixer(model, config)
    else:
        from robustkit.train._loop import index_ranges

        split = load_split(config.dataset, "train", data_dir=run.data_dir, download=run.download)
        n = len(split.labels) - config.holdout
        if n < 1:
            raise ConfigError(f"holdout = {config.holdout}: must be below the {len(split.labels)} training images")
        x, y = split.tensors(min(n, config.train_n or n))
        print(f"training on {len(y)} {config.dataset} images" + (f" (the last {config.holdout} held out)"
                                                                  if config.holdout else ""), flush=True)
        logs = train_mixing(model, x, y, config, device=run.device, progress=run.progress)
        record = {"epochs_log": logs, "train_seconds": time.perf_counter() - wall,
                  "data": {"dataset": config.dataset, "split": "train", "n": len(y), "source": split.source,
                           "train_indices": index_ranges(int(i) for i in split.indices[:len(y)]),
                           "holdout": config.holdout},
                  "mixer_from": None}
    test = load_split(config.dataset, "test", data_dir=run.data_dir, download=run.download)
    xv, yv = test.tensors(config.val_n)
    val = validate(model, xv, yv, eps, run.device, seed=config.seed)
    print("validation (first {n:.0f} test images, APGD-CE 10 steps at eps): ".format(**val)
          + ", ".join(f"{k} {v:.3f}" for k, v in val.items() if k != "n"), flush=True)
    training = {**record, **training_run(run.device, time.perf_counter() - wall, time.process_time() - cpu),
                "provenance": provenance(run.device)}
    return save_checkpoint(model, run.out, architecture="adaptive_smoothing", arch_args=model.arch_args,
                           dataset=config.dataset, num_classes=dataset_info(config.dataset).num_classes,
                           training=training, metrics={"validation": val}, trainer="adaptive_smoothing",
                           config=config)

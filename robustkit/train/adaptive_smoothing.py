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
attack iterations and one targeted attack instead of nine; the recipe says so.

    robustkit train adaptive_smoothing --std airbench94.cifar10_partial_tta0 --robust ltd.cifar10_partial \
        --recipe defenses/adaptive_smoothing.toml --data-dir ../shared/data/partial --out runs/as
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from robustkit.core.errors import ConfigError, close_matches_hint

RECIPE = Path(__file__).resolve().parents[2] / "defenses" / "adaptive_smoothing.toml"

# name -> (default, type, help). The defaults are visible here and in the recipe; flags override both.
OPTIONS: dict[str, tuple[Any, type, str]] = {
    "std": ("airbench94.cifar10_partial_tta0", str, "standard (accurate) base model g: id or checkpoint"),
    "robust": ("ltd.cifar10_partial", str, "robust base model h: id or checkpoint"),
    "dataset": ("cifar10", str, "training data"),
    "train_n": (0, int, "use only the first N training images (0 = all)"),
    "s_g": (1.0, float, "logit temperature of g inside the mixture"),
    "s_h": (1.0, float, "logit temperature of h inside the mixture"),
    "width": (32, int, "mixing-network width (channels of its first block)"),
    "train_scale": (2.0, float, "gamma = BN(raw) * scale + bias while training"),
    "train_bias": (0.4, float, "(the paper: 2, 0.4)"),
    "eval_scale": (2.0, float, "gamma scale as deployed"),
    "eval_bias": (0.4, float, "gamma bias as deployed (larger = more weight on h)"),
    "alpha_min": (0.0, float, "deployed alpha is squeezed into [alpha_min, alpha_max]"),
    "alpha_max": (1.0, float, ""),
    "bn_momentum": (0.01, float, "momentum of the mixer's BatchNorm1d on gamma"),
    "epochs": (1, int, "passes over the training images"),
    "batch_size": (64, int, "clean images per step (each also attacked 1 + n_targets times)"),
    "lr": (1e-3, float, "AdamW peak learning rate"),
    "weight_decay": (1e-5, float, ""),
    "warmup_frac": (0.04, float, "fraction of steps of linear warmup before the cosine decay"),
    "grad_clip": (10.0, float, "gradient-norm clip"),
    "eps": ("8/255", str, "nominal Linf radius; each attacked sample draws eps * U(eps_lo, eps_hi)"),
    "eps_lo": (0.4, float, ""),
    "eps_hi": (1.1, float, ""),
    "n_targets": (1, int, "targeted-DLR attacks per step (the paper: 9)"),
    "iter_lo": (2, int, "APGD iterations drawn uniformly in [iter_lo, iter_hi] per attack (paper: chi2(75))"),
    "iter_hi": (6, int, ""),
    "w_max": (0.4, float, "attack loss (1-w) base + w BCE(gamma, 1), w ~ U(0, w_max)"),
    "c_bce": (1.0, float, "loss weights (the paper's TRADES config: 1, 0.5, 0.1)"),
    "c_ce": (0.5, float, ""),
    "c_prod": (0.1, float, ""),
    "clean_weight": (1.0, float, "weight of the clean group's loss relative to the attacked group's"),
    "seed": (0, int, ""),
    "val_n": (200, int, "first N test images scored after training (clean, APGD-CE 10 steps, mean alpha)"),
}


def comp_loss(
    gamma: torch.Tensor, is_adv: torch.Tensor, log_probs: torch.Tensor, y: torch.Tensor,
    *, c_bce: float = 1.0, c_ce: float = 0.5, c_prod: float = 0.1,
    weight: torch.Tensor | None = None,
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
    model: Any, x: torch.Tensor, y: torch.Tensor, *, eps: float, epochs: int = 1, batch_size: int = 64,
    lr: float = 1e-3, weight_decay: float = 1e-5, warmup_frac: float = 0.04, grad_clip: float = 10.0,
    eps_lo: float = 0.4, eps_hi: float = 1.1, n_targets: int = 1, iter_lo: int = 2, iter_hi: int = 6,
    w_max: float = 0.4, c_bce: float = 1.0, c_ce: float = 0.5, c_prod: float = 0.1,
    clean_weight: float = 1.0, seed: int = 0, device: torch.device | str = "cpu", progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model.mixing_net`` (a :class:`MixedClassifier`) in place; return per-epoch logs."""
    from robustkit.attacks.apgd import randomized_attack

    dev = torch.device(device)
    model.to(dev)
    params = [p for p in model.mixing_net.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    attack_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    n = int(x.shape[0])
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    logs: list[dict[str, float]] = []
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        sums = {"loss": 0.0, "bce": 0.0, "ce": 0.0, "alpha_clean": 0.0, "alpha_adv": 0.0}
        t0 = time.perf_counter()
        bar = _bar(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", progress)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb, yb = x[idx].to(dev), y[idx].to(dev)
            # 1. Attack the composite: mixer in eval mode (running BN stats), training constants.
            model.eval()
            model.attack_view = True
            try:
                advs = randomized_attack(
                    model.forward_with_gamma, xb, yb, eps=eps, generator=attack_gen, n_targets=n_targets,
                    iter_range=(iter_lo, iter_hi), eps_range=(eps_lo, eps_hi), w_max=w_max)
            finally:
                model.attack_view = False
            # 2. Train the mixer on clean (label 0) + attacked (label 1) copies in one batch.
            model.train()
            xs = torch.cat([xb] + [a.detach() for _, a in advs])
            ys = yb.repeat(1 + len(advs))
            is_adv = torch.cat([torch.zeros(len(yb)), torch.ones(len(yb) * len(advs))]).to(dev)
            weight = torch.where(is_adv > 0, torch.ones_like(is_adv), torch.full_like(is_adv, clean_weight))
            for group in opt.param_groups:
                group["lr"] = lr * _lr_at(step, total, warmup_frac)
            log_probs, gamma = model.forward_with_gamma(xs)
            loss, parts = comp_loss(gamma, is_adv, log_probs, ys, c_bce=c_bce, c_ce=c_ce, c_prod=c_prod,
                                    weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
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
        print(f"epoch {epoch + 1}/{epochs}  loss {log['loss']:.4f}  bce {log['bce']:.4f}  ce {log['ce']:.4f}  "
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


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A TOML recipe: keys are :data:`OPTIONS` names (``name``/``description``/``method`` describe it)."""
    from robustkit.train.cli import read_toml

    p = Path(path)
    out = {}
    for k, v in read_toml(p).items():
        if k in ("name", "description", "method"):
            continue
        if k not in OPTIONS:
            raise ConfigError(f"recipe {p}: unknown option {k!r}{close_matches_hint(k, OPTIONS)}")
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustkit train adaptive_smoothing", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", help="TOML recipe (defenses/adaptive_smoothing.toml)")
    p.add_argument("--data-dir")
    p.add_argument("--out", required=True, help="checkpoint path stem (writes .safetensors and .json)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--mixer-from", metavar="CKPT",
                   help="skip training: take the mixing network of this adaptive_smoothing checkpoint and "
                        "re-deploy it with this recipe's deployed constants (eval_*, alpha_*), which never "
                        "affect training; the base models must be the same")
    for key, (_default, typ, help_) in OPTIONS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=None, help=help_)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from robustkit.core.checkpoint import save_checkpoint
    from robustkit.core.provenance import provenance
    from robustkit.core.threat import parse_eps
    from robustkit.data import load_split
    from robustkit.models.adaptive_smoothing import build_adaptive_smoothing

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = {k: d for k, (d, _t, _h) in OPTIONS.items()}
    if args.recipe:
        cfg.update(read_recipe(args.recipe))
    cfg.update({k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None})
    for k, (_d, typ, _h) in OPTIONS.items():
        try:
            cfg[k] = typ(cfg[k]) if not isinstance(cfg[k], bool) else cfg[k]
        except (TypeError, ValueError):
            raise ConfigError(f"option {k} must be {typ.__name__}, got {cfg[k]!r}") from None
    eps = parse_eps(cfg["eps"])
    dev = torch.device(args.device)
    torch.manual_seed(cfg["seed"])
    mixing = {k: cfg[k] for k in ("train_scale", "train_bias", "eval_scale", "eval_bias", "alpha_min",
                                  "alpha_max", "bn_momentum")}
    model = build_adaptive_smoothing(cfg["std"], cfg["robust"], s_g=cfg["s_g"], s_h=cfg["s_h"],
                                     width=cfg["width"], mixing=mixing).to(dev)
    train = load_split(cfg["dataset"], "train", data_dir=args.data_dir)
    x, y = train.tensors(cfg["train_n"] or None)
    print(f"robustkit train adaptive_smoothing: g={cfg['std']} h={cfg['robust']} taps "
          f"{model.arch_args['taps_std']} / {model.arch_args['taps_robust']}; mixing net "
          f"{sum(p.numel() for p in model.mixing_net.parameters()):,} parameters; {len(y)} train images; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    train_keys = ("epochs", "batch_size", "lr", "weight_decay", "warmup_frac", "grad_clip", "eps_lo", "eps_hi",
                  "n_targets", "iter_lo", "iter_hi", "w_max", "c_bce", "c_ce", "c_prod", "clean_weight", "seed")
    t0 = time.perf_counter()
    source: dict[str, Any] | None = None
    if args.mixer_from:
        from robustkit.models.base import load_model

        src = load_model(args.mixer_from)
        if src.metadata.get("architecture") != "adaptive_smoothing":
            raise ConfigError(f"--mixer-from {args.mixer_from} is not an adaptive_smoothing checkpoint")
        for key in ("std_sha256", "robust_sha256", "width", "taps_std", "taps_robust"):
            if src.metadata["arch_args"].get(key) != model.arch_args[key]:
                raise ConfigError(f"--mixer-from {args.mixer_from}: {key} differs from this recipe's composite")
        model.load_state_dict(src.model.state_dict())
        src_training = src.metadata.get("training", {})
        logs, seconds = src_training.get("epochs_log", []), float(src_training.get("train_seconds", 0.0))
        source = {"path": str(args.mixer_from), "sha256": src.checkpoint_sha256,
                  "training_command": src_training.get("command")}
        print(f"mixing network taken from {args.mixer_from} (sha256 {src.checkpoint_sha256}); no training")
    else:
        logs = train_mixing(model, x, y, eps=eps, device=dev, progress=not args.no_progress,
                            **{k: cfg[k] for k in train_keys})
        seconds = time.perf_counter() - t0
    test = load_split(cfg["dataset"], "test", data_dir=args.data_dir)
    xv, yv = test.tensors(cfg["val_n"])
    val = validate(model, xv, yv, eps, dev, seed=cfg["seed"])
    print("validation (first {n:.0f} test images, APGD-CE 10 steps at eps): ".format(**val)
          + ", ".join(f"{k} {v:.3f}" for k, v in val.items() if k != "n"), flush=True)
    training = {
        "method": "adaptive_smoothing", "recipe": cfg, "recipe_file": args.recipe, "epochs_log": logs,
        "train_seconds": seconds, "data": {"dataset": cfg["dataset"], "split": "train", "n": len(y),
                                           "source": train.source},
        "command": "robustkit train adaptive_smoothing " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "provenance": provenance(dev),
        "mixer_from": source,
    }
    meta = save_checkpoint(model, args.out, architecture="adaptive_smoothing", arch_args=model.arch_args,
                           dataset=cfg["dataset"], num_classes=10, training=training,
                           metrics={"validation": val}).metadata
    print(f"saved {meta['file']} (sha256 {meta['sha256']}) and its .json next to {args.out}; "
          f"training {seconds:.0f}s")
    return meta

"""Adaptive Smoothing (Bai, Anderson, Kim & Sojoudi, arXiv 2301.12554): an accurate standard classifier
g and a robust classifier h mixed in *probability* space with a weight alpha(x) from a mixing network.

    mixed(x) = log((1 - alpha) * softmax(s_g * g(x)) + alpha * softmax(s_h * h(x)))

Why probabilities and not logits: a robust h is far more confident on inputs it gets right than on
ones it gets wrong, so where h is confident it dominates the mixture whatever g says, and where h
is unsure the accurate g decides. The log makes the output a valid log-probability vector, usable
as logits by cross-entropy and by AutoAttack. It is computed in log space (``logaddexp`` of the two
weighted log-softmaxes) so a one-hot-confident g never underflows to ``log(0)``.

alpha(x) comes from a small network that reads intermediate feature maps of *both* base models
(:class:`FeatureTaps`: forward hooks on named submodules, chosen automatically per architecture
by resolution, so any robustkit model can be a base without per-architecture code). Its raw
output passes through BatchNorm1d(affine=False), ``* gamma_scale + gamma_bias`` and a sigmoid;
the paper uses different (scale, bias) constants for training and for deployment and squeezes the
deployed alpha into a range, and so do we (:class:`MixingConfig`). Only the mixing network learns;
g and h stay frozen and in eval mode.

A checkpoint of architecture ``adaptive_smoothing`` stores the mixing network's weights; its
arch args name the two base models (registry ids or checkpoint paths) *and their function pins*,
so loading rebuilds exactly the composite that was trained and refuses swapped base weights or a
base whose deployed constants changed (an LTD ``tau_s``, airbench's TTA level).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustkit.core.errors import CheckpointError, ConfigError
from robustkit.core.modes import kept_modes
from robustkit.models.base import Weights, load_model, register_model

DEFAULT_STD = "airbench94.cifar10_partial_tta0"
DEFAULT_ROBUST = "ltd.cifar10_partial"
# Function pin of robustkit/weights/adaptive_smoothing.cifar10_partial: the mixing network's tensors plus
# its arch_args, which hold the deployed constants (alpha_min, eval_bias, ...) and the base models'
# function pins, so an edited tau_s in ltd.cifar10_partial.json invalidates this composite too.
ADAPTIVE_SMOOTHING_CIFAR10_PARTIAL_PIN = "4025141c797dfc5e2717ddfc545d2eb76e9e3ebade5b22bc7074e496c9d01263"
# ... and of robustkit/weights/adaptive_smoothing.fashion_mnist_partial (small_cnn.fashion_mnist_std +
# ltd.fashion_mnist_partial; defenses/adaptive_smoothing.fashion_mnist_partial.toml).
ADAPTIVE_SMOOTHING_FASHION_MNIST_PARTIAL_PIN = "3246be39742ef885dfc29110bde401b77ff211ed0210c128b9e3cba1a78115b4"
# ... and of robustkit/weights/adaptive_smoothing.mnist_partial (small_cnn.mnist_std + small_cnn.mnist_pgd_at;
# defenses/adaptive_smoothing.mnist_partial.toml).
ADAPTIVE_SMOOTHING_MNIST_PARTIAL_PIN = "6dc4a69f32e3914cb631a03e280cfa05b4cf3a3e33c7b5461962526f8786e654"


# --------------------------------------------------------------------------------------------
# Mixing in probability space
# --------------------------------------------------------------------------------------------


def mix_from_log_alpha(
    logits_g: torch.Tensor, logits_h: torch.Tensor, log_alpha: torch.Tensor, log_1m_alpha: torch.Tensor,
    s_g: float = 1.0, s_h: float = 1.0,
) -> torch.Tensor:
    """log((1-a) softmax(s_g g) + a softmax(s_h h)) from log(a) and log(1-a) (shape (N,) or scalar).

    Taking the two logs separately is what keeps alpha = 0 or 1 exact (log 0 = -inf drops a term
    without NaNs in the forward pass) and sigmoid-parameterised alphas stable (``logsigmoid``).
    """
    lg = F.log_softmax(s_g * logits_g, dim=1)
    lh = F.log_softmax(s_h * logits_h, dim=1)
    if log_alpha.dim() == 1:
        log_alpha, log_1m_alpha = log_alpha[:, None], log_1m_alpha[:, None]
    return torch.logaddexp(log_1m_alpha + lg, log_alpha + lh)


def mix_log_probs(
    logits_g: torch.Tensor, logits_h: torch.Tensor, alpha: float | torch.Tensor,
    s_g: float = 1.0, s_h: float = 1.0,
) -> torch.Tensor:
    """Probability-space mixture of two classifiers' logits; ``alpha`` a float in [0, 1] or (N,)."""
    if isinstance(alpha, torch.Tensor):
        a = alpha.to(logits_g.dtype)
        if bool(((a < 0) | (a > 1)).any()):
            raise ValueError("alpha must lie in [0, 1]")
        return mix_from_log_alpha(logits_g, logits_h, torch.log(a), torch.log1p(-a), s_g, s_h)
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {a}")
    if a == 0.0:  # exactly g (and no dependence on h, not even NaN-through-zero-weight)
        return F.log_softmax(s_g * logits_g, dim=1)
    if a == 1.0:
        return F.log_softmax(s_h * logits_h, dim=1)
    t = logits_g.new_tensor
    return mix_from_log_alpha(logits_g, logits_h, t(math.log(a)), t(math.log1p(-a)), s_g, s_h)


# --------------------------------------------------------------------------------------------
# Feature taps: intermediate feature maps of any model, by module name
# --------------------------------------------------------------------------------------------


class FeatureTaps:
    """Capture the outputs of named submodules of ``model`` during its forward pass.

    Forward hooks, not per-architecture ``forward`` variants: every registered model (and any
    checkpoint of one) can feed the mixing network unchanged. A tapped module that runs more than
    once per forward (test-time augmentation) would make "the" feature map ambiguous, so that is
    an error, not a silent last-write-wins.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules or not n]
        if missing:
            from robustkit.core.errors import UnknownNameError

            raise UnknownNameError("feature tap", missing[0], [n for n in modules if n])
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self._active = False
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not self._active:  # the base model called on its own (e.g. scored as g alone)
                return
            if name in self.features:
                raise RuntimeError(
                    f"feature tap {name!r} fired twice in one forward pass (test-time augmentation?); "
                    "tap a single-pass model, e.g. airbench94.cifar10_partial_tta0")
            self.features[name] = output
        return hook

    def run(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``model(x)`` plus the tapped feature maps, in the order of ``names``."""
        self.features, self._active = {}, True
        try:
            out = model(x)
            feats = [self.features[n] for n in self.names]
        finally:
            self.features, self._active = {}, False
        return out, feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def auto_taps(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """The two modules whose outputs are the deepest feature maps at the two largest resolutions at or
    below half the input's (1/2 and 1/4 for a typical CNN).

    That is where the paper taps its base models (end of stage 1 and stage 2). One dry forward
    with hooks on every submodule records output shapes in execution order; at each resolution the
    last of the shallowest modules (a stage, for a network built from stages) is chosen.
    """
    c, h, w = (int(v) for v in input_shape)
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue
        handles.append(mod.register_forward_hook(
            lambda _m, _i, out, name=name: order.append((name, tuple(out.shape)))
            if isinstance(out, torch.Tensor) and out.dim() == 4 else None))
    try:
        p = next(iter(model.parameters()), None)
        with kept_modes(model, False), torch.no_grad():
            model(torch.zeros(1, c, h, w, device=p.device if p is not None else "cpu"))
    finally:
        for hd in handles:
            hd.remove()
    # The two largest resolutions at or below half the input's (16 and 8 for a 32-px SmallCNN; 15 and
    # 7 for airbench, whose unpadded whitening conv makes 31 px): ends of stage 1 and stage 2.
    sizes = sorted({s[2:] for _, s in order if s[2] <= h // 2 and s[3] <= w // 2}, reverse=True)
    if len(sizes) < 2:
        seen = ", ".join(f"{n} {list(s[1:])}" for n, s in order[:12])
        raise ConfigError(f"{type(model).__name__} has fewer than two feature-map resolutions at or below half "
                          f"the input's; give taps explicitly. Seen: {seen}")
    picks = []
    for size in sizes[:2]:
        # The shallowest modules at this resolution are the stages; the last of them ends the stage
        # (airbench: groups.0, not groups.1.conv1, which already belongs to the next stage).
        at = [name for name, shape in order if shape[2:] == size]
        depth = min(n.count(".") for n in at)
        picks.append([n for n in at if n.count(".") == depth][-1])
    return picks


def _tap_channels(model: nn.Module, taps: Sequence[str], input_shape: Sequence[int]) -> list[tuple[int, int, int]]:
    tapper = FeatureTaps(model, taps)
    p = next(iter(model.parameters()), None)
    try:
        with torch.no_grad():
            _, feats = tapper.run(model, torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu"))
    finally:
        tapper.remove()
    return [tuple(f.shape[1:]) for f in feats]  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# The mixing network
# --------------------------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """Pre-activation residual block (BN-ReLU-conv twice), 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class MixingNet(nn.Module):
    """Features of g and h -> one raw scalar per image (the paper's V3/V4 design, scaled down).

    concat(feat1_g, feat1_h) -> PreAct block (stride 2) -> + 1x1 conv of concat(feat2_g, feat2_h)
    (resized to match when the base models' stage-2 resolutions differ) -> PreAct block (stride 2)
    -> global average pool -> Linear(no bias).
    """

    def __init__(self, c1: int, c2: int, width: int = 32) -> None:
        super().__init__()
        self.block1 = PreActBlock(c1, width, stride=2)
        self.proj2 = nn.Conv2d(c2, width, 1, bias=False)
        self.block2 = PreActBlock(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, 1, bias=False)

    def forward(self, feat1: torch.Tensor, feat2: torch.Tensor) -> torch.Tensor:
        z = self.block1(feat1)
        f2 = self.proj2(feat2)
        if f2.shape[2:] != z.shape[2:]:
            f2 = F.adaptive_avg_pool2d(f2, z.shape[2:])
        z = self.block2(z + f2)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)).squeeze(1)


@dataclass(frozen=True)
class MixingConfig:
    """The paper's post-processing constants (train and deploy differ on purpose).

    In training gamma = BN(raw) * train_scale + train_bias (raw clamped to mean +- clamp_std * std of
    the batch first); deployed, gamma = BN(raw) * eval_scale + eval_bias and alpha = sigmoid(gamma) is
    squeezed into [alpha_min, alpha_max]. A larger eval bias shifts the deployed model towards h.
    """

    train_scale: float = 2.0
    train_bias: float = 0.4
    eval_scale: float = 2.0
    eval_bias: float = 0.4
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    clamp_std: float = 0.6
    bn_momentum: float = 0.01

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if not math.isfinite(v):
                raise ConfigError(f"mixing config {k} must be finite, got {v}")
        if not 0.0 <= self.alpha_min <= self.alpha_max <= 1.0:
            raise ConfigError(f"need 0 <= alpha_min <= alpha_max <= 1, got [{self.alpha_min}, {self.alpha_max}]")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ConfigError(f"bn_momentum must lie in (0, 1], got {self.bn_momentum}")


class MixedClassifier(nn.Module):
    """``log((1-alpha) softmax(s_g g) + alpha softmax(s_h h))`` with a fixed or an adaptive alpha.

    Give exactly one of ``alpha`` (a constant, plain "smoothing") or ``mixing_net``. g and h are
    frozen: their parameters never require grad and they stay in eval mode whatever mode the
    composite is put in (their BatchNorm statistics must not drift while the mixer trains). The
    composite is a deterministic, differentiable function of the input; the harness counts it as
    two forward passes (``number_forward_passes``).
    """

    number_forward_passes = 2

    def __init__(
        self,
        g: nn.Module,
        h: nn.Module,
        *,
        s_g: float = 1.0,
        s_h: float = 1.0,
        alpha: float | None = None,
        mixing_net: MixingNet | None = None,
        taps_g: Sequence[str] = (),
        taps_h: Sequence[str] = (),
        config: MixingConfig | None = None,
    ) -> None:
        super().__init__()
        if (alpha is None) == (mixing_net is None):
            raise ConfigError("give exactly one of alpha (a constant) and mixing_net")
        if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
        for s, what in ((s_g, "s_g"), (s_h, "s_h")):
            if not (math.isfinite(s) and s > 0):
                raise ConfigError(f"{what} must be a finite number > 0, got {s}")
        self.g, self.h = g, h
        for p in [*g.parameters(), *h.parameters()]:
            p.requires_grad_(False)
        self.s_g, self.s_h = float(s_g), float(s_h)
        self.alpha = None if alpha is None else float(alpha)
        self.mixing_net = mixing_net
        self.config = config or MixingConfig()
        self.bn = nn.BatchNorm1d(1, affine=False, momentum=self.config.bn_momentum)
        self.taps_g, self.taps_h = list(taps_g), list(taps_h)
        if mixing_net is not None and (len(self.taps_g) != 2 or len(self.taps_h) != 2):
            raise ConfigError("an adaptive mixture needs two feature taps on each base model")
        self._tappers = ((FeatureTaps(g, self.taps_g), FeatureTaps(h, self.taps_h))
                         if mixing_net is not None else None)
        # Attacks *during training* see the mixer in eval mode (running BN statistics) but with the
        # training constants and no alpha squeeze, as in the paper (its eval(scale_alpha=False)).
        self.attack_view = False
        self.g.eval()
        self.h.eval()

    def train(self, mode: bool = True) -> MixedClassifier:
        super().train(mode)
        self.g.eval()
        self.h.eval()
        return self

    def fixed_alpha(self, alpha: float) -> MixedClassifier:
        """The same g and h (shared, not copied) mixed with a constant alpha."""
        return MixedClassifier(self.g, self.h, s_g=self.s_g, s_h=self.s_h, alpha=alpha)

    def _gamma(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw mixer output -> (gamma, log alpha, log(1 - alpha))."""
        c = self.config
        if self.training:
            # Clamp outliers before BN so one odd batch cannot swing the running statistics.
            m, s = raw.mean().detach(), raw.std().detach() if raw.numel() > 1 else raw.new_tensor(0.0)
            if raw.numel() > 1:
                raw = torch.minimum(torch.maximum(raw, m - c.clamp_std * s), m + c.clamp_std * s)
        z = self.bn(raw[:, None])[:, 0]
        if self.training or self.attack_view:
            gamma = z * c.train_scale + c.train_bias
            return gamma, F.logsigmoid(gamma), F.logsigmoid(-gamma)
        gamma = z * c.eval_scale + c.eval_bias
        # Squeeze alpha into [lo, hi] in log space: alpha' = lo + (hi - lo) sigmoid(gamma).
        lo, width = c.alpha_min, c.alpha_max - c.alpha_min
        t = gamma.new_tensor
        log_lo = t(math.log(lo) if lo > 0 else -math.inf)
        log_hi_c = t(math.log1p(-c.alpha_max) if c.alpha_max < 1 else -math.inf)
        if width == 0:
            return gamma, log_lo.expand_as(gamma), t(math.log1p(-lo) if lo < 1 else -math.inf).expand_as(gamma)
        log_w = math.log(width)
        return (gamma, torch.logaddexp(log_lo, log_w + F.logsigmoid(gamma)),
                torch.logaddexp(log_hi_c, log_w + F.logsigmoid(-gamma)))

    def forward_with_gamma(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log mixed probabilities (N, C), gamma (N,)); alpha = sigmoid(gamma) before any squeeze."""
        if self.mixing_net is None:
            assert self.alpha is not None
            out = mix_log_probs(self.g(x), self.h(x), self.alpha, self.s_g, self.s_h)
            a = min(max(self.alpha, 1e-12), 1 - 1e-12)
            return out, out.new_full((x.shape[0],), math.log(a) - math.log1p(-a))
        assert self._tappers is not None
        lg, (g1, g2) = self._tappers[0].run(self.g, x)
        lh, (h1, h2) = self._tappers[1].run(self.h, x)
        raw = self.mixing_net(torch.cat([g1, _resize(h1, g1)], 1), torch.cat([g2, _resize(h2, g2)], 1))
        gamma, log_a, log_1ma = self._gamma(raw)
        return mix_from_log_alpha(lg, lh, log_a, log_1ma, self.s_g, self.s_h), gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_gamma(x)[0]

    @torch.no_grad()
    def mixing_weight(self, x: torch.Tensor) -> torch.Tensor:
        """alpha(x) as deployed (after the squeeze in eval mode), shape (N,)."""
        if self.mixing_net is None:
            assert self.alpha is not None
            return torch.full((x.shape[0],), self.alpha, device=x.device)
        assert self._tappers is not None
        _, (g1, g2) = self._tappers[0].run(self.g, x)
        _, (h1, h2) = self._tappers[1].run(self.h, x)
        raw = self.mixing_net(torch.cat([g1, _resize(h1, g1)], 1), torch.cat([g2, _resize(h2, g2)], 1))
        return self._gamma(raw)[1].exp()

    def extra_repr(self) -> str:
        mix = f"alpha={self.alpha:g}" if self.alpha is not None else f"adaptive, {self.config}"
        return f"s_g={self.s_g:g}, s_h={self.s_h:g}, {mix}"


def _resize(f: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Match spatial size so feature maps of two differently shaped base models can be concatenated."""
    return f if f.shape[2:] == like.shape[2:] else F.adaptive_avg_pool2d(f, like.shape[2:])


# --------------------------------------------------------------------------------------------
# The registered architecture
# --------------------------------------------------------------------------------------------


def _load_base(name: str, pin: str | None, sha256: str | None, role: str) -> tuple[nn.Module, str | None]:
    """Load a base model and check it is the one the mixer was trained with: by function pin, or by
    tensor sha256 for composites written before function pins existed."""
    loaded = load_model(name)
    for what, want, got in (("function pin", pin, loaded.function_sha256),
                            ("sha256", sha256, loaded.checkpoint_sha256)):
        if want and not got:
            raise CheckpointError(f"{role} model {name!r} has no checkpoint, but the composite names {what} "
                                  f"{want[:12]}…")
        if want and got != want:
            raise CheckpointError(
                f"{role} model {name!r} has {what} {got[:12]}…, but this composite was trained with "
                f"{want[:12]}…; its mixing network would not fit that model")
    return loaded.model, loaded.function_sha256


def build_adaptive_smoothing(
    std: str = DEFAULT_STD,
    robust: str = DEFAULT_ROBUST,
    std_pin: str | None = None,
    robust_pin: str | None = None,
    s_g: float = 1.0,
    s_h: float = 1.0,
    taps_std: Sequence[str] | None = None,
    taps_robust: Sequence[str] | None = None,
    width: int = 32,
    mixing: dict[str, float] | None = None,
    input_shape: Sequence[int] = (3, 32, 32),
    std_sha256: str | None = None,
    robust_sha256: str | None = None,
) -> MixedClassifier:
    """Build the composite from two base model ids (registry ids or checkpoint paths).

    Every argument is plain JSON so a checkpoint's ``arch_args`` rebuild it; ``*_pin`` are the function
    pins of the base models the mixer was trained with (``*_sha256``: their tensor sha256, as composites
    written before function pins recorded them). Base weights are *not* part of the composite's
    checkpoint (:attr:`external_state_prefixes`): they load from their own verified files.
    """
    g, pin_g = _load_base(std, std_pin, std_sha256, "standard")
    h, pin_h = _load_base(robust, robust_pin, robust_sha256, "robust")
    taps_g = list(taps_std) if taps_std else auto_taps(g, input_shape)
    taps_h = list(taps_robust) if taps_robust else auto_taps(h, input_shape)
    (cg1, *_), (cg2, *_) = _tap_channels(g, taps_g, input_shape)
    (ch1, *_), (ch2, *_) = _tap_channels(h, taps_h, input_shape)
    try:
        config = MixingConfig(**(mixing or {}))
    except TypeError as e:
        raise ConfigError(f"bad mixing config: {e}") from None
    model = MixedClassifier(g, h, s_g=s_g, s_h=s_h, mixing_net=MixingNet(cg1 + ch1, cg2 + ch2, width),
                            taps_g=taps_g, taps_h=taps_h, config=config)
    # What a trainer writes into the checkpoint's arch_args (resolved taps and pins, not "auto").
    model.arch_args = {  # type: ignore[assignment]
        "std": std, "robust": robust, "std_pin": pin_g, "robust_pin": pin_h, "s_g": s_g, "s_h": s_h,
        "taps_std": taps_g, "taps_robust": taps_h, "width": width, "mixing": asdict(config),
        "input_shape": list(input_shape),
    }
    return model


# The composite's checkpoint holds only the mixing network (and its BN): g and h are separate files.
MixedClassifier.external_state_prefixes = ("g.", "h.")  # type: ignore[attr-defined]


def _register() -> None:
    register_model(
        "adaptive_smoothing",
        build_adaptive_smoothing,
        description="Adaptive Smoothing: airbench94 (standard) + LTD SmallCNN (robust) mixed in probability "
                    "space by a trained mixing network (`robustkit train adaptive_smoothing`)",
        dataset="cifar10",
        tags={
            "cifar10_partial": Weights(
                file="adaptive_smoothing.cifar10_partial",
                pin=ADAPTIVE_SMOOTHING_CIFAR10_PARTIAL_PIN,
                description="mixing network for airbench94.cifar10_partial_tta0 + ltd.cifar10_partial, trained "
                            "on the 5,438 real CIFAR-10 train images "
                            "(defenses/adaptive_smoothing.cifar10_partial.toml)",
            ),
            "fashion_mnist_partial": Weights(
                file="adaptive_smoothing.fashion_mnist_partial",
                pin=ADAPTIVE_SMOOTHING_FASHION_MNIST_PARTIAL_PIN,
                description="mixing network for small_cnn.fashion_mnist_std + ltd.fashion_mnist_partial (Linf "
                            "0.1), trained on 7,226 real Fashion-MNIST train images, deployed constants chosen on "
                            "the 1,000 held out (defenses/adaptive_smoothing.fashion_mnist_partial.toml)",
            ),
            "mnist_partial": Weights(
                file="adaptive_smoothing.mnist_partial",
                pin=ADAPTIVE_SMOOTHING_MNIST_PARTIAL_PIN,
                description="mixing network for small_cnn.mnist_std + small_cnn.mnist_pgd_at (Linf 0.3), trained "
                            "on 23,680 real MNIST train images, deployed constants chosen on the 1,000 held out "
                            "(defenses/adaptive_smoothing.mnist_partial.toml)",
            ),
        },
        default_tag="cifar10_partial",
    )


_register()

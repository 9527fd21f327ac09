"""SmallCNN and TinyCNN: the small models robustkit ships and tests with.

Why these models exist: the toolkit needs a model that (a) ships inside the repository (well under
3 MB), (b) trains on two CPU cores in minutes, and (c) is *somewhat* robust, so that when
AutoAttack runs on it some examples survive APGD-CE and every later stage (APGD-T, FAB-T,
Square) is exercised on real data. A clean-only model would be broken by the first stage and
leave the rest of the pipeline untested. ``TinyCNN`` is the few-thousand-parameter variant for
unit tests.

The shipped ``small_cnn.cifar10_partial`` was trained by fast adversarial training (FGSM with a
random start, Wong, Rice & Kolter 2020): ``robustkit train fast_at --recipe
defenses/small_cnn.cifar10_partial.toml`` (:mod:`robustkit.train.fast_at`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustkit.core.errors import ConfigError
from robustkit.models.base import Normalize, Weights, register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def _check_stats(in_channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
    # A 3-value mean on a 1-channel model would broadcast silently into garbage; refuse it.
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(
            f"mean/std need {in_channels} values (one per input channel), got "
            f"{len(mean)} and {len(std)}"
        )


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    # bias=False: the BatchNorm shift that follows makes a conv bias redundant.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (width, 2*width, 4*width; two convs each) with max-pools,
    global average pooling and a linear head. ~73 k parameters at width 16 (the default and the
    shipped ``cifar10_partial`` weights), ~0.29 M at width 32.

    Takes float32 NCHW in [0, 1]; normalisation is the first layer so attacks see pixel space.
    All constructor arguments are JSON-serialisable: they are stored as checkpoint ``arch_args``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        _check_stats(in_channels, mean, std)
        w = width
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            _conv_bn(in_channels, w), _conv_bn(w, w), nn.MaxPool2d(2),  # 32 -> 16
            _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),  # 16 -> 8
            _conv_bn(2 * w, 4 * w), _conv_bn(4 * w, 4 * w), nn.MaxPool2d(2),  # 8 -> 4
        )
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size >= 8 px works
        self.head = nn.Linear(4 * w, num_classes)

    @property
    def feature_dim(self) -> int:
        """Width of the representation :meth:`embed` returns (``4 * width``)."""
        return self.head.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's representation of [0, 1] images (normalise, convolve, global-average-pool): what
        representation learners (SCoRe) and federated heads (FedLoGe) train on top of."""
        return torch.flatten(self.pool(self.features(self.normalize(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class TinyCNN(nn.Module):
    """Two 3x3 convs of ``width`` channels + a linear head (~2 k parameters): fast enough for
    unit tests of attacks and the harness, with the same contract as :class:`SmallCNN`."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        mean = (0.5,) * in_channels if mean is None else mean
        std = (0.5,) * in_channels if std is None else std
        _check_stats(in_channels, mean, std)
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # fixed head size whatever the input resolution
        )
        self.head = nn.Linear(width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(self.normalize(x)), 1))


# Function pin of robustkit/weights/small_cnn.cifar10_partial (tensors + architecture, arch_args,
# normalization, dataset, num_classes: robustkit.core.checkpoint.function_pin), verified on every load.
SMALL_CNN_CIFAR10_PARTIAL_PIN = "ff1e3d7ba558eee365d57199e8c36e65040104367b48316e044680ef671dc693"
# ... and of robustkit/weights/small_cnn.fashion_mnist_partial (defenses/small_cnn.fashion_mnist_partial.toml).
SMALL_CNN_FASHION_MNIST_PARTIAL_PIN = "5617c710be8d6ed91047cf752083f9080852675ee56f01bba038f202a48503c5"
# ... and of robustkit/weights/small_cnn.fashion_mnist_std (defenses/small_cnn.fashion_mnist_std.toml).
SMALL_CNN_FASHION_MNIST_STD_PIN = "009e1255e353a9976d5ca410215d887179771adf021243ef4d5266b974ea794e"
# ... and of the Fashion-MNIST comparison's PGD-AT and TRADES runs (defenses/small_cnn.fashion_mnist_{pgd_at,trades}.toml).
SMALL_CNN_FASHION_MNIST_PGD_AT_PIN = "d40f333ca4509b8fe528c146e852100bab08994ecc6a97d260ed837e99943d30"
SMALL_CNN_FASHION_MNIST_TRADES_PIN = "ad3e392016f48667125f12c65e855350510af1320e4c777c2e1aee407a75fbc0"
# ... and of robustkit/weights/small_cnn.mnist_partial (defenses/small_cnn.mnist_partial.toml).
SMALL_CNN_MNIST_PARTIAL_PIN = "23bf1f48730f7c31788d91a8f291e842fa85d12485d5387ebb552f85bc80d6a6"
# ... and of robustkit/weights/small_cnn.mnist_std (defenses/small_cnn.mnist_std.toml).
SMALL_CNN_MNIST_STD_PIN = "c95894a3c20acd0be73164f645b933d849244882edcc9abfe98a0f6a6a3d649a"
# ... and of the MNIST comparison's PGD-AT and TRADES runs (defenses/small_cnn.mnist_{pgd_at,trades}.toml).
SMALL_CNN_MNIST_PGD_AT_PIN = "00fdabecc39882c5465279caf567c6a8b62ac6cfb38b773ada73f0df47f360c1"
SMALL_CNN_MNIST_TRADES_PIN = "c86ce2c443c16e6d8610defda8a5f33d11b4c00177204d2c1b6fbe225af91e38"


def _register() -> None:
    """Put ``tiny_cnn`` and ``small_cnn`` (with its shipped weights) in the model registry."""
    register_model(
        "tiny_cnn",
        TinyCNN,
        description="2-conv test model (~2k params), random init only",
        dataset="synthetic",
    )
    register_model(
        "small_cnn",
        SmallCNN,
        description="6-conv CIFAR CNN (width 16, ~73k params), FGSM-RS adversarially trained on CIFAR-10 subset",
        dataset="cifar10",
        tags={
            "cifar10_partial": Weights(
                file="small_cnn.cifar10_partial",
                pin=SMALL_CNN_CIFAR10_PARTIAL_PIN,
                description="fast AT (FGSM-RS, eps 8/255), width 16, on the 5,438 real CIFAR-10 train images",
            ),
            "fashion_mnist_partial": Weights(
                file="small_cnn.fashion_mnist_partial",
                pin=SMALL_CNN_FASHION_MNIST_PARTIAL_PIN,
                description="fast AT (FGSM-RS, eps 0.1), width 16, on the 8,226 real Fashion-MNIST train images "
                            "(LTD's teacher there)",
            ),
            "fashion_mnist_std": Weights(
                file="small_cnn.fashion_mnist_std",
                pin=SMALL_CNN_FASHION_MNIST_STD_PIN,
                description="standard training (no attack), width 32, on 7,226 real Fashion-MNIST train images "
                            "(the last 1,000 held out): adaptive smoothing's accurate base g there",
            ),
            "fashion_mnist_pgd_at": Weights(
                file="small_cnn.fashion_mnist_pgd_at",
                pin=SMALL_CNN_FASHION_MNIST_PGD_AT_PIN,
                description="PGD-AT (PGD-3, eps 0.1), width 16, on 7,226 real Fashion-MNIST train images (the "
                            "last 1,000 held out): the LTD comparison's PGD-AT run",
            ),
            "fashion_mnist_trades": Weights(
                file="small_cnn.fashion_mnist_trades",
                pin=SMALL_CNN_FASHION_MNIST_TRADES_PIN,
                description="TRADES (beta 6, PGD-3, eps 0.1), width 16, on 7,226 real Fashion-MNIST train images "
                            "(the last 1,000 held out): the LTD comparison's TRADES run",
            ),
            "mnist_partial": Weights(
                file="small_cnn.mnist_partial",
                pin=SMALL_CNN_MNIST_PARTIAL_PIN,
                description="fast AT (FGSM-RS, eps 0.3), width 16, on 23,680 real MNIST train images (the last "
                            "1,000 held out): LTD's teacher there",
            ),
            "mnist_std": Weights(
                file="small_cnn.mnist_std",
                pin=SMALL_CNN_MNIST_STD_PIN,
                description="standard training (no attack), width 32, on 23,680 real MNIST train images (the last "
                            "1,000 held out): adaptive smoothing's accurate base g there",
            ),
            "mnist_pgd_at": Weights(
                file="small_cnn.mnist_pgd_at",
                pin=SMALL_CNN_MNIST_PGD_AT_PIN,
                description="PGD-AT (PGD-5, eps 0.3), width 16, on 23,680 real MNIST train images (the last 1,000 "
                            "held out): the LTD comparison's PGD-AT run",
            ),
            "mnist_trades": Weights(
                file="small_cnn.mnist_trades",
                pin=SMALL_CNN_MNIST_TRADES_PIN,
                description="TRADES (beta 6, PGD-5, eps 0.3), width 16, on 23,680 real MNIST train images (the last "
                            "1,000 held out): the LTD comparison's TRADES run",
            ),
        },
        default_tag="cifar10_partial",
    )


_register()

"""A 14,862-parameter CNN built with the two-stage recipe of Isong (2025), "Building Efficient
Lightweight CNN Models" (arXiv 2501.15547): the modules and their shipped weights. The training
procedure is the trainer ``lightweight_cnn`` (:mod:`robustkit.train.lightweight_cnn`).

The paper has no public code and gives no exact layer list, so this file rebuilds the *procedure's
models* within its parameter budgets:

Stage 1 trains two copies of one small CNN (:class:`LightweightCNN`, a "branch") independently,
branch A on the original images and branch B on augmented ones; side by side they form
:class:`DualInputOutput`, whose output is the concatenation of both branches' logits.

Stage 2 merges the two trained feature extractors into :class:`UnifiedModel` (registered as
``lightweight_cnn``; the model that is shipped and evaluated): both run in parallel on the same
input, their pooled features are concatenated and a new refinement head classifies them. It is
fine-tuned with progressive unfreezing (head first, then one block per phase, last to first).

Merge choice: the paper's headline (14,862 parameters, 0.17 MB) is the size of the deployed model,
so the budget is spent on the *unified* model: each branch gets about half of it
(7,120 feature parameters) and the head the rest (622). Keeping both extractors, rather than
averaging their weights, is what lets the unified model use the two views the branches learned
(plain and augmentation-invariant features); averaging two independently trained networks does
not work without aligning their channels first. The branches' own stage-1 classifiers are dropped.

Architecture at the MNIST defaults (1x28x28, widths (8, 16, 20), head 12):

    branch (x2)  block 0: conv3x3 1->8, BN, ReLU; conv3x3 8->8, BN, ReLU; maxpool   28 -> 14
                 block 1: conv3x3 8->16, BN, ReLU; conv3x3 16->16, BN, ReLU; maxpool 14 -> 7
                 block 2: conv3x3 16->20, BN, ReLU; global average pool -> 20 features
    head         dropout, linear 40->12, ReLU, linear 12->10

    7,120 per branch extractor, 622 head: 14,862 parameters in all, the paper's count (matched by
    choosing the widths, not by copying its unknown layers); a 66,200-byte safetensors file with
    the BatchNorm buffers. CIFAR-10 (3x32x32) uses widths (8, 16, 28) and head 32: 19,018.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustkit.core.errors import ConfigError
from robustkit.models.base import Normalize, Weights, register_model

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
MNIST_WIDTHS = (8, 16, 20)
MNIST_HEAD_HIDDEN = 12


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    # bias=False: the BatchNorm shift that follows makes a conv bias redundant (saves parameters).
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def make_blocks(in_channels: int, widths: Sequence[int]) -> nn.ModuleList:
    """The feature extractor of one branch, as an ordered list of blocks (the unfreezing units).

    Every block but the last is two conv-BN-ReLU layers and a 2x2 max-pool; the last is one
    conv-BN-ReLU and a global average pool, so the output is a ``widths[-1]`` vector whatever the
    input size and no large flatten->linear layer eats the parameter budget.
    """
    if not widths or any(int(w) < 1 for w in widths):
        raise ConfigError(f"widths must be positive channel counts, got {list(widths)}")
    blocks, cin = [], in_channels
    for i, w in enumerate(widths):
        if i < len(widths) - 1:
            blocks.append(nn.Sequential(_conv_bn(cin, w), _conv_bn(w, w), nn.MaxPool2d(2)))
        else:
            blocks.append(nn.Sequential(_conv_bn(cin, w), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        cin = w
    return nn.ModuleList(blocks)


def _check_stats(in_channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
    # A 3-value mean on a 1-channel model would broadcast silently into garbage; refuse it.
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(f"mean/std need {in_channels} values (one per input channel), got "
                          f"{len(mean)} and {len(std)}")


class LightweightCNN(nn.Module):
    """One branch: the "same lightweight CNN" of the paper, trained alone in stage 1.

    [0, 1] NCHW in, logits out (normalisation inside). ``blocks`` are ordered input to output;
    ``embed`` gives the pooled features the unified model reuses; ``classifier`` is the stage-1
    head, dropped at the merge. 7,330 parameters at the MNIST defaults (7,120 + 210 classifier).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = MNIST_WIDTHS,
        dropout: float = 0.0,
        mean: Sequence[float] = MNIST_MEAN,
        std: Sequence[float] = MNIST_STD,
    ) -> None:
        super().__init__()
        _check_stats(in_channels, mean, std)
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "widths": list(widths),
                       "mean": list(mean), "std": list(std)}
        self.normalize = Normalize(mean, std)
        self.blocks = make_blocks(in_channels, widths)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(widths[-1], num_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.normalize(x)
        for block in self.blocks:
            h = block(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class DualInputOutput(nn.Module):
    """Stage 1 of the paper: two branches side by side, ``(x_orig, x_aug) -> [logits_a | logits_b]``.

    The branches share nothing (no weights, no optimizer, no batches), so training one cannot move
    the other; the concatenated output is what the paper calls the dual-input-output model.
    """

    def __init__(self, branch_a: LightweightCNN, branch_b: LightweightCNN) -> None:
        super().__init__()
        self.branch_a, self.branch_b = branch_a, branch_b

    def forward(self, x_orig: torch.Tensor, x_aug: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_a(x_orig), self.branch_b(x_aug)], dim=1)


class UnifiedModel(nn.Module):
    """Stage 2 of the paper and the shipped model (``lightweight_cnn``): both branches' feature
    extractors run in parallel on the same image; their pooled features are concatenated and a new
    refinement head (dropout, linear, ReLU, linear) classifies them.

    All constructor arguments are JSON-serialisable (checkpoint ``arch_args``), so a checkpoint
    rebuilds the model without the branches; :meth:`from_branches` is the stage-2 merge.
    ``blocks[k]`` groups block k of both branches: unfreezing works depth by depth.

    ``frozen_blocks`` (set by the trainer's ``ProgressiveUnfreezer``) lists blocks that :meth:`train` keeps
    in eval mode, so a frozen block's BatchNorm uses and keeps its running statistics instead of
    updating them from the batch: frozen then means bit-identical, buffers included.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = MNIST_WIDTHS,
        head_hidden: int = MNIST_HEAD_HIDDEN,
        dropout: float = 0.0,
        mean: Sequence[float] = MNIST_MEAN,
        std: Sequence[float] = MNIST_STD,
    ) -> None:
        super().__init__()
        _check_stats(in_channels, mean, std)
        self.normalize = Normalize(mean, std)
        self.branch_a = make_blocks(in_channels, widths)
        self.branch_b = make_blocks(in_channels, widths)
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(2 * widths[-1], head_hidden), nn.ReLU(inplace=True),
            nn.Linear(head_hidden, num_classes),
        )
        self.frozen_blocks: tuple[int, ...] = ()

    @classmethod
    def from_branches(
        cls, branch_a: LightweightCNN, branch_b: LightweightCNN, head_hidden: int = MNIST_HEAD_HIDDEN,
        dropout: float = 0.0,
    ) -> UnifiedModel:
        """The merge: copy both trained extractors, add a freshly initialised head."""
        if branch_a.config != branch_b.config:
            raise ConfigError("the two branches must share one architecture to be merged")
        model = cls(**branch_a.config, head_hidden=head_hidden, dropout=dropout)
        model.branch_a.load_state_dict(branch_a.blocks.state_dict())
        model.branch_b.load_state_dict(branch_b.blocks.state_dict())
        return model

    @property
    def blocks(self) -> list[nn.ModuleList]:
        # Built on the fly, not registered: registering would list every weight twice in the
        # state dict (branch_a.0... and blocks.0.0...).
        return [nn.ModuleList([a, b]) for a, b in zip(self.branch_a, self.branch_b, strict=True)]

    def train(self, mode: bool = True) -> UnifiedModel:
        super().train(mode)
        if mode:
            for i in self.frozen_blocks:
                self.blocks[i].eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = b = self.normalize(x)
        for block_a, block_b in zip(self.branch_a, self.branch_b, strict=True):
            a, b = block_a(a), block_b(b)
        return self.head(torch.cat([a, b], dim=1))


def n_params(model: nn.Module) -> int:
    """Trainable-or-not parameter count (buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Registry. Shipped weights go in WEIGHTS_TAGS, one line each, e.g.
#   "mnist": Weights(file="lightweight_cnn.mnist", pin="...", description="..."),
# where pin is the checkpoint's function_sha256 (its JSON sidecar records it).
# The checkpoint's arch_args rebuild the dataset-specific variant (widths, channels, mean/std); the
# first tag listed becomes the default. Recipes: defenses/lightweight_cnn.<tag>.toml;
# measured figures: defenses/cards/lightweight_cnn.md.
# --------------------------------------------------------------------------------------------

WEIGHTS_TAGS: dict[str, Weights] = {
    "mnist_partial": Weights(
        file="lightweight_cnn.mnist_partial",
        pin="1fb74e96ea0b347bbf3edaaa812adc7cc2e14b468fbf7a998803d31953c64f93",
        description="MNIST, 24,680 real training images; 14,862 params; clean 98.84% on 10,000 real test images",
    ),
    "fashion_mnist_partial": Weights(
        file="lightweight_cnn.fashion_mnist_partial",
        pin="660473d8ec8954ad79e1ac9a144bffd11755b0601033d022c60c22242cd64e54",
        description="Fashion-MNIST, 8,226 real training images; 14,862 params; clean 86.96% on 6,978 real test images",
    ),
    "cifar10_partial": Weights(
        file="lightweight_cnn.cifar10_partial",
        pin="4029eff1471e8924f1b9eb3981d6b61ebb78652a4eec9d520a1d01878a32464d",
        description="CIFAR-10, 5,438 real training images; 19,018 params; clean 61.65% on 1,017 real test images",
    ),
}


def _register() -> None:
    register_model(
        "lightweight_cnn",
        UnifiedModel,
        description="Isong 2025 lightweight CNN: two 7k-param branches + head (14,862 params at 1x28x28)",
        dataset="mnist",
        tags=WEIGHTS_TAGS,
        default_tag=next(iter(WEIGHTS_TAGS), None),
    )


_register()

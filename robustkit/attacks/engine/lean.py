"""A model made cheaper to run for the length of one attack stage, computing the same function.

AutoAttack on a robust model is thousands of forward and backward passes per surviving image, so
on a CPU the model's own cost is the engine's cost. Two rewrites pay for every CIFAR-10 model
robustkit ships (``eval/benchmarks/layout.json``) and are undone when the stage ends, whatever
happens:

- **channels-last layout** of the images and of every convolution weight: oneDNN's convolutions
  and pooling run faster on NHWC than on NCHW, and every tensor an attack derives from the images
  keeps the layout;
- **batch norm folded into the convolution before it**: an eval-mode ``BatchNorm2d`` is a fixed
  per-channel affine map, so ``conv`` then ``bn`` equals one convolution with scaled weights and a
  bias. Folded only where that is provably the same function: the pair sits in an ``nn.Sequential``
  whose forward is the standard one, neither module has hooks (a hook on the convolution would see
  the folded output) or appears anywhere else in the model (shared weights), and the norm uses its
  running statistics.

The values computed differ only in the last bits (as between two batch sizes), and the harness
re-predicts every adversarial example with the untouched model, so a rewrite could at worst make
an attack weaker, never report a false success.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["foldable_pairs", "lean_model"]


@contextlib.contextmanager
def lean_model(model: nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Inside: ``model`` folded and channels-last, and ``x`` channels-last (the tensor to attack).
    Only for 4-d images on a CPU; elsewhere ``x`` and the model are left as they are."""
    if x.dim() != 4 or x.device.type != "cpu":
        yield x
        return
    with _folded_batch_norms(model), _channels_last(model):
        yield x.contiguous(memory_format=torch.channels_last)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def foldable_pairs(model: nn.Module) -> list[tuple[nn.Sequential, str, nn.Conv2d, nn.BatchNorm2d]]:
    """``(sequential, name of the norm, conv, norm)`` for every convolution + batch norm pair that
    folding leaves the same function (see the module docstring)."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    pairs = []
    for seq in model.modules():
        if type(seq) is not nn.Sequential:  # a subclass may run its modules its own way
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[first], seq._modules[second]
            if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and not bn.training
                    and bn.running_mean is not None and bn.running_var is not None
                    and bn.num_features == conv.out_channels and not _hooked(conv) and not _hooked(bn)
                    and uses[id(conv)] == 1 and uses[id(bn)] == 1):
                pairs.append((seq, second, conv, bn))
    return pairs


@contextlib.contextmanager
def _folded_batch_norms(model: nn.Module) -> Iterator[None]:
    undo = []
    try:
        with torch.no_grad():
            for seq, name, conv, bn in foldable_pairs(model):
                assert bn.running_var is not None and bn.running_mean is not None
                scale = torch.rsqrt(bn.running_var + bn.eps)
                if bn.affine:
                    scale = scale * bn.weight
                shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
                bias = conv.bias
                undo.append((seq, name, bn, conv, conv.weight.data, bias, None if bias is None else bias.data))
                conv.weight.data = conv.weight.data * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
                folded = (shift if bias is None else bias.data * scale + shift).to(conv.weight.dtype)
                if bias is None:
                    conv.bias = nn.Parameter(folded, requires_grad=False)
                else:
                    bias.data = folded
                seq._modules[name] = nn.Identity()
        yield
    finally:
        for seq, name, bn, conv, weight, bias, bias_data in reversed(undo):
            seq._modules[name] = bn
            conv.weight.data = weight
            if bias is None:
                conv.bias = None
            else:
                bias.data = bias_data


@contextlib.contextmanager
def _channels_last(model: nn.Module) -> Iterator[None]:
    swapped = [(p, p.data) for p in model.parameters()
               if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last)]
    try:
        for p, data in swapped:
            p.data = data.contiguous(memory_format=torch.channels_last)
        yield
    finally:
        for p, data in swapped:
            p.data = data

"""Switch a model's train/eval mode for a while and give every submodule its own mode back.

``model.train(was_training)`` is not a restore: it sets *every* submodule to the root's flag, so a
BatchNorm the caller froze in eval mode inside a training model comes back in train mode and its
running statistics drift on the next forward. The only faithful restore is per module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["kept_modes", "module_modes", "restore_modes"]


def module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every module of ``model`` (itself included) with its own ``training`` flag."""
    return [(m, m.training) for m in model.modules()]


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Set each module's flag back directly: ``train()`` overrides must not run, as they would
    impose a policy (e.g. frozen blocks in eval) on top of the exact state being restored."""
    for module, training in modes:
        module.training = training


@contextmanager
def kept_modes(model: nn.Module, training: bool | None = None) -> Iterator[nn.Module]:
    """Within the block the model is in ``model.train(training)`` (unchanged when None); afterwards
    every submodule has exactly the mode it had before, whatever happened in between."""
    modes = module_modes(model)
    try:
        if training is not None:
            model.train(training)
        yield model
    finally:
        restore_modes(modes)

"""Forward/backward image-pass counting, the cost measure AutoAttack papers report."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class PassCounter(nn.Module):
    """Wraps a model and counts image-forwards and image-backwards through it.

    A backward is counted when a gradient reaches the model's output, which covers both
    ``loss.backward()`` (FAB) and ``torch.autograd.grad`` (APGD, PGD). Counting is per image, so
    a batch of 64 is 64 passes, matching how AutoAttack's cost is usually quoted.

    ``compile``: run the model (and its ``forward_with_gamma``) through ``torch.compile``. On a CPU
    the forward passes of the small models get about 2x faster (Square is nothing but forward
    passes); logits agree with eager ones to float rounding. Compiled lazily, at the first call.
    """

    def __init__(self, model: nn.Module, *, compile: bool = False) -> None:
        super().__init__()
        self.model = model
        self.compiled = compile
        # Outside the module tree (``__dict__``): the compiled wrapper holds ``model`` as a submodule,
        # and registering it would list every parameter twice.
        self.__dict__["_run"] = torch.compile(model) if compile else model
        self.__dict__["_run_gamma"] = None
        self.forward_passes = 0
        self.backward_passes = 0
        self.forward_calls = 0
        # Called after every forward: lets a progress bar show life inside a long batch (one
        # Square batch is 5,000 sequential queries).
        self.on_forward: Callable[[], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._count(x, self._run(x))

    @property
    def forward_with_gamma(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The wrapped model's ``forward_with_gamma`` (adaptive attacks read the mixer through
        it), counted like ``forward``; absent (``hasattr`` is False) when the model has none."""
        if not callable(getattr(self.model, "forward_with_gamma", None)):
            raise AttributeError(f"{type(self.model).__name__} has no forward_with_gamma")
        return self._forward_with_gamma

    def _forward_with_gamma(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._run_gamma is None:
            method = self.model.forward_with_gamma
            self.__dict__["_run_gamma"] = torch.compile(method) if self.compiled else method
        out, gamma = self._run_gamma(x)
        return self._count(x, out), gamma

    def _count(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        self.forward_passes += n
        self.forward_calls += 1
        if out.requires_grad:
            out.register_hook(lambda g, n=n: self._count_backward(n))
        if self.on_forward is not None:
            self.on_forward()
        return out

    def _count_backward(self, n: int) -> None:
        self.backward_passes += n

    def snapshot(self) -> tuple[int, int]:
        return self.forward_passes, self.backward_passes

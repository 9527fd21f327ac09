"""The trainer registry: a trainer is a typed config dataclass plus one ``train(config, run)``.

A trainer file defines its config (field defaults and comments are the documentation) and a
function that trains, measures and saves one robustkit checkpoint, and registers the pair::

    @dataclass(frozen=True)
    class MyConfig:
        epochs: int = 10  # full passes over the training set
        seed: int = 0

    @register_trainer("my_method", MyConfig, description="what it trains, in one line")
    def train(config: MyConfig, run: RunOptions) -> Checkpoint:
        ...
        return save_checkpoint(model, run.out, ..., trainer="my_method", config=config)

``robustkit train my_method --recipe R.toml --set epochs=5`` then resolves the config (defaults,
recipe, overrides: :func:`robustkit.core.config.resolve_config`) and calls it; ``robustkit train
--list`` shows it, and the registry tests train it a few steps on synthetic data without a test
file naming it. What a run *computes* lives in the config (and is recorded in the checkpoint);
how it runs (device, threads, where data and output live) lives in :class:`RunOptions`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from robustkit.core.checkpoint import Checkpoint
from robustkit.core.errors import UnknownNameError
from robustkit.core.registry import Registry

C = TypeVar("C")


@dataclass(frozen=True)
class RunOptions:
    """How a training run runs, never what it computes (that is the config, which is recorded)."""

    out: Path  # the checkpoint to write: out.safetensors + out.json (a suffix is ignored)
    device: torch.device = torch.device("cpu")
    data_dir: str | None = None  # None: $ROBUSTKIT_DATA, else ~/.cache/robustkit/data
    download: bool = True  # fetch a missing dataset through torchvision when online
    progress: bool = True  # progress bars on stderr (--no-progress turns them off)
    log: bool = True  # one line per epoch and stage on stderr: what a run without bars still needs (--quiet)

    @property
    def stem(self) -> Path:
        """``out`` without a checkpoint suffix: where side files (logs, records) go."""
        return self.out.with_suffix("") if self.out.suffix in (".safetensors", ".json") else self.out


@dataclass(frozen=True)
class Trainer(Generic[C]):
    """A registered trainer: its name, config class and function."""

    name: str
    config: type[C]
    fn: Callable[[C, RunOptions], Checkpoint]
    description: str
    # Overrides that make a run take seconds on the synthetic dataset (a few steps of a tiny model):
    # the registry tests train every trainer with them, so a new trainer is tested without a test file.
    smoke: dict[str, Any] = field(default_factory=dict)

    def __call__(self, config: C, run: RunOptions) -> Checkpoint:
        if not isinstance(config, self.config):
            raise TypeError(f"trainer {self.name} takes a {self.config.__name__}, got {type(config).__name__}")
        return self.fn(config, run)


TRAINERS: Registry[Trainer[Any]] = Registry("trainer")
# Spellings of the previous release, accepted with a deprecation message until the next one.
DEPRECATED_NAMES: dict[str, str] = {}


def register_trainer(name: str, config: type, *, description: str = "", smoke: dict[str, Any] | None = None,
                     deprecated_names: tuple[str, ...] = ()) -> Callable[[Callable[..., Checkpoint]], Callable[..., Checkpoint]]:
    """Decorator: register ``fn(config, run)`` under ``name`` (snake_case, like model names).

    ``smoke``: config overrides for a seconds-long run on ``dataset = "synthetic"`` (see
    :attr:`Trainer.smoke`); ``deprecated_names``: old spellings that still work, with a warning."""

    def wrap(fn: Callable[..., Checkpoint]) -> Callable[..., Checkpoint]:
        text = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        trainer = Trainer(name, config, fn, text, dict(smoke or {}))
        TRAINERS.register(name, lambda: trainer, text)
        for old in deprecated_names:
            DEPRECATED_NAMES[old] = name
        return fn

    return wrap


def load_trainers() -> None:
    """Import every module of :mod:`robustkit.train` (each trainer file registers itself: adding one
    is adding a file) and the configured plug-ins."""
    import importlib
    import pkgutil

    import robustkit.train as package
    from robustkit.core.plugins import load_plugins

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    load_plugins()


def get_trainer(name: str) -> Trainer[Any]:
    """The trainer registered as ``name``; an old spelling warns, an unknown one lists close
    matches."""
    load_trainers()
    if name not in TRAINERS and name in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[name]
        print(f"robustkit: warning: trainer name {name!r} is deprecated and will be removed in the next "
              f"release; use {new!r}", file=sys.stderr)
        name = new
    if name not in TRAINERS:
        raise UnknownNameError("trainer", name, TRAINERS.names())
    return TRAINERS.get(name).factory()


def list_trainers() -> list[Trainer[Any]]:
    """Every registered trainer, sorted by name."""
    load_trainers()
    return [entry.factory() for entry in TRAINERS]

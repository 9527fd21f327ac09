"""The model registry and the model contract.

Contract: a model maps float32 NCHW images in [0, 1] to logits; normalisation lives inside the
model (:class:`Normalize`), as RobustBench requires, so attacks and the harness never need to
know a dataset's mean and std. Models are returned in ``eval()`` mode on the requested device.

Names are ``arch.tag``: the architecture is registered once; each tag names a set of weights
(``small_cnn.cifar10_partial``). ``arch`` alone picks the default tag; ``arch.init`` gives the
architecture with seeded random weights (what tests and trainers start from).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit.core.checkpoint import checkpoint_paths, function_pin, load_checkpoint
from robustkit.core.errors import CheckpointError, UnknownNameError, close_matches_hint
from robustkit.core.plugins import load_plugins
from robustkit.core.registry import Registry
from robustkit.models import _fit

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, stored as buffers so it moves with the model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class Weights:
    """A shipped weights file, pinned by its *function*: a swapped or truncated tensor file and an
    edited architecture, arch_args, normalisation, dataset or class count are all refused."""

    file: str  # relative to robustkit/weights/, without suffix
    pin: str  # the checkpoint's function_sha256 (robustkit.core.checkpoint.function_pin)
    description: str = ""
    # Overrides of the checkpoint's arch_args for this tag: two tags can share one file and differ
    # in a weight-free argument (airbench94's TTA level: the card's 6-pass model and a 1-pass one).
    # Applied after the file's pin is verified: the override is pinned by this source code.
    arch_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelInfo:
    """What ``robustkit list models`` shows and ``create_model`` needs."""

    name: str
    builder: Callable[..., nn.Module]
    description: str
    dataset: str
    num_classes: int
    input_shape: tuple[int, int, int]
    tags: dict[str, Weights] = field(default_factory=dict)
    default_tag: str | None = None


# Lookups first import the configured plug-ins (robustkit.core.plugins), so an out-of-tree model is
# found wherever a name is looked up, in the CLI or a notebook.
MODELS: Registry[ModelInfo] = Registry("model", before_lookup=load_plugins)

# Model sources: ids of the form ``prefix:rest`` whose models live outside robustkit (``rb:`` is
# RobustBench's zoo). A source module registers its loader here; :func:`load_model` dispatches
# on the prefix, so this module never imports a source (no import circle) and a plug-in can add one.
MODEL_SOURCES: Registry[LoadedModel] = Registry("model source", before_lookup=load_plugins)


def register_model(
    name: str,
    builder: Callable[..., nn.Module],
    *,
    description: str,
    dataset: str,
    tags: dict[str, Weights] | None = None,
    default_tag: str | None = None,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> None:
    """Register an architecture and its shipped weights. ``num_classes`` and ``input_shape``
    default to those of ``dataset`` (a registered dataset knows them: one source for each fact)."""
    if num_classes is None or input_shape is None:
        from robustkit.data import dataset_info

        info_d = dataset_info(dataset)
        num_classes = info_d.num_classes if num_classes is None else num_classes
        input_shape = tuple(info_d.shape) if input_shape is None else input_shape
    info = ModelInfo(
        name, builder, description, dataset, num_classes, input_shape, dict(tags or {}), default_tag
    )
    MODELS.register(name, lambda: info, description, dataset=dataset)


def register_model_source(prefix: str, loader: Callable[..., LoadedModel], *, description: str,
                          usage: str) -> None:
    """Register ``loader(rest, **options)`` for model ids ``prefix:rest``; ``usage`` (e.g.
    ``rb:<Name>``) and ``description`` are what ``robustkit list models`` shows."""
    MODEL_SOURCES.register(prefix, loader, description, usage=usage)


def model_source(name: str) -> str | None:
    """The registered source prefix of ``name`` (``"rb"`` for ``rb:Standard``), else None."""
    prefix, sep, _ = name.partition(":")
    return prefix.lower() if sep and prefix in MODEL_SOURCES else None


def model_info(name: str) -> ModelInfo:
    """Registry entry of an architecture name (no tag)."""
    return MODELS.get(name).factory()


def list_models() -> list[str]:
    """Every loadable model id (``arch.tag``), plus ``arch.init`` for random weights."""
    out: list[str] = []
    for entry in MODELS:
        info: ModelInfo = entry.factory()
        out.extend(f"{info.name}.{tag}" for tag in sorted(info.tags))
        out.append(f"{info.name}.init")
    return out


def resolve_model_name(name: str) -> tuple[ModelInfo, str]:
    """Split ``arch.tag`` and validate both halves (close matches on typos)."""
    arch, _, tag = name.partition(".")
    if arch not in MODELS:
        raise UnknownNameError("model", name, list_models() + MODELS.names())
    info = model_info(arch)
    if not tag:
        tag = info.default_tag or "init"
    if tag != "init" and tag not in info.tags:
        raise UnknownNameError("model", name, list_models())
    return info, tag


@dataclass
class LoadedModel:
    """A model plus where it came from (recorded in result provenance)."""

    model: nn.Module
    name: str
    dataset: str | None
    num_classes: int | None
    checkpoint_sha256: str | None  # of the tensor file
    metadata: dict[str, Any]
    # What the loaded model computes: the checkpoint's function pin, recomputed over the arch_args
    # actually used when a registry tag overrides some (airbench94 tta0); None without a checkpoint.
    function_sha256: str | None = None


def load_model(
    name: str, *, device: str | torch.device = "cpu", seed: int = 0, **arch_args: Any
) -> LoadedModel:
    """Load a registered model id, a robustkit checkpoint path, or a source's ``prefix:rest`` id
    (``rb:<RobustBenchName>``; ``arch_args`` are then the source loader's options)."""
    dev = torch.device(device)
    source = model_source(name)
    if source is not None:
        loaded = MODEL_SOURCES.get(source).factory(name.partition(":")[2], **arch_args)
    elif name.endswith((".safetensors", ".json")) or "/" in name or "\\" in name:
        loaded = load_checkpoint_model(name)
    else:
        info, tag = resolve_model_name(name)
        if tag == "init":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = info.builder(**arch_args)
            loaded = LoadedModel(
                model, f"{info.name}.init", info.dataset, info.num_classes, None,
                {"architecture": info.name, "arch_args": arch_args, "init_seed": seed},
            )
        else:
            w = info.tags[tag]
            loaded = load_checkpoint_model(WEIGHTS_DIR / w.file, expected_pin=w.pin, arch_args=w.arch_args)
            loaded.name = f"{info.name}.{tag}"
    loaded.model.to(dev).eval()
    return loaded


def load_checkpoint_model(
    path: str | Path, expected_pin: str | None = None, arch_args: dict[str, Any] | None = None
) -> LoadedModel:
    """Rebuild the architecture named in a checkpoint's metadata and load its verified weights.

    ``expected_pin`` is the registry's function pin; ``arch_args`` override the stored ones after
    verification (a registry tag's ``Weights.arch_args``)."""
    state, meta = load_checkpoint(path, expected_pin)  # verified first: an edited architecture is named
    arch = meta["architecture"]
    if not isinstance(arch, str) or arch not in MODELS:
        hint = close_matches_hint(arch, MODELS.names()) if isinstance(arch, str) else ""
        raise CheckpointError(f"checkpoint {path} names unknown architecture {arch!r}{hint}")
    info = model_info(arch)
    pin = meta["function_sha256_verified"]
    if arch_args:
        meta["arch_args"] = {**meta.get("arch_args", {}), **arch_args}
        meta["arch_args_overridden"] = sorted(arch_args)
        pin = function_pin(meta, meta["sha256_verified"])
    with _fit.loading(checkpoint_paths(path)[0], path):  # a composite that names itself is refused
        model = _fit.build(info.builder, arch, meta.get("arch_args", {}), path)
    # A composite (adaptive_smoothing) builds its sub-models from their own verified checkpoints and
    # stores only the rest: every key outside those prefixes must still match exactly.
    external = tuple(getattr(model, "external_state_prefixes", ()))
    try:
        if external:
            model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k.startswith(external)},
                                   **state}, strict=True)
            if any(k.startswith(external) for k in state):
                raise RuntimeError(f"the file holds weights under {external}, which load from their own files")
        else:
            model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        expected = model.state_dict()
        merged = {**{k: v for k, v in expected.items() if k.startswith(external)}, **state} if external else state
        why = _fit.mismatch(expected, merged) or " ".join(str(e).split())
        raise CheckpointError(f"checkpoint {path} does not fit {arch}: {why}") from None
    return LoadedModel(
        model,
        str(path),
        meta.get("dataset") or info.dataset,
        meta.get("num_classes") or info.num_classes,
        meta["sha256_verified"],
        meta,
        function_sha256=pin,
    )


def create_model(name: str, *, device: str | torch.device = "cpu", **kwargs: Any) -> nn.Module:
    """Build a model from the registry (``"small_cnn.cifar10_partial"``), a checkpoint path
    or ``"rb:<RobustBenchName>"``; returned in eval mode on ``device``."""
    return load_model(name, device=device, **kwargs).model

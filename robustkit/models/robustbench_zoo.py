"""``rb:<ModelName>``: RobustBench model-zoo models as robustkit models.

Why an adapter instead of ``robustbench.load_model``: robustbench unpickles checkpoints with a
plain ``torch.load`` (arbitrary code execution from a downloaded file) and silently loads some
state dicts non-strictly. Here the architecture comes from robustbench's model zoo, but the
weights are read with ``weights_only=True`` (:func:`robustkit.core.checkpoint.load_foreign_state_dict`),
loaded strictly, and the file's sha256 goes into the result's provenance.

This module registers the ``rb`` model source (:data:`robustkit.models.base.MODEL_SOURCES`), so
``load_model("rb:<Name>", dataset=..., threat_model=..., model_dir=..., download=...)`` reaches
:func:`load_robustbench_model` without the registry knowing about RobustBench. robustbench itself
is imported lazily (only when an ``rb:`` name is used): it pulls in timm, gdown and requests,
emits deprecation warnings on import, and imports ``autoattack``, which this environment provides
under the name ``pyautoattack``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from robustkit.core.checkpoint import load_foreign_state_dict, sha256_file
from robustkit.core.errors import CheckpointError, ConfigError, UnknownNameError
from robustkit.models.base import LoadedModel, register_model_source

ENV_MODEL_DIR = "ROBUSTKIT_RB_MODEL_DIR"
DEFAULT_MODEL_DIR = Path("~/.cache/robustkit/robustbench")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}

# Buffers some zoo architectures create in __init__ (input normalisation constants) that their
# published checkpoints do not contain; robustbench loads those models non-strictly for this
# reason. We allow exactly these names to be missing and nothing else.
_CONSTANT_BUFFERS = {"mu", "sigma", "mean", "std"}


def _import_robustbench() -> ModuleType:
    """Import robustbench with the ``autoattack`` -> ``pyautoattack`` shim, warnings silenced."""
    try:
        import pyautoattack
        import pyautoattack.state

        sys.modules.setdefault("autoattack", pyautoattack)
        sys.modules.setdefault("autoattack.state", pyautoattack.state)
    except ImportError:
        pass  # a real `autoattack` install may still satisfy robustbench
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import robustbench
            import robustbench.model_zoo
            import robustbench.utils
    except ImportError as e:
        raise ConfigError(
            f"rb: models need robustbench ({e}); install it with "
            "`pip install git+https://github.com/RobustBench/robustbench.git` "
            "(and `pip install pyautoattack` or AutoAttack)"
        ) from None
    return robustbench


def resolve_model_dir(model_dir: str | Path | None = None) -> Path:
    """Root of robustbench's ``<dataset>/<threat_model>/<Name>.pt`` layout: the argument, else
    ``$ROBUSTKIT_RB_MODEL_DIR``, else ``~/.cache/robustkit/robustbench``."""
    root = model_dir or os.environ.get(ENV_MODEL_DIR) or DEFAULT_MODEL_DIR
    return Path(root).expanduser()


def _zoo_entry(rb: ModuleType, name: str, dataset: str, threat_model: str) -> tuple[dict, str, str]:
    """Find ``name`` in ``robustbench.model_zoo.model_dicts``; return (entry, dataset, threat)."""
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    datasets = {d.value.lower(): d for d in BenchmarkDataset}
    threats = {t.value.lower(): t for t in ThreatModel}
    ds = datasets.get(str(dataset).lower())
    if ds is None:
        raise ConfigError(
            f"unknown RobustBench dataset {dataset!r}; use one of {', '.join(sorted(datasets))}"
        )
    tm = threats.get(str(threat_model).lower())
    if tm is None:
        raise ConfigError(
            f"unknown RobustBench threat model {threat_model!r}; use one of "
            f"{', '.join(t.value for t in ThreatModel)}"
        )
    # robustbench stores corruptions_3d models under the corruptions folder/dict
    folder = ThreatModel(tm.value.replace("_3d", ""))
    zoo = rb.model_zoo.model_dicts.get(ds, {})
    if folder not in zoo:
        raise ConfigError(f"RobustBench has no {tm.value} models for {ds.value}")
    models = zoo[folder]
    if name not in models:
        raise UnknownNameError("RobustBench model", name, models)  # known: this dataset+threat
    return models[name], ds.value, folder.value


def _fit_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Apply robustbench's prefix fixes: checkpoints saved from a wrapper carry ``model.`` on
    every key (Chen2020Efficient), while zoo models that wrap a timm net with a normalisation
    layer expect it (ImageNet). Pick whichever variant matches the architecture's keys best."""
    want = set(model.state_dict())

    def strip(k: str) -> str:
        return k[len("model.") :] if k.startswith("model.") else k

    candidates = [
        state,
        {strip(k): v for k, v in state.items()},
        {f"model.{k}": v for k, v in state.items()},
    ]
    return max(candidates, key=lambda s: len(want & set(s)))


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """``load_state_dict(strict=True)`` except for known constant buffers; errors -> CheckpointError."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    param_names = {n for n, _ in model.named_parameters()}
    tolerated = [
        k for k in missing if k not in param_names and k.rsplit(".", 1)[-1] in _CONSTANT_BUFFERS
    ]
    bad_missing = [k for k in missing if k not in tolerated]
    if bad_missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if bad_missing:
            parts.append(f"missing {len(bad_missing)} keys: {show(bad_missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {show(unexpected)}")
        raise CheckpointError(
            f"{path} does not fit the RobustBench architecture of {name}: {'; '.join(parts)}"
        )
    for k in tolerated:  # keep the constructor's values for constant buffers
        state = {**state, k: own[k]}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) or lines[0]
        raise CheckpointError(
            f"{path} does not fit the RobustBench architecture of {name}: {detail}"
        ) from None


def _download(rb: ModuleType, gdrive_id: str, path: Path, name: str) -> None:
    """Fetch with robustbench's own Google-Drive downloader into a temporary name, so an
    interrupted or refused download never leaves a file that looks like a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        rb.utils.download_gdrive_new(gdrive_id, part)
        if not part.is_file() or part.stat().st_size == 0:
            raise RuntimeError("the downloader produced no file")
        part.replace(path)
    except BaseException as e:  # noqa: BLE001 - gdown/requests raise many types; keep Ctrl-C
        part.unlink(missing_ok=True)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise CheckpointError(
            f"could not download RobustBench model {name} (Google Drive id {gdrive_id}) to {path}: "
            f"{type(e).__name__}: {e}. Offline? Download it elsewhere (e.g. with "
            f"robustbench.utils.load_model) and place the .pt file at {path}"
        ) from None


def load_robustbench_model(
    name: str,
    *,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    model_dir: str | Path | None = None,
    download: bool = True,
) -> LoadedModel:
    """Build RobustBench zoo model ``name`` and load its weights safely (CPU, eval mode).

    The weights live at ``<model_dir>/<dataset>/<threat_model>/<name>.pt`` (robustbench's own
    layout, so an existing robustbench ``models/`` folder can be reused as ``model_dir``).
    Zoo models take [0, 1] inputs and normalise internally, matching robustkit's contract.
    """
    rb = _import_robustbench()
    entry, ds, tm = _zoo_entry(rb, name, dataset, threat_model)
    gdrive_id = entry.get("gdrive_id")
    if gdrive_id is None or isinstance(gdrive_id, (list, tuple)):
        kind = "an ensemble of several checkpoints" if gdrive_id else "hosted on timm/HF, not Drive"
        raise ConfigError(
            f"RobustBench model {name} is {kind}; robustkit's rb: adapter loads single-checkpoint "
            "models only — load it with robustbench.utils.load_model and pass the module to "
            "robustkit.evaluate"
        )
    path = resolve_model_dir(model_dir) / ds / tm / f"{name}.pt"
    if not path.is_file():
        if not download:
            raise CheckpointError(
                f"RobustBench weights for {name} not found at {path} (download disabled); "
                "place the .pt file there or allow the download"
            )
        _download(rb, gdrive_id, path, name)

    state = load_foreign_state_dict(path)  # weights_only=True; unwraps state_dict/module.
    if not state:
        raise CheckpointError(f"{path} holds no tensors at the top level or under state_dict")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = entry["model"]()
    _load_strict(model, _fit_keys(state, model), path, name)
    model.eval()
    meta: dict[str, Any] = {
        "source": "robustbench",
        "dataset": ds,
        "threat_model": tm,
        "path": str(path),
        "gdrive_id": gdrive_id,
        "architecture": type(model).__name__,
    }
    return LoadedModel(
        model=model,
        name=f"rb:{name}",
        dataset=ds,
        num_classes=NUM_CLASSES.get(ds),
        checkpoint_sha256=sha256_file(path),
        metadata=meta,
    )


register_model_source("rb", load_robustbench_model, usage="rb:<Name>",
                      description="any RobustBench model-zoo entry (weights from --rb-model-dir)")

"""Self-describing checkpoints: ``NAME.safetensors`` plus ``NAME.json`` metadata.

safetensors holds tensors only, so loading a checkpoint can never execute code (a pickled
``.pt`` can). The JSON sidecar carries what is needed to rebuild and trust the model: the
architecture and its arguments, the normalisation, the training data and recipe, and the sha256
of the tensor file, verified on every load so a truncated download or a swapped file is caught
before it produces a wrong robustness number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit.core.config import config_to_dict
from robustkit.core.errors import CheckpointError

CHECKPOINT_FORMAT = "robustkit.checkpoint"
CHECKPOINT_VERSION = 1


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A written checkpoint: where its tensor file is and the metadata its sidecar holds."""

    path: Path  # NAME.safetensors (the sidecar is NAME.json)
    metadata: dict[str, Any]


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    # Append rather than with_suffix(): "small_cnn.cifar10_partial" has a dot of its own.
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    architecture: str,
    arch_args: dict[str, Any] | None = None,
    normalization: dict[str, list[float]] | None = None,
    dataset: str | None = None,
    num_classes: int | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    trainer: str | None = None,
    config: Any = None,
) -> Checkpoint:
    """Write ``path.safetensors`` and ``path.json``; return them as a :class:`Checkpoint`.

    ``trainer`` and ``config`` (the resolved config dataclass of a registered trainer) are recorded
    so ``robustkit train TRAINER --recipe R.toml`` can be checked against the file it claims to make.

    ``model`` is saved uncompiled and unwrapped: ``_orig_mod.``/``module.`` prefixes from
    ``torch.compile``/DataParallel are stripped so the file loads into a plain module.
    """
    from safetensors.torch import save_file

    tensor_path, meta_path = _paths(path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    # A composite's sub-models named in ``external_state_prefixes`` live in their own verified files.
    external = tuple(getattr(model, "external_state_prefixes", ()))
    state = {
        _strip_prefixes(k): v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if not (external and _strip_prefixes(k).startswith(external))
    }
    save_file(state, str(tensor_path), metadata={"format": CHECKPOINT_FORMAT})
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "architecture": architecture,
        "arch_args": arch_args or {},
        "normalization": normalization,
        "dataset": dataset,
        "num_classes": num_classes,
        "trainer": trainer,
        "config": config_to_dict(config) if config is not None else None,
        "training": training or {},
        "metrics": metrics or {},
        "n_parameters": sum(p.numel() for p in model.parameters()),  # sub-models included
        "file": tensor_path.name,
        "sha256": sha256_file(tensor_path),
    }
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return Checkpoint(tensor_path, meta)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check the JSON sidecar of a checkpoint."""
    tensor_path, meta_path = _paths(path)
    if not tensor_path.exists():
        raise CheckpointError(f"checkpoint file not found: {tensor_path}")
    if not meta_path.exists():
        raise CheckpointError(
            f"checkpoint metadata not found: {meta_path} (a robustkit checkpoint is a "
            ".safetensors file plus a .json sidecar)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path} is not robustkit checkpoint metadata")
    for key in ("architecture", "sha256"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata {meta_path} lacks {key!r}")
    return meta


def load_checkpoint(
    path: str | Path, expected_sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and load a checkpoint; return ``(state_dict, metadata)``.

    The file's sha256 must equal the metadata's (and ``expected_sha256`` when given, e.g. the
    value pinned in the model registry).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensor_path, _ = _paths(path)
    meta = read_metadata(path)
    actual = sha256_file(tensor_path)
    for label, want in (("its metadata", meta["sha256"]), ("the registry", expected_sha256)):
        if want is not None and actual != want:
            raise CheckpointError(
                f"sha256 mismatch for {tensor_path}: file is {actual[:12]}…, {label} says "
                f"{str(want)[:12]}…; the file is corrupt or was replaced — re-download or re-train it"
            )
    try:
        state = load_file(str(tensor_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {tensor_path}: {e}") from None
    meta["sha256_verified"] = actual
    return state, meta


def load_foreign_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a third-party ``.pt``/``.pth`` state dict without unpickling arbitrary objects.

    ``weights_only=True`` restricts unpickling to tensors and plain containers; common wrappers
    (``{"state_dict": ...}``, ``{"model": ...}``) and DataParallel/compile prefixes are removed.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types here
        head = p.read_bytes()[:64].lstrip().lower()
        hint = " (it looks like an HTML page: a failed download)" if head.startswith(b"<") else ""
        raise CheckpointError(f"cannot load {p} as a weights-only checkpoint{hint}: {e}") from None
    # Unwrap containers repeatedly: some zoo files hold {"last": {"state_dict": ...}}.
    unwrapped = True
    while unwrapped and isinstance(obj, dict):
        unwrapped = False
        for key in ("state_dict", "model_state_dict", "model", "net", "last"):
            if key in obj and isinstance(obj[key], dict):
                obj, unwrapped = obj[key], True
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} does not hold a state dict")
    return {_strip_prefixes(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(key: str) -> str:
    for prefix in ("_orig_mod.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key

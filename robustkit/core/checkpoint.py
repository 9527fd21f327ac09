"""Self-describing checkpoints: ``NAME.safetensors`` plus ``NAME.json`` metadata.

safetensors holds tensors only, so loading a checkpoint can never execute code (a pickled
``.pt`` can). The JSON sidecar carries what is needed to rebuild and trust the model: the
architecture and its arguments, the normalisation, the training data and recipe, and the sha256
of the tensor file, verified on every load so a truncated download or a swapped file is caught
before it produces a wrong robustness number.

The tensors alone do not define what a checkpoint computes: the same mixing network with an alpha
floor of 0.8 or 0.0 is 13% or 0% robust, and an LTD student's ``tau_s`` lives in the sidecar. So the
sidecar also records a *function pin*, ``function_sha256`` = sha256 of the canonical JSON of the
tensor sha256 plus every :data:`FUNCTION_FIELDS` value, and one short digest per field (``pins``)
so an edit can be named. Both are recomputed on load; the model registry pins the function, not
just the file. Training, config, trainer and metrics are descriptive and stay editable.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit.core.config import config_to_dict
from robustkit.core.errors import CheckpointError

CHECKPOINT_FORMAT = "robustkit.checkpoint"
CHECKPOINT_VERSION = 1
# The metadata a loader turns into the model and its evaluation: the builder gets architecture and
# arch_args (deployed constants such as alpha_min, tau_s, tta_level live there), load_checkpoint_model
# takes dataset and num_classes (which data, classes and threat model an evaluation uses), and
# normalization states the input contract. Everything else in the sidecar describes how it was made.
FUNCTION_FIELDS = ("architecture", "arch_args", "normalization", "dataset", "num_classes")
# A field digest only has to tell an edit apart from the original; the function pin is a full sha256.
FIELD_DIGEST_CHARS = 16


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


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for a checkpoint given by either file or by its stem."""
    return _paths(path)


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
    pin_metadata(meta)
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return Checkpoint(tensor_path, meta)


def _canonical(value: Any) -> bytes:
    """The one JSON spelling of a value: sorted keys, no whitespace (what the pins hash)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _as_json(value: Any) -> Any:
    # Hash what the sidecar will hold after a write and a read (tuples become lists, keys strings),
    # so the pins computed when saving equal those recomputed when loading.
    return json.loads(json.dumps(value))


def function_pin(meta: dict[str, Any], tensor_sha256: str | None = None) -> str:
    """sha256 over the tensor file's sha256 plus every :data:`FUNCTION_FIELDS` value of ``meta``.

    ``tensor_sha256`` defaults to the one ``meta`` records; the loader passes the file's actual one.
    """
    fields = {k: meta.get(k) for k in FUNCTION_FIELDS}
    fields["sha256"] = tensor_sha256 or meta.get("sha256")
    return hashlib.sha256(_canonical(_as_json(fields))).hexdigest()


def field_pins(meta: dict[str, Any]) -> dict[str, str]:
    """Short digest of every function field, nested dicts flattened to dotted paths.

    Flattening is what lets an error say ``arch_args.mixing.alpha_min`` rather than ``arch_args``.
    A non-empty dict is a branch; anything else (a list, a number, ``{}``, ``None``) is a leaf.
    """
    out: dict[str, str] = {}

    def walk(path: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{path}.{k}", v)
        else:
            out[path] = hashlib.sha256(_canonical(value)).hexdigest()[:FIELD_DIGEST_CHARS]

    for key in (*FUNCTION_FIELDS, "sha256"):
        walk(key, _as_json(meta.get(key)))
    return out


def pin_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``function_sha256`` and ``pins`` into ``meta`` (in place) from its current fields."""
    meta["function_sha256"] = function_pin(meta)
    meta["pins"] = field_pins(meta)
    return meta


def verify_function(
    meta: dict[str, Any], meta_path: Path, tensor_sha256: str, expected_pin: str | None = None
) -> str:
    """Recompute the function pin of verified tensors + ``meta``; refuse edits; return the pin.

    A changed field is named (its per-field digest differs); intact fields whose pin is not the
    registry's ``expected_pin`` mean another checkpoint than the one the registry ships. A
    sidecar written before pins existed loads with a warning unless the registry vouches for it.
    """
    pin = function_pin(meta, tensor_sha256)
    recorded = meta.get("pins")
    if recorded is None and "function_sha256" not in meta:
        if expected_pin is None:
            print(f"robustkit: warning: {meta_path} has no function pin (written before robustkit pinned "
                  "architecture, arch_args and normalization): its tensors are verified, its function is not; "
                  "re-save it to pin it", file=sys.stderr)
    else:
        if not isinstance(recorded, dict):
            raise CheckpointError(f"{meta_path}: its 'pins' entry is missing or malformed; restore the file")
        now = field_pins(meta)
        changed = sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))
        if changed:
            key = changed[0]
            how = "edited" if key in recorded and key in now else "added" if key in now else "removed"
            more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])})" if len(changed) > 1 else ""
            raise CheckpointError(
                f"{meta_path}: field {key} was {how} after the checkpoint was written (pinned "
                f"{str(recorded.get(key, '-'))[:12]}, now {now.get(key, '-')[:12]}){more}; "
                "re-train or restore the file")
        if meta.get("function_sha256") != pin:
            raise CheckpointError(
                f"{meta_path}: its function_sha256 {str(meta.get('function_sha256'))[:12]}… does not match its "
                f"pinned fields and tensors ({pin[:12]}…): the pin was edited; re-train or restore the file")
    if expected_pin is not None and pin != expected_pin:
        raise CheckpointError(
            f"{meta_path}: function pin {pin[:12]}… differs from the registry's {expected_pin[:12]}…: the file "
            "is intact but is not the checkpoint this model id ships; restore the shipped file")
    return pin


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
    for p in (tensor_path, meta_path):
        if not p.is_file():  # a folder named like the file: reading it would be an IsADirectoryError
            raise CheckpointError(f"{p} is a {'folder' if p.is_dir() else 'special file'}, not a checkpoint file")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_path} is not robustkit checkpoint metadata")
    for key in ("architecture", "sha256"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata {meta_path} lacks {key!r}")
    return meta


def load_checkpoint(
    path: str | Path, expected_pin: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and load a checkpoint; return ``(state_dict, metadata)``.

    The file's sha256 must equal the metadata's, the metadata's function fields must be those that
    were pinned when it was written, and the function pin must equal ``expected_pin`` when given
    (the value the model registry ships). ``metadata`` gains ``sha256_verified`` and
    ``function_sha256_verified``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensor_path, meta_path = _paths(path)
    meta = read_metadata(path)
    try:
        actual = sha256_file(tensor_path)
    except OSError as e:
        raise CheckpointError(f"cannot read {tensor_path}: {e}") from None
    if actual != meta["sha256"]:
        raise CheckpointError(
            f"sha256 mismatch for {tensor_path}: file is {actual[:12]}…, its metadata says "
            f"{str(meta['sha256'])[:12]}…; the file is corrupt or was replaced — re-download or re-train it"
        )
    pin = verify_function(meta, meta_path, actual, expected_pin)
    try:
        state = load_file(str(tensor_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {tensor_path}: {e}") from None
    meta["sha256_verified"] = actual
    meta["function_sha256_verified"] = pin
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

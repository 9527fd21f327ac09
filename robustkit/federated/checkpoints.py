"""Where a federated run's personalised models live and which test images each is scored on.

A ``fedloge`` run writes the generic model as ``<out>.safetensors`` and client k's personalised model
beside it as ``<out>.client<k>.safetensors``; the client file records the positions of the client's
local test set in the dataset's test split (drawn to mirror its training label distribution,
:func:`robustkit.federated.partition.local_test_sets`). ``robustkit eval --model <out>.safetensors
--client k`` resolves both, so a personalised model is never scored on the balanced test split by
accident.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from robustkit.core.checkpoint import checkpoint_paths
from robustkit.core.errors import ConfigError


def client_path(stem: str | Path, client: int) -> Path:
    """``<stem>.client<k>`` (no suffix), the name every engine saves client k's model under."""
    stem = checkpoint_paths(stem)[0].with_suffix("")
    return stem.parent / f"{stem.name}.client{client}"


def client_checkpoint(model: str, client: int) -> Path:
    """Client ``client``'s personalised checkpoint of the federated run saved at ``model``."""
    import json

    stem = Path(model)
    meta_path = checkpoint_paths(stem)[1]
    if stem.suffix not in (".safetensors", ".json") or not meta_path.is_file():
        raise ConfigError(f"--client needs the checkpoint of a federated run (<out>.safetensors), got {model!r}")
    meta = json.loads(meta_path.read_text())
    clients = ((meta.get("training") or {}).get("federated") or {}).get("clients")
    if not isinstance(clients, int):
        raise ConfigError(f"{model} is not a federated run's generic model (no training.federated.clients); "
                          "--client applies to fedloge checkpoints")
    if not 0 <= client < clients:
        raise ConfigError(f"--client {client}: the run has clients 0 to {clients - 1}")
    path = checkpoint_paths(client_path(stem, client))[0]
    if not path.is_file():
        raise ConfigError(f"client {client}'s personalised model {path} is missing (was the run's folder moved?)")
    return path


def local_test_examples(loaded: Any, args: argparse.Namespace, dataset: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     dict[str, Any], str]:
    """The first ``--n-examples`` images of the client's local test set (all of them by default)."""
    from robustkit.data import load_split

    if getattr(args, "data_file", None):
        raise ConfigError("--client evaluates on the client's local test set; it does not take --data-file")
    training = loaded.metadata.get("training") or {}
    positions = training.get("local_test_positions")
    if not isinstance(positions, list) or not positions:
        raise ConfigError(f"{args.model} records no local test set (training.local_test_positions)")
    n = len(positions) if args.n_examples is None else args.n_examples
    if n > len(positions):
        raise ConfigError(f"--n-examples {n} exceeds client {args.client}'s {len(positions)} local test images")
    split = load_split(dataset, "test", data_dir=args.data_dir, download=not args.no_download)
    x_all, y_all = split.tensors()
    keep = torch.tensor(positions[:n], dtype=torch.long)
    data_info = {"source": split.source, "split": "test", "n_available": len(positions),
                 "indices": f"client {args.client} local test set (positions recorded in the checkpoint)",
                 "client": args.client}
    return x_all[keep], y_all[keep], data_info, dataset

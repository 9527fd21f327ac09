"""The long-tailed training data the SCoRe and FedLoGe trainers share: a seeded long-tailed view of a
dataset's training split (:mod:`robustkit.longtail`), the balanced test split, and what the checkpoint
records about them (official indices, class counts: ``robustkit eval`` turns the counts into
many/medium/few accuracy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from robustkit.train._loop import index_ranges
from robustkit.train.base import RunOptions


@dataclass(frozen=True)
class LTData:
    info: Any
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    record: dict[str, Any]


def load_longtail(config: Any, run: RunOptions) -> LTData:
    """The long-tailed view of the training split and the balanced test split, with the record the
    checkpoint keeps (the official indices of every image trained on, and the class counts).

    ``config`` has ``dataset``, ``longtail`` (None: the whole split), ``longtail_n_max``, ``data_seed``,
    ``n_train`` and ``n_test``: the fields both trainers' configs define."""
    from robustkit.data import dataset_info, load_split
    from robustkit.longtail import longtail_view

    info = dataset_info(config.dataset)
    train = load_split(config.dataset, "train", data_dir=run.data_dir, download=run.download)
    test = load_split(config.dataset, "test", data_dir=run.data_dir, download=run.download)
    x, y = train.tensors(config.n_train)
    indices = np.asarray(train.indices[: len(y)])
    record: dict[str, Any] = {"dataset": config.dataset, "source": str(train.source)}
    if config.longtail is not None:
        view = longtail_view(y.numpy(), config.longtail, info.num_classes, seed=config.data_seed,
                             n_max=config.longtail_n_max, class_names=info.classes)
        keep = torch.from_numpy(view.positions)
        x, y, indices = x[keep], y[keep], indices[view.positions]
        record["longtail"] = view.record
    counts = torch.bincount(y, minlength=info.num_classes).tolist()
    x_test, y_test = test.tensors(config.n_test)
    record.update({"n_train": len(y), "class_counts": counts, "train_indices": index_ranges(indices),
                   "test_source": str(test.source), "n_test": len(y_test)})
    return LTData(info, x, y, x_test, y_test, record)

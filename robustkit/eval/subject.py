"""What an evaluation is of: which model, with which exact weights, on which data.

The command line knows this once it has loaded a model and the examples; every evaluation it
then runs (one attack, a curve's points, a trade-off's mixtures, the masking checks) records the
same provenance. So it is one typed value made once (:meth:`Subject.from_loaded`) and handed down,
and the result code writes it into each result (:func:`robustkit.eval.results.subject_fields`).
A notebook that passes none gets the model's class name and a fingerprint of the tensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from robustkit.models.base import LoadedModel


@dataclass(frozen=True)
class Subject:
    """The model and data of an evaluation, as the result JSON records them."""

    model: str | None = None  # model id or checkpoint path; None: the module's class name
    checkpoint_sha256: str | None = None  # the verified weights file (None: random init or foreign)
    model_info: dict[str, Any] = field(default_factory=dict)  # architecture, arch_args
    dataset: str | None = None  # dataset name, or the stem of a --data-file
    # source, split, n_available, indices, fingerprint, ...: where the examples came from. Only
    # true of the examples it was made for: a subset of them gets :meth:`on_subset`.
    data_info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, *, dataset: str | None,
                    data_info: dict[str, Any] | None = None) -> Subject:
        """A loaded model's provenance plus the data it is evaluated on."""
        info = {k: loaded.metadata[k] for k in ("architecture", "arch_args") if k in loaded.metadata}
        counts = train_class_counts(loaded.metadata)
        if counts is not None:  # per-class results group classes by it (robustkit.eval.per_class)
            info["train_class_counts"] = counts
        return cls(model=loaded.name, checkpoint_sha256=loaded.checkpoint_sha256, model_info=info,
                   dataset=dataset, data_info=dict(data_info or {}))

    def name_for(self, model: nn.Module) -> str:
        """The model's recorded name: the id it was loaded by, else its class name."""
        return self.model or type(model).__name__

    def renamed(self, model: str) -> Subject:
        """The same subject under another model name (a trade-off's g, h and mixtures)."""
        return replace(self, model=model)

    def on_subset(self) -> Subject:
        """For a subset of the examples: the data description no longer applies (its fingerprint
        is recomputed from the tensors), the model's does."""
        return replace(self, data_info={})

    def fingerprint(self, x: torch.Tensor, y: torch.Tensor) -> str:
        """The data's recorded fingerprint, else a hash of the tensors themselves."""
        return self.data_info.get("fingerprint") or tensor_fingerprint(x, y)


def train_class_counts(metadata: dict[str, Any]) -> list[int] | None:
    """A checkpoint's ``training.data.class_counts`` (training images per class) when it is a list
    of ints; anything else is not a class count this code can trust, so it counts as absent."""
    training = metadata.get("training")
    data = training.get("data") if isinstance(training, dict) else None
    counts = data.get("class_counts") if isinstance(data, dict) else None
    if isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        return list(counts)
    return None


def tensor_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of the images (float32 NCHW bytes) then the labels (int64): same data, same hash."""
    h = hashlib.sha256()
    h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()

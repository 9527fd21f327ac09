"""What an evaluation accepts: images and labels :func:`~robustkit.eval.evaluate` can use, and data
that fits the model it is given.

Every problem found here would otherwise be a silently wrong number or a raw torch error after the
clean pass: 1-channel images broadcast through a 3-channel ``Normalize`` (25% "clean accuracy"),
labels beyond the model's classes (never correct, so robust accuracy looks low), float16 images
whose float32 adversarial copies differ from them by rounding (a false budget violation). So the
inputs are checked up front; what has exactly one meaning is converted (and recorded in the
result's ``checks.input_conversions``), the rest is refused with one line that says what to pass.

Conversions, and why only these:

* images float64/float16/bfloat16 in [0, 1] -> float32, the model contract's dtype, *before* the
  budget bookkeeping, so the eps-ball is measured around the images the model actually saw;
* labels of any other integer dtype (int32, uint8, ...) -> int64: the same class indices.

Refused: integer or bool images (0-255 or a mask? say which: ``x.float() / 255``), NHWC images
(``x.permute(0, 3, 1, 2)``), bool labels, and float labels even when whole-valued: a 1-D float label
tensor is a regression target or the output of a pipeline meant for something else as often as it
is class indices, ``torch.nn.functional.cross_entropy`` refuses it for the same reason, and
``y.long()`` costs the caller nothing while a wrong guess would cost a wrong number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robustkit.core.errors import ConfigError, InputRangeError

if TYPE_CHECKING:
    from robustkit.models.base import LoadedModel

__all__ = ["CheckedInputs", "check_inputs", "check_labels_fit", "check_model_data", "expected_input_shape"]

CHANNEL_COUNTS = (1, 3)  # what an image's channel axis holds, for telling NCHW from NHWC


@dataclass(frozen=True)
class CheckedInputs:
    """The images and labels an evaluation runs on, after the unambiguous conversions."""

    x: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    y: torch.Tensor  # int64 (N,), >= 0
    conversions: list[str]  # e.g. "images float64 -> float32"; empty when none were needed


def check_inputs(x: Any, y: Any, batch_size: int, *, model: nn.Module | None = None,
                 input_shape: Sequence[int] | None = None) -> CheckedInputs:
    """Validate ``(x, y)`` for :func:`~robustkit.eval.evaluate` and convert what is unambiguous.

    ``input_shape`` is the model's (C, H, W) when known (a loaded checkpoint's, recorded by the CLI
    in ``Subject.model_info``); the channels of the model's :class:`~robustkit.models.Normalize`
    layers are checked in any case, since they broadcast a wrong channel count without an error.
    """
    conversions: list[str] = []
    x = _images(x, conversions)
    y = _labels(y, int(x.shape[0]), conversions)
    if x.shape[0] == 0:
        raise ConfigError("no examples to evaluate")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be an integer >= 1, got {batch_size!r}")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0 or not torch.isfinite(x).all():
        raise InputRangeError(
            f"inputs must lie in [0, 1] (found min {lo:.4g}, max {hi:.4g}); robustkit models "
            "normalise internally, so pass unnormalised images"
        )
    _check_shape(x, model, input_shape)
    return CheckedInputs(x, y, conversions)


def _images(x: Any, conversions: list[str]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        hint = ": wrap it with torch.from_numpy" if type(x).__module__ == "numpy" else ""
        raise ConfigError(f"images must be a torch tensor (N, C, H, W) of floats in [0, 1], got "
                          f"{type(x).__name__}{hint}")
    if x.dim() != 4:
        hint = "; one image? add a batch axis: x[None]" if x.dim() == 3 else ""
        raise ConfigError(f"images must be 4-D (N, C, H, W), got shape {tuple(x.shape)}{hint}")
    if x.shape[1] not in CHANNEL_COUNTS and x.shape[3] in CHANNEL_COUNTS:
        raise ConfigError(f"images have shape {tuple(x.shape)}, channels last (N, H, W, C); evaluate() takes "
                          "channels first (N, C, H, W): pass x.permute(0, 3, 1, 2)")
    if not x.is_floating_point():
        hint = "; for 0-255 pixels pass x.float() / 255" if x.dtype == torch.uint8 else ""
        raise ConfigError(f"images are {_dtype(x)}; evaluate() takes floats in [0, 1]{hint}")
    if x.dtype != torch.float32:
        conversions.append(f"images {_dtype(x)} -> float32")
        x = x.to(torch.float32)
    return x


def _labels(y: Any, n: int, conversions: list[str]) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise ConfigError(f"labels must be a torch tensor of class indices (int64), got {type(y).__name__}: "
                          "pass torch.as_tensor(labels)")
    if y.dim() == 2 and y.shape[0] == n and y.shape[1] > 1:
        raise ConfigError(f"labels have shape {tuple(y.shape)} (one-hot or scores?); evaluate() takes one class "
                          "index per input: pass y.argmax(1)")
    if y.dim() != 1 or y.shape[0] != n:
        raise ConfigError(f"labels must be a 1-D tensor with one label per input ({n}), got shape {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ConfigError(f"labels are {_dtype(y)}; evaluate() takes integer class indices (int64): pass y.long() "
                          "if they are whole class numbers")
    if y.dtype != torch.int64:
        conversions.append(f"labels {_dtype(y)} -> int64")
        y = y.to(torch.int64)
    if n and int(y.min()) < 0:
        i = int(y.argmin())
        raise ConfigError(f"labels must be class indices >= 0; example {i} has label {int(y[i])}")
    return y


def _check_shape(x: torch.Tensor, model: nn.Module | None, input_shape: Sequence[int] | None) -> None:
    """A wrong image shape the model would not refuse by itself (a broadcast or adaptive pooling)."""
    if input_shape is not None and tuple(x.shape[1:]) != tuple(int(v) for v in input_shape):
        raise ConfigError(f"the model takes {_shape(input_shape)} images (C x H x W) but these are "
                          f"{_shape(x.shape[1:])}")
    if model is None:
        return
    from robustkit.models.base import Normalize

    wanted = sorted({int(m.mean.shape[1]) for m in model.modules()
                     if isinstance(m, Normalize) and m.mean.dim() == 4})
    if wanted and int(x.shape[1]) not in wanted:
        raise ConfigError(f"the model normalises {' or '.join(map(str, wanted))}-channel images but these have "
                          f"{int(x.shape[1])} channel(s) ({_shape(x.shape[1:])}): is this the data it was made for?")


def check_labels_fit(y: torch.Tensor, logits: Any) -> int:
    """The model's class count, from the logits of one input; labels it has no logit for are refused
    (they could never be counted correct, which would pass for low accuracy)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"the model must return logits of shape (N, classes); for 1 input it returned {got}")
    num_classes = int(logits.shape[1])
    hi = int(y.max())
    if hi >= num_classes:
        raise ConfigError(f"labels go up to {hi} (example {int(y.argmax())}) but the model has {num_classes} "
                          "logits per input: are these labels for this model?")
    return num_classes


# --------------------------------------------------------------------------- the CLI's model/data check


def expected_input_shape(loaded: LoadedModel) -> tuple[int, int, int] | None:
    """The (C, H, W) a loaded model was made for: its recorded ``input_shape``, else the shape of the
    dataset it was trained on (with the channel count of its ``in_channels``); None when unknown."""
    from robustkit.data import DATASETS, dataset_info

    arch_args = loaded.metadata.get("arch_args") or {}
    recorded = arch_args.get("input_shape") if isinstance(arch_args, dict) else None
    if isinstance(recorded, (list, tuple)) and len(recorded) == 3 and all(isinstance(v, int) for v in recorded):
        return (recorded[0], recorded[1], recorded[2])
    if not loaded.dataset or loaded.dataset not in DATASETS:
        return None
    c, h, w = dataset_info(loaded.dataset).shape
    channels = arch_args.get("in_channels") if isinstance(arch_args, dict) else None
    return (channels if isinstance(channels, int) and not isinstance(channels, bool) else c, h, w)


def check_model_data(loaded: LoadedModel, x: torch.Tensor, y: torch.Tensor, *, data_name: str,
                     dataset: str | None) -> str | None:
    """Refuse data a loaded model cannot have been made for; say so when it is another dataset of the
    same shape and classes (returned as a one-line warning, else None).

    ``dataset`` is the registered dataset the examples come from (None for a ``--data-file``, whose
    class count only its labels tell), ``data_name`` what to call the data in a message.
    """
    from robustkit.data import DATASETS, dataset_info

    model, trained_on = loaded.name, loaded.dataset
    shape = expected_input_shape(loaded)
    origin = f" ({trained_on})" if trained_on else ""
    if shape is not None and tuple(x.shape[1:]) != shape:
        fix = f"evaluate it on {trained_on} data" if trained_on else "convert the data to that shape"
        raise ConfigError(f"{model} takes {_shape(shape)} images{origin} but {data_name}'s are "
                          f"{_shape(x.shape[1:])} (C x H x W): {fix}")
    data_info = dataset_info(dataset) if dataset and dataset in DATASETS else None
    k = loaded.num_classes
    if k is not None and data_info is not None and data_info.num_classes != k:
        raise ConfigError(f"{model} has {k} classes{origin} but {data_name} has {data_info.num_classes}: "
                          f"its accuracy on {data_name} would mean nothing")
    if k is not None and int(y.max()) >= k:
        raise ConfigError(f"labels go up to {int(y.max())} but {model} has {k} classes: is {data_name} the data "
                          "it was trained for?")
    if data_info is None or not trained_on or trained_on == data_info.name:
        return None
    same = trained_on in DATASETS and dataset_info(trained_on).classes == data_info.classes
    classes = "the same classes" if same else f"{data_info.num_classes} classes, but not the same ones"
    return (f"{model} was trained on {trained_on} and is evaluated on {data_info.name} ({_shape(shape or x.shape[1:])}, "
            f"{classes}): the numbers are not {trained_on}'s")


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")

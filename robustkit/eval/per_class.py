"""Per-class accuracy of an evaluation, and many/medium/few-shot groups when training counts are known.

A single accuracy hides what long-tailed training does: the head classes can carry the number
while the tail classes fail. So every result records clean and robust accuracy per class, their
unweighted mean over the classes present in the test set (balanced accuracy), and, when the
model's training class counts are known (a checkpoint's ``training.data.class_counts``), the
accuracy of three groups of classes by training count, the long-tail literature's usual split
(Liu et al. 2019, "Large-Scale Long-Tailed Recognition in an Open World"): many-shot > 100
training images, medium-shot 20-100, few-shot < 20. The thresholds travel with the result.

Everything is a count by ``torch.bincount`` over labels, so the cost does not grow with the number
of classes in Python. Values are JSON-ready: a class with no test example has accuracy ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["FEW_SHOT_BELOW", "GROUP_RULE", "MANY_SHOT_ABOVE", "per_class_report", "result_per_class",
           "summary_lines"]

MANY_SHOT_ABOVE = 100  # a class with more training images than this is many-shot
FEW_SHOT_BELOW = 20  # fewer than this is few-shot; the rest (20..100 inclusive) is medium-shot
GROUP_RULE = (f"training images per class: many > {MANY_SHOT_ABOVE}, medium {FEW_SHOT_BELOW}-{MANY_SHOT_ABOVE}, "
              f"few < {FEW_SHOT_BELOW} (Liu et al. 2019, OLTR); a group's accuracy is over its test examples")


def per_class_report(
    y: torch.Tensor | Sequence[int],
    clean_flags: torch.Tensor | Sequence[bool],
    robust_flags: torch.Tensor | Sequence[bool] | None,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    train_counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Clean and robust accuracy per class, balanced accuracy and (with ``train_counts``) groups.

    Args:
        y: test labels in ``[0, num_classes)``.
        clean_flags, robust_flags: per-example correctness, aligned with ``y`` (robust None: clean only).
        class_names: one name per class (default: the class indices).
        train_counts: training images per class, ``num_classes`` of them; None: no groups.

    Raises ValueError on inconsistent lengths: the caller decides what a bad input means
    (:func:`result_per_class` turns bad training counts into a warning).
    """
    labels = torch.as_tensor(y, dtype=torch.long).flatten().cpu()
    if num_classes < 1 or (labels.numel() and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    if train_counts is not None and len(train_counts) != num_classes:
        raise ValueError(f"{len(train_counts)} training class counts for {num_classes} classes")
    n = torch.bincount(labels, minlength=num_classes)
    clean = _hits(labels, clean_flags, num_classes)
    robust = _hits(labels, robust_flags, num_classes) if robust_flags is not None else None
    return {
        "classes": list(class_names) if class_names is not None else list(range(num_classes)),
        "n": n.tolist(),
        "clean_acc": _ratios(clean, n),
        "robust_acc": _ratios(robust, n) if robust is not None else None,
        "balanced_clean_acc": _balanced(clean, n),
        "balanced_robust_acc": _balanced(robust, n) if robust is not None else None,
        "train_counts": [int(c) for c in train_counts] if train_counts is not None else None,
        "groups": _groups(train_counts, n, clean, robust) if train_counts is not None else None,
        "group_rule": GROUP_RULE,
    }


def result_per_class(
    y: torch.Tensor,
    clean_flags: Sequence[bool],
    robust_flags: Sequence[bool] | None,
    num_classes: int,
    dataset: str | None,
    train_counts: Any = None,
) -> tuple[dict[str, Any], list[str]]:
    """The result's ``per_class`` section and the warnings it raises.

    Class names come from the registered dataset when its class count matches the model's; training
    counts that do not fit the model (wrong length, not non-negative ints) are a producer's mistake
    that must not cost the evaluation: they are left out, the groups with them, and a warning says
    why, so a result never shows groups computed from counts of another label space.
    """
    notes: list[str] = []
    counts = train_counts
    if counts is not None and not _valid_counts(counts, num_classes):
        notes.append(f"the model's training class counts ({_short(counts)}) do not fit its {num_classes} "
                     "classes; the per-class result has no many/medium/few groups")
        counts = None
    report = per_class_report(y, clean_flags, robust_flags, num_classes,
                              class_names=_class_names(dataset, num_classes), train_counts=counts)
    return report, notes


# --------------------------------------------------------------------------- helpers


def _hits(labels: torch.Tensor, flags: torch.Tensor | Sequence[bool], num_classes: int) -> torch.Tensor:
    """Correct examples per class."""
    f = torch.as_tensor(flags, dtype=torch.bool).flatten().cpu()
    if f.numel() != labels.numel():
        raise ValueError(f"{f.numel()} flags for {labels.numel()} labels")
    return torch.bincount(labels[f], minlength=num_classes)


def _ratios(hits: torch.Tensor, n: torch.Tensor) -> list[float | None]:
    """hits / n per class; None where the class has no test example (JSON has no NaN)."""
    acc = hits.double() / n.clamp(min=1).double()
    return [float(a) if k > 0 else None for a, k in zip(acc.tolist(), n.tolist(), strict=True)]


def _balanced(hits: torch.Tensor, n: torch.Tensor) -> float | None:
    """Mean accuracy over the classes present in the test set, each class weighing the same."""
    present = n > 0
    if not bool(present.any()):
        return None
    return float((hits[present].double() / n[present].double()).mean())


def _groups(train_counts: Sequence[int], n: torch.Tensor, clean: torch.Tensor,
            robust: torch.Tensor | None) -> dict[str, dict[str, Any]]:
    """Many/medium/few by training count; each group's accuracy pools its classes' test examples."""
    counts = torch.as_tensor([int(c) for c in train_counts], dtype=torch.long)
    masks = {"many": counts > MANY_SHOT_ABOVE, "few": counts < FEW_SHOT_BELOW}
    masks["medium"] = ~(masks["many"] | masks["few"])
    out: dict[str, dict[str, Any]] = {}
    for name in ("many", "medium", "few"):  # three groups, not a loop over classes or examples
        m = masks[name]
        total = int(n[m].sum())
        out[name] = {
            "classes": m.nonzero().flatten().tolist(),
            "n": total,
            "clean_acc": int(clean[m].sum()) / total if total else None,
            "robust_acc": (int(robust[m].sum()) / total if total else None) if robust is not None else None,
        }
    return out


def _valid_counts(counts: Any, num_classes: int) -> bool:
    return (isinstance(counts, (list, tuple)) and len(counts) == num_classes
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts))


def _class_names(dataset: str | None, num_classes: int) -> list[str] | None:
    """The registered dataset's class names when they describe the model's outputs, else None."""
    from robustkit.data import DATASETS, dataset_info

    if dataset is None or dataset not in DATASETS:
        return None
    names = dataset_info(dataset).classes
    return list(names) if len(names) == num_classes else None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_lines(per_class: dict[str, Any] | None) -> list[str]:
    """The terminal block under a result's summary: balanced accuracy, then one line per group."""
    from robustkit.eval.results import text_table

    if not per_class:
        return []
    present = sum(1 for k in per_class.get("n", []) if k)
    line = f"balanced accuracy: clean {_pct(per_class.get('balanced_clean_acc'))}"
    if per_class.get("robust_acc") is not None:
        line += f", robust {_pct(per_class.get('balanced_robust_acc'))}"
    out = ["", f"{line} (mean over the {present} classes in the test set)"]
    groups = per_class.get("groups")
    if groups:
        rows = [("group", "classes", "n", "clean", "robust")]
        rows += [(name, str(len(g["classes"])), str(g["n"]), _pct(g["clean_acc"]), _pct(g["robust_acc"]))
                 for name, g in groups.items()]
        out += text_table(rows)
    return out


def _pct(value: float | None) -> str:
    return f"{100 * value:.2f}%" if value is not None else "-"

"""robustkit: adversarial-robustness evaluation and training.

The public API a notebook needs::

    import robustkit
    model = robustkit.create_model("small_cnn")                   # [0,1] images in, logits out
    attack = robustkit.create_attack("autoattack", norm="Linf", eps="8/255")
    x, y, _ = robustkit.load_examples("cifar10", n=200)
    result = robustkit.evaluate(model, attack, x, y)
    print(result.summary())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robustkit.attacks import create_attack, list_attacks
    from robustkit.data import list_datasets, load_examples
    from robustkit.eval import EvalResult, evaluate
    from robustkit.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "EvalResult", "__version__", "create_attack", "create_model", "evaluate", "list_attacks",
    "list_datasets", "list_models", "load_examples",
]

# The public API is imported on first use (PEP 562): `import robustkit` must not import torch, so the
# command line's own handlers (one line for Ctrl-C, for a bad argument) are in place during the
# seconds torch takes to import, and `robustkit --version` does not wait for it.
_EXPORTS = {
    "create_attack": "robustkit.attacks", "list_attacks": "robustkit.attacks",
    "list_datasets": "robustkit.data", "load_examples": "robustkit.data",
    "EvalResult": "robustkit.eval", "evaluate": "robustkit.eval",
    "create_model": "robustkit.models", "list_models": "robustkit.models",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robustkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

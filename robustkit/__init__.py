"""robustkit: adversarial-robustness evaluation and training.

The public API a notebook needs::

    import robustkit
    model = robustkit.create_model("small_cnn")                   # [0,1] images in, logits out
    attack = robustkit.create_attack("autoattack", norm="Linf", eps="8/255")
    x, y, _ = robustkit.load_examples("cifar10", n=200)
    result = robustkit.evaluate(model, attack, x, y)
    print(result.summary())
"""

from robustkit.attacks import create_attack, list_attacks
from robustkit.data import list_datasets, load_examples
from robustkit.eval import EvalResult, evaluate
from robustkit.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "EvalResult", "__version__", "create_attack", "create_model", "evaluate", "list_attacks",
    "list_datasets", "list_models", "load_examples",
]

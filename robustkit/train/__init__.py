"""Training: one file per producer, each a typed config plus ``train(config, run)``, registered by
name (:mod:`robustkit.train.base`); the pieces every trainer shares live beside them.

``robustkit train --list`` shows the registered trainers; ``robustkit train NAME --help`` a
trainer's config fields with their defaults.
"""

from robustkit.train.base import (
    TRAINERS,
    RunOptions,
    Trainer,
    get_trainer,
    list_trainers,
    load_trainers,
    register_trainer,
)

__all__ = ["TRAINERS", "RunOptions", "Trainer", "get_trainer", "list_trainers", "load_trainers",
           "register_trainer"]

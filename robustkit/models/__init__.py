"""Model architectures and their shipped weights.

Every module of this package whose name does not start with ``_`` is imported here and registers its
architectures (:func:`register_model`) or model sources (:func:`register_model_source`) as it
loads: adding a model is adding a file, and no registration depends on what else happened to be
imported (timm's "Unknown model"). Out-of-tree plug-ins (:mod:`robustkit.core.plugins`) register
theirs when a model name is first looked up.
"""

import importlib
import pkgutil

from robustkit.models.base import (
    MODEL_SOURCES,
    MODELS,
    LoadedModel,
    Normalize,
    Weights,
    create_model,
    list_models,
    load_model,
    model_info,
    register_model,
    register_model_source,
)

__all__ = [
    "MODELS", "MODEL_SOURCES", "LoadedModel", "Normalize", "Weights", "create_model", "list_models",
    "load_model", "model_info", "register_model", "register_model_source",
]


def _import_modules() -> None:
    """Import every model module (each registers itself), in name order."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_modules()

"""Model architectures and shipped weights (imported explicitly so registration never depends on
what else happened to be imported)."""

# Imported for their registrations: tiny_cnn and small_cnn; lightweight_cnn; airbench94/95/96
# (standard training, robustkit.models.airbench); ltd, the LTD student wrapper (trained by
# robustkit.train, which robustkit.models never imports); adaptive_smoothing, the mixed classifier
# (its builder loads the others' shipped weights by registry id when called, not at import).
from robustkit.models import adaptive_smoothing, airbench, lightweight_cnn, ltd_student, small_cnn  # noqa: F401
from robustkit.models.base import (
    MODELS,
    LoadedModel,
    Normalize,
    Weights,
    create_model,
    list_models,
    load_model,
    model_info,
    register_model,
)

__all__ = [
    "MODELS", "LoadedModel", "Normalize", "Weights", "create_model", "list_models", "load_model",
    "model_info", "register_model",
]

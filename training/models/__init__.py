"""Model registry. Importing this package registers every built-in model."""
from training.models.registry import ModelSpec, build_model, get_model_spec, list_models, register_model
from training.models import small, resnet  # noqa: F401  (registers models)

__all__ = ["ModelSpec", "build_model", "get_model_spec", "list_models", "register_model"]

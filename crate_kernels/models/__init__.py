"""The CRATE model family and its registry (the names and presets are the table ``registry.MODELS``)."""

from crate_kernels.models.crate import CRATE
from crate_kernels.models.crate_alpha import CRATEAlpha
from crate_kernels.models.crate_lm import CRATELM, CRATEMLM
from crate_kernels.models.crate_mae import CRATEMAE
from crate_kernels.models.registry import create_model, list_models, model_config, parse_model_args, register_model
from crate_kernels.models.vit import ViT

__all__ = [
    "CRATE",
    "CRATELM",
    "CRATEMAE",
    "CRATEMLM",
    "CRATEAlpha",
    "ViT",
    "create_model",
    "list_models",
    "model_config",
    "parse_model_args",
    "register_model",
]

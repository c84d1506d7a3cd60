"""crate_kernels: fused Triton kernels, drop-in layers and models for CRATE (arXiv 2311.13110)."""

from crate_kernels import measure
from crate_kernels.backend import get_backend, not_supported_reasons, set_backend
from crate_kernels.kernels.configs import set_autotune
from crate_kernels.models import CRATE, CRATELM, CRATEMAE, CRATEMLM, CRATEAlpha, ViT, create_model, list_models
from crate_kernels.models.pretrained import from_pretrained, load_official, save_pretrained
from crate_kernels.modules import ISTA, MSSA, OvercompleteISTA
from crate_kernels.ops.ista import ista
from crate_kernels.ops.ista_overcomplete import ista_overcomplete
from crate_kernels.ops.mssa import mssa
from crate_kernels.patch import apply_crate_kernels, revert_crate_kernels

__all__ = [
    "CRATE",
    "CRATELM",
    "CRATEMAE",
    "CRATEMLM",
    "ISTA",
    "MSSA",
    "CRATEAlpha",
    "OvercompleteISTA",
    "ViT",
    "apply_crate_kernels",
    "create_model",
    "from_pretrained",
    "get_backend",
    "ista",
    "ista_overcomplete",
    "list_models",
    "load_official",
    "measure",
    "mssa",
    "not_supported_reasons",
    "revert_crate_kernels",
    "save_pretrained",
    "set_autotune",
    "set_backend",
]

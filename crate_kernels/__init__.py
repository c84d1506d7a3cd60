"""crate_kernels: fused Triton kernels, drop-in layers and models for CRATE (arXiv 2311.13110)."""

from crate_kernels.backend import get_backend, not_supported_reasons, set_backend
from crate_kernels.models import CRATE, create_model, list_models
from crate_kernels.modules import ISTA, MSSA, OvercompleteISTA
from crate_kernels.ops.ista import ista
from crate_kernels.ops.ista_overcomplete import ista_overcomplete
from crate_kernels.ops.mssa import mssa

__all__ = [
    "CRATE",
    "ISTA",
    "MSSA",
    "OvercompleteISTA",
    "create_model",
    "get_backend",
    "ista",
    "ista_overcomplete",
    "list_models",
    "mssa",
    "not_supported_reasons",
    "set_backend",
]

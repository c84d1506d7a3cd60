"""Drop-in layers with upstream constructor arguments and parameter names."""

from crate_kernels.modules.ista import ISTA, OvercompleteISTA
from crate_kernels.modules.mssa import MSSA

__all__ = ["ISTA", "MSSA", "OvercompleteISTA"]

"""Patching an existing model: swap its MSSA / ISTA blocks for the fused drop-in modules, in place, and back.

``apply_crate_kernels(model)`` walks a model instance and replaces every upstream-layout block it recognises — the
official code's ``Attention``, ``FeedForward`` and ``OvercompleteISTABlock``, and crate-lm's ``CausalSelfAttention``
and ``MLP`` (the classes in ``reference/`` carry the same names and attributes) — by ``crate_kernels.MSSA`` (for
crate-lm, ``CrateLMAttention``, which keeps crate-lm's submodule names), ``ISTA`` or ``OvercompleteISTA``. The new
module is built on the meta device and then given the original's own submodules and ``Parameter`` objects: nothing is
copied or allocated, ``state_dict`` keys stay the same, and an optimizer built before the swap keeps training the same
tensors. ``revert_crate_kernels(model)`` puts the original module objects back. No class or function is
monkey-patched.

Limits: forward hooks registered on a swapped block stay on the original object (re-register them after a swap).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from crate_kernels.modules import ISTA, MSSA, OvercompleteISTA

# fused module -> the module it replaced; weak, so a model that is dropped takes its originals with it
_ORIGINALS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


@dataclass
class PatchReport:
    """What ``apply_crate_kernels`` / ``revert_crate_kernels`` did, by submodule path.

    Attributes:
        swapped: path -> (class before, class after) for every module replaced.
        already_fused: paths of crate_kernels modules found in place (nothing to do).
    """

    swapped: dict[str, tuple[str, str]] = field(default_factory=dict)
    already_fused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{len(self.swapped)} module(s) swapped, {len(self.already_fused)} already fused"]
        lines += [f"  {path}: {old} -> {new}" for path, (old, new) in self.swapped.items()]
        return "\n".join(lines)


def _is_upstream_attention(m: object) -> bool:
    return (
        type(m).__name__ == "Attention"
        and isinstance(getattr(m, "qkv", None), nn.Linear)
        and m.qkv.bias is None
        and isinstance(getattr(m, "heads", None), int)
        and isinstance(getattr(m, "to_out", None), (nn.Sequential, nn.Identity))
        # upstream's CRATE-MAE decoder can build it with use_softmax=False (attend = Identity): not MSSA
        and isinstance(getattr(m, "attend", None), nn.Softmax)
    )


def _is_upstream_feedforward(m: nn.Module) -> bool:
    weight = getattr(m, "weight", None)
    return (
        type(m).__name__ == "FeedForward"
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and weight.shape[0] == weight.shape[1]
        and hasattr(m, "step_size")
        and hasattr(m, "lambd")
    )


def _is_upstream_overcomplete(m: nn.Module) -> bool:
    return (
        type(m).__name__ == "OvercompleteISTABlock"
        and isinstance(getattr(m, "D", None), nn.Parameter)
        and isinstance(getattr(m, "D1", None), nn.Parameter)
        and hasattr(m, "eta")
        and hasattr(m, "lmbda")
    )


def _is_crate_lm_attention(m: nn.Module) -> bool:
    return (
        type(m).__name__ == "CausalSelfAttention"
        and isinstance(getattr(m, "c_attn", None), nn.Linear)
        and m.c_attn.bias is None
        and isinstance(getattr(m, "c_proj", None), nn.Linear)
        and isinstance(getattr(m, "n_head", None), int)
        and isinstance(getattr(m, "resid_dropout", None), nn.Dropout)
    )


def _is_crate_lm_ista(m: nn.Module) -> bool:
    weight = getattr(m, "weight", None)  # (m, D) = Dᵀ of the shared overcomplete dictionary
    return (
        type(m).__name__ == "MLP"
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and weight.shape[0] % weight.shape[1] == 0
        and hasattr(m, "step_size")
        and hasattr(m, "lambd")
    )


def _synthesis_paths(model: nn.Module) -> set[str]:
    """Paths of upstream CRATE-MAE decoder synthesis steps. Upstream names them ``FeedForward`` too (square
    ``weight``, ``step_size``, ``lambd``) but they compute the plain linear map ``x Dᵀ``; they are the first block of
    a ``[PreNorm(FeedForward), PreNorm(Attention)]`` decoder layer, where an ISTA step comes second."""
    paths = set()
    for path, m in _named_submodules(model):
        is_pair = isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == 2 and hasattr(m[0], "fn")
        if is_pair and _is_upstream_attention(getattr(m[1], "fn", None)):
            paths.add(f"{path}.0.fn")
    return paths


def _fused_attention(m: nn.Module) -> MSSA:
    dim, inner = m.qkv.in_features, m.qkv.out_features
    dropout = m.dropout.p if isinstance(getattr(m, "dropout", None), nn.Dropout) else 0.0
    with torch.device("meta"):  # the parameters are replaced below: allocate nothing
        new = MSSA(dim, heads=m.heads, dim_head=inner // m.heads, dropout=dropout)
    new.qkv, new.to_out, new.scale = m.qkv, m.to_out, m.scale
    return new


class CrateLMAttention(MSSA):
    """crate-lm's ``CausalSelfAttention`` on the fused core, keeping its submodule names (``c_attn``, ``c_proj``,
    ``resid_dropout``) and so its ``state_dict`` keys: ``c_attn`` is MSSA's ``qkv``, ``c_proj`` + ``resid_dropout``
    its ``to_out``, causal, with crate-lm's attention dropout."""

    def __init__(self, original: nn.Module):
        nn.Module.__init__(self)  # the submodules are the original's: build none
        self.c_attn, self.c_proj, self.resid_dropout = original.c_attn, original.c_proj, original.resid_dropout
        self.heads = original.n_head
        self.dim_head = original.c_attn.out_features // original.n_head
        self.scale = self.dim_head**-0.5
        self.attn_dropout = float(getattr(original, "dropout", 0.0))
        self.is_causal = True

    @property
    def qkv(self) -> nn.Linear:
        return self.c_attn

    def to_out(self, merged: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.c_proj(merged))


def _fused_feedforward(m: nn.Module) -> ISTA:
    with torch.device("meta"):
        new = ISTA(m.weight.shape[0], step_size=m.step_size, lambd=m.lambd)
    new.weight = m.weight
    return new


def _fused_overcomplete(m: nn.Module) -> OvercompleteISTA:
    dim, atoms = m.D.shape
    with torch.device("meta"):
        new = OvercompleteISTA(dim, overcomplete_ratio=atoms // dim, step_size=m.eta, lambd=m.lmbda)
    new.D, new.D1 = m.D, m.D1
    return new


def _fused_crate_lm_ista(m: nn.Module) -> OvercompleteISTA:
    atoms, dim = m.weight.shape
    with torch.device("meta"):
        new = OvercompleteISTA(dim, atoms // dim, step_size=m.step_size, lambd=m.lambd, shared=True)
    new.weight = m.weight
    return new


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def _named_submodules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (path, module) below the root, a module shared by several parents once per path."""
    return [(path, m) for path, m in model.named_modules(remove_duplicate=False) if path]


def apply_crate_kernels(model: nn.Module, mssa: bool = True, ista: bool = True) -> PatchReport:
    """Swap the model's upstream-layout MSSA and/or ISTA blocks for the fused modules, in place.

    Args:
        model: any ``nn.Module`` holding upstream (or ``reference/``) ``Attention``, ``FeedForward`` or
            ``OvercompleteISTABlock`` blocks, crate-lm's ``CausalSelfAttention`` and ``MLP``, or crate_kernels
            modules (left as they are).
        mssa: swap attention blocks. ista: swap ISTA blocks.

    Returns:
        A :class:`PatchReport`; ``revert_crate_kernels(model)`` undoes the swap.
    """
    _check_model(model)
    if not isinstance(mssa, bool) or not isinstance(ista, bool):
        raise TypeError(f"mssa and ista must be bools, got mssa={mssa!r}, ista={ista!r}")
    builders: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], nn.Module]]] = []
    if mssa:
        builders += [(_is_upstream_attention, _fused_attention), (_is_crate_lm_attention, CrateLMAttention)]
    if ista:
        builders += [
            (_is_upstream_feedforward, _fused_feedforward),
            (_is_upstream_overcomplete, _fused_overcomplete),
            (_is_crate_lm_ista, _fused_crate_lm_ista),
        ]
    fused_types = tuple(t for t, wanted in ((MSSA, mssa), (ISTA, ista), (OvercompleteISTA, ista)) if wanted)

    report = PatchReport()
    synthesis = _synthesis_paths(model)
    made: dict[int, nn.Module] = {}  # id(original) -> its fused module, so a shared block stays shared
    for path, m in _named_submodules(model):
        if isinstance(m, fused_types):
            report.already_fused.append(path)
            continue
        build = next((b for is_kind, b in builders if is_kind(m)), None)
        if build is None or path in synthesis:
            continue
        if id(m) not in made:
            new = build(m)
            new.train(m.training)
            _ORIGINALS[new] = m
            made[id(m)] = new
        _replace(model, path, made[id(m)])
        report.swapped[path] = (type(m).__name__, type(made[id(m)]).__name__)
    return report


def revert_crate_kernels(model: nn.Module) -> PatchReport:
    """Put back the original module objects that ``apply_crate_kernels`` replaced in ``model``.

    Returns:
        A :class:`PatchReport` whose ``swapped`` lists each path restored as (fused class, original class).
    """
    _check_model(model)
    report = PatchReport()
    for path, m in _named_submodules(model):
        original = _ORIGINALS.get(m)
        if original is not None:
            original.train(m.training)
            _replace(model, path, original)
            report.swapped[path] = (type(m).__name__, type(original).__name__)
    return report

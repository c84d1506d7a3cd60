"""Shared tools for the module and model tests: outputs plus every gradient, compared entry by entry."""

from collections.abc import Callable

import torch
from torch import nn

from tests.utils import assert_close_to_ref, seeded


def outputs_and_grads(
    model: Callable[..., torch.Tensor],
    *inputs: torch.Tensor,
    params_of: nn.Module | None = None,
    rename: Callable[[str], str] = lambda name: name,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """``{"out": model(*inputs), "d<param>": grad, ..., "dinput<i>": grad}`` for one fixed random upstream gradient.

    Parameters come from ``params_of`` (default: ``model``); their names pass through ``rename`` so that two
    layouts of the same model compare key by key.
    """
    leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs]
    out = model(*leaves, **kwargs)
    grad_out = torch.randn(out.shape, generator=seeded(1), dtype=torch.float64).to(out)
    params = {rename(name): p for name, p in (params_of or model).named_parameters() if p.requires_grad}
    float_inputs = {f"input{i}": x for i, x in enumerate(leaves) if x.is_floating_point()}
    wrt = {**params, **float_inputs}
    # allow_unused: a parameter the forward never reads (upstream CRATE-MAE's decoder_embed) has no gradient entry
    grads = torch.autograd.grad(out, list(wrt.values()), grad_out, allow_unused=True)
    return {"out": out.detach(), **{f"d{name}": g for name, g in zip(wrt, grads, strict=True) if g is not None}}


def assert_all_close(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    low_precision: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every entry by the numerics rules (docs/design.md, 'Numerics rules'): ``expected`` is the fp64 reference,
    ``low_precision`` the reference in actual's dtype (rule a, used for the kernels)."""
    assert actual.keys() == expected.keys(), f"entries differ: {sorted(actual.keys() ^ expected.keys())}"
    for name, value in actual.items():
        low = None if low_precision is None else low_precision[name]
        assert_close_to_ref(name, value, expected[name], low, kind="fwd" if name == "out" else "bwd")


def assert_exactly_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    """fp64 against fp64: every entry within ``atol`` (no relative slack)."""
    assert actual.keys() == expected.keys(), f"entries differ: {sorted(actual.keys() ^ expected.keys())}"
    for name, value in actual.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def randomized(model: nn.Module, scale: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict of random values (not the init) so that every parameter, LN affine included, matters."""
    g = seeded(seed)
    return {
        k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype) * scale
        for k, v in model.state_dict().items()
    }

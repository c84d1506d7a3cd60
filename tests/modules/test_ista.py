"""crate_kernels.ISTA / OvercompleteISTA against reference.ista: state_dict both ways, outputs and gradients."""

import pytest
import torch

import crate_kernels
from crate_kernels import ISTA, OvercompleteISTA
from reference.ista import FeedForward, OvercompleteISTABlock, ista_overcomplete_ref
from tests.models.helpers import assert_all_close, assert_exactly_close, outputs_and_grads
from tests.utils import BACKENDS, seeded

f64 = torch.float64


def _ista_pair(dim=32, step_size=0.1):
    ref = FeedForward(dim, dim, step_size=step_size)
    ours = ISTA(dim, dim, step_size=step_size)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _overcomplete_pair(dim=16):
    ref = OvercompleteISTABlock(dim)
    ours = OvercompleteISTA(dim)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def test_ista_state_dict_and_init_match_upstream():
    ours, ref = _ista_pair()
    assert list(ours.state_dict()) == ["weight"] and ours.weight.shape == (32, 32)
    assert ours.lambd == ref.lambd == 0.1 and ours.step_size == ref.step_size
    back = FeedForward(32, 32)
    back.load_state_dict(ISTA(32).state_dict())
    assert ISTA(32).weight.abs().max() <= (6 / 32) ** 0.5  # kaiming_uniform_, fan_in = D


def test_overcomplete_state_dict_and_init_match_upstream():
    ours, ref = _overcomplete_pair()
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["D", "D1"]
    assert ours.D.shape == ours.D1.shape == (16, 64)
    OvercompleteISTABlock(16).load_state_dict(OvercompleteISTA(16).state_dict())
    shared = OvercompleteISTA(16, shared=True)
    assert list(shared.state_dict()) == ["weight"] and shared.weight.shape == (64, 16)
    assert shared.weight.abs().max() <= (6 / 16) ** 0.5


def test_ista_matches_reference_fp64():
    crate_kernels.set_backend("torch")
    ours, ref = _ista_pair(step_size=0.2)
    ours.lambd = ref.lambd = 0.5  # the CRATE-MAE encoder's λ
    x = torch.randn(2, 9, 32, generator=seeded(0), dtype=f64)
    assert_exactly_close(outputs_and_grads(ours.double(), x), outputs_and_grads(ref.double(), x), atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_matches_reference(backend):
    crate_kernels.set_backend(backend)
    ours, ref = _ista_pair()
    x = torch.randn(2, 9, 32, generator=seeded(0))
    low = outputs_and_grads(ref, x) if backend != "torch" else None
    assert_all_close(outputs_and_grads(ours, x), outputs_and_grads(ref.double(), x.double()), low)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overcomplete_matches_reference_with_residual(backend):
    """CRATE-α: z_half + OvercompleteISTABlock(LN(z_half)), the residual fused into the op."""
    crate_kernels.set_backend(backend)
    ours, ref = _overcomplete_pair()
    y, z = torch.randn(2, 9, 16, generator=seeded(0)), torch.randn(2, 9, 16, generator=seeded(1))
    ref64 = OvercompleteISTABlock(16).double()
    ref64.load_state_dict(ref.state_dict())
    expected = outputs_and_grads(lambda a, b: ref64(a) + b, y.double(), z.double(), params_of=ref64)
    low = outputs_and_grads(lambda a, b: ref(a) + b, y, z, params_of=ref) if backend != "torch" else None
    actual = outputs_and_grads(lambda a, b: ours(a, residual=b), y, z, params_of=ours)
    assert_all_close(actual, expected, low)


def test_overcomplete_shared_is_crate_lm_dictionary_fp64():
    """shared=True stores Dᵀ as ``weight`` (m, D) and synthesises with the same dictionary."""
    crate_kernels.set_backend("torch")
    ours = OvercompleteISTA(16, shared=True).double()
    x = torch.randn(3, 5, 16, generator=seeded(0), dtype=f64)
    expected = ista_overcomplete_ref(x, ours.weight.t(), None, 0.1, 0.1)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-12)


def test_ista_repr_names_backend():
    crate_kernels.set_backend("torch")
    assert "backend='torch'" in repr(ISTA(8)) and "backend='torch'" in repr(OvercompleteISTA(8, shared=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_modules_follow_autocast(backend):
    """Inside autocast the modules run in autocast's dtype, as upstream's F.linear would; CRATE-α's residual is added
    outside the op, so the residual stream keeps fp32."""
    crate_kernels.set_backend(backend)
    ista_module, ref = _ista_pair()
    over, over_ref = _overcomplete_pair()
    x, z = torch.randn(2, 9, 32, generator=seeded(0)), torch.randn(2, 9, 16, generator=seeded(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, over_out = ista_module(x), over(z, residual=z)
    assert out.dtype == torch.bfloat16 and over_out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.double()(x.double()), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(over_out.double(), over_ref.double()(z.double()) + z.double(), atol=2e-2, rtol=2e-2)

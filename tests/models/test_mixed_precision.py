"""Mixed precision as upstream computes it: under bf16 / fp16 autocast every model family keeps upstream's dtype of
the residual stream after every block, and its outputs are no further from an fp64 evaluation of the same weights
than upstream's own op sequence under the same autocast (reference/ is that sequence)."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import crate_kernels
import reference.crate
import reference.crate_alpha
import reference.crate_lm
from crate_kernels.models import CRATELM, CRATEMAE, CRATEAlpha
from crate_kernels.models import crate_lm as ours_lm
from crate_kernels.models import crate_mae as ours_mae
from reference.crate_mae import MaskedAutoencoderCRATE
from tests.utils import AUTOCAST_DTYPES, BACKENDS, seeded, use_backend

MAX_ERROR_RATIO = 1.25  # ours / upstream's, both against fp64, under the same autocast


@dataclass
class Family:
    """One model family at a given size: ours and upstream's with the same weights, and how each runs."""

    ours: nn.Module
    ref: nn.Module
    inputs: torch.Tensor
    output: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, inputs) -> logits / predicted patches
    # (model, stream tensor) -> the stream's dtype after each block, run layer by layer
    ours_blocks: Callable[[torch.Tensor], list[torch.dtype]]
    ref_blocks: Callable[[torch.Tensor], list[torch.dtype]]
    width: int


def _dtypes_after(blocks, step: Callable[[object, torch.Tensor], torch.Tensor], x: torch.Tensor) -> list[torch.dtype]:
    dtypes = []
    for block in blocks:
        x = step(block, x)
        dtypes.append(x.dtype)
    return dtypes


def _ours_blocks(*transformers) -> Callable[[torch.Tensor], list[torch.dtype]]:
    """Our layers one by one through ``Transformer._layer`` (encoder, then decoder for the MAE)."""
    return lambda x: [
        dtype
        for t in transformers
        for dtype in _dtypes_after(t.layers, lambda pair, z, t=t: t._layer(*pair, z, None), x)
    ]


def build(family: str, dim: int = 64, depth: int = 4, heads: int = 4, batch: int = 4, seed: int = 0) -> Family:
    """``family`` at width ``dim``: upstream's model with its own init (seeded), ours loaded from it."""
    torch.manual_seed(seed)
    images = torch.randn(batch, 1, 8, 8, generator=seeded(seed + 1))
    image_args = dict(image_size=8, patch_size=2, num_classes=10, dim=dim, depth=depth, heads=heads, channels=1)
    image_args["dim_head"] = dim // heads
    classify = lambda model, x: model(x)  # noqa: E731
    if family == "crate":
        ref = reference.crate.CRATE(**image_args)
        ours = crate_kernels.CRATE(**image_args)
        ours.load_state_dict(ref.state_dict())
        ref_blocks = lambda x: _dtypes_after(ref.transformer.layers, lambda l, z: l[1](l[0](z) + z), x)  # noqa: E731
        return Family(ours, ref, images, classify, _ours_blocks(ours.transformer), ref_blocks, dim)
    if family == "crate_alpha":
        ref = reference.crate_alpha.CRATE(**image_args)
        ours = CRATEAlpha(**image_args)
        ours.load_state_dict(ref.state_dict())

        def alpha_layer(layer, z):
            z = layer[0](z) + z
            return layer[1](z) + z

        ref_blocks = lambda x: _dtypes_after(ref.transformer.layers, alpha_layer, x)  # noqa: E731
        return Family(ours, ref, images, classify, _ours_blocks(ours.transformer), ref_blocks, dim)
    if family == "crate_mae":
        ref = MaskedAutoencoderCRATE(
            img_size=8, patch_size=2, in_chans=1, embed_dim=dim, depth=depth, num_heads=heads,
            decoder_embed_dim=dim, decoder_depth=depth, decoder_num_heads=heads,
        )  # fmt: skip
        ours = CRATEMAE(
            image_size=8, patch_size=2, channels=1, dim=dim, depth=depth, heads=heads, dim_head=dim // heads
        )
        ours.load_state_dict(ours_mae.from_upstream_state_dict(ref.state_dict()))

        def predict(model, x):
            torch.manual_seed(seed)  # the same random masks for every model
            return model(x)[1]

        def ref_blocks(x):
            step = lambda block, z: block(z)  # noqa: E731
            return _dtypes_after(ref.blocks, step, x) + _dtypes_after(ref.decoder_blocks, step, x)

        return Family(ours, ref, images, predict, _ours_blocks(ours.transformer, ours.decoder), ref_blocks, dim)
    if family == "crate_lm":
        ref = reference.crate_lm.CRATE(
            reference.crate_lm.CRATEConfig(block_size=32, vocab_size=128, n_layer=depth, n_head=heads, n_embd=dim)
        )
        ours = CRATELM(vocab_size=128, block_size=32, dim=dim, depth=depth, heads=heads)
        ours.load_state_dict(ours_lm.from_upstream_state_dict(ref.state_dict()))
        idx = torch.randint(128, (batch // 2, 32), generator=seeded(seed + 1))
        ref_blocks = lambda x: _dtypes_after(ref.transformer.h, lambda block, z: block(z), x)  # noqa: E731
        logits = lambda model, x: model(x, targets=x)[0] if model is ref else model(x)  # noqa: E731
        return Family(ours, ref, idx, logits, _ours_blocks(ours.transformer), ref_blocks, dim)
    raise ValueError(family)


FAMILIES = ["crate", "crate_alpha", "crate_mae", "crate_lm"]


def output_errors(f: Family, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, upstream's) absolute output errors under ``dtype`` autocast against the fp64 evaluation of the weights."""
    f.ours.to(device).eval(), f.ref.to(device).eval()
    inputs = f.inputs.to(device)
    with torch.no_grad():
        exact = f.output(f.ref.double(), inputs.double() if inputs.is_floating_point() else inputs)
        f.ref.float()
        with torch.autocast(device.type, dtype=dtype):
            ours, upstream = f.output(f.ours, inputs), f.output(f.ref, inputs)
    return (ours.double() - exact).abs(), (upstream.double() - exact).abs()


def errors(f: Family, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(ours, upstream's) root-mean-square output error (the RMS over every output: the largest single error of a
    small model swings by ±50 % between seeds)."""
    ours, upstream = output_errors(f, dtype, device)
    return ours.square().mean().sqrt().item(), upstream.square().mean().sqrt().item()


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_block_outputs_keep_upstreams_dtype_under_autocast(family, dtype, device):
    """After every block (the MAE: encoder, then decoder) the residual stream has the dtype upstream's op order gives
    it: float32 where upstream adds a low-precision update to a float32 stream (CRATE, CRATE-α, the MAE encoder),
    the autocast dtype where upstream's block ends in a GEMM (crate-lm, the MAE decoder). Both backends."""
    f = build(family, dim=32, depth=2, heads=2, batch=2)
    f.ours.to(device), f.ref.to(device)
    x = torch.randn(2, 5, f.width, generator=seeded(3)).to(device)
    for backend in ("torch", "triton") if device.type == "cuda" or crate_kernels.backend.interpreting() else ("torch",):
        crate_kernels.set_backend(backend)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            ours, upstream = f.ours_blocks(x), f.ref_blocks(x)
            assert ours == upstream, backend
            assert f.output(f.ours, f.inputs.to(device)).dtype == f.output(f.ref, f.inputs.to(device)).dtype
    if family in ("crate", "crate_alpha"):
        assert set(ours) == {torch.float32}  # the finding this guards: our stream turned to the autocast dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_autocast_error_no_worse_than_upstream(family, backend, device):
    """bf16 autocast: our outputs are at most 1.25× as far from the fp64 evaluation as upstream's op sequence's.
    Under the interpreter the Triton path rounds to bf16 as a GPU does (kernels/rounding.py)."""
    use_backend(backend)
    ours, upstream = errors(build(family, dim=32, depth=2, heads=2), torch.bfloat16, device)
    assert ours <= MAX_ERROR_RATIO * upstream, f"{family}: error {ours:.3g} vs upstream {upstream:.3g}"

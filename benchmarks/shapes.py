"""What the suites measure: shapes read off the model presets, the providers, the modes, and the FLOP/byte counts.

Every benchmark shape comes from a preset (never a literal in a bench file): the preset is built on the ``meta``
device (no memory, no init cost) and its layer sizes are read off the modules, so a preset change moves the benchmarks
with it. A :class:`BenchShape` is a preset plus a batch size; its id reads like ``crate_b-256x197x768h12``.

FLOPs are the algorithm's minimum (docs/design.md, 'Performance goals'): attention 4·B·H·N²·P forward (half when
causal), backward 2.5× forward; a GEMM 2·M·N·K, backward twice forward; vanilla ISTA in the one-GEMM M-form, the
overcomplete ISTA as its four thin GEMMs. Every provider of a row is credited the same count, so TFLOP/s is effective
throughput and comparable across providers; the roofline floor is that count over the card's measured matmul rate. Bytes
are the compulsory traffic (inputs, outputs, parameters and their gradients read or written once), a lower bound.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from crate_kernels import OvercompleteISTA, create_model
from crate_kernels.models import CRATE, CRATELM, CRATEAlpha, model_config
from reference import crate as reference_crate
from reference import crate_alpha as reference_crate_alpha
from reference import crate_lm as reference_crate_lm

MODES = ("fwd", "bwd", "fwd_bwd", "train_step", "load")  # load: one batch out of a data loader
# The op suites' modes, fwd_bwd first: a time-limited run measures the goals' mode before the others.
OP_MODES = ("fwd_bwd", "fwd", "bwd")
STEP_SIZE, LAMBD = 0.1, 0.1  # η and λ of the ISTA blocks in every preset


@dataclass(frozen=True)
class Provider:
    """One implementation a user could pick.

    ``ours``: part of crate_kernels (a speed-up "over the best other" compares against providers that are not ours).
    ``gpu_only``: its rows carry the ``gpu`` mark and are skipped, with the reason, on a machine without CUDA.
    ``backend``: the crate_kernels backend the harness selects while this provider runs (None: left as it is).
    ``compile_mode``: ``torch.compile`` mode the bench file applies through :meth:`maybe_compile` (None: eager).
    """

    name: str
    ours: bool
    gpu_only: bool = False
    backend: str | None = None
    compile_mode: str | None = None

    def maybe_compile(self, fn):
        """``fn`` (a module or function) compiled in this provider's mode, or as it is for eager providers."""
        if self.compile_mode is None:
            return fn
        # Each row compiles a fresh model: drop earlier rows' graphs so dynamo's recompile limit never silently
        # turns a compile row into eager.
        torch._dynamo.reset()
        return torch.compile(fn, mode=self.compile_mode)

    def __str__(self) -> str:
        return self.name


UPSTREAM_EAGER = Provider("upstream_eager", ours=False)
UPSTREAM_COMPILE = Provider("upstream_compile", ours=False, gpu_only=True, compile_mode="default")
UPSTREAM_COMPILE_MAX = Provider("upstream_compile_max_autotune", ours=False, gpu_only=True, compile_mode="max-autotune")
TORCH_PATH = Provider("torch_path", ours=True, backend="torch")
TRITON = Provider("triton", ours=True, gpu_only=True, backend="triton")
TRITON_COMPILE = Provider("triton_compile", ours=True, gpu_only=True, backend="triton", compile_mode="default")
# The token GEMM alone (the ISTA suites): the Triton kernel with its epilogue against cuBLAS, both GPU-only.
CUBLAS = Provider("cublas_matmul", ours=False, gpu_only=True)
TRITON_GEMM = Provider("triton_gemm", ours=True, gpu_only=True, backend="triton")
# The report computes "speed-up vs eager" and "vs compile" against these two names.
EAGER_NAME, COMPILE_NAME = UPSTREAM_EAGER.name, UPSTREAM_COMPILE.name


def providers(*chosen: Provider) -> list:
    """``pytest.param`` per provider, id = its name, GPU-only ones marked ``gpu``."""
    return [pytest.param(p, id=p.name, marks=[pytest.mark.gpu] if p.gpu_only else []) for p in chosen]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of one preset, read off its modules.

    ``tokens``: N per sample (1 + patches for classifiers, the context length for LMs); ``overcomplete``: the ISTA
    dictionary ratio m/D (0 = vanilla (D, D) ISTA); ``embed_in``: input width of the patch embedding (0 = token lookup);
    ``head_out``: classes or vocabulary; ``head_per_token``: the head runs on every token (LMs) or on one (classifiers);
    ``image_size``, ``channels``: the classifier's input images (0 for LMs).
    """

    name: str
    short: str
    dim: int
    depth: int
    heads: int
    dim_head: int
    tokens: int
    causal: bool = False
    overcomplete: int = 0
    embed_in: int = 0
    head_out: int = 0
    head_per_token: bool = False
    image_size: int = 0
    channels: int = 0

    @property
    def items_unit(self) -> str:
        return "tokens" if self.causal else "images"


@dataclass(frozen=True)
class BenchShape:
    """A preset at a batch size: the (B, N, D, H, P) every suite needs."""

    model: ModelShape
    batch: int

    @property
    def B(self) -> int:
        return self.batch

    @property
    def N(self) -> int:
        return self.model.tokens

    @property
    def D(self) -> int:
        return self.model.dim

    @property
    def H(self) -> int:
        return self.model.heads

    @property
    def P(self) -> int:
        return self.model.dim_head

    @property
    def causal(self) -> bool:
        return self.model.causal

    @property
    def items(self) -> int:
        """What one call processes, in ``model.items_unit``: images, or tokens for LMs."""
        return self.B * self.N if self.model.causal else self.B

    @property
    def id(self) -> str:
        return f"{self.model.short}-{self.B}x{self.N}x{self.D}h{self.H}"

    def __str__(self) -> str:
        return self.id


# crate_kernels' model class -> the upstream model of reference/ built from the same registry configuration.
_UPSTREAM = {
    CRATE: lambda config: reference_crate.CRATE(**config),
    CRATEAlpha: lambda config: reference_crate_alpha.CRATE(**config),
    CRATELM: lambda config: reference_crate_lm.CRATE(
        reference_crate_lm.CRATEConfig(
            block_size=config["block_size"],
            vocab_size=config["vocab_size"],
            n_layer=config["depth"],
            n_head=config["heads"],
            n_embd=config["dim"],
        )
    ),
}
_SHORT = {"tiny": "t", "small": "s", "base": "b", "large": "l"}


def _short(name: str) -> str:
    """``crate_base_patch16_224`` -> ``crate_b``, ``crate_alpha_base_patch16_224`` -> ``crate_alpha_b``,
    ``crate_lm_base`` -> ``crate_lm_b``, ``crate_demo`` -> ``crate_demo``: readable shape ids."""
    parts = name.split("_")
    if parts[-1] == "224":
        parts = parts[:-2]
    return "_".join(_SHORT.get(part, part) for part in parts)


def is_language_model(name: str) -> bool:
    return isinstance(_meta_model(name), CRATELM)


def build_upstream(name: str, device: torch.device | str = "cpu", **overrides) -> nn.Module:
    """The upstream model (reference/) of registered preset ``name``, on ``device`` (``"meta"``: shapes only)."""
    config = model_config(name, **overrides)
    family = type(_meta_model(name))
    if family not in _UPSTREAM:
        raise ValueError(
            f"name must be a preset with an upstream model in reference/ ({list(_UPSTREAM)}), got {name!r}"
        )
    with torch.device(device):
        return _UPSTREAM[family](config)


@functools.cache
def _meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return create_model(name)


@functools.cache
def model_shape(name: str) -> ModelShape:
    """Read the sizes of registered preset ``name`` off a meta-device instance of crate_kernels' model."""
    model = _meta_model(name)
    config = model_config(name)
    attn, ista = model.transformer.layers[0][0].fn, model.transformer.layers[0][1].fn
    sizes = {
        "name": name,
        "short": _short(name),
        "dim": config["dim"],
        "depth": config["depth"],
        "heads": attn.heads,
        "dim_head": attn.qkv.out_features // attn.heads,
        "overcomplete": ista.dictionaries()[0].numel() // config["dim"] ** 2
        if isinstance(ista, OvercompleteISTA)
        else 0,
    }
    if isinstance(model, CRATELM):
        return ModelShape(
            **sizes, tokens=config["block_size"], causal=True, head_out=config["vocab_size"], head_per_token=True
        )
    channels = config.get("channels", inspect.signature(type(model)).parameters["channels"].default)
    return ModelShape(
        **sizes,
        tokens=model.pos_embedding.shape[1],
        embed_in=channels * config["patch_size"] ** 2,
        head_out=config["num_classes"],
        image_size=config["image_size"],
        channels=channels,
    )


def _on_gpu() -> bool:
    return torch.cuda.is_available()


# (preset, batch) per machine. GPU: the batch of the performance goals (B = 256 at 224/16); CPU: small enough that a
# smoke run of every suite takes seconds. Layer- and op-level suites use op_shapes(), whole steps model_shapes().
# The causal LM runs at its preset context (1024 tokens) with B·N near the vision shapes' token count.
_VISION = ["crate_tiny_patch16_224", "crate_small_patch16_224", "crate_base_patch16_224", "crate_large_patch16_224",
           "crate_alpha_base_patch16_224"]  # fmt: skip
_GPU_OP = [*((name, 256) for name in _VISION), ("crate_lm_base", 32)]
# CRATE-L's whole training step at half the batch (eager upstream keeps every attention matrix for backward).
_GPU_MODEL = [(name, 128 if "large" in name else 256) for name in _VISION] + [("crate_lm_base", 16)]
_CPU_OP = [("crate_demo", 8), ("crate_alpha_demo", 8), ("crate_lm_demo", 2), ("crate_tiny_patch16_224", 2)]
_CPU_MODEL = [("crate_demo", 8), ("crate_alpha_demo", 8), ("crate_lm_demo", 2), ("crate_tiny_patch16_224", 8)]


def op_shapes() -> list[BenchShape]:
    """Shapes for op- and layer-level suites on this machine."""
    return [BenchShape(model_shape(n), b) for n, b in (_GPU_OP if _on_gpu() else _CPU_OP)]


def model_shapes() -> list[BenchShape]:
    """Shapes for whole-model training steps on this machine."""
    return [BenchShape(model_shape(n), b) for n, b in (_GPU_MODEL if _on_gpu() else _CPU_MODEL)]


def headline_first(shapes: list[BenchShape], batches: tuple[int, ...] = (256, 64)) -> list[BenchShape]:
    """GPU: every shape at each batch in ``batches``, CRATE-B's rows first; CPU: the smoke shapes as they are."""
    if not _on_gpu():
        return shapes
    shapes = [BenchShape(s.model, b) for s in shapes for b in batches]
    return sorted(shapes, key=lambda s: (not s.model.short.endswith("_b"), -s.B))


# The data-loader suite: the loader at 224 px beside the training step of CRATE-T/16 and CRATE-B/16 at one batch.
_CPU_DATA = [("crate_tiny_patch16_224", 8), ("crate_base_patch16_224", 8)]
_GPU_DATA = [("crate_tiny_patch16_224", 256), ("crate_base_patch16_224", 256)]


def data_shapes() -> list[BenchShape]:
    """Shapes for the data-loader suite on this machine (each preset's images at its batch)."""
    return [BenchShape(model_shape(n), b) for n, b in (_GPU_DATA if _on_gpu() else _CPU_DATA)]


def bench_dtypes() -> list[torch.dtype]:
    """bf16 on GPU (the dtype of the goals); fp32 on CPU, where bf16 matmuls are not representative."""
    return [torch.bfloat16] if _on_gpu() else [torch.float32]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- FLOPs and bytes ------------------------------------------------------------------------------------------------
_BWD_FACTOR = {"fwd": 0.0, "bwd": 1.0, "fwd_bwd": 1.0, "train_step": 1.0}
_FWD_FACTOR = {"fwd": 1.0, "bwd": 0.0, "fwd_bwd": 1.0, "train_step": 1.0}


def _check_mode(mode: str) -> None:
    if mode not in _FWD_FACTOR:
        raise ValueError(f"mode must be one of {tuple(_FWD_FACTOR)} (modes that count FLOPs), got {mode!r}")


def gemm_flops(M: int, N: int, K: int, mode: str) -> float:
    """(M, K) @ (K, N): 2·M·N·K forward, twice that backward (input and weight gradients)."""
    _check_mode(mode)
    return 2.0 * M * N * K * (_FWD_FACTOR[mode] + 2.0 * _BWD_FACTOR[mode])


def attention_flops(B: int, H: int, N: int, P: int, causal: bool, mode: str) -> float:
    """4·B·H·N²·P forward (half when causal), 2.5× that backward."""
    _check_mode(mode)
    fwd = 4.0 * B * H * N * N * P * (0.5 if causal else 1.0)
    return fwd * (_FWD_FACTOR[mode] + 2.5 * _BWD_FACTOR[mode])


def ista_flops(T: int, D: int, mode: str) -> float:
    """Vanilla ISTA in the M-form on T tokens: forward one T×D×D GEMM plus M = η(D − DᵀD) (one D³ GEMM); backward
    dy = g + g·Mᵀ and C = yᵀg (two token GEMMs) plus dD = η(C − D(C + Cᵀ)) (one D³ GEMM)."""
    _check_mode(mode)
    return (2.0 * T * D * D + 2.0 * D**3) * (_FWD_FACTOR[mode] + 2.0 * _BWD_FACTOR[mode])


def ista_overcomplete_flops(T: int, D: int, m: int, mode: str) -> float:
    """Two-step overcomplete ISTA: four thin T×D×m GEMMs forward (yD, a₁Dᵀ, (·)D, a₂D_outᵀ), twice that backward."""
    return 4.0 * gemm_flops(T, m, D, mode)


def time_gemm(bench, op: str, shape: BenchShape, dtype: torch.dtype, provider: Provider, make_inputs, fused) -> None:
    """The main token GEMM alone: ``fused(a, b)`` (the Triton kernel with its epilogue) or ``torch.matmul(a, b)``."""
    a, b = make_inputs()
    (M, K), N = a.shape, b.shape[1]
    fn = fused if provider is TRITON_GEMM else torch.matmul
    nbytes = (M * K + K * N + M * N) * (torch.finfo(dtype).bits // 8)
    bench(fn, make_inputs, mode="fwd", provider=provider, op=op, shape=shape, dtype=dtype, flops=2.0 * M * N * K,
          nbytes=nbytes)  # fmt: skip


def layer_flops(shape: BenchShape, mode: str) -> float:
    """One CRATE layer (LN + MSSA + LN + ISTA) on shape's B·N tokens; LayerNorms and elementwise work not counted."""
    T, D, HP = shape.B * shape.N, shape.D, shape.H * shape.P
    projections = gemm_flops(T, HP, D, mode) + gemm_flops(T, D, HP, mode)  # qkv, to_out
    attention = attention_flops(shape.B, shape.H, shape.N, shape.P, shape.causal, mode)
    m = shape.model.overcomplete
    ista = ista_overcomplete_flops(T, D, m * D, mode) if m else ista_flops(T, D, mode)
    return projections + attention + ista


def train_step_flops(shape: BenchShape) -> float:
    """Forward + backward of the whole model: every layer, the patch embedding and the head (optimizer not counted)."""
    model, T = shape.model, shape.B * shape.N
    head_rows = T if model.head_per_token else shape.B
    patches = shape.B * (shape.N - 1)  # every token but the class token is an embedded patch
    embed = gemm_flops(patches, model.dim, model.embed_in, "fwd_bwd") if model.embed_in else 0.0
    return (
        model.depth * layer_flops(shape, "fwd_bwd")
        + embed
        + gemm_flops(head_rows, model.head_out, model.dim, "fwd_bwd")
    )


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Callable[..., torch.Tensor]) -> Callable[..., None]:
    """A whole training step on given inputs, as a ``train_step`` row times it: zero the gradients, ``loss(*inputs)``
    forward and backward, the optimizer's update."""

    def step(*inputs) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(*inputs).backward()
        optimizer.step()

    return step


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the given tensors (compulsory traffic: each read or written once)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())

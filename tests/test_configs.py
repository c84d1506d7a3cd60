"""The heuristic configs compile for sm_90 without spills or a stack frame and fit its shared memory, per kernel family
(docs/design.md, 'Kernel configurations'); the autotune switch.

The launches come from the ops themselves: each case runs an op forward and backward inside ``backend.dry_run()``
(CPU tensors; the launchers record kernel, constexprs and heuristic config), and every distinct specialisation is
compiled with Triton's ptxas in ONE process without TRITON_INTERPRET, once per session. The default run compiles a
representative subset; the ``slow`` run every dtype (fp32 in tf32 and IEEE, fp16, bf16) × P ∈ {32, 64, 128} × mask.
"""

import itertools
import json

import pytest
import torch

import crate_kernels
from crate_kernels.kernels import configs
from tests.utils import run_without_interpreter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (dtype, fp32 matmul precision, P, mask, with the ISTA GEMMs): the ops' launches at one case; the GEMMs ignore P.
QUICK = [
    ("bf16", "ieee", 64, "none", True),
    ("fp16", "ieee", 128, "causal+mask", False),
    ("fp32", "tf32", 32, "causal", False),
]
FULL = [
    (dtype, precision, P, mask, True)
    for (dtype, precision), P, mask in itertools.product(
        [("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee")],
        [32, 64, 128],
        ["none", "causal", "causal+mask"],
    )
]


def _record(dtype: str, precision: str, P: int, mask: str, gemm: bool, target: str) -> list:
    """The launches of MSSA and (with ``gemm``) ISTA and overcomplete ISTA, forward and backward, at one case;
    16-bit cases run the ISTA ops on an fp32 x too."""
    from benchmarks.compiled import arch
    from crate_kernels import backend

    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    t = DTYPES[dtype]
    B, N, H, D = 2, 197, 4, 384
    w = torch.randn(B, N, H, P, dtype=t).transpose(1, 2).requires_grad_()
    keep = torch.ones(B, N, dtype=torch.bool) if mask == "causal+mask" else None
    x = torch.randn(B, N, D, dtype=t, requires_grad=True)
    dictionary = torch.randn(D, D, dtype=t, requires_grad=True)
    wide = torch.randn(D, 4 * D, dtype=t, requires_grad=True)
    with backend.dry_run(divmod(arch(target), 10)) as launches:
        crate_kernels.mssa(w, attn_mask=keep, is_causal=mask != "none").sum().backward()
        for x_in in (x, x.detach().float().requires_grad_()) if gemm and t != torch.float32 else (x,) * gemm:
            # an fp32 x with a 16-bit dictionary: autocast's mix, fp32 tiles rounded for the dot
            crate_kernels.ista(x_in, dictionary).sum().backward()
            crate_kernels.ista_overcomplete(x_in, wide, residual=x_in).sum().backward()
    torch.set_float32_matmul_precision("highest")
    return launches


def profile_cases(cases: list[tuple], target: str = "sm_90") -> str:
    """JSON {"rows": [{case, kernel, constexprs, config, profile}] of every distinct launch of ``cases`` compiled for
    ``target``, "cache_results": whether each autotuner keeps its results on disk} (run without TRITON_INTERPRET: the
    interpreter turns Triton's result cache off)."""
    from benchmarks.compile_report import _config_json, _key, _name
    from benchmarks.compiled import profile_launch
    from crate_kernels.kernels.ista import _ista_gemm_kernel
    from crate_kernels.kernels.mssa import _mssa_bwd_kernel, _mssa_fwd_kernel

    rows, seen = [], set()
    for case in cases:
        for launch in _record(*case, target):
            key = _key(launch)
            if key in seen:
                continue
            seen.add(key)
            profile = profile_launch(launch, target=target)
            constexprs = {k: str(v) for k, v in launch.constexprs.items()}
            row = {"case": list(case), "kernel": _name(launch.kernel), "constexprs": constexprs}
            rows.append(row | {"config": _config_json(launch.config), "profile": profile._asdict()})
    tuned = (_ista_gemm_kernel, _mssa_fwd_kernel, _mssa_bwd_kernel)
    return json.dumps({"rows": rows, "cache_results": {_name(k): k.cache_results for k in tuned}})


_ROWS: dict[tuple[str, str], dict] = {}


def _compiled(which: str, target: str = "sm_90") -> dict:
    """``profile_cases`` of the QUICK or FULL cases for ``target``, compiled once per session in one process."""
    if (which, target) not in _ROWS:
        pytest.importorskip("triton.backends.nvidia")
        cases = QUICK if which == "quick" else FULL
        code = f"from tests.test_configs import profile_cases; print(profile_cases({cases!r}, {target!r}))"
        timeout = 300 if which == "quick" else 3600  # the full matrix: about 10 minutes on two loaded cores
        _ROWS[which, target] = json.loads(run_without_interpreter(code, timeout).splitlines()[-1])
    return _ROWS[which, target]


# IEEE fp32 dots run as FMAs and ptxas spills a little at every tile tried (docs/design.md, 'Kernel configurations'):
# their gate is no cliff (the autotune list's 64 × 64 tiles took 6.7–12.7 KB of stack), not zero.
IEEE_FP32_MAX_STACK = 1024


def _assert_fit(rows: list[dict], kernels: tuple[str, ...], max_shared: int = 232448) -> None:
    rows = [r for r in rows if r["kernel"] in kernels]
    assert rows, f"no launch of {kernels}"
    bad = []
    for r in rows:
        p = r["profile"]
        stack = IEEE_FP32_MAX_STACK if r["case"][:2] == ["fp32", "ieee"] else 0
        if not (p["spill_bytes"] <= stack and p["stack_bytes"] <= stack and p["shared_bytes"] <= max_shared):
            bad.append(f"{r['kernel']} {r['case']} {r['config']}: {p}")
    assert not bad, "\n".join(bad)


FAMILIES = {
    "mssa_fwd": ("_mssa_fwd_kernel",),
    "mssa_bwd": ("_mssa_bwd_kernel", "_mssa_bwd_delta_kernel"),
    "gemm": ("_ista_gemm_kernel",),
}
SKIP_ON_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run them")


@SKIP_ON_GPU
@pytest.mark.parametrize("family", FAMILIES)
def test_heuristic_configs_fit_hopper(family):
    """The representative cases: bf16 at P = 64 with the GEMMs, fp16 causal and masked at P = 128, fp32 (tf32)
    causal at P = 32."""
    _assert_fit(_compiled("quick")["rows"], FAMILIES[family])


@pytest.mark.slow
@SKIP_ON_GPU
@pytest.mark.parametrize("target", ["sm_90", "sm_80", "sm_100"])
@pytest.mark.parametrize("family", FAMILIES)
def test_heuristic_configs_fit_every_case(family, target):
    """fp32 (tf32 and IEEE) / fp16 / bf16 × P ∈ {32, 64, 128} × (no mask, causal, causal + key-padding mask); about
    ten minutes of compiling per target on two loaded cores."""
    from benchmarks.compiled import TARGETS

    _assert_fit(_compiled("full", target)["rows"], FAMILIES[family], TARGETS[target][0])


def test_set_autotune(monkeypatch):
    monkeypatch.setattr(configs, "_autotune", None)
    monkeypatch.delenv("CRATE_KERNELS_AUTOTUNE", raising=False)
    assert not configs.autotuning()
    monkeypatch.setenv("CRATE_KERNELS_AUTOTUNE", "1")
    assert configs.autotuning()
    crate_kernels.set_autotune(False)
    assert not configs.autotuning()
    with pytest.raises(TypeError, match="bool"):
        crate_kernels.set_autotune(1)


def test_autotune_keys_separate_what_compiles_differently():
    """Tuned tiles persist on disk (Triton's cache_results) under the autotune key: every constexpr that changes the
    compiled kernel beyond the tensors' dtypes must be in it."""
    from crate_kernels.kernels.ista import _ista_gemm_kernel

    assert {"DOT_DTYPE", "DOT_PRECISION"} <= set(_ista_gemm_kernel.keys)


@SKIP_ON_GPU
def test_autotune_results_persist():
    assert all(_compiled("quick")["cache_results"].values())


def test_compile_report_records_every_kernel_of_a_training_step():
    """The report's launch list comes from a dry run of the step: every kernel family, each launch with its
    heuristic config, and nothing launched (the outputs are never written)."""
    from benchmarks.compile_report import _name, record_step

    launches = record_step("crate_tiny_patch16_224", torch.bfloat16, batch=1)
    names = {_name(launch.kernel) for launch in launches}
    assert names == {"_mssa_fwd_kernel", "_mssa_bwd_delta_kernel", "_mssa_bwd_kernel", "_ista_gemm_kernel"}
    depth = crate_kernels.create_model("crate_tiny_patch16_224").config["depth"]
    assert sum(_name(launch.kernel) == "_mssa_fwd_kernel" for launch in launches) == depth
    assert all(launch.config.num_warps in (4, 8) for launch in launches)

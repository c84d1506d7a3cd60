"""The benchmark harness: collection of ``bench_*.py``, the ``bench`` timing fixture, the card's ceilings.

A bench function asks for ``bench`` and calls it once::

    def bench_ista_fwd_bwd(bench, shape, dtype, provider):
        bench(fn, make_inputs, mode="fwd_bwd", provider=provider, op="ista", shape=shape, dtype=dtype,
              flops=ista_flops(shape.B * shape.N, shape.D, "fwd_bwd"), nbytes=...)

What the fixture does (see :meth:`Bench.__call__`):
- warm-up calls outside the timed region (this is also where ``torch.compile`` compiles);
- rotating input buffers: ``make_inputs()`` is called again for extra copies while one set is smaller than the card's
  L2, so no timed call finds its inputs in cache (CUDA only: CPU rows are small-shape smoke numbers);
- per-call times with CUDA events on the GPU (the device is synchronised before reading them), ``perf_counter`` on
  CPU; the call count fits a time budget (``--bench-budget`` seconds per row);
- median, p20 and p80 in ``extra_info``; the per-call times become the pytest-benchmark statistics, so its table,
  ``--benchmark-json`` and ``--benchmark-compare`` see the device times;
- peak memory of one more call (``torch.cuda.max_memory_allocated``, CUDA only) as its own measurement;
- the card, its clocks when ``nvidia-smi`` reads them, torch / triton / CUDA versions, dtype, FLOPs, bytes, TFLOP/s and,
  on a GPU, the fraction of the roofline floor (from this run's measured matmul rate and copy bandwidth; None on CPU)
  in ``extra_info``.

Modes: ``fwd`` times ``fn(*inputs)``; ``bwd`` runs the forward untimed and times ``out.backward(grad)``; ``fwd_bwd``
times both; ``train_step`` times ``fn(*inputs)`` as an opaque whole step (forward, backward, optimizer), ``load`` as
one batch out of a data loader. For ``bwd`` and ``fwd_bwd``, ``fn`` returns one tensor and the ``.grad`` of inputs
that require grad are reset before each call.

Without CUDA, providers marked ``gpu`` are skipped with a reason saying their rows were not measured.

``extra_info`` keys (report.py reads them): suite, op, mode, shape, dtype, provider, ours, items, items_unit, flops,
bytes, median_ms, p20_ms, p80_ms, calls, peak_mb, tflops, matmul_tflops, copy_gbps, floor_ms, roofline_fraction,
device, card, clocks, torch, triton, cuda.
"""

import functools
import itertools
import math
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

import crate_kernels
from benchmarks.shapes import MODES, BenchShape, Provider, dtype_name

GPU_SKIP_REASON = "GPU row not measured: no CUDA device on this machine (run benchmarks/gpu_check.sh on a GPU)"
_WARMUP_CALLS = 3
_MIN_CALLS, _MAX_CALLS = 5, 200
_MAX_INPUT_COPIES = 64


class _BenchModule(pytest.Module):
    """A ``bench_*.py`` file: collects the ``bench_<op>_<mode>`` functions it defines, not imported helpers."""

    def funcnamefilter(self, name: str) -> bool:
        return name.startswith("bench_") or super().funcnamefilter(name)

    def istestfunction(self, obj: object, name: str) -> bool:
        return super().istestfunction(obj, name) and getattr(obj, "__module__", None) == self.obj.__name__


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return _BenchModule.from_parent(parent, path=file_path)
    return None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-budget", type=float, default=None, help="seconds of timed calls per row (default 0.5 GPU, 0.2 CPU)"
    )
    parser.addoption(
        "--bench-deadline",
        type=float,
        default=None,
        help="Unix time after which rows are skipped as not measured, so a run under a time limit still ends "
        "normally and writes its JSON (pytest-benchmark writes nothing when interrupted)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def card_info() -> dict:
    """The card and the software versions every row carries."""
    import triton

    device = _device()
    info = {
        "device": device.type,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "clocks": None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda" and shutil.which("nvidia-smi"):
        query = "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.limit"
        result = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader", f"--id={torch.cuda.current_device()}"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        fields = [f.strip() for f in result.stdout.split(",")]
        if result.returncode == 0 and len(fields) == 4:
            info["clocks"] = f"SM {fields[0]} (max {fields[1]}), memory {fields[2]}, power limit {fields[3]}"
    return info


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["crate_kernels"] = card_info()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(
    prepare: Callable[[], object], run: Callable[[object], None], device: torch.device, budget_s: float
) -> list[float]:
    """Seconds of each timed ``run(prepare())``; ``prepare`` is never timed. Warm-up first, then as many calls as fit
    ``budget_s`` (between _MIN_CALLS and _MAX_CALLS)."""
    for _ in range(_WARMUP_CALLS):
        state = prepare()
        _sync(device)
        start = time.perf_counter()
        run(state)
        _sync(device)
        estimate = time.perf_counter() - start
    calls = min(_MAX_CALLS, max(_MIN_CALLS, math.ceil(budget_s / max(estimate, 1e-9))))
    if device.type == "cuda":
        events = []
        for _ in range(calls):
            state = prepare()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(state)
            end.record()
            events.append((start, end))
        _sync(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(calls):
        state = prepare()
        start = time.perf_counter()
        run(state)
        times.append(time.perf_counter() - start)
    return times


def _input_copies(make_inputs: Callable[[], Sequence], device: torch.device) -> list[tuple]:
    """One input set, or enough fresh sets that cycling through them overruns the L2 cache twice."""
    first = tuple(make_inputs())
    nbytes = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
    cache = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    count = 1 if nbytes == 0 or nbytes >= cache else min(_MAX_INPUT_COPIES, math.ceil(2 * cache / nbytes))
    return [first] + [tuple(make_inputs()) for _ in range(count - 1)]


def _peak_mb(prepare: Callable[[], object], run: Callable[[object], None], device: torch.device) -> float | None:
    """Peak allocated memory (MB) during one ``prepare`` + ``run``: everything live, parameters included."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    run(prepare())
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


class Ceilings:
    """The card's measured matmul rate and copy bandwidth per dtype, for the roofline floor of every GPU row.

    Large enough to reach the plateau of an H100 (one 8192³ GEMM ≈ 1.1 TFLOP; 1 GiB copied). A CPU run measures none:
    a smoke-sized matmul and a cache-resident copy give no plausible ceiling, so CPU rows carry no roofline.
    """

    _MATMUL_N, _COPY_BYTES = 8192, 2**30

    def __init__(self, device: torch.device, budget_s: float):
        self.device, self.budget_s = device, budget_s
        self._cache: dict[torch.dtype, tuple[float, float]] = {}

    def __call__(self, dtype: torch.dtype) -> tuple[float, float]:
        """(matmul TFLOP/s, copy GB/s) measured once per dtype in this run."""
        if dtype not in self._cache:
            n, copy_bytes = self._MATMUL_N, self._COPY_BYTES
            a = torch.randn(n, n, device=self.device, dtype=dtype)
            b = torch.randn(n, n, device=self.device, dtype=dtype)
            mm = statistics.median(_time_calls(lambda: None, lambda _: torch.mm(a, b), self.device, self.budget_s))
            src = torch.empty(copy_bytes // 4, device=self.device, dtype=torch.float32)
            dst = torch.empty_like(src)
            cp = statistics.median(_time_calls(lambda: None, lambda _: dst.copy_(src), self.device, self.budget_s))
            self._cache[dtype] = (2 * n**3 / mm / 1e12, 2 * copy_bytes / cp / 1e9)
        return self._cache[dtype]


@pytest.fixture(scope="session")
def ceilings(pytestconfig: pytest.Config) -> Ceilings:
    return Ceilings(_device(), _budget(pytestconfig))


def _budget(config: pytest.Config) -> float:
    budget = config.getoption("--bench-budget")
    return budget if budget is not None else (0.5 if torch.cuda.is_available() else 0.2)


class Bench:
    """The timing target; one call per benchmark (see the module docstring)."""

    def __init__(self, benchmark, ceilings: Ceilings, budget_s: float, suite: str):
        self.benchmark, self.ceilings, self.budget_s, self.suite = benchmark, ceilings, budget_s, suite
        self.device = _device()

    def __call__(
        self,
        fn: Callable,
        make_inputs: Callable[[], Sequence],
        *,
        mode: str,
        provider: Provider,
        op: str,
        shape: BenchShape,
        dtype: torch.dtype,
        flops: float,
        nbytes: float,
    ) -> dict:
        """Time ``fn(*make_inputs())`` in ``mode``; returns (and records) the row's ``extra_info``.

        Args:
            fn: the provider's callable; for ``bwd``/``fwd_bwd`` it returns one tensor.
            make_inputs: returns a fresh tuple of ``fn``'s arguments on the bench device (called again for rotation).
            mode: one of ``fwd``, ``bwd``, ``fwd_bwd``, ``train_step``.
            flops, nbytes: the minimum work and compulsory traffic of one call (benchmarks/shapes.py).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if provider.gpu_only and self.device.type != "cuda":
            pytest.skip(GPU_SKIP_REASON)
        saved_backend = crate_kernels.get_backend()
        if provider.backend is not None:
            crate_kernels.set_backend(provider.backend)
        try:
            prepare, run = self._prepare_and_run(fn, _input_copies(make_inputs, self.device), mode)
            if (
                not self.benchmark.enabled
            ):  # --benchmark-disable: pytest-benchmark makes one call, a smoke test of the row
                self.benchmark.pedantic(lambda: run(prepare()))
                _sync(self.device)
                return {}
            times = _time_calls(prepare, run, self.device, self.budget_s)
            peak_mb = _peak_mb(prepare, run, self.device)
        finally:
            crate_kernels.set_backend(saved_backend)
        info = self._extra_info(times, peak_mb, mode, provider, op, shape, dtype, flops, nbytes)
        self.benchmark.group = f"{op} {mode} {shape.id} {info['dtype']}"
        self.benchmark.extra_info.update(info)
        # pytest-benchmark's own loop times the host with perf_counter; on CUDA we time with events, so we hand it the
        # measured per-call seconds (the statistics object of a one-round pedantic run, refilled before it is read).
        self.benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        self.benchmark.stats.stats.data[:] = times
        return info

    def _prepare_and_run(self, fn: Callable, copies: list[tuple], mode: str):
        """``prepare()`` (untimed: next input set, cleared grads, and the forward for ``bwd``) and ``run(state)``."""
        rotation = itertools.cycle(copies)
        grad_out: list[torch.Tensor] = []

        def next_inputs() -> tuple:
            inputs = next(rotation)
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.grad = None
            return inputs

        def backward(out: torch.Tensor) -> None:
            if not grad_out:
                grad_out.append(torch.randn_like(out))
            out.backward(grad_out[0])

        if mode in ("fwd", "train_step", "load"):
            return next_inputs, lambda inputs: fn(*inputs)
        if mode == "bwd":
            return lambda: fn(*next_inputs()), backward
        return next_inputs, lambda inputs: backward(fn(*inputs))

    def _extra_info(self, times, peak_mb, mode, provider, op, shape, dtype, flops, nbytes) -> dict:
        median = statistics.median(times)
        quantiles = statistics.quantiles(times, n=5, method="inclusive")  # cut points at 20, 40, 60, 80 %
        matmul_tflops = copy_gbps = floor_s = None
        if self.device.type == "cuda":
            matmul_tflops, copy_gbps = self.ceilings(dtype)
            floor_s = max(flops / (matmul_tflops * 1e12), nbytes / (copy_gbps * 1e9))
        return {
            "suite": self.suite,
            "op": op,
            "mode": mode,
            "shape": shape.id,
            "dtype": dtype_name(dtype),
            "provider": provider.name,
            "ours": provider.ours,
            "items": shape.items,
            "items_unit": shape.model.items_unit,
            "flops": float(flops),
            "bytes": float(nbytes),
            "median_ms": median * 1e3,
            "p20_ms": quantiles[0] * 1e3,
            "p80_ms": quantiles[3] * 1e3,
            "calls": len(times),
            "peak_mb": peak_mb,
            "tflops": flops / median / 1e12,
            "matmul_tflops": matmul_tflops,
            "copy_gbps": copy_gbps,
            "floor_ms": None if floor_s is None else floor_s * 1e3,
            "roofline_fraction": None if floor_s is None else floor_s / median,
            **card_info(),
        }


@pytest.fixture
def bench(benchmark, ceilings: Ceilings, pytestconfig: pytest.Config, request: pytest.FixtureRequest) -> Bench:
    """The timing target; the suite name is the bench file's name without ``bench_``."""
    deadline = pytestconfig.getoption("--bench-deadline")
    if deadline is not None and time.time() > deadline:
        pytest.skip("row not measured: the run's time budget (--bench-deadline) was spent")
    suite = Path(request.node.path).stem.removeprefix("bench_")
    return Bench(benchmark, ceilings, _budget(pytestconfig), suite)

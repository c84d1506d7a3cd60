"""The benchmark harness, shapes and report: synthetic pytest-benchmark JSON → report.md + summary.json, and CPU runs of
the suites (one call per row, and one timed row end to end through report.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import report
from benchmarks.shapes import (
    TRITON,
    TRITON_COMPILE,
    UPSTREAM_COMPILE,
    UPSTREAM_COMPILE_MAX,
    BenchShape,
    attention_flops,
    ista_flops,
    layer_flops,
    model_shape,
    train_step_flops,
)

ROOT = Path(__file__).resolve().parents[1]


def _row(provider: str, ours: bool, median_s: float, shape: str = "crate_b-256x197x768h12", **extra) -> dict:
    """One benchmark entry as pytest-benchmark writes it, with the harness's extra_info."""
    info = {
        "suite": "model",
        "op": "crate_layer",
        "mode": "fwd_bwd",
        "shape": shape,
        "dtype": "bfloat16",
        "provider": provider,
        "ours": ours,
        "items": 256,
        "items_unit": "images",
        "flops": 6.4e11,
        "bytes": 1e9,
        "median_ms": median_s * 1e3,
        "p20_ms": median_s * 0.9e3,
        "p80_ms": median_s * 1.1e3,
        "calls": 20,
        "peak_mb": 1234.0,
        "tflops": 6.4e11 / median_s / 1e12,
        "matmul_tflops": 700.0,
        "copy_gbps": 2900.0,
        "floor_ms": 0.9,
        "roofline_fraction": 0.9e-3 / median_s,
        "device": "cuda",
        "card": "NVIDIA H100 80GB HBM3",
        "clocks": None,
        "torch": "2.11.0",
        "triton": "3.6.0",
        "cuda": "13.0",
        **extra,
    }
    return {"fullname": f"benchmarks/bench_model.py::bench_layer[{shape}-{provider}]", "extra_info": info,
            "stats": {"median": median_s}}  # fmt: skip


def _write_run(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps({"datetime": "2026-11-27T03:00:00", "machine_info": {}, "benchmarks": rows}))
    return path


def test_report_writes_summary_in_schema_with_speedups(tmp_path: Path) -> None:
    small = "crate_t-256x197x384h6"
    run = _write_run(
        tmp_path / "run.json",
        [
            _row("upstream_eager", False, 4e-3),
            _row("upstream_compile", False, 2e-3),
            _row("sdpa_flash", False, 2.5e-3),
            _row("triton", True, 1e-3),
            _row("upstream_eager", False, 3e-3, shape=small),
            _row("triton", True, 1.5e-3, shape=small),
        ],
    )
    out = report.write_report([run], tmp_path / "out")

    summary = json.loads((out / "summary.json").read_text())
    report.validate_summary(summary)
    assert summary["card"] == "NVIDIA H100 80GB HBM3" and summary["date"] == "2026-11-27"
    rows = {(r["shape"], r["provider"]): r for r in summary["rows"]}
    ours = rows[("crate_b-256x197x768h12", "triton")]
    assert ours["ms"] == pytest.approx(1.0)
    assert ours["speedup_vs_eager"] == pytest.approx(4.0)
    assert ours["speedup_vs_compile"] == pytest.approx(2.0)
    assert ours["speedup_vs_best_other"] == pytest.approx(2.0)  # upstream_compile is the fastest baseline
    # a baseline's "best other" is the fastest baseline other than itself
    assert rows[("crate_b-256x197x768h12", "upstream_compile")]["speedup_vs_best_other"] == pytest.approx(1.25)
    assert rows[(small, "triton")]["speedup_vs_eager"] == pytest.approx(2.0)
    assert rows[(small, "triton")]["speedup_vs_compile"] is None  # no compile row at that shape: not invented

    text = (out / "report.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "No GPU in this run" not in text
    assert "| crate_b-256x197x768h12 | triton (ours) | 1.000 (0.900–1.100) |" in text
    assert "4.00×" in text and "## Regression gate" in text
    assert "| one layer fwd+bwd within 1.5× of the roofline floor | triton | bfloat16 | 0.90 | 0.67 | yes |" in text
    assert "| training step ≥ 2× upstream eager | — | — | not measured |" in text
    assert (out / "speedup.png").stat().st_size > 0 and (out / "tflops_vs_n.png").stat().st_size > 0
    assert json.loads((out / report.RAW_NAME).read_text())["benchmarks"][0]["stats"]["median"] == 4e-3


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.pop("date"),
        lambda s: s["rows"][0].pop("ms"),
        lambda s: s["rows"][0].update(ms="fast"),
        lambda s: s["rows"][0].update(tflops=float("nan")),
        lambda s: s["rows"][0].update(extra=1.0),
    ],
    ids=["no-date", "no-ms", "ms-str", "tflops-nan", "extra-key"],
)
def test_validate_summary_rejects_bad_schema(damage) -> None:
    row = dict.fromkeys(report.SUMMARY_ROW_TYPES)
    row.update(suite="s", op="o", mode="fwd", shape="x", dtype="bfloat16", provider="p", ms=1.0)
    summary = {"card": "c", "date": "d", "rows": [row]}
    report.validate_summary(summary)
    damage(summary)
    with pytest.raises(ValueError, match="summary"):
        report.validate_summary(summary)


def test_report_leaves_out_foreign_rows_refuses_mixed_cards_and_duplicates(tmp_path: Path) -> None:
    foreign = {"fullname": "bench_x.py::bench_y[z]", "extra_info": {"op": "y"}, "stats": {"median": 1.0}}
    with pytest.raises(ValueError, match="no harness rows"):
        report.load_rows([_write_run(tmp_path / "a.json", [foreign])])
    out = report.write_report([_write_run(tmp_path / "a2.json", [foreign, _row("triton", True, 1e-3)])], tmp_path)
    assert "1 benchmark entries were left out" in (out / "report.md").read_text()
    assert [r["provider"] for r in json.loads((out / "summary.json").read_text())["rows"]] == ["triton"]
    mixed = [_row("triton", True, 1e-3), _row("upstream_eager", False, 2e-3, card="NVIDIA H200")]
    with pytest.raises(ValueError, match="several cards"):
        report.load_rows([_write_run(tmp_path / "b.json", mixed)])
    twice = _write_run(tmp_path / "c.json", [_row("triton", True, 1e-3)])
    rows, _, _ = report.load_rows([twice, twice])
    with pytest.raises(ValueError, match="two rows"):
        report.add_speedups(rows)


def test_latest_run_picks_the_newest_folder_of_the_card(tmp_path: Path) -> None:
    for name in ("nvidia-h100-80gb-hbm3-2026-01-02", "nvidia-h100-80gb-hbm3-2026-03-01", "nvidia-h200-2026-05-01"):
        (tmp_path / name).mkdir()
        (tmp_path / name / report.RAW_NAME).write_text("{}")
    (tmp_path / "nvidia-h100-80gb-hbm3-2026-04-01").mkdir()  # no raw JSON: not a baseline
    latest = report.latest_run("NVIDIA H100 80GB HBM3", tmp_path)
    assert latest == tmp_path / "nvidia-h100-80gb-hbm3-2026-03-01" / report.RAW_NAME
    assert report.latest_run("NVIDIA A100", tmp_path) is None


def test_shapes_come_from_the_presets() -> None:
    small, base = model_shape("crate_small_patch16_224"), model_shape("crate_base_patch16_224")
    assert (small.dim, small.heads, small.dim_head, small.tokens, small.depth) == (576, 12, 48, 197, 12)
    assert (base.embed_in, base.head_out, base.image_size, base.channels) == (768, 1000, 224, 3)
    assert model_shape("crate_large_patch16_224").depth == 24
    alpha = model_shape("crate_alpha_base_patch16_224")
    assert (alpha.short, alpha.overcomplete, alpha.embed_in, alpha.tokens) == ("crate_alpha_b", 4, 768, 197)


def test_flops_follow_design_formulas() -> None:
    shape = BenchShape(model_shape("crate_base_patch16_224"), 256)
    T = 256 * 197
    assert attention_flops(256, 12, 197, 64, False, "fwd") == 4 * 256 * 12 * 197**2 * 64
    assert attention_flops(256, 12, 197, 64, True, "fwd_bwd") == 3.5 * 2 * 256 * 12 * 197**2 * 64
    assert ista_flops(T, 768, "fwd_bwd") == 3 * (2 * T * 768**2 + 2 * 768**3)
    # One CRATE-B layer fwd+bwd at B = 256 has a compute floor of ≈ 0.81 ms at ~800 TFLOP/s (docs/design.md,
    # 'Performance goals').
    assert layer_flops(shape, "fwd_bwd") / 800e12 == pytest.approx(0.81e-3, rel=0.02)
    assert train_step_flops(shape) > 12 * layer_flops(shape, "fwd_bwd")


def _pytest_benchmarks(*args: str) -> subprocess.CompletedProcess:
    # Benchmarks time real providers: the Triton interpreter (CI exports it) would only slow the CPU rows down. One
    # thread: the demo shapes gain nothing from more, and on a shared two-core runner spinning threads cost 5×.
    # Neither the interpreter nor the xdist worker variables (pytest-benchmark disables itself under xdist).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU smoke of the suites; on a GPU benchmarks/gpu_check.sh runs them at full size"
)


@cpu_only
def test_suites_run_on_cpu_and_feed_the_report(tmp_path: Path) -> None:
    """The suites' demo rows, timed briefly; GPU providers skipped with a reason that says so; the JSON they leave
    goes through report.py."""
    raw = tmp_path / "run.json"
    result = _pytest_benchmarks("-k", "demo", "-rs", "--bench-budget=0.001", f"--benchmark-json={raw}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "GPU row not measured" in result.stdout
    out = report.write_report([raw], tmp_path / "out")
    summary = json.loads((out / "summary.json").read_text())
    gpu_only = {p.name for p in (TRITON, TRITON_COMPILE, UPSTREAM_COMPILE, UPSTREAM_COMPILE_MAX)}
    assert not gpu_only & {r["provider"] for r in summary["rows"]}  # skipped on CPU, not measured
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["peak_mb"] is None for r in summary["rows"])
    layer = {r["provider"]: r for r in summary["rows"] if r["op"] == "crate_layer" and r["mode"] == "fwd_bwd"}
    assert layer["torch_path"]["speedup_vs_eager"] == pytest.approx(
        layer["upstream_eager"]["ms"] / layer["torch_path"]["ms"]
    )
    text = (out / "report.md").read_text()
    assert "No GPU in this run" in text and "ceilings measured" not in text
    raw_rows = json.loads(raw.read_text())["benchmarks"]
    for row in raw_rows:  # the statistics pytest-benchmark keeps (and --benchmark-compare reads) are the harness's
        assert row["stats"]["median"] * 1e3 == pytest.approx(row["extra_info"]["median_ms"])
        assert row["extra_info"]["roofline_fraction"] is None and row["extra_info"]["matmul_tflops"] is None
        assert row["extra_info"]["calls"] == row["stats"]["rounds"] >= 5


def test_harness_modes_time_only_their_part() -> None:
    """``bwd`` runs the forward in the untimed ``prepare`` and only the backward in the timed ``run``; ``fwd_bwd``
    times both; input gradients are cleared before each call; the call count stays within the harness's bounds."""
    from benchmarks import conftest as harness

    counts = {"fwd": 0, "bwd": 0}

    class Counted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:
            counts["fwd"] += 1
            return 2 * x

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            counts["bwd"] += 1
            return 2 * grad

    bench = harness.Bench(benchmark=None, ceilings=None, budget_s=0.0, suite="test")
    x = torch.ones(3, requires_grad=True)
    prepare, run = bench._prepare_and_run(Counted.apply, [(x,)], "bwd")
    state = prepare()
    assert counts == {"fwd": 1, "bwd": 0}
    run(state)
    assert counts == {"fwd": 1, "bwd": 1} and x.grad is not None
    prepare, run = bench._prepare_and_run(Counted.apply, [(x,)], "fwd_bwd")
    state = prepare()
    assert x.grad is None and counts == {"fwd": 1, "bwd": 1}
    run(state)
    assert counts == {"fwd": 2, "bwd": 2}
    times = harness._time_calls(prepare, run, torch.device("cpu"), budget_s=0.0)
    assert len(times) == harness._MIN_CALLS and all(t > 0 for t in times)
    assert counts["fwd"] == 2 + harness._WARMUP_CALLS + harness._MIN_CALLS

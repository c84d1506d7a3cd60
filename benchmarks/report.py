"""Turn pytest-benchmark JSON into ``benchmarks/results/<card>-<date>/``: report.md, summary.json and plots.

    python -m benchmarks.report RUN.json [MORE.json ...] [--out DIR]   # write the report of one or more runs
    python -m benchmarks.report --latest [--card NAME]                  # print the latest committed run of a card

Every number in the report comes from a row of the given JSON (rows the harness in conftest.py wrote: their
``extra_info`` holds suite, op, mode, shape, dtype, provider, ...); nothing is estimated or filled in. A row's time is
the median of pytest-benchmark's statistics, i.e. of the per-call device times the harness measured.

Speed-ups compare rows of the same suite, op, mode, shape and dtype: the other provider's median over this one's.
"vs eager" is over ``upstream_eager``, "vs compile" over ``upstream_compile`` (default mode), "vs best other" over the
fastest provider that is not crate_kernels' own (and is not the row itself).
"""

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from benchmarks.shapes import COMPILE_NAME, EAGER_NAME, BenchShape, model_shape

RESULTS = Path(__file__).resolve().parent / "results"
RAW_NAME = "benchmark.json"  # the raw pytest-benchmark JSON kept beside the report (the regression gate reads it)
_REQUIRED = ("suite", "op", "mode", "shape", "dtype", "provider", "ours", "card")

# summary.json: {"card", "date", "rows": [...]}; None where a value was not measured.
SUMMARY_ROW_TYPES = {
    "suite": str,
    "op": str,
    "mode": str,
    "shape": str,
    "dtype": str,
    "provider": str,
    "ms": float,
    "tflops": (float, type(None)),
    "peak_mb": (float, type(None)),
    "speedup_vs_eager": (float, type(None)),
    "speedup_vs_compile": (float, type(None)),
    "speedup_vs_best_other": (float, type(None)),
}


def validate_summary(summary: dict) -> None:
    """Raise ValueError unless ``summary`` has exactly the schema above (types included)."""
    if not isinstance(summary, dict) or set(summary) != {"card", "date", "rows"}:
        raise ValueError(f"summary must be a dict with keys card, date, rows, got {summary!r:.200}")
    if not isinstance(summary["card"], str) or not isinstance(summary["date"], str):
        raise ValueError("summary card and date must be strings")
    if not isinstance(summary["rows"], list):
        raise ValueError("summary rows must be a list")
    for i, row in enumerate(summary["rows"]):
        if not isinstance(row, dict) or set(row) != set(SUMMARY_ROW_TYPES):
            raise ValueError(f"summary row {i} must have keys {sorted(SUMMARY_ROW_TYPES)}, got {row!r:.200}")
        for key, kind in SUMMARY_ROW_TYPES.items():
            value = row[key]
            if not isinstance(value, kind) or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"summary row {i}: {key} must be {kind}, finite, got {value!r}")


def load_rows(paths: Iterable[Path]) -> tuple[list[dict], dict, list[str]]:
    """The harness rows of pytest-benchmark JSON files (``extra_info`` plus ``ms``), the first run's header, and the
    names of the entries left out because the harness did not write them (their ``extra_info`` lacks its keys)."""
    rows, header, left_out = [], {}, []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "benchmarks" not in data:
            raise ValueError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' key)")
        header = header or {"datetime": data.get("datetime", ""), "machine_info": data.get("machine_info", {})}
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {})
            if any(k not in info for k in _REQUIRED):
                left_out.append(bench.get("fullname", bench.get("name", "?")))
                continue
            rows.append({**info, "ms": bench["stats"]["median"] * 1e3})
    if not rows:
        raise ValueError(f"no harness rows in the given JSON ({len(left_out)} entries without its extra_info)")
    cards = sorted({r["card"] for r in rows})
    if len(cards) != 1:
        raise ValueError(f"rows from several cards {cards}: write one report per card")
    return rows, header, left_out


def _group_key(row: dict) -> tuple:
    return row["suite"], row["op"], row["mode"], row["shape"], row["dtype"]


def add_speedups(rows: list[dict]) -> None:
    """Set ``speedup_vs_eager``, ``speedup_vs_compile``, ``speedup_vs_best_other`` (None when that row is absent)."""
    groups = defaultdict(dict)
    for row in rows:
        group = groups[_group_key(row)]
        if row["provider"] in group:
            raise ValueError(f"two rows for {(*_group_key(row), row['provider'])}: give each run's JSON once")
        group[row["provider"]] = row
    for row in rows:
        group = groups[_group_key(row)]
        others = [r for p, r in group.items() if not r["ours"] and p != row["provider"]]
        best = min(others, key=lambda r: r["ms"], default=None)
        row["speedup_vs_eager"] = group[EAGER_NAME]["ms"] / row["ms"] if EAGER_NAME in group else None
        row["speedup_vs_compile"] = group[COMPILE_NAME]["ms"] / row["ms"] if COMPILE_NAME in group else None
        row["speedup_vs_best_other"] = best["ms"] / row["ms"] if best is not None else None
        row["best_other"] = best["provider"] if best is not None else None


def summarize(rows: list[dict], card: str, date: str) -> dict:
    summary = {
        "card": card,
        "date": date,
        "rows": [
            {
                **{k: row[k] for k in ("suite", "op", "mode", "shape", "dtype", "provider")},
                "ms": float(row["ms"]),
                "tflops": _float(row.get("tflops")),
                "peak_mb": _float(row.get("peak_mb")),
                "speedup_vs_eager": _float(row["speedup_vs_eager"]),
                "speedup_vs_compile": _float(row["speedup_vs_compile"]),
                "speedup_vs_best_other": _float(row["speedup_vs_best_other"]),
            }
            for row in rows
        ],
    }
    validate_summary(summary)
    return summary


def _float(value) -> float | None:
    return None if value is None else float(value)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _sections(rows: list[dict]) -> dict[tuple, list[dict]]:
    sections = defaultdict(list)
    for row in rows:
        sections[(row["suite"], row["op"], row["mode"], row["dtype"])].append(row)
    return sections


def _shape_order(rows: list[dict]) -> list[str]:
    """Shapes in the order of their token count N, then first appearance."""
    return sorted(dict.fromkeys(r["shape"] for r in rows), key=_tokens)


def _tokens(shape_id: str) -> int:
    """N of a shape id ``<model>-BxNxDhH``; 0 when the id has another form."""
    match = re.search(r"-(\d+)x(\d+)x(\d+)h(\d+)$", shape_id)
    return int(match.group(2)) if match else 0


def _section_markdown(rows: list[dict]) -> list[str]:
    shapes = _shape_order(rows)
    names = list(dict.fromkeys(r["provider"] for r in rows))
    cell = {(r["shape"], r["provider"]): r for r in rows}
    lines = ["Median ms per call (lower is better):", "", "| shape | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for shape in shapes:
        cells = [_fmt(cell[(shape, p)]["ms"], ".3f") if (shape, p) in cell else "—" for p in names]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| shape | provider | ms (p20–p80) | items/s | TFLOP/s | roofline | peak MB | × eager | × compile "
        "| × best other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        for p in names:
            r = cell.get((shape, p))
            if r is None:
                continue
            spread = f"{r['ms']:.3f} ({_fmt(r.get('p20_ms'), '.3f')}–{_fmt(r.get('p80_ms'), '.3f')})"
            rate = r["items"] / (r["ms"] / 1e3) if r.get("items") else None
            unit = f" {r['items_unit']}" if rate is not None else ""
            best = f" ({r['best_other']})" if r["best_other"] else ""
            lines.append(
                f"| {shape} | {p}{' (ours)' if r['ours'] else ''} | {spread} | {_fmt(rate, ',.0f', unit)} | "
                f"{_fmt(r.get('tflops'), '.3g')} | {_fmt(r.get('roofline_fraction'), '.0%')} | "
                f"{_fmt(r.get('peak_mb'), ',.0f')} | {_fmt(r['speedup_vs_eager'], '.2f', '×')} | "
                f"{_fmt(r['speedup_vs_compile'], '.2f', '×')} | {_fmt(r['speedup_vs_best_other'], '.2f', '×')}{best} |"
            )
    return lines


# The goals of docs/design.md, 'Performance goals' (reported, never asserted): (op, mode, metric, target, what it says).
# Metrics are "higher is better" row values; "peak_vs_eager" is upstream eager's peak memory over ours.
GOALS = [
    ("train_step", "train_step", "speedup_vs_eager", 2.0, "training step ≥ 2× upstream eager"),
    ("train_step", "train_step", "speedup_vs_compile", 1.4, "training step ≥ 1.4× torch.compile of upstream"),
    ("train_step", "train_step", "peak_vs_eager", 1.0, "training step: less peak memory than upstream eager"),
    ("crate_layer", "fwd_bwd", "roofline_fraction", 1 / 1.5, "one layer fwd+bwd within 1.5× of the roofline floor"),
    ("ista", "fwd_bwd", "speedup_vs_eager", 3.0, "ISTA op fwd+bwd ≥ 3× upstream eager"),
    ("ista", "fwd_bwd", "speedup_vs_compile", 2.0, "ISTA op fwd+bwd ≥ 2× torch.compile of upstream"),
    ("mssa", "fwd_bwd", "speedup_vs_best_other", 1.3, "MSSA core fwd+bwd ≥ 1.3× the best baseline"),
]


def goal_shape() -> str:
    """The shape of the performance goals: CRATE-B/16 at B = 256."""
    return BenchShape(model_shape("crate_base_patch16_224"), 256).id


def _goal_lines(rows: list[dict]) -> list[str]:
    shape = goal_shape()
    lines = [
        f"## Headline: the performance goals at {shape}",
        "",
        'Our fastest provider on the goal shape, per goal; reported, not asserted. "not measured": this run has no '
        "such row (no GPU, or the suite was not run).",
        "",
        "| goal | provider | dtype | measured | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for op, mode, metric, target, text in GOALS:
        candidates = [r for r in rows if (r["op"], r["mode"], r["shape"]) == (op, mode, shape) and r["ours"]]
        best = min(candidates, key=lambda r: r["ms"], default=None)
        value = None if best is None else _goal_metric(best, metric, rows)
        if value is None:
            lines.append(f"| {text} | — | — | not measured | {target:.2f} | — |")
            continue
        lines.append(
            f"| {text} | {best['provider']} | {best['dtype']} | {value:.2f} | {target:.2f} | "
            f"{'yes' if value >= target else 'no'} |"
        )
    return [*lines, ""]


def _goal_metric(row: dict, metric: str, rows: list[dict]) -> float | None:
    if metric != "peak_vs_eager":
        return row.get(metric)
    eager = [r for r in rows if _group_key(r) == _group_key(row) and r["provider"] == EAGER_NAME]
    if not eager or not row.get("peak_mb") or not eager[0].get("peak_mb"):
        return None
    return eager[0]["peak_mb"] / row["peak_mb"]


REGRESSION_GATE = """\
## Regression gate

Each results folder keeps the run's raw pytest-benchmark JSON (`benchmark.json`). On a machine with the same card,
compare a new run against the latest committed one and fail on a slowdown of more than 10 % of the median:

```bash
BASE=$(python -m benchmarks.report --latest)        # benchmarks/results/<card>-<date>/benchmark.json of this card
pytest benchmarks --benchmark-compare="$BASE" --benchmark-compare-fail=median:10%
```

The median is of per-call device times (CUDA events), robust to the odd slow call; 10 % is above the run-to-run
spread of the same card (p20–p80 in the report) and below the gains the kernels are for. A row whose shape, provider
or dtype is new has nothing to compare against and passes. Rows of another card are never compared: `--latest`
looks only at folders named after this machine's card. After an intended change of speed, commit the new results
folder (`benchmarks/gpu_check.sh` writes it) so it becomes the baseline.
"""


def render_markdown(
    rows: list[dict], header: dict, card: str, date: str, plots: list[str], left_out: list[str] = ()
) -> str:
    first = rows[0]
    machine = header.get("machine_info", {})
    lines = [
        f"# crate_kernels benchmarks — {card}, {date}",
        "",
        f"- card: **{card}** (device `{first.get('device')}`), clocks: {first.get('clocks') or 'not read'}",
        f"- torch {first.get('torch')}, triton {first.get('triton')}, CUDA {first.get('cuda')}, "
        f"Python {machine.get('python_version', '?')}",
        "- times: median of per-call device times (p20–p80 in brackets); TFLOP/s counts the algorithm's minimum FLOPs "
        "(docs/design.md), the same for every provider; × = the other provider's time over this one's on the same "
        "shape, dtype and mode, both measured in this run.",
    ]
    if first.get("device") == "cuda":
        lines += [
            f"- ceilings measured in this run: matmul {_fmt(first.get('matmul_tflops'), '.4g')} TFLOP/s "
            f"({first['dtype']}), copy {_fmt(first.get('copy_gbps'), ',.0f')} GB/s; roofline = the floor (FLOPs "
            "over the matmul ceiling or bytes over the copy ceiling, whichever is larger) over the measured time.",
        ]
    else:
        lines.append(
            "- **No GPU in this run**: only CPU providers at small shapes were measured; every GPU row "
            "(Triton kernels, torch.compile) was skipped, not measured. These numbers say nothing about GPU speed. "
            "No roofline: a CPU run measures no ceiling worth dividing by."
        )
    if left_out:
        lines.append(
            f"- {len(left_out)} benchmark entries were left out: their extra_info lacks the harness's keys "
            f"{list(_REQUIRED)} (benchmarks/conftest.py): "
            + ", ".join(f"`{name}`" for name in left_out[:10])
            + (" …" if len(left_out) > 10 else "")
        )
    lines += ["", *_goal_lines(rows)]
    for (suite, op, mode, dtype), section in sorted(_sections(rows).items()):
        lines += [f"## {suite}: {op} {mode} ({dtype})", "", *_section_markdown(section), ""]
    if plots:
        lines += ["## Plots", "", *[f"![{name}]({name})" for name in plots], ""]
    lines.append(REGRESSION_GATE)
    return "\n".join(lines)


def write_plots(rows: list[dict], out: Path) -> list[str]:
    """speedup.png (bars: speed-up over upstream eager per shape and provider) and tflops_vs_n.png (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = sorted(_sections(rows).items())
    written = []
    for name, draw in (("speedup.png", _draw_speedup), ("tflops_vs_n.png", _draw_tflops)):
        fig, axes = plt.subplots(len(sections), 1, figsize=(10, 3.2 * len(sections)), squeeze=False)
        for ax, (key, section) in zip(axes[:, 0], sections, strict=True):
            draw(ax, section)
            ax.set_title(" ".join(key), fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)
    return written


def _draw_speedup(ax, rows: list[dict]) -> None:
    shapes = _shape_order(rows)
    names = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != EAGER_NAME]
    cell = {(r["shape"], r["provider"]): r["speedup_vs_eager"] for r in rows}
    width = 0.8 / max(len(names), 1)
    for i, p in enumerate(names):
        xs = [j + i * width for j, s in enumerate(shapes) if cell.get((s, p)) is not None]
        ys = [cell[(s, p)] for s in shapes if cell.get((s, p)) is not None]
        ax.bar(xs, ys, width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=7)
    ax.set_ylabel("× upstream eager")
    ax.legend(fontsize=7)


def _draw_tflops(ax, rows: list[dict]) -> None:
    for p in dict.fromkeys(r["provider"] for r in rows):
        points = sorted((_tokens(r["shape"]), r["tflops"]) for r in rows if r["provider"] == p and r.get("tflops"))
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=p)
    ax.set_xlabel("N (tokens per sequence)")
    ax.set_ylabel("TFLOP/s")
    ax.legend(fontsize=7)


def write_report(paths: list[Path], out: Path | None = None) -> Path:
    """Write report.md, summary.json, the plots and the raw JSON (first path) into ``out`` (default
    ``benchmarks/results/<card>-<date>``); returns the folder."""
    rows, header, left_out = load_rows(paths)
    card = rows[0]["card"]
    date = (header.get("datetime") or "")[:10] or "undated"
    out = Path(out) if out is not None else RESULTS / f"{slug(card)}-{date}"
    out.mkdir(parents=True, exist_ok=True)
    add_speedups(rows)
    summary = summarize(rows, card, date)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plots = write_plots(rows, out)
    (out / "report.md").write_text(render_markdown(rows, header, card, date, plots, left_out))
    merged = json.loads(Path(paths[0]).read_text())
    for path in paths[1:]:
        merged["benchmarks"] += json.loads(Path(path).read_text())["benchmarks"]
    (out / RAW_NAME).write_text(json.dumps(merged) + "\n")
    return out


def latest_run(card: str, results: Path = RESULTS) -> Path | None:
    """The raw JSON of the newest results folder of ``card`` (folders are ``<card slug>-<YYYY-MM-DD>``)."""
    pattern = re.compile(re.escape(slug(card)) + r"-(\d{4}-\d{2}-\d{2})$")
    runs = sorted(
        (m.group(1), p) for p in results.glob("*") if (m := pattern.match(p.name)) and (p / RAW_NAME).is_file()
    )
    return runs[-1][1] / RAW_NAME if runs else None


def _this_card() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", type=Path, help="pytest-benchmark JSON files of one card")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<card>-<date>)")
    parser.add_argument("--latest", action="store_true", help="print the latest committed raw JSON of a card")
    parser.add_argument("--card", help="card name for --latest (default: this machine's)")
    args = parser.parse_args(argv)
    if args.latest:
        path = latest_run(args.card or _this_card())
        if path is None:
            print(f"no results for card {args.card or _this_card()!r} under {RESULTS}", file=sys.stderr)
            return 1
        print(path)
        return 0
    if not args.json:
        parser.error("give at least one pytest-benchmark JSON file (or --latest)")
    print(write_report(args.json, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

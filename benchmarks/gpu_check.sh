#!/usr/bin/env bash
# The one script to run on a GPU machine, unattended, in under 8 minutes (docs/design.md, 'Pinned versions
# and environment': torch 2.11, triton 3.6, no pip installs, run from the checkout):
#   1. print the GPU, driver, torch, triton and CUDA versions;
#   2. the test suite on the GPU, Triton compiled for real (TRITON_INTERPRET unset), gpu-marked tests included;
#   3. the kernel suites (benchmarks/bench_mssa.py, bench_ista*.py, when present), then each kernel of the CRATE-B/16
#      bf16 training step timed with its heuristic config and with the autotuner's pick (benchmarks/tune_gap.py);
#   4. the model suites (bench_model.py), most needed first: every layer shape and the CRATE-B/16 training step
#      uncompiled, the torch.compile rows at CRATE-B/16 (compiling whole models costs minutes, so only the shape of
#      the performance goals), the other presets' training steps, max-autotune last;
#   5. report.py -> benchmarks/results/<card>-<date>/{report.md, summary.json, benchmark.json, plots}, copied with this
#      script's log to $OUT/<card>-<date>/ when $OUT is set.
# Each stage gets what is left of the time budget (capped per stage). Benchmark stages get a --bench-deadline ROW_SLACK
# seconds before their limit: later rows are skipped as "not measured" and pytest ends normally, writing its JSON
# (pytest-benchmark writes nothing when killed); the hard limit only stops a stage whose last row overruns the slack.
# Exit status: non-zero when the tests or a stage failed or overran its hard limit (stages the budget had no time
# for are listed, not failed).
# Usage: bash benchmarks/gpu_check.sh   (env: CRATE_KERNELS_GPU_CHECK_BUDGET seconds, default 465; PYTHON)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET CRATE_KERNELS_BACKEND
PYTHON=${PYTHON:-python3}
BUDGET=${CRATE_KERNELS_GPU_CHECK_BUDGET:-465}
REPORT_RESERVE=25  # seconds kept for report.py and the copy to $OUT
ROW_SLACK=45       # seconds a row started just before a stage's deadline may take (a compile, a CRATE-L step)

CARD_SLUG=$("$PYTHON" -c "import torch; from benchmarks.report import slug; print(slug(torch.cuda.get_device_name()))") || {
    echo "gpu_check: no CUDA device visible to torch; nothing to do on this machine" >&2
    exit 2
}
RESULTS="benchmarks/results/${CARD_SLUG}-$(date -u +%F)"
RAW=$(mktemp -d)
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
FAILED=()   # stages that failed or overran their hard limit: the exit status says so
NOT_RUN=()  # stages the budget left no time for (the report simply has no rows of theirs)

# run_stage NAME CAP_SECONDS COMMAND...: run COMMAND with min(CAP, time left) seconds; skip it when under 20 s are left.
# The word @DEADLINE@ in COMMAND becomes the Unix time ROW_SLACK seconds (at most half the limit) before the limit.
run_stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - REPORT_RESERVE - SECONDS))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "=== $name: not run, ${left}s left of the budget"
        NOT_RUN+=("$name")
        return
    fi
    echo "=== $name (limit ${limit}s, ${SECONDS}s elapsed)"
    local margin=$((ROW_SLACK < limit / 2 ? ROW_SLACK : limit / 2))
    local deadline=$(($(date +%s) + limit - margin)) args=() arg
    for arg in "$@"; do args+=("${arg//@DEADLINE@/$deadline}"); done
    timeout -s INT -k 20 "$limit" "${args[@]}"
    local rc=$?
    case $rc in
        0 | 5) ;;  # 5: pytest collected nothing (e.g. a suite filtered away)
        124 | 130 | 137) echo "=== $name: stopped at its time limit (rows finished so far are kept)"; FAILED+=("$name (time limit)") ;;
        *) FAILED+=("$name (exit $rc)") ;;
    esac
}

main() {
    echo "=== versions"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$PYTHON" - <<'PY'
import platform, torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
PY

    # Compiling the Triton variants dominates the GPU tests (5–15 s each for exact fp32): spread them over the CPU
    # cores with pytest-xdist when the image has it.
    local workers=()
    "$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n 8)
    run_stage "tests on the GPU" 140 "$PYTHON" -m pytest tests -m "not slow" -q -p no:cacheprovider --maxfail=20 \
        "${workers[@]}"

    BENCH=("$PYTHON" -m pytest -q -p no:cacheprovider -rs --benchmark-columns=median,iqr,rounds
        --bench-deadline=@DEADLINE@)
    mapfile -t KERNEL_SUITES < <(ls benchmarks/bench_mssa.py benchmarks/bench_ista*.py 2>/dev/null)
    if ((${#KERNEL_SUITES[@]})); then
        run_stage "kernel suites" 100 "${BENCH[@]}" "${KERNEL_SUITES[@]}" --benchmark-json="$RAW/kernels.json"
    else
        echo "=== kernel suites: none in benchmarks/ yet"
    fi
    # Heuristic vs autotuned configs, same process: what the default (no autotuning) leaves on the table.
    run_stage "heuristic vs autotuned configs" 90 "$PYTHON" -m benchmarks.tune_gap --model crate_base_patch16_224 \
        --dtype bf16 --batch 64 --deadline @DEADLINE@ --out "$RESULTS"
    # Model suites in the order of what the report's headline needs (the performance goals at CRATE-B/16): every layer shape
    # and the CRATE-B/16 steps uncompiled, then the torch.compile rows at CRATE-B/16, then the other presets' steps,
    # then max-autotune (minutes of autotuning) with whatever time is left.
    local model=benchmarks/bench_model.py
    run_stage "model suites: layers, CRATE-B/16 step" 70 "${BENCH[@]}" "$model" \
        -k "not compile and (bench_layer or crate_b-)" --benchmark-json="$RAW/model.json"
    run_stage "model suites: torch.compile at CRATE-B/16" 130 "${BENCH[@]}" "$model" \
        -k "compile and not max_autotune and crate_b- and (fwd_bwd or train_step)" \
        --benchmark-json="$RAW/model_compile.json"
    run_stage "model suites: training steps of the other presets" 100 "${BENCH[@]}" "$model" \
        -k "bench_train_step and not compile and not crate_b-" --benchmark-json="$RAW/model_steps.json"
    run_stage "model suites: max-autotune at CRATE-B/16" 100 "${BENCH[@]}" "$model" \
        -k "max_autotune and crate_b- and (fwd_bwd or train_step)" --benchmark-json="$RAW/model_max_autotune.json"

    echo "=== report (${SECONDS}s elapsed)"
    mapfile -t RUNS < <(ls "$RAW"/*.json 2>/dev/null)
    if ((${#RUNS[@]})) && "$PYTHON" -m benchmarks.report "${RUNS[@]}" --out "$RESULTS"; then
        sed -n '1,200p' "$RESULTS/report.md"
    else
        FAILED+=("report")
    fi
    rm -rf "$RAW"

    echo "=== done in ${SECONDS}s; results in $RESULTS"
    if ((${#NOT_RUN[@]})); then
        printf 'gpu_check: not run for lack of time: %s\n' "${NOT_RUN[@]}"
    fi
    if ((${#FAILED[@]})); then
        printf 'gpu_check: not clean: %s\n' "${FAILED[@]}"
    fi
    ((${#FAILED[@]} == 0))
}

main 2>&1 | tee "$LOG"
STATUS=${PIPESTATUS[0]}
if [[ -n "${OUT:-}" ]]; then  # after tee has finished, so the copied log is complete
    mkdir -p "$OUT/$(basename "$RESULTS")"
    cp "$RESULTS"/* "$OUT/$(basename "$RESULTS")/"
fi
exit "$STATUS"

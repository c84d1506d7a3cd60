#!/usr/bin/env bash
# The one script to run on a GPU machine, unattended, in under 8 minutes (DESIGN.md §6: torch 2.11, triton 3.6, no pip
# installs, run from the checkout):
#   1. print the GPU, driver, torch, triton and CUDA versions;
#   2. the test suite on the GPU, Triton compiled for real (TRITON_INTERPRET unset), gpu-marked tests included;
#   3. the kernel suites (benchmarks/bench_mssa.py, bench_ista*.py, when present);
#   4. the model suites (bench_model.py): uncompiled providers at every preset shape, then the torch.compile rows at
#      CRATE-B/16 (compiling whole models costs minutes, so only the shape of DESIGN §5's goals);
#   5. report.py -> benchmarks/results/<card>-<date>/{report.md, summary.json, benchmark.json, plots}, copied with this
#      script's log to $OUT/<card>-<date>/ when $OUT is set.
# Each stage gets what is left of the time budget (capped per stage). Benchmark stages get a --bench-deadline ROW_SLACK
# seconds before their limit: later rows are skipped as "not measured" and pytest ends normally, writing its JSON
# (pytest-benchmark writes nothing when killed); the hard limit only stops a stage whose last row overruns the slack.
# Exit status: non-zero when the tests or a stage failed or ran out of time.
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
exec > >(tee "$LOG") 2>&1
FAILED=()

# run_stage NAME CAP_SECONDS COMMAND...: run COMMAND with min(CAP, time left) seconds; skip it when under 20 s are left.
# The word @DEADLINE@ in COMMAND becomes the Unix time ROW_SLACK seconds before the stage's limit.
run_stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - REPORT_RESERVE - SECONDS))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "=== $name: skipped, ${left}s left of the budget"
        FAILED+=("$name (no time left)")
        return
    fi
    echo "=== $name (limit ${limit}s, ${SECONDS}s elapsed)"
    local deadline=$(($(date +%s) + limit - ROW_SLACK)) args=() arg
    for arg in "$@"; do args+=("${arg//@DEADLINE@/$deadline}"); done
    timeout -s INT -k 20 "$limit" "${args[@]}"
    local rc=$?
    case $rc in
        0 | 5) ;;  # 5: pytest collected nothing (e.g. a suite filtered away)
        124 | 130 | 137) echo "=== $name: stopped at its time limit (rows finished so far are kept)"; FAILED+=("$name (time limit)") ;;
        *) FAILED+=("$name (exit $rc)") ;;
    esac
}

echo "=== versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PYTHON" -c "
import platform, torch, triton
print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')
print(f'device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}')
"

run_stage "tests on the GPU" 150 "$PYTHON" -m pytest tests -m "not slow" -q -p no:cacheprovider --maxfail=20

BENCH=("$PYTHON" -m pytest -q -p no:cacheprovider -rs --benchmark-columns=median,iqr,rounds --bench-deadline=@DEADLINE@)
mapfile -t KERNEL_SUITES < <(ls benchmarks/bench_mssa.py benchmarks/bench_ista*.py 2>/dev/null)
if ((${#KERNEL_SUITES[@]})); then
    run_stage "kernel suites" 110 "${BENCH[@]}" "${KERNEL_SUITES[@]}" --benchmark-json="$RAW/kernels.json"
else
    echo "=== kernel suites: none in benchmarks/ yet"
fi
run_stage "model suites, uncompiled" 110 "${BENCH[@]}" benchmarks/bench_model.py -k "not compile" \
    --benchmark-json="$RAW/model.json"
run_stage "layer, torch.compile at CRATE-B/16" 90 "${BENCH[@]}" benchmarks/bench_model.py \
    -k "bench_layer and compile and crate_b- and fwd_bwd" --benchmark-json="$RAW/layer_compile.json"
run_stage "training step, torch.compile at CRATE-B/16" 150 "${BENCH[@]}" benchmarks/bench_model.py \
    -k "bench_train_step and compile and crate_b- and not max_autotune" --benchmark-json="$RAW/step_compile.json"

echo "=== report (${SECONDS}s elapsed)"
mapfile -t RUNS < <(ls "$RAW"/*.json 2>/dev/null)
if ((${#RUNS[@]})) && "$PYTHON" -m benchmarks.report "${RUNS[@]}" --out "$RESULTS"; then
    sed -n '1,200p' "$RESULTS/report.md"
else
    FAILED+=("report")
fi
rm -rf "$RAW"

echo "=== done in ${SECONDS}s; results in $RESULTS"
if ((${#FAILED[@]})); then
    printf 'gpu_check: not clean: %s\n' "${FAILED[@]}"
fi
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT/$(basename "$RESULTS")"
    cp "$RESULTS"/* "$OUT/$(basename "$RESULTS")/"
fi
((${#FAILED[@]} == 0))

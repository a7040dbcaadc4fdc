#!/usr/bin/env bash
# The GPU check, in one go on a CUDA machine (about 8 minutes on one H100, and up to 7 more for the dry run): install
# prod9 with its dev tools at the pinned versions, run the GPU-marked tests, run the benchmark at real sizes (stage 1
# at 128³ with bf16 autocast, stage 2 at 16³ and 24×24×18 tokens, SDPA attention), run the dry run of every bundle
# workflow at the bundles' default sizes with bf16 (scripts/real_size_check.py), and print a short table last. Each
# step has its own time limit; a step that fails or runs out of time is reported in the table and the next step still
# runs.
#
#     bash scripts/gpu_check.sh            # logs in benchmarks/gpu_check/, results in benchmarks/results_cuda.json,
#                                          # the dry run in benchmarks/gpu_check/real_size_check/
set -euo pipefail
cd "$(dirname "$0")/.."

LOG_DIR=benchmarks/gpu_check
RESULTS=benchmarks/results_cuda.json
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's prod9_ext, even if the install step fails
STEP_ROWS=()

# run_step NAME SECONDS COMMAND...: run COMMAND under `timeout`, log to $LOG_DIR/NAME.log, remember status and time.
run_step() {
    local name=$1 limit=$2 start status code=0
    shift 2
    start=$(date +%s)
    echo ">>> $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1 || code=$?
    if [[ $code -eq 0 ]]; then
        status=ok
    elif [[ $code -eq 124 ]]; then
        status="stopped at the time limit"
    else
        status="failed (exit $code)"
    fi
    tail -n 3 "$LOG_DIR/$name.log"
    STEP_ROWS+=("| $name | $status | $(($(date +%s) - start)) |")
}

if command -v nvidia-smi >/dev/null; then
    GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)
else
    GPU="nvidia-smi not found"
fi
echo "GPU: $GPU"

run_step install 100 python -m pip install --quiet -c constraints.txt -e ".[dev]"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'CUDA is not available to torch')"
run_step gpu-tests 80 python -m pytest -m gpu tests/gpu -q -p no:cacheprovider
rm -f "$RESULTS"
run_step benchmark 270 python scripts/benchmark.py --device cuda --profile gpu --threads 8 --output "$RESULTS"
run_step real-size 420 python scripts/real_size_check.py --device cuda --amp true \
    --output_dir "$LOG_DIR/real_size_check" --overwrite true --timeout_s 240

echo
echo "## Benchmark tables"
sed -n '/^## /,$p' "$LOG_DIR/benchmark.log" | sed '/^## Summary/,$d'
sed -n '/^## Dry run/,$p' "$LOG_DIR/real-size.log"
echo
echo "## GPU check on $GPU"
echo
echo "| step | status | seconds |"
echo "|---|---|---|"
printf '%s\n' "${STEP_ROWS[@]}"
echo
if [[ -f "$RESULTS" ]]; then
    python scripts/bench_summary.py "$RESULTS"
else
    echo "no benchmark results: see $LOG_DIR/benchmark.log"
fi

#!/usr/bin/env bash
# The GPU check, in one go on a CUDA machine, at most 8 minutes on one H100/H200, with no package index needed:
#
#     bash scripts/gpu_wheels.sh     # first, where pip reaches the index: the wheels the GPU machine lacks, in wheelhouse/
#     bash scripts/gpu_check.sh      # on the GPU machine, in the checkout with wheelhouse/ copied beside it
#
# Steps: check that torch sees CUDA and is a version prod9 supports (else one line and stop), install prod9 from
# wheelhouse/ (`pip install --no-index --find-links wheelhouse -e .`; the torch found stays, pinned by a constraint;
# without wheelhouse/ pip uses the index), run the GPU tests, the benchmark at real sizes, and the dry run of every
# bundle workflow at the default sizes in bf16 on BraTS-geometry phantoms (scripts/real_size_check.py), then print
# the benchmark and dry-run tables, and last one table of the steps. Each step has its own limit; a step that fails or
# runs out of time is a row of that table and the next step still runs. Logs, the benchmark's JSON and the dry run's
# table end up in one archive, benchmarks/gpu_check.tar.gz (ARCHIVE=path to put it elsewhere).
#
# How the limits are sized (CPU figures: BENCHMARKS.md, a 2-core CPU; the GPU is taken as at least 100x faster for
# the launch-bound small networks and 200x for the 3D convolutions at real size, in bf16):
# - install, 45 s: the offline install of 25 wheels and the editable build took 10-25 s on the 2-core CPU
#   (tests/system/test_offline_install.py); pip runs on one core, so about the same there.
# - gpu-tests, 60 s: about 15 tests at toy sizes; collecting them takes 8-17 s here (torch and MONAI imports), each
#   test's CPU reference a few seconds at most, plus CUDA's start-up (~5 s) and kernel choice.
# - benchmark, 100 s: the GPU profile's CPU-equivalent work is ~2 h, nearly all of it the autoregressive peer's 4,096
#   sequential calls at 16³ (2,098 s per repeat, table 1): at ~2-3 ms per call on a GPU (launch-bound, 8 layers)
#   that is ~10 s per repeat, 3 repeats; the rest (diffusion, MaskGiT, stage 1 at 128³: ~1,500 s CPU) /200 ~ 8 s;
#   plus ~20 s of start-up. The results file is rewritten after every table, so a cut keeps what was measured.
# - real-size, 250 s (the workflows get 215 of them, `--budget_s`; the rest is the activation count and the table):
#   3 phantom cases (10.7 s each here) ~ 30 s; 11 workflows each start a process (imports, config, CUDA: ~15 s);
#   stage 1 reconstructs a whole case in 784 windows of 64³ (13.7 s each on the CPU in float32: 3 h; /200 ~ 55 s) for
#   validation and evaluation, encodes one case into the token cache (4.6 s a window here, ~18 s), and stage 2
#   decodes one target per case (~15 s) in validation, evaluation and inference. That is ~330 s for everything, so
#   the dry run runs the default-mode workflows first and the `-mean` decoding and multi-GPU runs (one process on one
#   GPU) last: the budget cuts those first, and the table says which ran.
# Total: 20 (checks) + 45 + 60 + 100 + 250 = 475 s.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
LOG_DIR=benchmarks/gpu_check
ARCHIVE=${ARCHIVE:-benchmarks/gpu_check.tar.gz}
PYTHON=${PYTHON:-python3}
if [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON=python; fi
rm -rf "$LOG_DIR"
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's prod9_ext, even if the install step fails
export PYTHONUNBUFFERED=1
STEP_ROWS=()

# run_step NAME SECONDS COMMAND...: run COMMAND under `timeout`, log to $LOG_DIR/NAME.log, remember status and time.
run_step() {
    local name=$1 limit=$2 start status code=0
    shift 2
    start=$(date +%s)
    echo ">>> $name (limit ${limit} s): $*"
    timeout -k 10 "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1 || code=$?
    if [[ $code -eq 0 ]]; then
        status=ok
    elif [[ $code -eq 124 || $code -eq 137 ]]; then
        status="stopped at the time limit"
    else
        status="failed (exit $code)"
    fi
    tail -n 3 "$LOG_DIR/$name.log"
    STEP_ROWS+=("| $name | $status | $(($(date +%s) - start)) | $limit |")
    return $code
}

# Torch: present, supported by pyproject.toml, seeing CUDA. One line either way; on failure, nothing else runs.
if ! timeout 20 "$PYTHON" - >"$LOG_DIR/torch.txt" 2>&1 <<'PY'; then
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version
try:
    import torch
except ImportError as err:
    sys.exit(f"gpu_check: stopped: torch is not installed for {sys.executable} ({err})")
requirements = [Requirement(r) for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]]
supported = next(r.specifier for r in requirements if r.name == "torch")
if not supported.contains(Version(torch.__version__), prereleases=True):
    sys.exit(f"gpu_check: stopped: torch {torch.__version__} is outside the range prod9 supports (torch{supported})")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: stopped: torch {torch.__version__} cannot see a CUDA device (CUDA build {torch.version.cuda})")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
PY
    tail -n 1 "$LOG_DIR/torch.txt"
    exit 1
fi
TORCH=$(tail -n 1 "$LOG_DIR/torch.txt")
echo "gpu_check: $TORCH"

# Install prod9 from the checkout, keeping the torch and torchvision found.
# (Installed versions as pip sees them: torch.__version__ may add a local part, +cu130, that the metadata lacks.)
"$PYTHON" - >"$LOG_DIR/keep.txt" <<'PY'
from importlib import metadata

for name in ("torch", "torchvision"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
PY
if [[ -d $WHEELHOUSE ]]; then
    SOURCE=(--no-index --find-links "$WHEELHOUSE")
else
    echo "gpu_check: no $WHEELHOUSE/ here: installing from the package index (bash scripts/gpu_wheels.sh makes it)"
    SOURCE=()
fi
if ! run_step install 45 "$PYTHON" -m pip install --no-cache-dir "${SOURCE[@]}" -c "$LOG_DIR/keep.txt" -e .; then
    echo "gpu_check: stopped: the install failed: $(grep -m 1 -E '^ERROR' "$LOG_DIR/install.log" || tail -n 1 "$LOG_DIR/install.log") (log: $LOG_DIR/install.log)"
    exit 1
fi

run_step gpu-tests 60 "$PYTHON" -m pytest -m gpu tests/gpu -q -p no:cacheprovider
run_step benchmark 100 "$PYTHON" scripts/benchmark.py --device cuda --profile gpu --threads 8 \
    --output "$LOG_DIR/results_cuda.json"
run_step real-size 250 "$PYTHON" scripts/real_size_check.py --device cuda --amp true --num_cases 3 \
    --output_dir "$LOG_DIR/real_size_check" --overwrite true --timeout_s 120 --budget_s 215

echo
echo "## Benchmark tables"
sed -n '/^## /,$p' "$LOG_DIR/benchmark.log" | sed '/^## Summary/,$d'
sed -n '/^## Dry run/,$p' "$LOG_DIR/real-size.log"
echo
if [[ -f $LOG_DIR/results_cuda.json ]]; then
    "$PYTHON" scripts/bench_summary.py "$LOG_DIR/results_cuda.json"
else
    echo "no benchmark results: see $LOG_DIR/benchmark.log"
fi

# One archive: logs, JSON and markdown (not the dry run's data, models and volumes).
mkdir -p "$(dirname "$ARCHIVE")"
(cd "$LOG_DIR" && find . -type f \( -name '*.log' -o -name '*.json' -o -name '*.md' -o -name '*.txt' \) \
    -not -path './real_size_check/data/*' -print0 | tar -czf - --null -T -) >"$ARCHIVE"
echo
echo "Logs and results: $ARCHIVE"
echo
echo "## GPU check: $TORCH, $(date -u +%Y-%m-%d)"
echo
echo "| step | status | seconds | limit |"
echo "|---|---|---|---|"
printf '%s\n' "${STEP_ROWS[@]}"

#!/usr/bin/env bash
# One short run on a machine with a CUDA GPU: build fusedres there (CUDA kernels for the GPU's
# architecture, no emulation build), run the cuda-marked tests, then `python -m fusedres` (op
# checks, the ResNet-50 check and the benchmark: eager next to the fused backends). Each stage
# has its own time limit, so one slow stage still leaves the others their turn. Logs, the
# tests' junit XML included, go to $OUT (default gpu_logs/); the last lines printed summarise.
#   TEST_S / BENCH_S: seconds for the tests / the benchmark; PROVIDERS: the benchmark's set;
#   WORKERS: pytest-xdist workers (16).
set -u
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 FUSEDRES_NO_EMULATION=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
TEST_S=${TEST_S:-220}
BENCH_S=${BENCH_S:-150}
PROVIDERS=${PROVIDERS:-eager,fusedres-cuda,fusedres-triton}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch',
torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '|',
torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
    nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.txt"

t0=$(date +%s)
if ! $PY -m pip install -e . --no-build-isolation --no-deps >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    echo "build FAILED after $(($(date +%s) - t0)) s"
    exit 1
fi
echo "build: $(($(date +%s) - t0)) s"

# Fixed Triton configs (conftest's default): one compile per specialisation, no tuning.
t0=$(date +%s)
# pytest-xdist and pytest-timeout where installed (the GPU image has both).
OPTIONAL=""
$PY -c "import xdist" 2>/dev/null && OPTIONAL="-n ${WORKERS:-16}"
$PY -c "import pytest_timeout" 2>/dev/null && OPTIONAL="$OPTIONAL --timeout 90"
timeout -k 10 "$TEST_S" $PY -m pytest -m cuda -v -p no:cacheprovider $OPTIONAL \
    --continue-on-collection-errors -rfE --durations=15 --junitxml="$OUT/junit.xml" \
    >"$OUT/tests.log" 2>&1
echo "tests: rc=$? in $(($(date +%s) - t0)) s"
pkill -f "pytest -m cuda" 2>/dev/null  # stray xdist workers
grep -E "(FAILED|ERROR) tests/" "$OUT/tests.log" | sort -u | cut -c1-220 | head -40
grep -cE "PASSED" "$OUT/tests.log" | sed 's/^/passed lines: /'
tail -3 "$OUT/tests.log"

t0=$(date +%s)
FUSEDRES_TRITON_AUTOTUNE=0 timeout -k 10 "$BENCH_S" $PY -m fusedres --providers "$PROVIDERS" \
    >"$OUT/fusedres.log" 2>&1
echo "python -m fusedres: rc=$? in $(($(date +%s) - t0)) s"
grep -E "FAILED|passed|Error" "$OUT/fusedres.log" | head -20
tail -14 "$OUT/fusedres.log"

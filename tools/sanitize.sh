#!/usr/bin/env bash
# Runs the GPU tests on small shapes (-m "cuda and not slow") under compute-sanitizer:
# memcheck (out-of-bounds / misaligned accesses) and racecheck (shared-memory hazards).
#   tools/sanitize.sh [LOG_DIR] [extra pytest arguments]
# Logs go to LOG_DIR (default: $OUT, else ./sanitizer-logs). Exits non-zero if a tool reports
# an error or a test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${1:-${OUT:-./sanitizer-logs}}"
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$LOGS"
TESTS=(tests/test_batch_norm.py tests/test_add_relu.py tests/test_conv_bias_act.py
       tests/test_conv_triton.py tests/test_stress.py)
# Every tensor its own cudaMalloc, so an access past its end is not hidden inside a cached block.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

status=0
for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool (logs: $LOGS/$tool.*)"
    compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 86 \
        --log-file "$LOGS/$tool.%p.log" \
        python -m pytest -m "cuda and not slow" -x -q -p no:cacheprovider "${TESTS[@]}" "$@" \
        >"$LOGS/$tool.pytest.log" 2>&1
    rc=$?
    tail -n 2 "$LOGS/$tool.pytest.log"
    grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/$tool".*[0-9].log 2>/dev/null | sort | uniq -c
    if [ "$rc" -ne 0 ]; then
        echo "$tool: FAILED (exit code $rc; 86: the sanitizer found errors)"
        status=1
    fi
done
exit "$status"

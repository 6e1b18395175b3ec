#!/usr/bin/env bash
# The linters CI runs: ruff (configured in pyproject.toml) on the Python sources and a
# clang-format check (.clang-format) of csrc/. Needs `pip install -e ".[lint]"`.
# tools/lint.sh --fix rewrites the files instead of checking them.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t cpp < <(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')
if [[ "${1:-}" == "--fix" ]]; then
    ruff check --fix .
    clang-format -i "${cpp[@]}"
else
    ruff check .
    clang-format --dry-run --Werror "${cpp[@]}"
fi
echo "lint: ruff and clang-format clean (${#cpp[@]} C++ / CUDA files)"

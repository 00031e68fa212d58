#!/usr/bin/env bash
# Builds kvbatch (and llama.cpp if not cached) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-demo
. scripts/packages.sh
ensure_packages "${KVBATCH_TEST_PKGS[@]}"
ctest --test-dir "${KVBATCH_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)" "$@"

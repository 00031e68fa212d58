#!/usr/bin/env bash
# Builds kvbatch and its C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer
# (KVBATCH_SANITIZE=ON; llama.cpp stays as installed) in build-asan/ and runs
# the unit tests and the integration tests but the slowest (see `slow` below).
#
#   KVBATCH_ASAN_BUILD_DIR   build dir                         (default: build-asan)
#   KVBATCH_ASAN_ALL=1       run every integration test
#   KVBATCH_ASAN_CC          clang or gcc                      (default: clang)
#   KVBATCH_JOBS             build parallelism                  (default: nproc)
#   extra arguments          passed to ctest
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[sanitize] $*" >&2; }
start=$(date +%s)

# Packages: the ones scripts/setup.sh installs (this script may run first);
# libclang-rt is the sanitizers' runtime; npm fetches llama.cpp.
cc=${KVBATCH_ASAN_CC:-clang}
. scripts/packages.sh
extra=()
[ "$cc" = clang ] && extra=(clang libclang-rt-dev)
ensure_packages "${KVBATCH_BUILD_PKGS[@]}" "${extra[@]}" -- npm

llama_dir=${KVBATCH_LLAMA_DIR:-$(bash scripts/llama.sh)}
build=${KVBATCH_ASAN_BUILD_DIR:-build-asan}
jobs=${KVBATCH_JOBS:-$(nproc)}

# halt_on_error: the first report fails the test. Leaks are errors; the
# suppressions name only leaks inside llama.cpp/ggml (not ours to fix).
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:abort_on_error=0:detect_leaks=1:detect_stack_use_after_return=0:check_initialization_order=1:print_stacktrace=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/tests/fuzz/lsan.supp:print_suppressions=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O0 -g1" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O0 -g1")
command -v ccache >/dev/null 2>&1 && flags+=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
if [ "$cc" = clang ]; then
  export CC=clang CXX=clang++
else
  # GCC's -Wmaybe-uninitialized is wrong under ASan (std::regex in libstdc++'s headers).
  export CC=gcc CXX=g++
  flags+=(-DCMAKE_CXX_FLAGS="-Wno-maybe-uninitialized")
fi
# -O0: on a 2-core machine the sanitized build is most of this script's time
# and -O0 compiles about twice as fast as -O1; the tests spend their time in
# llama.cpp (optimized, not instrumented). -g1 keeps line numbers in reports.
cmake -S . -B "$build" "${flags[@]}" -DKVBATCH_SANITIZE=ON -DKVBATCH_LLAMA_DIR="$llama_dir" >/dev/null
# The test binaries are listed (gtest_discover_tests) at build time, under the options above.
cmake --build "$build" -j "$jobs" --target kvbatch kvb_unit_tests kvb_integration_tests store_conformance_test
built=$(date +%s)
log "built $build in $((built - start)) s"

# Integration tests run the real binary on a generated model. Under the
# sanitizers these five take 37-92 s each on 2 cores (286 s together; every
# other one 22 s or less): they run only with KVBATCH_ASAN_ALL=1. Each of
# their files keeps faster tests in the run (the template sweep renders 70
# templates; ChatTemplate's other tests render through the same code).
slow='ScoringBatchOf200|Seed\.SameSeedSameOutput|VocabTrie\.AllowedTokensEqual|JsonObjectAnswersParse|EveryShippedTemplate'
skip=()
[ "${KVBATCH_ASAN_ALL:-0}" = 1 ] || skip=(-E "$slow")
ctest --test-dir "$build" --output-on-failure -j "$jobs" -L 'unit|integration' "${skip[@]}" "$@"
log "tests passed in $(( $(date +%s) - built )) s (total $(( $(date +%s) - start )) s)"

#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, clang + ASan/UBSan) in build-fuzz/
# and runs each for a while on a copy of its seed corpus. Exits non-zero when
# any target crashes, leaks, times out or runs out of memory, naming the input.
#
#   scripts/fuzz.sh                  every target
#   scripts/fuzz.sh line stream      some of them (line schema multipart stream)
#
#   KVBATCH_FUZZ_SECONDS   seconds per target          (default: 60)
#   KVBATCH_FUZZ_JOBS      targets run at once         (default: nproc)
#   KVBATCH_FUZZ_BUILD_DIR build dir                   (default: build-fuzz)
#   KVBATCH_JOBS           build parallelism           (default: nproc)
#
# A crashing input is left in build-fuzz/artifacts/<target>/; replay it with
#   build-fuzz/tests/fuzz/fuzz_<target> <file>
# and keep it as a regression test: copy it to tests/fuzz/regressions/<target>/
# (tests/unit/fuzz_regression_test.cc replays every file there).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[fuzz] $*" >&2; }
start=$(date +%s)

# Packages: what scripts/setup.sh installs, plus clang and its libFuzzer
# runtime; npm fetches llama.cpp (scripts/llama.sh).
. scripts/packages.sh
ensure_packages "${KVBATCH_BUILD_PKGS[@]}" clang libclang-rt-dev -- npm

llama_dir=${KVBATCH_LLAMA_DIR:-$(bash scripts/llama.sh)}
build=${KVBATCH_FUZZ_BUILD_DIR:-build-fuzz}
jobs=${KVBATCH_JOBS:-$(nproc)}
seconds=${KVBATCH_FUZZ_SECONDS:-60}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(line schema multipart stream)

launcher=()
command -v ccache >/dev/null 2>&1 && launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
CC=clang CXX=clang++ cmake -S . -B "$build" -DKVBATCH_FUZZ=ON -DKVBATCH_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" \
  -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" -DKVBATCH_LLAMA_DIR="$llama_dir" "${launcher[@]}" >/dev/null
cmake --build "$build" -j "$jobs" --target $(printf 'fuzz_%s ' "${targets[@]}")
built=$(date +%s)
log "built in $((built - start)) s; fuzzing ${targets[*]} for $seconds s each"

# Leaks inside llama.cpp/ggml (not ours) are suppressed by name, narrowly.
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/tests/fuzz/lsan.supp:print_suppressions=0}
export ASAN_OPTIONS=${ASAN_OPTIONS:-print_stacktrace=1:detect_stack_use_after_return=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

max_len() {
  case $1 in
    line) echo 32768 ;;       # room for deep nesting and long bodies
    schema) echo 4096 ;;
    multipart) echo 16384 ;;  # over the harness's 4096-byte upload limit
    stream) echo 1024 ;;
  esac
}

# Fork mode, going on after a crash: one run reports every distinct failure
# it finds, not only the first.
run_one() {
  local t=$1 bin="$build/tests/fuzz/fuzz_$1" corpus="$build/corpus/$1" art="$build/artifacts/$1/"
  rm -rf "$art" && mkdir -p "$corpus" "$art"
  cp -n tests/fuzz/corpus/"$t"/* "$corpus"/ 2>/dev/null || true
  local dict=()
  [ -f "tests/fuzz/$t.dict" ] && dict=(-dict="tests/fuzz/$t.dict")
  "$bin" -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 -max_total_time="$seconds" \
    -rss_limit_mb=2048 -timeout=10 -max_len="$(max_len "$t")" -artifact_prefix="$art" "${dict[@]}" "$corpus" \
    >"$build/fuzz-$t.log" 2>&1
}

parallel=${KVBATCH_FUZZ_JOBS:-$(nproc)}
for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do sleep 1; done
  { run_one "$t" && echo 0 || echo $?; } >"$build/fuzz-$t.rc" &
done
wait

# What a report is about: its kind and the first frame in our code.
signature() {
  local kind frame
  kind=$(grep -m1 -oE "ERROR: (AddressSanitizer|LeakSanitizer): [a-z-]+|runtime error: [^:]*|FUZZ INVARIANT FAILED at [^ ]*|ERROR: libFuzzer: [a-z -]+" "$1" ||
         echo "unknown failure")
  frame=$(grep -m1 -E "#[0-9]+ 0x[0-9a-f]+ in kvb::.* /[^ ]*/(src|tests)/[^ ]+:[0-9]+" "$1" |
          sed -E 's/.* in (kvb::[^(]*).* \/[^ ]*\/((src|tests)\/[^ :]+:[0-9]+).*/\1 \2/' || true)
  echo "$kind | ${frame:-?}"
}

failed=0
for t in "${targets[@]}"; do
  rc=$(cat "$build/fuzz-$t.rc")
  logf="$build/fuzz-$t.log"
  last=$(grep -E '^#[0-9]+: cov:' "$logf" | tail -1 || true)
  runs=$(echo "$last" | sed -E 's/^#([0-9]+):.*/\1/')
  mapfile -t found < <(find "$build/artifacts/$t" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
                         -o -name 'oom-*' \) ! -name '*.log' | sort)
  if [ "$rc" = 0 ] && [ ${#found[@]} -eq 0 ]; then
    log "$t: ok (${runs:-?} runs; ${last#*: })"
    continue
  fi
  failed=1
  [ "$rc" = 0 ] || log "$t: libFuzzer exited with $rc (log: $logf)"
  [ ${#found[@]} -gt 0 ] || tail -30 "$logf" >&2
  # Replay each input once for a clean report; group the reports by signature.
  declare -A count=() example=()
  for input in "${found[@]}"; do
    "$build/tests/fuzz/fuzz_$t" -timeout=10 -rss_limit_mb=2048 "$input" >"$input.log" 2>&1 || true
    sig=$(signature "$input.log")
    count[$sig]=$(( ${count[$sig]:-0} + 1 ))
    if [ -z "${example[$sig]:-}" ] || [ "$(wc -c <"$input")" -lt "$(wc -c <"${example[$sig]}")" ]; then
      example[$sig]=$input
    fi
  done
  for sig in "${!count[@]}"; do
    input=${example[$sig]}
    log "$t: FAILED ${count[$sig]} input(s): $sig"
    echo "  smallest input: $input ($(wc -c <"$input") bytes); report: $input.log" >&2
    # The invariant's message and the frames in our code (where it failed, freed, allocated).
    grep -E "FUZZ INVARIANT|^  [a-z].*|^(READ|WRITE|freed|previously)|#[0-9]+ 0x[0-9a-f]+ in .* /[^ ]*/(src|tests)/[^ ]+:[0-9]+:[0-9]+$" \
      "$input.log" | grep -vE " in (std::|__|fuzzer::|LLVMFuzzerTestOneInput)" | head -16 |
      sed -E 's/ 0x[0-9a-f]+ in / /; s/\([^()]*\)( const)? \/[^ ]*\/((src|tests)\/)/() \2/' | cut -c1-160 >&2 || true
  done
  unset count example
  echo "  keep one per failure: mkdir -p tests/fuzz/regressions/$t && cp <input> tests/fuzz/regressions/$t/" >&2
done
log "done in $(( $(date +%s) - start )) s"
exit $failed

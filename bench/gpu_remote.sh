#!/usr/bin/env bash
# The GPU benchmark on a lent machine that has CUDA but not kvbatch's build
# dependencies: run from the repository root with .gpu/ packed by
# bench/gpu_pack.sh. Phases, each skipped when already done on this machine
# (state in $GPU_WORK, so a second call continues where a cut one stopped):
#
#   build  llama.cpp (pinned, patches applied) with CUDA: llama-server,
#          llama-batched-bench and the libraries kvbatch loads
#   model  gen-model --preset llama3-8b (Llama 3 8B's shape, Q4_K, 4.6 GB)
#   bench  bench/run_bench.py --gpu: kvbatch (device sampling on, then off),
#          llama-server's -np/KV sweep, the shared-prefix bound
#   tests  the integration tests' batched-vs-alone logit checks on the GPU
#          (SharedPrefix*, or TEST_FILTER), KVBATCH_TEST_GPU_LAYERS=-1
#   alone  greedy answers batched vs each request alone, on the GPU
#
#   bash bench/gpu_remote.sh [phase...]      (default: build tests model bench alone)
# Results and logs go to $OUT (default $GPU_WORK/out).
#
# On an H200 with 16 cores (2026-11-30): the build about 250 s, the model
# 135 s (alongside the build), the bench about 390 s, of which llama-server
# -np 128 with split KV alone took 301 s; hence unified KV first and a
# time budget (BUDGET) on the sweep.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pack=$root/.gpu
W=${GPU_WORK:-/root/kvb-gpu}
OUT=${OUT:-$W/out}
REQUESTS=${REQUESTS:-2000}
BUDGET=${BUDGET:-200}   # seconds of run_bench.py before the rest of the llama-server sweep is skipped
mkdir -p "$W" "$OUT"
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/phases.log"; }
phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(build tests model bench alone)
want() { local p; for p in "${phases[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
export PATH=$PATH:/usr/local/cuda/bin

# kvbatch's own libraries where this machine lacks them.
mkdir -p "$W/fallback"
for f in "$pack"/syslib/*; do
  n=$(basename "$f")
  ldconfig -p | grep -q " $n " || [ -e "$W/fallback/$n" ] || cp "$f" "$W/fallback/"
done
export LD_LIBRARY_PATH=$W/build/bin:$W/fallback${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
kvb=$pack/kvbatch

gen_model() {  # $1: library path to run kvbatch with
  LD_LIBRARY_PATH=$1 KVBATCH_VOCAB_DIR=$pack/vocab "$kvb" gen-model --preset "${MODEL_PRESET:-llama3-8b}" -o "$W/model.gguf" \
    >"$W/gen.log" 2>&1
}
genpid=
if want model && [ ! -f "$W/model.gguf" ] && [ ! -f "$W/build/.done" ]; then
  # With the CPU build of llama.cpp packed here, at low priority while CUDA compiles.
  nice -n 19 bash -c "$(declare -f gen_model); kvb=$kvb pack=$pack W=$W gen_model $pack/cpulib:$W/fallback" &
  genpid=$!
  log "generating the model in the background"
fi

if want build && [ ! -f "$W/build/.done" ]; then
  log "machine: $(nproc) cores; $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
  log "nvcc: $(nvcc --version | tail -1); cmake: $(cmake --version | head -1); ninja: $(command -v ninja || echo none)"
  [ -d "$W/src" ] || { mkdir -p "$W/src" && tar -C "$W/src" -xJf "$pack/llama-src.tar.xz"; }
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$W/src" -B "$W/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
  log "configured"
  cmake --build "$W/build" -j "$(nproc)" --target llama llama-common llama-server llama-batched-bench \
    >"$W/build.log" 2>&1 || { tail -40 "$W/build.log" | tee "$OUT/build-tail.log"; exit 1; }
  touch "$W/build/.done"
  log "built"
fi

if want tests && [ -f "$W/build/.done" ]; then
  # The paths compiled into the tests (gpu_pack.sh wrote them down).
  . "$pack/test-paths"
  mkdir -p "$TEST_TMP" "$TEST_VOCAB" "$(dirname "$TEST_BIN")"
  [ -e "$TEST_BIN" ] || cp "$kvb" "$TEST_BIN"
  for f in "$pack"/vocab/*; do [ -e "$TEST_VOCAB/$(basename "$f")" ] || cp "$f" "$TEST_VOCAB/"; done
  KVBATCH_TEST_GPU_LAYERS=-1 timeout 300 "$pack/kvb_integration_tests" --gtest_filter="${TEST_FILTER:-SharedPrefix*}" \
    >"$OUT/tests.log" 2>&1
  log "tests on the GPU (${TEST_FILTER:-SharedPrefix*}): $(grep -E '^\[  (PASSED|FAILED) |tests? ran' "$OUT/tests.log" | tr '\n' ' ')"
fi

if want model; then
  [ -z "$genpid" ] || { wait "$genpid"; log "background generation: $(tail -1 "$W/gen.log")"; }
  if [ ! -f "$W/model.gguf" ]; then
    "$kvb" --help >/dev/null || { log "kvbatch does not start here:"; ldd "$kvb" | grep -i "not found"; exit 1; }
    gen_model "$LD_LIBRARY_PATH"
    log "generated: $(tail -1 "$W/gen.log")"
  fi
  log "model: $(du -h "$W/model.gguf" | cut -f1)"
fi

if want bench && [ ! -f "$W/bench.done" ]; then
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
  # A short first run (the model into the page cache): if device sampling
  # fails on this GPU, the benchmark runs without it rather than not at all.
  python3 "$root/bench/make_workload.py" --requests 16 --out "$W/smoke.jsonl" >/dev/null
  ab=(--ab-args "--device-sampling off")
  if ! "$kvb" run "$W/smoke.jsonl" -o "$W/smoke-out.jsonl" -m "$W/model.gguf" >"$OUT/smoke.log" 2>&1; then
    log "smoke run failed with device sampling (see smoke.log); benchmarking without it"
    ab=(--kvbatch-args "--device-sampling off")
  fi
  log "smoke: $(grep -E 'done in|steps' "$OUT/smoke.log" | tr -s ' ' | tr '\n' ' ')"
  log "bench: $REQUESTS requests"
  PYTHONUNBUFFERED=1 python3 "$root/bench/run_bench.py" --gpu --requests "$REQUESTS" --threads "$(nproc)" \
    --model "$W/model.gguf" --kvbatch "$kvb" --llama-server "$W/build/bin/llama-server" --skip naive \
    "${ab[@]}" --parallel "${PARALLEL:-128,64}" --server-kv "${SERVER_KV:-unified,split}" \
    --bound-runs 1 --time-budget "$BUDGET" --out-dir "$W/bench" 2>&1 |
    grep -v '^progress:' | tee "$OUT/bench.log" | grep -v -E '^(llama_|load|print_info|srv |slot |que |common_|ggml_|main:)'
  cp "$W"/bench/2*.json "$OUT/" 2>/dev/null && touch "$W/bench.done"
  log "bench done"
fi

if want alone && [ -f "$W/bench/work/kvbatch-out.jsonl" ]; then
  # The first 32 requests each alone (one sequence, no shared prefix), against their batched answers.
  head -32 "$W/bench/work/rubric.jsonl" >"$W/alone-in.jsonl"
  rm -f "$W/alone-out.jsonl"
  "$kvb" run "$W/alone-in.jsonl" -o "$W/alone-out.jsonl" -m "$W/model.gguf" --max-seqs 1 --anchors 0 -q \
    >"$OUT/alone.log" 2>&1
  python3 - "$W/bench/work/kvbatch-out.jsonl" "$W/alone-out.jsonl" <<'PY' | tee -a "$OUT/alone.log"
import json, sys
text = lambda l: l["response"]["body"]["choices"][0]["message"]["content"]
batched = {json.loads(l)["custom_id"]: text(json.loads(l)) for l in open(sys.argv[1])}
alone = {json.loads(l)["custom_id"]: text(json.loads(l)) for l in open(sys.argv[2])}
same = sum(batched[k] == v for k, v in alone.items())
prefix = sum(len(__import__("os").path.commonprefix([batched[k], v])) for k, v in alone.items())
total = sum(len(v) for v in alone.values())
print(f"batched vs alone on the GPU: {same}/{len(alone)} answers identical, {prefix}/{total} characters agree before the first difference")
PY
  log "alone done"
fi

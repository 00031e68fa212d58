#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a working kvbatch:
# installs build dependencies, fetches and builds llama.cpp (cached outside
# the repo), builds kvbatch, generates the demo model and runs a demo batch.
#
#   scripts/setup.sh             everything, ending with the demo batch
#   scripts/setup.sh --no-demo   stop after the build (tests, CI)
#
#   KVBATCH_LLAMA_DIR=/path      use your own llama.cpp checkout or install prefix
#   KVBATCH_BUILD_DIR=build      where kvbatch is built
set -euo pipefail
cd "$(dirname "$0")/.."
demo=1
[ "${1:-}" = "--no-demo" ] && demo=0
log() { echo "[setup] $*" >&2; }

# 1. System packages (Debian names); skipped when already present. npm and
# python3 only when the commands are missing.
. scripts/packages.sh
ensure_packages "${KVBATCH_BUILD_PKGS[@]}" -- npm python3

# 2. llama.cpp: the user's own, or the pinned one built into the cache.
llama_dir=${KVBATCH_LLAMA_DIR:-}
if [ -z "$llama_dir" ]; then
  llama_dir=$(bash scripts/llama.sh)
fi
log "llama.cpp: $llama_dir"

# 3. kvbatch itself.
build=${KVBATCH_BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVBATCH_LLAMA_DIR="$llama_dir" >/dev/null
cmake --build "$build" -j "$(nproc)"
log "built $build/kvbatch"

# The API tests' client: the official OpenAI Node SDK, pinned by the lockfile.
if [ ! -f tests/api/node_modules/.package-lock.json ] ||
   [ tests/api/package-lock.json -nt tests/api/node_modules/.package-lock.json ]; then
  log "installing the API tests' npm packages"
  (cd tests/api && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

[ $demo = 1 ] || exit 0

# 4. The demo: a generated model (no download) and a shared-rubric batch.
mkdir -p "$build/demo"
rm -f "$build/demo/results.jsonl" "$build/demo/errors.jsonl"  # a fresh demo each time
python3 bench/make_workload.py --requests 64 --max-tokens 16 --out "$build/demo/requests.jsonl"
"$build/kvbatch" run "$build/demo/requests.jsonl" -o "$build/demo/results.jsonl" -e "$build/demo/errors.jsonl"
log "demo results: $build/demo/results.jsonl (first line below)"
head -n 1 "$build/demo/results.jsonl" | cut -c 1-400

#!/usr/bin/env bash
# Fetches llama.cpp's source from the pinned node-llama-cpp npm package (its
# llama/gitRelease.bundle), builds it with CMake and installs it into a cache
# directory outside the repository, keyed by version and build options.
# A finished install is reused as is. Prints the install prefix on stdout.
#
#   KVBATCH_CACHE   cache root            (default: ${XDG_CACHE_HOME:-~/.cache}/kvbatch)
#   KVBATCH_CUDA    1/0: force CUDA on/off (default: on when nvcc and a GPU are present)
#   KVBATCH_JOBS    build parallelism     (default: nproc)
#   KVBATCH_LLAMA_SRC  an existing llama.cpp source tree to build instead of
#                   fetching the pinned one (keyed by its path in the cache;
#                   copied, never modified)
#
# patches/*.patch are applied in order to the source before it is built (the
# install prefix is keyed by their hash). They must apply to the pinned
# llama.cpp; on a KVBATCH_LLAMA_SRC tree a patch that does not apply is
# skipped with a warning, with the ones after it (kvbatch works without them,
# only slower). $prefix/PATCHES lists what was applied.
set -euo pipefail

NLC_VERSION=3.22.1   # node-llama-cpp version pinned; it fixes the llama.cpp commit
cache=${KVBATCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvbatch}
jobs=${KVBATCH_JOBS:-$(nproc)}
log() { echo "[llama.sh] $*" >&2; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shopt -s nullglob
patches=("$root"/patches/*.patch)
shopt -u nullglob
patch_hash=none
if [ ${#patches[@]} -gt 0 ]; then patch_hash=$(cat "${patches[@]}" | md5sum | cut -c1-8); fi

cuda=${KVBATCH_CUDA:-}
if [ -z "$cuda" ]; then
  cuda=0
  if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then cuda=1; fi
  fi
fi
# Native CPU code is keyed by the CPU's feature flags so a cache is never
# reused on a machine that cannot run it.
cpukey=$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | md5sum | cut -c1-8)
src_tag="nlc${NLC_VERSION}"
if [ -n "${KVBATCH_LLAMA_SRC:-}" ]; then
  src_tag="src$(echo "$(cd "$KVBATCH_LLAMA_SRC" && pwd)" | md5sum | cut -c1-8)"
fi
key="${src_tag}-$([ "$cuda" = 1 ] && echo cuda || echo cpu)-${cpukey}"
# RECIPE changes when what is installed changes (r2: test-llama-archs, r3:
# llama-batched-bench), so
# an older install is not taken for a complete one; the build tree
# (work-$key) is shared and rebuilt incrementally.
RECIPE=r3
prefix="$cache/llama-$key-$RECIPE-p$patch_hash"

work="$cache/work-$key"
# llama.cpp's chat templates (models/templates/*.jinja): tests render each.
copy_templates() {
  if [ -d "$work/src/models/templates" ] && [ ! -d "$prefix/share/templates" ]; then
    mkdir -p "$prefix/share/templates" && cp "$work/src/models/templates/"*.jinja "$prefix/share/templates/"
  fi
}
# The source tree the install was built from (bench/gpu_pack.sh packs it);
# written on reuse too, for installs older than this file.
record_source() {
  [ -f "$prefix/SOURCE" ] || echo "$work/src" >"$prefix/SOURCE"
}

if [ -f "$prefix/.complete" ]; then
  copy_templates
  record_source
  log "reusing $prefix"
  echo "$prefix"
  exit 0
fi

mkdir -p "$work"
if [ -n "${KVBATCH_LLAMA_SRC:-}" ]; then
  # A copy, so that the patches never touch the user's tree.
  rm -rf "$work/src" && mkdir "$work/src"
  tar -C "$KVBATCH_LLAMA_SRC" --exclude=./.git --exclude='./build*' -cf - . | tar -C "$work/src" -xf -
  git -C "$work/src" init -q  # its own root for git apply, wherever the cache lies
elif [ ! -d "$work/src/.git" ]; then
  log "fetching node-llama-cpp@$NLC_VERSION from the npm registry"
  (cd "$work" && rm -rf pkg && mkdir pkg && cd pkg &&
     npm pack --silent "node-llama-cpp@$NLC_VERSION" >/dev/null &&
     tar xzf node-llama-cpp-$NLC_VERSION.tgz package/llama/gitRelease.bundle)
  rm -rf "$work/src"
  git clone -q "$work/pkg/package/llama/gitRelease.bundle" "$work/src"
  rm -rf "$work/pkg"
fi
if [ -d "$work/src/.git" ] && [ -z "${KVBATCH_LLAMA_SRC:-}" ]; then
  # The pinned tree as fetched, then the patches: a changed series starts over.
  git -C "$work/src" checkout -q -- . && git -C "$work/src" clean -fdq
fi
applied=()
for p in "${patches[@]}"; do
  if (cd "$work/src" && git apply --check "$p" 2>/dev/null); then
    (cd "$work/src" && git apply "$p")
    applied+=("$(basename "$p")")
  elif [ -z "${KVBATCH_LLAMA_SRC:-}" ]; then
    log "error: $(basename "$p") does not apply to the pinned llama.cpp"; (cd "$work/src" && git apply --check "$p") || true
    exit 1
  else
    log "WARNING: $(basename "$p") does not apply to $KVBATCH_LLAMA_SRC; building it without this patch and the ones after it."
    log "WARNING: kvbatch works without them, only slower (see patches/README.md)."
    break
  fi
done
[ ${#applied[@]} -eq 0 ] || log "applied ${#applied[@]} patch(es): ${applied[*]}"

cmake_args=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=ON
  -DCMAKE_INSTALL_PREFIX="$prefix"
  -DCMAKE_INSTALL_RPATH="$prefix/lib"
  -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_TOOLS_INSTALL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=ON
)
if command -v ccache >/dev/null 2>&1; then
  cmake_args+=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
if [ "$cuda" = 1 ]; then
  export PATH=$PATH:/usr/local/cuda/bin
  cmake_args+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${KVBATCH_CUDA_ARCH:-native})
fi

log "building llama.cpp ($key) with $jobs jobs; the first build takes a while"
cmake -S "$work/src" -B "$work/build" "${cmake_args[@]}" >"$work/configure.log" 2>&1 ||
  { cat "$work/configure.log" >&2; exit 1; }
cmake --build "$work/build" -j "$jobs" --target llama llama-common llama-server llama-batched-bench test-llama-archs >"$work/build.log" 2>&1 ||
  { tail -50 "$work/build.log" >&2; exit 1; }
# Tests off again before installing: llama.cpp would install every test
# binary, and only test-llama-archs was built (a reconfigure, no rebuild).
cmake -S "$work/src" -B "$work/build" -DLLAMA_BUILD_TESTS=OFF >>"$work/configure.log" 2>&1 ||
  { cat "$work/configure.log" >&2; exit 1; }
cmake --install "$work/build" >"$work/install.log" 2>&1 || { cat "$work/install.log" >&2; exit 1; }

# llama.cpp installs neither the common library's headers nor llama-server
# when its tools are not installed; kvbatch uses both (chat templates,
# JSON-schema grammars; the benchmark baseline).
mkdir -p "$prefix/include/llama-common" "$prefix/bin"
cp "$work/src/common/"*.h "$prefix/include/llama-common/"
cp -r "$work/src/common/jinja" "$prefix/include/llama-common/" 2>/dev/null || true
cp -r "$work/src/vendor/." "$prefix/include/llama-common/"
cp "$work/build/bin/llama-server" "$work/build/bin/llama-batched-bench" "$prefix/bin/"
# Writes a small random-weight GGUF of any architecture llama.cpp supports
# (tests: recurrent, hybrid and MoE models).
cp "$work/build/bin/test-llama-archs" "$prefix/bin/"
find "$work/build" -name 'libllama-common*' -exec cp -a {} "$prefix/lib/" \;
mkdir -p "$prefix/share" && rm -rf "$prefix/share/vocab" && mkdir "$prefix/share/vocab" &&
  { cp "$work/src/models/"ggml-vocab-*.gguf "$prefix/share/vocab/" 2>/dev/null || true; }
copy_templates
record_source
git -C "$work/src" rev-parse HEAD >"$prefix/COMMIT" 2>/dev/null || echo "$src_tag" >"$prefix/COMMIT"
printf '%s\n' "${applied[@]}" >"$prefix/PATCHES"
touch "$prefix/.complete"
log "installed into $prefix"
echo "$prefix"

#!/usr/bin/env bash
# Packs what bench/gpu_remote.sh needs on a GPU machine that has CUDA (nvcc,
# CMake, a C++ compiler) but none of kvbatch's build dependencies, into .gpu/
# (ignored by git; under 64 MiB):
#   .gpu/kvbatch            this build's kvbatch, debug info stripped
#   .gpu/syslib/            the shared libraries it needs beyond glibc and
#                           libstdc++ (used there only where missing)
#   .gpu/llama-src.tar.xz   the pinned llama.cpp source with patches/*.patch applied
#   .gpu/vocab/             the llama-bpe vocabulary (gen-model --preset llama3-8b)
#                           and llama-spm (the tests' tiny model)
#   .gpu/cpulib/            this machine's CPU build of llama.cpp, so that the
#                           model is generated there while the CUDA build runs
#   .gpu/kvb_integration_tests, .gpu/test-paths
#                           the integration tests and the paths compiled into
#                           them (gpu_remote.sh's tests phase recreates them)
#
#   bash bench/gpu_pack.sh [build-dir]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-$root/build}
prefix=$(bash "$root/scripts/llama.sh")
src=$(cat "$prefix/SOURCE")  # the llama.cpp tree llama.sh built from
pack=$root/.gpu
rm -rf "$pack" && mkdir -p "$pack/syslib" "$pack/vocab" "$pack/cpulib"
grep -qx '/.gpu/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >>"$root/.git/info/exclude"

objcopy --strip-debug "$build/kvbatch" "$pack/kvbatch"
# Everything kvbatch loads except llama.cpp's libraries (built there with
# CUDA) and the C and C++ runtimes (that machine's own are newer).
ldd "$build/kvbatch" | awk '$3 ~ /^\// {print $3}' | grep -v "$(dirname "$prefix")" |
  grep -Ev '/(libc|libm|libstdc\+\+|libgcc_s|libgomp|ld-linux[^/]*)\.so' |
  while read -r lib; do cp -L "$lib" "$pack/syslib/"; done
cp "$prefix/share/vocab/ggml-vocab-llama-bpe.gguf" "$prefix/share/vocab/ggml-vocab-llama-spm.gguf" "$pack/vocab/"
objcopy --strip-debug "$build/tests/kvb_integration_tests" "$pack/kvb_integration_tests"
# The tests find kvbatch, the vocabularies and their scratch folder at paths
# fixed when they were built.
compiled() {
  grep -o "$1=\\\\\"[^\\\\]*" "$build/tests/CMakeFiles/kvb_integration_tests.dir/flags.make" | head -1 | cut -d'"' -f2
}
printf 'TEST_BIN=%q\nTEST_TMP=%q\nTEST_VOCAB=%q\n' "$(compiled KVBATCH_BIN)" "$(compiled KVBATCH_TEST_TMP)" \
  "$(compiled KVBATCH_VOCAB_DIR)" >"$pack/test-paths"
for l in libggml-base libggml-cpu libggml libllama libllama-common; do
  objcopy --strip-debug "$prefix/lib/$l.so.0" "$pack/cpulib/$l.so.0"
done

# The source llama.sh built from (the pinned tree plus the patches), without
# what a CUDA build of the library, llama-server and llama-batched-bench skips.
tmp=$(mktemp -d)
git -C "$src" archive --format=tar HEAD -- . ':!models' ':!docs' ':!media' ':!gguf-py' ':!examples' \
  ':!tests' ':!.devops' ':!grammars' ':!benches' | tar -C "$tmp" -xf -
for p in "$root"/patches/*.patch; do (cd "$tmp" && git apply "$p"); done
tar -C "$tmp" -cf - . | xz -T2 -6 >"$pack/llama-src.tar.xz"
rm -rf "$tmp"
du -sh "$pack" && ls -la "$pack" "$pack/syslib"

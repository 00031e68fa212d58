// Flash attention alone, on the shapes kvbatch gives ggml's CPU kernel: a
// ubatch of sequences decoding after one shared prompt (and, optionally, a
// new request's prompt chunk in the same ubatch), K and V laid out as
// llama.cpp's cache holds them (a row per cell, every head in it), one
// buffer per layer so that the cache does not stay in the CPU's caches.
// Prints the best and mean time of the default kernel, of ggml's reference
// row-by-row kernel (use_ref) and of the batch-invariant kernel of
// patches/0004 (kvbatch --deterministic), measured alternately in one run.
// To compare two builds of llama.cpp, run it with LD_LIBRARY_PATH pointing
// at each (bench/README.md).
#include <ggml-backend.h>
#include <ggml-cpu.h>
#include <ggml.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

struct Options {
  int rows = 32;      // decoding sequences, one row each
  int prompt = 0;     // rows of a new request's prompt chunk in the same ubatch
  int prefix = 1900;  // cells every row sees
  int own = 32;       // cells of each decoding sequence after the prefix (interleaved)
  int prompt_own = 0; // cells of each decoding sequence's own prompt, consecutive, before those
  int heads = 8, kv_heads = 8, head_dim = 64;
  int layers = 8, threads = 2, iters = 20;
  std::vector<std::string> kernels = {"default", "ref", "invariant"};  // the kernels timed
};

enum class Kernel { kDefault, kRef, kBatchInvariant };

struct Timing {
  double best = 1e30, total = 0;
};

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"ggml CPU flash attention on kvbatch's ubatch shapes"};
  app.add_option("--rows", o.rows, "decoding sequences (one row each)");
  app.add_option("--prompt", o.prompt, "rows of a new prompt chunk in the same ubatch (causal)");
  app.add_option("--prefix", o.prefix, "shared prefix cells");
  app.add_option("--own", o.own, "each decoding sequence's own cells (interleaved with the others')");
  app.add_option("--prompt-own", o.prompt_own,
                 "each decoding sequence's own prompt cells, consecutive per sequence, before the interleaved ones "
                 "(kvbatch prefills a wave's prompts together, then they decode side by side)");
  app.add_option("--heads", o.heads, "query heads");
  app.add_option("--kv-heads", o.kv_heads, "KV heads");
  app.add_option("--head-dim", o.head_dim, "head size");
  app.add_option("--layers", o.layers, "layers (one cache buffer each)");
  app.add_option("--threads", o.threads, "threads");
  app.add_option("--iters", o.iters, "timed runs of each kernel");
  bool no_ref = false;
  app.add_flag("--no-ref", no_ref, "time the default kernel only (--kernels default)");
  app.add_option("--kernels", o.kernels, "the kernels timed (to profile one): default, ref, invariant")
      ->delimiter(',')
      ->check(CLI::IsMember({"default", "ref", "invariant"}));
  CLI11_PARSE(app, argc, argv);
  auto timed = [&](const char* name) { return std::find(o.kernels.begin(), o.kernels.end(), name) != o.kernels.end(); };
  if (no_ref) o.kernels = {"default"};
  const bool k_default = timed("default");
  const bool k_ref = timed("ref");
  if (o.heads % o.kv_heads != 0 || o.rows + o.prompt < 1) {
    std::fprintf(stderr, "heads must be a multiple of kv-heads, and there must be rows\n");
    return 2;
  }

  const int n_rows = o.rows + o.prompt;
  const int n_used = o.prefix + o.rows * (o.prompt_own + o.own) + o.prompt;
  const int n_kv = (n_used + 255) / 256 * 256;  // llama.cpp pads the cache view to 256

  ggml_backend_t backend = ggml_backend_cpu_init();
  // patches/0004's switch, looked up so that a llama.cpp without it still builds this (and skips that kernel)
  using SetBatchInvariant = void (*)(ggml_backend_t, bool);
  const auto set_batch_invariant = reinterpret_cast<SetBatchInvariant>(
      ggml_backend_reg_get_proc_address(ggml_backend_cpu_reg(), "ggml_backend_cpu_set_batch_invariant"));
  const bool invariant = timed("invariant") && set_batch_invariant != nullptr;
  ggml_backend_cpu_set_n_threads(backend, o.threads);
  ggml_init_params ip{ggml_tensor_overhead() * size_t(8 * o.layers + 8) + ggml_graph_overhead(), nullptr, true};
  ggml_context* ctx = ggml_init(ip);
  ggml_cgraph* graph = ggml_new_graph(ctx);
  ggml_tensor* mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, n_rows);
  std::vector<ggml_tensor*> inputs;
  for (int l = 0; l < o.layers; ++l) {
    ggml_tensor* q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, o.head_dim, n_rows, o.heads);
    ggml_tensor* k_cache = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, o.head_dim * o.kv_heads, n_kv);
    ggml_tensor* v_cache = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, o.head_dim * o.kv_heads, n_kv);
    const size_t head_bytes = size_t(o.head_dim) * sizeof(ggml_fp16_t);
    ggml_tensor* k = ggml_view_3d(ctx, k_cache, o.head_dim, n_kv, o.kv_heads, k_cache->nb[1], head_bytes, 0);
    ggml_tensor* v = ggml_view_3d(ctx, v_cache, o.head_dim, n_kv, o.kv_heads, v_cache->nb[1], head_bytes, 0);
    ggml_tensor* out = ggml_flash_attn_ext(ctx, q, k, v, mask, 1.0f / std::sqrt(float(o.head_dim)), 0.0f, 0.0f);
    ggml_build_forward_expand(graph, out);
    inputs.insert(inputs.end(), {q, k_cache, v_cache});
  }
  ggml_backend_buffer_t buffer = ggml_backend_alloc_ctx_tensors(ctx, backend);

  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (ggml_tensor* t : inputs) {
    if (t->type == GGML_TYPE_F32) {
      std::vector<float> x(size_t(ggml_nelements(t)));
      for (auto& f : x) f = nd(rng);
      ggml_backend_tensor_set(t, x.data(), 0, ggml_nbytes(t));
    } else {
      std::vector<ggml_fp16_t> x(size_t(ggml_nelements(t)));
      for (auto& f : x) f = ggml_fp32_to_fp16(nd(rng));
      ggml_backend_tensor_set(t, x.data(), 0, ggml_nbytes(t));
    }
  }
  // Decoding row r sees the prefix, its prompt's cells (o.prompt_own of them,
  // the r-th such run after the prefix) and its own cells (every o.rows-th
  // after those, as sequences decoding side by side fill them); prompt row p
  // sees the prefix and the prompt's cells up to its own.
  const ggml_fp16_t visible = ggml_fp32_to_fp16(0.0f);
  std::vector<ggml_fp16_t> m(size_t(ggml_nelements(mask)), ggml_fp32_to_fp16(-INFINITY));
  for (int r = 0; r < n_rows; ++r) {
    ggml_fp16_t* row = &m[size_t(r) * size_t(n_kv)];
    std::fill(row, row + o.prefix, visible);
    const int decoded = o.prefix + o.rows * o.prompt_own;  // the first interleaved cell
    if (r < o.rows) {
      std::fill(row + o.prefix + r * o.prompt_own, row + o.prefix + (r + 1) * o.prompt_own, visible);
      for (int s = 0; s < o.own; ++s) row[decoded + s * o.rows + r] = visible;
    } else {
      const int first = decoded + o.rows * o.own;
      std::fill(row + first, row + first + (r - o.rows) + 1, visible);
    }
  }
  ggml_backend_tensor_set(mask, m.data(), 0, ggml_nbytes(mask));

  Timing t_default, t_ref, t_invariant;
  auto run = [&](Kernel kernel, Timing* t, bool timed) {
    ggml_backend_cpu_set_use_ref(backend, kernel == Kernel::kRef);
    if (set_batch_invariant) set_batch_invariant(backend, kernel == Kernel::kBatchInvariant);
    const auto start = std::chrono::steady_clock::now();
    ggml_backend_graph_compute(backend, graph);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (timed) {
      t->best = std::min(t->best, ms);
      t->total += ms;
    }
  };
  if (k_default) run(Kernel::kDefault, &t_default, false);
  if (k_ref) run(Kernel::kRef, &t_ref, false);
  if (invariant) run(Kernel::kBatchInvariant, &t_invariant, false);
  for (int i = 0; i < o.iters; ++i) {
    if (k_default) run(Kernel::kDefault, &t_default, true);
    if (k_ref) run(Kernel::kRef, &t_ref, true);
    if (invariant) run(Kernel::kBatchInvariant, &t_invariant, true);
  }
  std::printf(
      "flash attention, %d layers: %d decoding rows + %d prompt rows, prefix %d, own %d + %d, %d cells; heads %d/%d of "
      "%d; %d threads\n",
      o.layers, o.rows, o.prompt, o.prefix, o.prompt_own, o.own, n_kv, o.heads, o.kv_heads, o.head_dim, o.threads);
  if (k_default) std::printf("  default kernel:   best %8.2f ms  mean %8.2f ms\n", t_default.best, t_default.total / o.iters);
  auto report = [&](const char* name, const Timing& t) {
    std::printf("  %-17s best %8.2f ms  mean %8.2f ms", name, t.best, t.total / o.iters);
    if (k_default) std::printf("  (%.2fx the default's best)", t.best / t_default.best);
    std::printf("\n");
  };
  if (k_ref) report("reference kernel:", t_ref);
  if (invariant) report("batch-invariant:", t_invariant);
  else if (timed("invariant"))
    std::printf("  batch-invariant:  not in this llama.cpp (patches/0004)\n");
  ggml_backend_buffer_free(buffer);
  ggml_free(ctx);
  ggml_backend_free(backend);
  return 0;
}

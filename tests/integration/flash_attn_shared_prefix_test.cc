// ggml's CPU flash attention on the shapes kvbatch gives it: many sequences'
// rows in one ubatch, all seeing one shared KV prefix, then each its own
// cells. patches/0001 computes the shared columns for all rows at once (a
// tiled matrix product) and the rest row by row; whatever path the kernel
// takes, its output must match a double-precision softmax(QK^T)V computed
// here, as closely as the reference per-row kernel (use_ref) does. The
// batch-invariant kernel (patches/0004, kvbatch --deterministic) must match
// it too, and give each row bit for bit what it gives that row alone.
#include <ggml-backend.h>
#include <ggml-cpu.h>
#include <ggml.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

namespace {

struct Shape {
  int rows;       // query rows in the ubatch (N)
  int seqs;       // sequences they belong to (row r is in sequence r % seqs)
  int prefix;     // KV columns every row sees
  int own;        // KV columns after the prefix, each owned by one sequence
  int heads;      // query heads
  int kv_heads;   // KV heads (GQA when fewer)
  float max_bias = 0.0f;
  float softcap = 0.0f;
  bool hide_first = false;  // one row does not see column 0 (no shared prefix)
  int threads = 2;
  bool cache_layout = false;  // K and V as llama.cpp's cache holds them: a row per cell, every head in it
  int base_step = 0;          // the rows' first decode step (each has seen this many own cells before)
  int head_dim = 64;          // DK = DV
  bool sinks = false;         // attention sinks (a logit per head in the denominator only, as gpt-oss has)
  bool f32_kv = false;        // K and V in F32 instead of F16
  bool packed = false;        // prompts, not decoding: each sequence's rows and own cells are consecutive
  int v_dim = 0;              // DV where it differs from DK
};

struct Case {
  std::vector<float> q, k, v, mask;  // mask as float; 0 or -INF (ALiBi: -distance)
  std::vector<float> sinks;          // per head, when the shape has them
  int n_kv = 0, dk = 64, dv = 64;
};

void PrintTo(const Shape& s, std::ostream* os) {
  *os << s.rows << " rows of " << s.seqs << " sequences, prefix " << s.prefix << ", own " << s.own << ", heads "
      << s.heads << "/" << s.kv_heads << ", max_bias " << s.max_bias << ", softcap " << s.softcap
      << (s.hide_first ? ", column 0 hidden from one row" : "") << ", " << s.threads << " threads"
      << (s.cache_layout ? ", cache layout" : "") << ", base step " << s.base_step << ", head dim " << s.head_dim
      << (s.sinks ? ", sinks" : "") << (s.f32_kv ? ", F32 K and V" : "") << (s.packed ? ", packed prompts" : "")
      << (s.v_dim ? ", V " + std::to_string(s.v_dim) + " wide" : std::string());
}

Case MakeCase(const Shape& s, uint32_t seed) {
  Case c;
  c.n_kv = s.prefix + s.own;
  c.dk = s.head_dim;
  c.dv = s.v_dim ? s.v_dim : s.head_dim;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  c.q.resize(size_t(c.dk) * s.rows * s.heads);
  c.k.resize(size_t(c.dk) * c.n_kv * s.kv_heads);
  c.v.resize(size_t(c.dv) * c.n_kv * s.kv_heads);
  for (auto& x : c.q) x = nd(rng);
  // Through f16 here, so that the double reference sees what the kernel sees.
  for (auto& x : c.k) x = ggml_fp16_to_fp32(ggml_fp32_to_fp16(nd(rng)));
  for (auto& x : c.v) x = ggml_fp16_to_fp32(ggml_fp32_to_fp16(nd(rng)));
  c.mask.assign(size_t(c.n_kv) * s.rows, -INFINITY);
  // Decoding (the default): row r is sequence r % seqs, and own cell i sequence i % seqs, as
  // sequences decoding in lockstep lay them out. Packed: the rows and own cells of each
  // sequence are consecutive, as a ubatch of several prompts lays them out.
  const int rows_per_seq = std::max(1, s.rows / s.seqs);
  const int own_per_seq = std::max(1, s.own / s.seqs);
  for (int r = 0; r < s.rows; ++r) {
    const int seq = s.packed ? std::min(r / rows_per_seq, s.seqs - 1) : r % s.seqs;
    const int step = (s.packed ? r - seq * rows_per_seq : r / s.seqs) + s.base_step;  // the row's step in its sequence
    for (int col = 0; col < c.n_kv; ++col) {
      bool visible;
      int distance;
      if (col < s.prefix) {
        visible = true;
        distance = s.prefix - col + step;
      } else {
        const int i = col - s.prefix;  // own cells: sequence i % seqs, step i / seqs (packed: i / own_per_seq, i % own_per_seq)
        const int cell_seq = s.packed ? std::min(i / own_per_seq, s.seqs - 1) : i % s.seqs;
        const int cell_step = s.packed ? i - cell_seq * own_per_seq : i / s.seqs;
        visible = cell_seq == seq && cell_step <= step;
        distance = step - cell_step;
      }
      if (visible) c.mask[size_t(r) * c.n_kv + col] = s.max_bias > 0 ? -float(distance) : 0.0f;
    }
  }
  if (s.hide_first) c.mask[size_t(s.rows / 2) * c.n_kv] = -INFINITY;
  if (s.sinks) {
    c.sinks.resize(size_t(s.heads));
    for (auto& x : c.sinks) x = 3.0f * nd(rng);
  }
  return c;
}

// softmax(scale * q.k + slope * mask) v in double, per row and head; out[r][h][d].
std::vector<double> Reference(const Shape& s, const Case& c, float scale) {
  std::vector<double> out(size_t(c.dv) * s.heads * s.rows);
  const int n_head_log2 = 1 << int(std::floor(std::log2(s.heads)));
  const double m0 = std::pow(2.0, -double(s.max_bias) / n_head_log2);
  const double m1 = std::pow(2.0, -(double(s.max_bias) / 2.0) / n_head_log2);
  for (int h = 0; h < s.heads; ++h) {
    const int hk = h / (s.heads / s.kv_heads);
    const double slope = s.max_bias > 0 ? (h < n_head_log2 ? std::pow(m0, h + 1) : std::pow(m1, 2 * (h - n_head_log2) + 1)) : 1.0;
    for (int r = 0; r < s.rows; ++r) {
      const float* q = &c.q[(size_t(h) * s.rows + r) * c.dk];
      std::vector<double> w(c.n_kv, 0.0);
      double mx = -INFINITY;
      for (int col = 0; col < c.n_kv; ++col) {
        const float m = c.mask[size_t(r) * c.n_kv + col];
        if (m == -INFINITY) { w[col] = -INFINITY; continue; }
        const float* k = &c.k[(size_t(hk) * c.n_kv + col) * c.dk];
        double dot = 0;
        for (int d = 0; d < c.dk; ++d) dot += double(q[d]) * k[d];
        double x = dot * scale;
        if (s.softcap > 0) x = s.softcap * std::tanh(x / s.softcap);
        w[col] = x + slope * m;
        mx = std::max(mx, w[col]);
      }
      if (s.sinks) mx = std::max(mx, double(c.sinks[h]));
      double sum = s.sinks ? std::exp(double(c.sinks[h]) - mx) : 0.0;
      for (auto& x : w) { x = x == -INFINITY ? 0.0 : std::exp(x - mx); sum += x; }
      double* o = &out[(size_t(r) * s.heads + h) * c.dv];
      for (int col = 0; col < c.n_kv; ++col) {
        if (w[col] == 0.0) continue;
        const float* v = &c.v[(size_t(hk) * c.n_kv + col) * c.dv];
        for (int d = 0; d < c.dv; ++d) o[d] += w[col] / sum * v[d];
      }
    }
  }
  return out;
}

enum class Kernel { kDefault, kRef, kBatchInvariant };

// ggml_flash_attn_ext on the CPU backend; kRef forces the per-row kernel (use_ref),
// kBatchInvariant the batch-invariant one (patches/0004).
std::vector<float> RunGgml(const Shape& s, const Case& c, float scale, Kernel kernel) {
  ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
  EXPECT_NE(dev, nullptr);
  ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
  ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
  using SetThreads = void (*)(ggml_backend_t, int);
  using SetRef = void (*)(ggml_backend_t, bool);
  if (auto f = reinterpret_cast<SetThreads>(ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads"))) f(backend, s.threads);
  auto set_ref = reinterpret_cast<SetRef>(ggml_backend_reg_get_proc_address(reg, "ggml_backend_cpu_set_use_ref"));
  EXPECT_TRUE(set_ref != nullptr || kernel != Kernel::kRef);
  if (set_ref) set_ref(backend, kernel == Kernel::kRef);
  auto set_bi = reinterpret_cast<SetRef>(ggml_backend_reg_get_proc_address(reg, "ggml_backend_cpu_set_batch_invariant"));
  EXPECT_TRUE(set_bi != nullptr || kernel != Kernel::kBatchInvariant);
  if (set_bi) set_bi(backend, kernel == Kernel::kBatchInvariant);

  ggml_init_params ip{ggml_tensor_overhead() * 16 + ggml_graph_overhead(), nullptr, true};
  ggml_context* ctx = ggml_init(ip);
  ggml_tensor* q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, c.dk, s.rows, s.heads, 1);
  ggml_tensor *k_store, *v_store, *k, *v;
  const ggml_type kv_type = s.f32_kv ? GGML_TYPE_F32 : GGML_TYPE_F16;
  const size_t kv_size = ggml_type_size(kv_type);
  if (s.cache_layout) {  // [dk * kv_heads, n_kv] viewed as [dk, n_kv, kv_heads]
    k_store = ggml_new_tensor_2d(ctx, kv_type, c.dk * s.kv_heads, c.n_kv);
    v_store = ggml_new_tensor_2d(ctx, kv_type, c.dv * s.kv_heads, c.n_kv);
    k = ggml_view_3d(ctx, k_store, c.dk, c.n_kv, s.kv_heads, k_store->nb[1], c.dk * kv_size, 0);
    v = ggml_view_3d(ctx, v_store, c.dv, c.n_kv, s.kv_heads, v_store->nb[1], c.dv * kv_size, 0);
  } else {
    k = k_store = ggml_new_tensor_4d(ctx, kv_type, c.dk, c.n_kv, s.kv_heads, 1);
    v = v_store = ggml_new_tensor_4d(ctx, kv_type, c.dv, c.n_kv, s.kv_heads, 1);
  }
  ggml_tensor* mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, c.n_kv, s.rows, 1, 1);
  ggml_tensor* out = ggml_flash_attn_ext(ctx, q, k, v, mask, scale, s.max_bias, s.softcap);
  ggml_flash_attn_ext_set_prec(out, GGML_PREC_F32);
  ggml_tensor* sinks = nullptr;
  if (s.sinks) {
    sinks = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, s.heads);
    ggml_flash_attn_ext_add_sinks(out, sinks);
  }
  ggml_cgraph* gf = ggml_new_graph(ctx);
  ggml_build_forward_expand(gf, out);
  ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);

  auto to_f16 = [](const std::vector<float>& x) {
    std::vector<ggml_fp16_t> h(x.size());
    for (size_t i = 0; i < x.size(); ++i) h[i] = ggml_fp32_to_fp16(x[i]);
    return h;
  };
  // c.k and c.v are [kv_heads][n_kv][d]; the cache layout is [n_kv][kv_heads][d]
  auto layout = [&](const std::vector<float>& x, int d) {
    if (!s.cache_layout) return x;
    std::vector<float> y(x.size());
    for (int h = 0; h < s.kv_heads; ++h)
      for (int col = 0; col < c.n_kv; ++col)
        for (int i = 0; i < d; ++i) y[(size_t(col) * s.kv_heads + h) * d + i] = x[(size_t(h) * c.n_kv + col) * d + i];
    return y;
  };
  auto set_kv = [&](ggml_tensor* t, const std::vector<float>& x) {
    if (s.f32_kv) return ggml_backend_tensor_set(t, x.data(), 0, ggml_nbytes(t));
    const auto h = to_f16(x);
    ggml_backend_tensor_set(t, h.data(), 0, ggml_nbytes(t));
  };
  ggml_backend_tensor_set(q, c.q.data(), 0, ggml_nbytes(q));
  set_kv(k_store, layout(c.k, c.dk));
  set_kv(v_store, layout(c.v, c.dv));
  const auto m16 = to_f16(c.mask);
  ggml_backend_tensor_set(mask, m16.data(), 0, ggml_nbytes(mask));
  if (sinks) ggml_backend_tensor_set(sinks, c.sinks.data(), 0, ggml_nbytes(sinks));
  EXPECT_EQ(ggml_backend_graph_compute(backend, gf), GGML_STATUS_SUCCESS);
  std::vector<float> result(ggml_nelements(out));  // [dv, heads, rows]
  ggml_backend_tensor_get(out, result.data(), 0, ggml_nbytes(out));
  ggml_backend_buffer_free(buf);
  ggml_free(ctx);
  ggml_backend_free(backend);
  return result;
}

double MaxError(const std::vector<float>& got, const std::vector<double>& want) {
  double e = 0;
  for (size_t i = 0; i < got.size(); ++i) e = std::max(e, std::fabs(double(got[i]) - want[i]));
  return e;
}

class FlashAttnSharedPrefix : public ::testing::TestWithParam<Shape> {};

TEST_P(FlashAttnSharedPrefix, MatchesDoubleReference) {
  const Shape s = GetParam();
  const Case c = MakeCase(s, 1234u + uint32_t(s.rows * 7 + s.prefix));
  const float scale = 1.0f / std::sqrt(float(c.dk));
  const auto want = Reference(s, c, scale);
  const auto fast = RunGgml(s, c, scale, Kernel::kDefault);
  const auto ref = RunGgml(s, c, scale, Kernel::kRef);
  const auto invariant = RunGgml(s, c, scale, Kernel::kBatchInvariant);
  ASSERT_EQ(fast.size(), want.size());
  ASSERT_EQ(invariant.size(), want.size());
  const double e_fast = MaxError(fast, want), e_ref = MaxError(ref, want);
  EXPECT_LT(MaxError(invariant, want), 4e-3) << "batch-invariant kernel vs double reference";
  // The reference kernel accumulates V in f16 (up to 6.4e-3 off here, on the
  // 200-row prompt chunk); the tiled ones in f32.
  EXPECT_LT(e_fast, 4e-3) << "default kernel vs double reference";
  EXPECT_LT(e_ref, 1e-2) << "per-row reference kernel vs double reference";
  EXPECT_LE(e_fast, e_ref * 1.5 + 1e-4) << "default kernel less exact than the reference one";
}

// The batch-invariant kernel gives a row, bit for bit, what it gives that row
// alone: one query row, only the cells it sees (in the same order), after
// `lead` cells it does not see (so that its cells fall elsewhere in the KV
// tiles), on another number of threads.
Case Alone(const Shape& s, const Case& c, int row, int lead, Shape* alone) {
  *alone = s;
  alone->rows = alone->seqs = 1;
  alone->threads = s.threads == 1 ? 3 : 1;
  std::vector<int> cols;
  for (int col = 0; col < c.n_kv; ++col)
    if (c.mask[size_t(row) * c.n_kv + col] != -INFINITY) cols.push_back(col);
  Case a;
  a.dk = c.dk;
  a.dv = c.dv;
  a.sinks = c.sinks;
  a.n_kv = lead + int(cols.size());
  a.q.resize(size_t(a.dk) * s.heads);
  for (int h = 0; h < s.heads; ++h)
    std::copy_n(&c.q[(size_t(h) * s.rows + row) * c.dk], c.dk, &a.q[size_t(h) * a.dk]);
  a.k.assign(size_t(a.dk) * a.n_kv * s.kv_heads, 0.5f);
  a.v.assign(size_t(a.dv) * a.n_kv * s.kv_heads, -0.25f);
  a.mask.assign(size_t(a.n_kv), -INFINITY);
  for (size_t i = 0; i < cols.size(); ++i) {
    const int col = lead + int(i);
    a.mask[col] = c.mask[size_t(row) * c.n_kv + cols[i]];
    for (int h = 0; h < s.kv_heads; ++h) {
      std::copy_n(&c.k[(size_t(h) * c.n_kv + cols[i]) * c.dk], c.dk, &a.k[(size_t(h) * a.n_kv + col) * a.dk]);
      std::copy_n(&c.v[(size_t(h) * c.n_kv + cols[i]) * c.dv], c.dv, &a.v[(size_t(h) * a.n_kv + col) * a.dv]);
    }
  }
  return a;
}

TEST_P(FlashAttnSharedPrefix, BatchInvariantKernelGivesARowWhatItGivesItAlone) {
  const Shape s = GetParam();
  const Case c = MakeCase(s, 99u + uint32_t(s.rows * 3 + s.own));
  const float scale = 1.0f / std::sqrt(float(c.dk));
  const auto batched = RunGgml(s, c, scale, Kernel::kBatchInvariant);
  for (const int row : {0, s.rows / 2, s.rows - 1}) {
    for (const int lead : {0, 37}) {
      Shape s1;
      const Case a = Alone(s, c, row, lead, &s1);
      const auto alone = RunGgml(s1, a, scale, Kernel::kBatchInvariant);
      ASSERT_EQ(alone.size(), size_t(c.dv) * s.heads);
      const float* b = &batched[size_t(row) * s.heads * c.dv];
      EXPECT_EQ(std::memcmp(b, alone.data(), alone.size() * sizeof(float)), 0)
          << "row " << row << " after " << lead << " hidden cells: first value " << b[0] << " batched, " << alone[0]
          << " alone";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, FlashAttnSharedPrefix,
    ::testing::Values(
        Shape{32, 32, 1900, 64, 8, 8},          // the rubric: 32 sequences decoding after a 1,900-token prompt
        Shape{32, 32, 1900, 64, 8, 2},          // GQA
        Shape{4, 4, 64, 8, 4, 4},               // the smallest ubatch and prefix that take the shared path
        Shape{17, 5, 100, 40, 4, 4},            // several rows per sequence (causal among own cells), odd sizes
        Shape{63, 63, 130, 63, 2, 1},           // one row short of a full tile
        Shape{3, 3, 500, 6, 4, 4},              // too few rows: the per-row path
        Shape{32, 32, 63, 64, 4, 4},            // too short a prefix: the per-row path
        Shape{24, 24, 700, 48, 8, 8, 8.0f},     // ALiBi: the mask carries distances
        Shape{16, 16, 300, 32, 4, 4, 0.0f, 30.0f},  // logit soft-capping
        Shape{32, 32, 900, 64, 4, 4, 0.0f, 0.0f, true},  // column 0 hidden from one row: no shared prefix
        // llama.cpp's cache layout (a row per cell holding every head), where
        // the threads split the cells (patches/0003)
        Shape{32, 32, 1900, 1024, 8, 8, 0.0f, 0.0f, false, 2, true, 31},  // the rubric at step 31
        Shape{32, 32, 1900, 64, 8, 2, 0.0f, 0.0f, false, 3, true},        // GQA, 3 threads
        Shape{32, 32, 64, 1024, 8, 8, 0.0f, 0.0f, false, 2, true, 31},    // short prefix: own cells only, sparse
        Shape{17, 5, 300, 40, 4, 4, 8.0f, 0.0f, false, 1, true, 2},       // ALiBi, several rows per sequence, 1 thread
        Shape{24, 24, 500, 48, 4, 2, 0.0f, 30.0f, true, 4, true},         // soft-capping, GQA, column 0 hidden, 4 threads
        Shape{63, 63, 2000, 63, 2, 1, 0.0f, 0.0f, false, 2, true},        // one row short of a full tile
        Shape{96, 32, 1900, 96, 8, 2, 0.0f, 0.0f, false, 2, true},        // more than a tile: 3 rows per sequence
        Shape{200, 1, 300, 200, 4, 4, 0.0f, 0.0f, false, 3, true},        // one sequence's prompt chunk, causal
        Shape{300, 4, 256, 300, 32, 8, 0.0f, 0.0f, false, 2, true},       // rows in two chunks (scratch-bound)
        Shape{32, 32, 700, 64, 8, 2, 0.0f, 0.0f, false, 2, true, 3, 128}, // Llama 3 8B's heads (128 wide, GQA 4)
        Shape{17, 5, 300, 40, 4, 4, 0.0f, 0.0f, false, 2, true, 2, 80},   // heads 80 wide: not a multiple of 32
        Shape{8, 8, 300, 8, 256, 1, 0.0f, 0.0f, false, 2, true},          // 256 query heads on one KV head: a block
                                                                          // outgrows the other kernels' scratch
        Shape{32, 32, 700, 64, 8, 2, 0.0f, 0.0f, false, 2, true, 3, 64, true},        // attention sinks
        Shape{17, 5, 300, 40, 4, 4, 8.0f, 0.0f, false, 2, true, 2, 64, false, true},  // K and V in F32, ALiBi
        // a ubatch of prompts after the prefix: each own tile is seen by one or two prompts' rows only
        Shape{320, 10, 700, 320, 8, 8, 0.0f, 0.0f, false, 2, true, 0, 64, false, false, true},  // 10 prompts of 32
        Shape{156, 3, 300, 156, 4, 2, 8.0f, 0.0f, false, 3, true, 0, 64, false, false, true},   // ALiBi, GQA, 3 threads
        Shape{100, 4, 200, 100, 4, 4, 0.0f, 30.0f, false, 2, true, 0, 128, true, false, true},  // soft-capping, sinks, 128 wide
        // K and V of different widths
        Shape{32, 32, 700, 64, 8, 2, 0.0f, 0.0f, false, 2, true, 3, 192, false, false, false, 128},  // K 192, V 128
        Shape{17, 5, 300, 40, 4, 4, 8.0f, 0.0f, false, 3, true, 2, 36, false, false, false, 64},     // K 36: no whole vectors
        Shape{64, 2, 300, 64, 4, 2, 0.0f, 0.0f, false, 2, true, 0, 40, false, true, true, 32}        // F32, packed, K 40, V 32
        ));

}  // namespace

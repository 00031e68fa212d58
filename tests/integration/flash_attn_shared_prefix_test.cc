// ggml's CPU flash attention on the shapes kvbatch gives it: many sequences'
// rows in one ubatch, all seeing one shared KV prefix, then each its own
// cells. patches/0001 computes the shared columns for all rows at once (a
// tiled matrix product) and the rest row by row; whatever path the kernel
// takes, its output must match a double-precision softmax(QK^T)V computed
// here, as closely as the reference per-row kernel (use_ref) does.
#include <ggml-backend.h>
#include <ggml-cpu.h>
#include <ggml.h>
#include <gtest/gtest.h>

#include <cmath>
#include <ostream>
#include <random>
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
};

struct Case {
  std::vector<float> q, k, v, mask;  // mask as float; 0 or -INF (ALiBi: -distance)
  int n_kv = 0, dk = 64, dv = 64;
};

void PrintTo(const Shape& s, std::ostream* os) {
  *os << s.rows << " rows of " << s.seqs << " sequences, prefix " << s.prefix << ", own " << s.own << ", heads "
      << s.heads << "/" << s.kv_heads << ", max_bias " << s.max_bias << ", softcap " << s.softcap
      << (s.hide_first ? ", column 0 hidden from one row" : "");
}

Case MakeCase(const Shape& s, uint32_t seed) {
  Case c;
  c.n_kv = s.prefix + s.own;
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
  for (int r = 0; r < s.rows; ++r) {
    const int seq = r % s.seqs;
    const int step = r / s.seqs;  // the row's position among its sequence's rows
    for (int col = 0; col < c.n_kv; ++col) {
      bool visible;
      int distance;
      if (col < s.prefix) {
        visible = true;
        distance = s.prefix - col + step;
      } else {
        const int i = col - s.prefix;  // own cells: sequence i % seqs, step i / seqs
        visible = (i % s.seqs == seq) && (i / s.seqs <= step);
        distance = step - i / s.seqs;
      }
      if (visible) c.mask[size_t(r) * c.n_kv + col] = s.max_bias > 0 ? -float(distance) : 0.0f;
    }
  }
  if (s.hide_first) c.mask[size_t(s.rows / 2) * c.n_kv] = -INFINITY;
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
      double sum = 0;
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

// ggml_flash_attn_ext on the CPU backend; use_ref forces the per-row kernel.
std::vector<float> RunGgml(const Shape& s, const Case& c, float scale, bool use_ref) {
  ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
  EXPECT_NE(dev, nullptr);
  ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
  ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
  using SetThreads = void (*)(ggml_backend_t, int);
  using SetRef = void (*)(ggml_backend_t, bool);
  if (auto f = reinterpret_cast<SetThreads>(ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads"))) f(backend, 2);
  auto set_ref = reinterpret_cast<SetRef>(ggml_backend_reg_get_proc_address(reg, "ggml_backend_cpu_set_use_ref"));
  EXPECT_TRUE(set_ref != nullptr || !use_ref);
  if (set_ref) set_ref(backend, use_ref);

  ggml_init_params ip{ggml_tensor_overhead() * 16 + ggml_graph_overhead(), nullptr, true};
  ggml_context* ctx = ggml_init(ip);
  ggml_tensor* q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, c.dk, s.rows, s.heads, 1);
  ggml_tensor* k = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, c.dk, c.n_kv, s.kv_heads, 1);
  ggml_tensor* v = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, c.dv, c.n_kv, s.kv_heads, 1);
  ggml_tensor* mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, c.n_kv, s.rows, 1, 1);
  ggml_tensor* out = ggml_flash_attn_ext(ctx, q, k, v, mask, scale, s.max_bias, s.softcap);
  ggml_flash_attn_ext_set_prec(out, GGML_PREC_F32);
  ggml_cgraph* gf = ggml_new_graph(ctx);
  ggml_build_forward_expand(gf, out);
  ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);

  auto to_f16 = [](const std::vector<float>& x) {
    std::vector<ggml_fp16_t> h(x.size());
    for (size_t i = 0; i < x.size(); ++i) h[i] = ggml_fp32_to_fp16(x[i]);
    return h;
  };
  ggml_backend_tensor_set(q, c.q.data(), 0, ggml_nbytes(q));
  auto k16 = to_f16(c.k), v16 = to_f16(c.v), m16 = to_f16(c.mask);
  ggml_backend_tensor_set(k, k16.data(), 0, ggml_nbytes(k));
  ggml_backend_tensor_set(v, v16.data(), 0, ggml_nbytes(v));
  ggml_backend_tensor_set(mask, m16.data(), 0, ggml_nbytes(mask));
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
  const auto fast = RunGgml(s, c, scale, /*use_ref=*/false);
  const auto ref = RunGgml(s, c, scale, /*use_ref=*/true);
  ASSERT_EQ(fast.size(), want.size());
  const double e_fast = MaxError(fast, want), e_ref = MaxError(ref, want);
  // The reference kernel accumulates V in f16; the tiled one in f32.
  EXPECT_LT(e_fast, 4e-3) << "default kernel vs double reference";
  EXPECT_LT(e_ref, 4e-3) << "per-row reference kernel vs double reference";
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
        Shape{32, 32, 900, 64, 4, 4, 0.0f, 0.0f, true}  // column 0 hidden from one row: no shared prefix
        ));

}  // namespace

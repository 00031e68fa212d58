#include "tools/gen_model.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "gguf.h"
#include "llama.h"

namespace kvb::tools {
namespace {

// Weight scales. Each matrix is N(0, (gain / sqrt(fan_in))^2), so every
// projection roughly preserves the RMS of its (RMS-normalised) input, and the
// embedding has unit RMS, like a layer's output. Greedy decoding is what the
// tests look at, and both extremes defeat them. Tuned on 24-token greedy
// continuations of 6 prompts plus a check of whether the context changes the
// next token (compared with the last token alone, 57 positions):
//   embd 0.1:  bench loops on a few tokens (13.8 of 24 distinct);
//   embd 4.0:  the residual stream is mostly the current token, so it acts
//              like a bigram table (context matters at 21/57 on tiny);
//   gain 0.3:  the same failure (7/57 on tiny);
//   embd 1, gain 1: 22-24 distinct, context matters at 53/57 (tiny) and
//              57/57 (bench), and each prompt gives its own continuation.
constexpr float kEmbdStd = 1.0f;
constexpr float kMatrixGain = 1.0f;
constexpr float kOutputGain = 1.0f;

constexpr float kRopeFreqBase = 10000.0f;
constexpr float kRmsNormEps = 1e-5f;

// Bound on the float staging buffer while streaming a tensor to disk.
constexpr int64_t kChunkElements = int64_t{1} << 18;

struct GgufDeleter {
  void operator()(gguf_context* ctx) const { gguf_free(ctx); }
};
using GgufPtr = std::unique_ptr<gguf_context, GgufDeleter>;

struct GgmlDeleter {
  void operator()(ggml_context* ctx) const { ggml_free(ctx); }
};
using GgmlPtr = std::unique_ptr<ggml_context, GgmlDeleter>;

struct FileCloser {
  void operator()(FILE* f) const {
    if (f != nullptr) std::fclose(f);
  }
};
using FilePtr = std::unique_ptr<FILE, FileCloser>;

// How to fill one tensor. std_dev == 0 means constant 1 (norm weights).
struct TensorSpec {
  ggml_tensor* tensor;
  float std_dev;
};

// splitmix64 finaliser: decorrelates per-tensor seeds derived from similar
// inputs (the same seed, names differing in one character).
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Each tensor gets its own stream keyed by name, so adding or reordering
// tensors does not change the others' weights.
uint64_t TensorSeed(uint64_t seed, const char* name) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a
  for (const char* p = name; *p != '\0'; ++p) {
    h = (h ^ static_cast<unsigned char>(*p)) * 0x100000001b3ULL;
  }
  return Mix(seed ^ Mix(h));
}

// Box-Muller over mt19937_64 rather than std::normal_distribution, whose
// algorithm is implementation-defined: the same seed must give the same file
// with any standard library.
class NormalSource {
 public:
  explicit NormalSource(uint64_t seed) : engine_(seed) {}

  float Next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    constexpr double kTwoPi = 6.283185307179586476925;
    // 53 random bits in (0, 1]; never 0, so the log is finite.
    const double u1 = (static_cast<double>(engine_() >> 11) + 1.0) * 0x1.0p-53;
    const double u2 = static_cast<double>(engine_() >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = static_cast<float>(r * std::sin(kTwoPi * u2));
    has_spare_ = true;
    return static_cast<float>(r * std::cos(kTwoPi * u2));
  }

 private:
  std::mt19937_64 engine_;
  float spare_ = 0.0f;
  bool has_spare_ = false;
};

Status ValidateOptions(const GenModelOptions& o) {
  if (o.vocab_path.empty()) return Status::InvalidArgument("gen_model: vocab_path is empty");
  if (o.out_path.empty()) return Status::InvalidArgument("gen_model: out_path is empty");
  if (o.n_embd <= 0 || o.n_layer <= 0 || o.n_head <= 0 || o.n_head_kv <= 0 || o.n_ff <= 0 ||
      o.n_ctx_train <= 0) {
    return Status::InvalidArgument("gen_model: all dimensions must be positive");
  }
  if (o.stream_elements <= 0 || o.threads < 0) {
    return Status::InvalidArgument("gen_model: stream_elements must be positive and threads not negative");
  }
  if (o.n_embd % o.n_head != 0) {
    return Status::InvalidArgument("gen_model: n_embd must be a multiple of n_head");
  }
  if ((o.n_embd / o.n_head) % 2 != 0) {
    return Status::InvalidArgument("gen_model: head size n_embd/n_head must be even (RoPE)");
  }
  if (o.arch != "llama" && o.arch != "bert") return Status::InvalidArgument("gen_model: arch must be llama or bert");
  if (o.n_head % o.n_head_kv != 0) {
    return Status::InvalidArgument("gen_model: n_head must be a multiple of n_head_kv");
  }
  if (o.weight_type != GGML_TYPE_Q8_0 && o.weight_type != GGML_TYPE_Q4_K && o.weight_type != GGML_TYPE_F16 &&
      o.weight_type != GGML_TYPE_F32) {
    return Status::InvalidArgument("gen_model: weight_type must be Q8_0, Q4_K, F16 or F32");
  }
  // Every matrix's row (ne0) is n_embd long, except ffn_down's (n_ff).
  const int64_t block = ggml_blck_size(o.weight_type);
  if (o.n_embd % block != 0 || o.n_ff % block != 0) {
    return Status::InvalidArgument("gen_model: n_embd and n_ff must be multiples of " +
                                   std::to_string(block) + " for " +
                                   ggml_type_name(o.weight_type));
  }
  return Status::Ok();
}

llama_ftype FileType(ggml_type t) {
  switch (t) {
    case GGML_TYPE_F16: return LLAMA_FTYPE_MOSTLY_F16;
    case GGML_TYPE_F32: return LLAMA_FTYPE_ALL_F32;
    case GGML_TYPE_Q4_K: return LLAMA_FTYPE_MOSTLY_Q4_K_S;
    default: return LLAMA_FTYPE_MOSTLY_Q8_0;
  }
}

// Copies the tokenizer.* keys only: vocab files also carry general.* and
// <arch>.* keys of the model they were cut from, which must not leak in.
Status CopyTokenizer(const std::string& vocab_path, gguf_context* out, int64_t* n_vocab) {
  if (!std::filesystem::exists(vocab_path)) {
    return Status::NotFound("gen_model: vocab file not found: " + vocab_path);
  }
  gguf_init_params params = {/*no_alloc=*/true, /*ctx=*/nullptr};
  GgufPtr vocab(gguf_init_from_file(vocab_path.c_str(), params));
  if (vocab == nullptr) {
    return Status::InvalidArgument("gen_model: not a GGUF file: " + vocab_path);
  }
  const int64_t tokens_id = gguf_find_key(vocab.get(), "tokenizer.ggml.tokens");
  if (tokens_id < 0 || gguf_get_kv_type(vocab.get(), tokens_id) != GGUF_TYPE_ARRAY) {
    return Status::InvalidArgument("gen_model: no tokenizer.ggml.tokens in " + vocab_path);
  }
  *n_vocab = static_cast<int64_t>(gguf_get_arr_n(vocab.get(), tokens_id));

  gguf_set_kv(out, vocab.get());
  std::vector<std::string> foreign;
  for (int64_t i = 0; i < gguf_get_n_kv(out); ++i) {
    const std::string key = gguf_get_key(out, i);
    if (key.rfind("tokenizer.", 0) != 0) foreign.push_back(key);
  }
  for (const std::string& key : foreign) gguf_remove_key(out, key.c_str());
  return Status::Ok();
}

// The keys every architecture has, as "<arch>.<key>".
void SetCommonHyperparameters(const GenModelOptions& o, const std::string& arch, gguf_context* g) {
  auto key = [&](const char* k) { return arch + "." + k; };
  gguf_set_val_str(g, "general.architecture", arch.c_str());
  gguf_set_val_str(g, "general.name", o.name.c_str());
  gguf_set_val_u32(g, "general.file_type", static_cast<uint32_t>(FileType(o.weight_type)));
  gguf_set_val_u32(g, key("context_length").c_str(), static_cast<uint32_t>(o.n_ctx_train));
  gguf_set_val_u32(g, key("embedding_length").c_str(), static_cast<uint32_t>(o.n_embd));
  gguf_set_val_u32(g, key("block_count").c_str(), static_cast<uint32_t>(o.n_layer));
  gguf_set_val_u32(g, key("feed_forward_length").c_str(), static_cast<uint32_t>(o.n_ff));
  gguf_set_val_u32(g, key("attention.head_count").c_str(), static_cast<uint32_t>(o.n_head));
}

void SetBertHyperparameters(const GenModelOptions& o, gguf_context* g) {
  SetCommonHyperparameters(o, "bert", g);
  gguf_set_val_f32(g, "bert.attention.layer_norm_epsilon", 1e-12f);
  gguf_set_val_bool(g, "bert.attention.causal", false);
  gguf_set_val_u32(g, "bert.pooling_type", 1);  // mean, as bge and MiniLM
  if (gguf_find_key(g, "tokenizer.ggml.token_type_count") < 0)
    gguf_set_val_u32(g, "tokenizer.ggml.token_type_count", 2);
}

void SetHyperparameters(const GenModelOptions& o, int64_t n_vocab, gguf_context* g) {
  if (o.arch == "bert") return SetBertHyperparameters(o, g);
  SetCommonHyperparameters(o, "llama", g);
  gguf_set_val_u32(g, "llama.attention.head_count_kv", static_cast<uint32_t>(o.n_head_kv));
  gguf_set_val_f32(g, "llama.rope.freq_base", kRopeFreqBase);
  gguf_set_val_f32(g, "llama.attention.layer_norm_rms_epsilon", kRmsNormEps);
  gguf_set_val_u32(g, "llama.rope.dimension_count", static_cast<uint32_t>(o.n_embd / o.n_head));
  gguf_set_val_u32(g, "llama.vocab_size", static_cast<uint32_t>(n_vocab));
  gguf_set_val_str(g, "tokenizer.chat_template", o.chat_template.c_str());
}

// Declares every tensor in llama.cpp's layout (ggml order: ne0 is the input
// dimension) and returns how to fill each, in file order.
std::vector<TensorSpec> DeclareTensors(const GenModelOptions& o, int64_t n_vocab,
                                       ggml_context* ctx) {
  const int64_t n_embd = o.n_embd;
  const int64_t n_ff = o.n_ff;
  const int64_t n_embd_kv = n_embd / o.n_head * o.n_head_kv;
  const ggml_type wt = o.weight_type;
  const auto gain = [](int64_t fan_in, float g) {
    return g / std::sqrt(static_cast<float>(fan_in));
  };

  std::vector<TensorSpec> specs;
  const auto matrix = [&](const std::string& name, int64_t ne0, int64_t ne1, float std_dev) {
    ggml_tensor* t = ggml_new_tensor_2d(ctx, wt, ne0, ne1);
    ggml_set_name(t, name.c_str());
    specs.push_back({t, std_dev});
  };
  const auto norm = [&](const std::string& name) {
    ggml_tensor* t = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_embd);
    ggml_set_name(t, name.c_str());
    specs.push_back({t, 0.0f});
  };

  const auto vec = [&](const std::string& name, int64_t n, float std_dev) {
    ggml_tensor* t = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
    ggml_set_name(t, name.c_str());
    specs.push_back({t, std_dev});
  };
  if (o.arch == "bert") {
    // llama.cpp's BERT layout (src/models/bert.cpp): post-norm blocks with biases.
    constexpr float kBias = 0.02f;
    matrix("token_embd.weight", n_embd, n_vocab, kEmbdStd);
    ggml_tensor* types = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, 2);
    ggml_set_name(types, "token_types.weight");
    specs.push_back({types, kBias});
    ggml_tensor* pos = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_embd, o.n_ctx_train);
    ggml_set_name(pos, "position_embd.weight");
    specs.push_back({pos, kEmbdStd});
    norm("token_embd_norm.weight");
    vec("token_embd_norm.bias", n_embd, kBias);
    for (int il = 0; il < o.n_layer; ++il) {
      const std::string p = "blk." + std::to_string(il) + ".";
      for (const char* w : {"attn_q", "attn_k", "attn_v", "attn_output"}) {
        matrix(p + w + ".weight", n_embd, n_embd, gain(n_embd, kMatrixGain));
        vec(p + w + ".bias", n_embd, kBias);
      }
      norm(p + "attn_output_norm.weight");
      vec(p + "attn_output_norm.bias", n_embd, kBias);
      matrix(p + "ffn_up.weight", n_embd, n_ff, gain(n_embd, kMatrixGain));
      vec(p + "ffn_up.bias", n_ff, kBias);
      matrix(p + "ffn_down.weight", n_ff, n_embd, gain(n_ff, kMatrixGain));
      vec(p + "ffn_down.bias", n_embd, kBias);
      norm(p + "layer_output_norm.weight");
      vec(p + "layer_output_norm.bias", n_embd, kBias);
    }
    return specs;
  }
  matrix("token_embd.weight", n_embd, n_vocab, kEmbdStd);
  for (int il = 0; il < o.n_layer; ++il) {
    const std::string p = "blk." + std::to_string(il) + ".";
    norm(p + "attn_norm.weight");
    matrix(p + "attn_q.weight", n_embd, n_embd, gain(n_embd, kMatrixGain));
    matrix(p + "attn_k.weight", n_embd, n_embd_kv, gain(n_embd, kMatrixGain));
    matrix(p + "attn_v.weight", n_embd, n_embd_kv, gain(n_embd, kMatrixGain));
    matrix(p + "attn_output.weight", n_embd, n_embd, gain(n_embd, kMatrixGain));
    norm(p + "ffn_norm.weight");
    matrix(p + "ffn_gate.weight", n_embd, n_ff, gain(n_embd, kMatrixGain));
    matrix(p + "ffn_down.weight", n_ff, n_embd, gain(n_ff, kMatrixGain));
    matrix(p + "ffn_up.weight", n_embd, n_ff, gain(n_embd, kMatrixGain));
  }
  norm("output_norm.weight");
  matrix("output.weight", n_embd, n_vocab, gain(n_embd, kOutputGain));
  return specs;
}

bool WriteZeros(FILE* f, size_t n) {
  static constexpr char kZeros[64] = {};
  while (n > 0) {
    const size_t k = std::min(n, sizeof(kZeros));
    if (std::fwrite(kZeros, 1, k, f) != k) return false;
    n -= k;
  }
  return true;
}

// A tensor's weights come from independent streams of up to
// GenModelOptions::stream_elements elements each (whole rows): stream 0 is
// seeded with the tensor's seed, so a tensor that fits one stream (every
// tensor of the tiny, bench and bert presets) is what it always was; larger
// ones (llama3-8b's) are generated and converted by several threads. The
// file does not depend on how many.

// One stream's rows of one tensor (units are written in order), converted to the tensor's type.
struct Unit {
  const TensorSpec* spec;
  int64_t stream;
  int64_t rows;
  bool last;  // the tensor's last unit: padding follows it
  std::vector<uint8_t> bytes;
};

std::vector<Unit> PlanUnits(const std::vector<TensorSpec>& specs, int64_t stream_elements) {
  std::vector<Unit> units;
  for (const TensorSpec& spec : specs) {
    const int64_t n_per_row = spec.tensor->ne[0];
    const int64_t n_rows = ggml_nrows(spec.tensor);
    const int64_t per_stream = std::max<int64_t>(1, stream_elements / n_per_row);
    for (int64_t row = 0, k = 0; row < n_rows; row += per_stream, ++k)
      units.push_back({&spec, k, std::min(per_stream, n_rows - row), row + per_stream >= n_rows, {}});
  }
  return units;
}

// Generates and converts one unit a chunk of rows at a time (bounded float staging).
void FillUnit(Unit& u, uint64_t seed) {
  const ggml_tensor* t = u.spec->tensor;
  const int64_t n_per_row = t->ne[0];
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElements / n_per_row);
  const size_t row_size = ggml_row_size(t->type, n_per_row);
  const uint64_t tensor_seed = TensorSeed(seed, t->name);
  NormalSource normal(u.stream == 0 ? tensor_seed : Mix(tensor_seed ^ Mix(static_cast<uint64_t>(u.stream))));
  std::vector<float> src(static_cast<size_t>(std::min(u.rows, rows_per_chunk) * n_per_row));
  u.bytes.resize(static_cast<size_t>(u.rows) * row_size);
  for (int64_t row = 0; row < u.rows; row += rows_per_chunk) {
    const int64_t nr = std::min(rows_per_chunk, u.rows - row);
    const size_t n = static_cast<size_t>(nr * n_per_row);
    for (size_t i = 0; i < n; ++i) src[i] = u.spec->std_dev == 0.0f ? 1.0f : u.spec->std_dev * normal.Next();
    ggml_quantize_chunk(t->type, src.data(), u.bytes.data() + static_cast<size_t>(row) * row_size, 0, nr,
                        n_per_row, nullptr);
  }
}

// Generates every tensor's data, `threads` units at a time, and appends it in
// order, each tensor padded to the alignment gguf assumed for the offsets.
bool WriteTensorData(const std::vector<TensorSpec>& specs, const GenModelOptions& o, size_t alignment, FILE* f) {
  std::vector<Unit> units = PlanUnits(specs, o.stream_elements);
  const size_t threads = o.threads > 0 ? static_cast<size_t>(o.threads)
                                       : std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  for (size_t begin = 0; begin < units.size(); begin += threads) {
    const size_t end = std::min(units.size(), begin + threads);
    std::vector<std::thread> pool;
    for (size_t i = begin + 1; i < end; ++i) pool.emplace_back(FillUnit, std::ref(units[i]), o.seed);
    FillUnit(units[begin], o.seed);
    for (std::thread& th : pool) th.join();
    for (size_t i = begin; i < end; ++i) {
      Unit& u = units[i];
      if (std::fwrite(u.bytes.data(), 1, u.bytes.size(), f) != u.bytes.size()) return false;
      std::vector<uint8_t>().swap(u.bytes);
      if (u.last) {
        const size_t nbytes = ggml_nbytes(u.spec->tensor);
        if (!WriteZeros(f, GGML_PAD(nbytes, alignment) - nbytes)) return false;
      }
    }
  }
  return true;
}

}  // namespace

StatusOr<GenModelOptions> ModelPreset(std::string_view name) {
  GenModelOptions o;
  o.weight_type = GGML_TYPE_Q8_0;
  if (name == "tiny") {
    o.name = "kvbatch-tiny";
    o.n_embd = 64;
    o.n_layer = 2;
    o.n_head = 4;
    o.n_head_kv = 4;
    o.n_ff = 192;
    o.n_ctx_train = 4096;
  } else if (name == "bench") {
    o.name = "kvbatch-bench";
    o.n_embd = 512;
    o.n_layer = 8;
    o.n_head = 8;
    o.n_head_kv = 8;
    o.n_ff = 1376;
    o.n_ctx_train = 8192;
  } else if (name == "llama3-8b") {
    // Llama 3 8B's shape (the GPU benchmark): 8.0B parameters, Q4_K (4.6 GB).
    o.name = "kvbatch-llama3-8b";
    o.vocab_file = "ggml-vocab-llama-bpe.gguf";
    o.n_embd = 4096;
    o.n_layer = 32;
    o.n_head = 32;
    o.n_head_kv = 8;
    o.n_ff = 14336;
    o.n_ctx_train = 8192;
    o.weight_type = GGML_TYPE_Q4_K;
    o.chat_template = std::string(kLlama3Template);
  } else if (name == "bert" || name == "bert-small") {
    // bert: tests. bert-small: bge-small's shape (33M parameters), benchmarks.
    const bool small = name == "bert-small";
    o.name = small ? "kvbatch-bert-small" : "kvbatch-bert";
    o.arch = "bert";
    o.vocab_file = "ggml-vocab-bert-bge.gguf";
    o.n_embd = small ? 384 : 128;
    o.n_layer = small ? 12 : 2;
    o.n_head = small ? 12 : 4;
    o.n_head_kv = o.n_head;
    o.n_ff = small ? 1536 : 256;
    o.n_ctx_train = 512;
    o.chat_template.clear();
  } else {
    return Status::InvalidArgument("unknown model preset '" + std::string(name) +
                                   "' (expected tiny, bench, llama3-8b, bert or bert-small)");
  }
  return o;
}

Status GenerateModel(const GenModelOptions& opts) {
  if (Status s = ValidateOptions(opts); !s.ok()) return s;

  GgufPtr out(gguf_init_empty());
  int64_t n_vocab = 0;
  if (Status s = CopyTokenizer(opts.vocab_path, out.get(), &n_vocab); !s.ok()) return s;
  SetHyperparameters(opts, n_vocab, out.get());

  // Metadata only: tensor data is generated while writing, so memory stays
  // at one chunk no matter how large the model is.
  const size_t n_tensors = 8 + 20 * static_cast<size_t>(opts.n_layer);
  ggml_init_params params = {/*mem_size=*/n_tensors * ggml_tensor_overhead(),
                             /*mem_buffer=*/nullptr, /*no_alloc=*/true};
  GgmlPtr ctx(ggml_init(params));
  if (ctx == nullptr) return Status::Internal("gen_model: ggml_init failed");
  const std::vector<TensorSpec> specs = DeclareTensors(opts, n_vocab, ctx.get());
  for (const TensorSpec& spec : specs) gguf_add_tensor(out.get(), spec.tensor);

  const std::string tmp_path = opts.out_path + ".tmp";
  const auto fail = [&](const std::string& what) {
    std::remove(tmp_path.c_str());
    return Status::IoError("gen_model: " + what + " " + tmp_path + ": " + std::strerror(errno));
  };
  {
    FilePtr f(std::fopen(tmp_path.c_str(), "wb"));
    if (f == nullptr) return fail("cannot open");
    if (!gguf_write_to_file_ptr(out.get(), f.get(), /*only_meta=*/true)) {
      return fail("cannot write");
    }
    const size_t alignment = gguf_get_alignment(out.get());
    if (!WriteTensorData(specs, opts, alignment, f.get())) return fail("cannot write");
    if (std::fflush(f.get()) != 0) return fail("cannot write");
    if (std::fclose(f.release()) != 0) return fail("cannot close");
  }
  std::error_code ec;
  std::filesystem::rename(tmp_path, opts.out_path, ec);
  if (ec) {
    std::remove(tmp_path.c_str());
    return Status::IoError("gen_model: cannot rename " + tmp_path + " to " + opts.out_path + ": " +
                           ec.message());
  }
  return Status::Ok();
}

}  // namespace kvb::tools

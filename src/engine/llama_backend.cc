#include "engine/llama_backend.h"

#include <cstdio>

#include "engine/llama_sampler.h"
#include "engine/vocab_trie.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <fstream>
#include <limits>
#include <thread>

#include "ggml-backend.h"
#include "llama.h"

namespace kvb::engine {

struct LlamaBackend::BatchBuffer {
  llama_batch batch{};
  explicit BatchBuffer(int32_t n) : batch(llama_batch_init(n, 0, 1)) {}
  ~BatchBuffer() { llama_batch_free(batch); }
};

size_t AvailableRam() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  size_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024;
  return size_t{4} << 30;
}

StatusOr<std::unique_ptr<LlamaBackend>> LlamaBackend::Create(const Model* model, const ContextOptions& o) {
  std::unique_ptr<LlamaBackend> b(new LlamaBackend);
  b->model_ = model;
  b->n_vocab_ = model->n_vocab();
  ggml_backend_dev_t gpu = model->gpu();

  ggml_type kv_type = GGML_TYPE_F16;
  if (o.kv_type == "f32") kv_type = GGML_TYPE_F32;
  else if (o.kv_type == "q8_0") kv_type = GGML_TYPE_Q8_0;
  else if (o.kv_type != "f16") return Status::InvalidArgument("unknown KV cache type " + o.kv_type + " (f16, f32, q8_0)");
  // KvBytesPerCell is for f16; scale by the chosen type's bytes per element.
  const int64_t per_cell = static_cast<int64_t>(static_cast<double>(model->KvBytesPerCell()) / 2.0 *
                                                ggml_type_size(kv_type) / ggml_blck_size(kv_type));
  int32_t cells = o.kv_cells;
  if (cells <= 0) {
    // Size the cache from free memory, with a margin for compute buffers.
    size_t free = 0, total = 0;
    if (gpu) {
      ggml_backend_dev_memory(gpu, &free, &total);
      free = static_cast<size_t>(free * 0.80);
    } else {
      free = std::min(AvailableRam() / 2, size_t{8} << 30);
    }
    const int64_t by_mem = static_cast<int64_t>(free) / std::max<int64_t>(per_cell, 1);
    // On a CPU the default stays modest (32k cells): admission runs fewer
    // sequences at once when a job needs more, and RAM stays free.
    cells = static_cast<int32_t>(std::clamp<int64_t>(by_mem, 2048, gpu ? 1 << 20 : 1 << 15));
  }
  const int32_t max_seqs = o.max_seqs > 0 ? o.max_seqs : (gpu ? 128 : 32);
  // Deterministic mode keeps one more sequence id: the scheduler's retired cells.
  const int32_t extra = o.anchors + (o.deterministic ? 1 : 0);
  const int32_t n_seq_max = std::min<int32_t>(max_seqs + extra, static_cast<int32_t>(llama_max_parallel_sequences()));
  if (n_seq_max <= extra) return Status::InvalidArgument("too many anchors for the sequence limit");
  using SetDefault = void (*)(bool);
  SetDefault set_use_ref = nullptr;
  SetDefault set_batch_invariant = nullptr;  // patches/0004: the faster batch-invariant attention kernel
  if (o.deterministic) {
    if (gpu)
      return Status::InvalidArgument(
          "--deterministic runs on the CPU only: GPU kernels are not batch-invariant yet (add --gpu-layers 0)");
    ggml_backend_reg_t cpu = ggml_backend_reg_by_name("CPU");
    if (cpu) {
      set_use_ref = reinterpret_cast<SetDefault>(
          ggml_backend_reg_get_proc_address(cpu, "ggml_backend_cpu_set_default_use_ref"));
      set_batch_invariant = reinterpret_cast<SetDefault>(
          ggml_backend_reg_get_proc_address(cpu, "ggml_backend_cpu_set_default_batch_invariant"));
    }
    if (!set_use_ref)
      return Status::FailedPrecondition(
          "--deterministic needs llama.cpp with kvbatch's patches/0002 (ggml_backend_cpu_set_default_use_ref); "
          "scripts/llama.sh applies them");
  }

  bool device_sampling = gpu != nullptr;
  if (o.device_sampling == "on") device_sampling = true;
  else if (o.device_sampling == "off") device_sampling = false;
  else if (o.device_sampling != "auto")
    return Status::InvalidArgument("unknown device sampling mode " + o.device_sampling + " (auto, on, off)");

  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = static_cast<uint32_t>(cells);
  cp.n_batch = static_cast<uint32_t>(o.n_batch);
  cp.n_ubatch = static_cast<uint32_t>(o.n_ubatch > 0 ? o.n_ubatch : (gpu ? std::min(o.n_batch, 512) : o.n_batch));
  cp.n_seq_max = static_cast<uint32_t>(n_seq_max);
  const int32_t threads = o.n_threads > 0 ? o.n_threads : static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
  cp.n_threads = threads;
  cp.n_threads_batch = threads;
  cp.kv_unified = true;
  cp.flash_attn_type = o.flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
  cp.no_perf = true;
  cp.type_k = cp.type_v = kv_type;
  if (o.deterministic) {
    // The batch-invariant flash-attention kernel (or, without patches/0004,
    // the reference one) computes each row over its visible cells in cell
    // order; without flash attention, a cell's place in the cache would
    // decide its SIMD lane in the sums.
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    cp.op_offload = false;
    cp.offload_kqv = false;
  }
  // The scheduler asks for at most one output per sequence and step; the
  // device samplers' buffers are sized by it.
  if (device_sampling) cp.n_outputs_max_per_seq = 1;
  // for this context's CPU backend only
  if (set_use_ref) set_use_ref(true);
  if (set_batch_invariant) set_batch_invariant(true);
  b->ctx_ = llama_init_from_model(model->raw(), cp);
  if (set_batch_invariant) set_batch_invariant(false);
  if (set_use_ref) set_use_ref(false);
  if (!b->ctx_) {
    return Status::ResourceExhausted("llama.cpp could not create a context with " + std::to_string(cells) +
                                     " KV cells; try a smaller --kv-cells");
  }
  b->partial_forks_ = !llama_model_is_recurrent(model->raw()) && !llama_model_is_hybrid(model->raw());
  b->info_.kv_cells = static_cast<int32_t>(llama_n_ctx(b->ctx_));
  b->info_.n_seq_max = static_cast<int32_t>(llama_n_seq_max(b->ctx_));
  b->info_.max_seqs = b->info_.n_seq_max - extra;
  b->info_.n_ctx_seq = std::min(b->info_.kv_cells, model->n_ctx_train() > 0 ? model->n_ctx_train() : b->info_.kv_cells);
  b->info_.n_batch = static_cast<int32_t>(llama_n_batch(b->ctx_));
  b->info_.kv_bytes = per_cell * b->info_.kv_cells;
  b->info_.device = gpu ? ggml_backend_dev_description(gpu) : "CPU";
  b->batch_ = std::make_unique<BatchBuffer>(b->info_.n_batch);
  if (device_sampling) {
    // Chains are attached when a greedy request takes the sequence id
    // (SetDeviceGreedy), so a job without greedy requests adds nothing to the graph.
    for (int32_t s = 0; s < b->info_.n_seq_max; ++s) {
      llama_sampler* chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
      llama_sampler_chain_add(chain, llama_sampler_init_greedy());
      b->device_chains_.push_back(chain);
    }
    b->device_on_.assign(b->device_chains_.size(), 0);
  }
  return b;
}

LlamaBackend::~LlamaBackend() {
  ClearGrammars();
  batch_.reset();
  if (ctx_) llama_free(ctx_);
  for (llama_sampler* chain : device_chains_) llama_sampler_free(chain);  // after the context that used them
}

void LlamaBackend::SetDeviceGreedy(int32_t seq, bool on) {
  if (seq < 0 || seq >= static_cast<int32_t>(device_chains_.size()) || device_on_[seq] == on) return;
  // A change of the set re-plans llama.cpp's graph at the next decode (once,
  // however many changed): a job of greedy requests pays it once per id.
  if (!llama_set_sampler(ctx_, seq, on ? device_chains_[seq] : nullptr)) {
    // This backend cannot run the sampler (llama.cpp logged why): host picks for good.
    for (size_t s = 0; s < device_chains_.size(); ++s) llama_set_sampler(ctx_, static_cast<llama_seq_id>(s), nullptr);
    for (llama_sampler* chain : device_chains_) llama_sampler_free(chain);
    device_chains_.clear();
    device_on_.clear();
    return;
  }
  device_on_[seq] = on;
}

Token LlamaBackend::DeviceToken(int32_t batch_index) {
  if (device_chains_.empty()) return kNoToken;
  const llama_token t = llama_get_sampled_token_ith(ctx_, batch_index);
  return t == LLAMA_TOKEN_NULL ? kNoToken : t;
}

void LlamaBackend::CopySeq(int32_t src, int32_t dst, int32_t n) {
  llama_memory_seq_cp(llama_get_memory(ctx_), src, dst, 0, n);
}

void LlamaBackend::RemoveSeq(int32_t seq) { llama_memory_seq_rm(llama_get_memory(ctx_), seq, -1, -1); }

Status LlamaBackend::Decode(const std::vector<BatchToken>& tokens) {
  llama_batch& b = batch_->batch;
  b.n_tokens = static_cast<int32_t>(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    b.token[i] = tokens[i].token;
    b.pos[i] = tokens[i].pos;
    b.n_seq_id[i] = 1;
    b.seq_id[i][0] = tokens[i].seq;
    b.logits[i] = tokens[i].logits;
  }
  int32_t rc = 0;
  try {
    rc = llama_decode(ctx_, b);
  } catch (const std::exception& e) {
    return Status::Internal(std::string("llama_decode threw: ") + e.what());
  }
  // The outputs are read next anyway: waiting here makes the step's decode
  // time the device's (EngineStats::decode_seconds), not the host's.
  if (rc == 0) llama_synchronize(ctx_);
  if (rc == 0) return Status::Ok();
  if (rc == 1) return Status::ResourceExhausted("no KV slot for the batch");
  return Status::Internal("llama_decode failed with code " + std::to_string(rc));
}

const float* LlamaBackend::Logits(int32_t batch_index) { return llama_get_logits_ith(ctx_, batch_index); }

std::unique_ptr<Sampler> LlamaBackend::NewSampler(const SamplingParams& p) {
  if (p.grammar.empty()) return NewLlamaSampler(n_vocab_, p, nullptr);
  if (!trie_) trie_ = VocabTrie::Build(model_->vocab());
  // A job usually has one schema for thousands of requests: parse each
  // distinct grammar once and clone it per request.
  // Tool calls add a trigger set (lazy) or prefilled tokens: part of the key.
  std::string key = p.grammar;
  if (p.grammar_lazy || !p.grammar_prefill.empty()) {
    // Fields after a NUL byte, which GBNF text and patterns do not hold.
    const std::string sep(1, '\0');
    key += sep + (p.grammar_lazy ? "lazy" : "prefill");
    for (const std::string& pattern : p.grammar_trigger_patterns) key += sep + "p" + pattern;
    for (Token t : p.grammar_trigger_tokens) key += sep + "t" + std::to_string(t);
    for (Token t : p.grammar_prefill) key += sep + "f" + std::to_string(t);
  }
  auto it = grammars_.find(key);
  if (it == grammars_.end()) {
    if (grammars_.size() >= kMaxCachedGrammars) ClearGrammars();
    it = grammars_.emplace(key, NewGrammar(p)).first;
  }
  if (it->second == nullptr) return nullptr;
  return NewLlamaSampler(n_vocab_, p, it->second, trie_.get());
}

llama_sampler* LlamaBackend::NewGrammar(const SamplingParams& p) const {
  if (!p.grammar_lazy) {
    llama_sampler* g = llama_sampler_init_grammar(model_->vocab(), p.grammar.c_str(), "root");
    // The template's start of the assistant turn, which the grammar covers.
    try {
      for (Token t : p.grammar_prefill)
        if (g) llama_sampler_accept(g, t);
    } catch (const std::exception&) {
      llama_sampler_free(g);  // the grammar does not start with it: the request fails, alone
      return nullptr;
    }
    return g;
  }
  std::vector<const char*> patterns;
  for (const std::string& s : p.grammar_trigger_patterns) patterns.push_back(s.c_str());
  return llama_sampler_init_grammar_lazy_patterns(model_->vocab(), p.grammar.c_str(), "root", patterns.data(),
                                                  patterns.size(), p.grammar_trigger_tokens.data(),
                                                  p.grammar_trigger_tokens.size());
}

void LlamaBackend::ClearGrammars() {
  for (auto& [_, g] : grammars_)
    if (g) llama_sampler_free(g);
  grammars_.clear();
}

bool LlamaBackend::IsEndOfGeneration(Token t) const { return llama_vocab_is_eog(model_->vocab(), t); }

void LlamaBackend::DeviceMemory(size_t* free, size_t* total) const {
  *free = *total = 0;
  // The model's GPU, else the CPU device (host RAM).
  ggml_backend_dev_t dev = model_->gpu();
  if (dev == nullptr) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
  if (dev != nullptr) ggml_backend_dev_memory(dev, free, total);
  if (dev != nullptr && model_->gpu() == nullptr) {
    // The CPU device reports all RAM as free: what the kernel can still give is MemAvailable.
    *free = std::min(*total, AvailableRam());
  }
}

}  // namespace kvb::engine

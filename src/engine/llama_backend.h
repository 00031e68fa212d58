// The Backend on a real llama.cpp context: one unified KV cache shared by
// all sequences, so llama_memory_seq_cp shares cells instead of copying.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/backend.h"
#include "engine/model.h"

struct llama_context;
struct llama_sampler;

namespace kvb::engine {

class VocabTrie;

struct ContextOptions {
  int32_t kv_cells = 0;   // 0: sized from free memory
  int32_t max_seqs = 0;   // parallel requests; 0: chosen from the hardware
  int32_t anchors = 4;    // extra sequence ids for shared prefixes
  int32_t n_batch = 2048; // tokens per step (decode + prefill chunks)
  int32_t n_ubatch = 0;   // 0: n_batch on CPU, 512 on GPU
  int32_t n_threads = 0;  // 0: all cores
  bool flash_attn = true;
  // Batch-invariant inference: a request's answer is bitwise the same alone,
  // in any batch and order (CPU only; needs patches/0002 in llama.cpp).
  // Every op takes ggml's reference CPU kernel, and the scheduler keeps KV
  // cells in position order (SchedulerOptions::monotonic_cells).
  bool deterministic = false;
  std::string kv_type = "f16";  // K/V cache type: f16, f32 (less rounding noise), q8_0 (half the memory)
  // Greedy picks on the device (llama.cpp's backend sampling), so that a
  // step whose outputs are all greedy copies no logits back: "auto" (on a
  // GPU), "on" or "off".
  std::string device_sampling = "auto";
  // Embeddings' pooling: "" the model's own (last for a decoder that
  // declares none), or mean, last, cls.
  std::string pooling;
};

struct ContextInfo {
  int32_t kv_cells = 0;
  int32_t n_seq_max = 0;
  int32_t max_seqs = 0;
  int32_t n_ctx_seq = 0;
  int32_t n_batch = 0;
  int64_t kv_bytes = 0;
  std::string device;  // "CPU" or the GPU's description
};

// The host memory the kernel can still give (MemAvailable), in bytes; 4 GiB
// when /proc/meminfo cannot be read.
size_t AvailableRam();

class LlamaBackend : public Backend {
 public:
  static StatusOr<std::unique_ptr<LlamaBackend>> Create(const Model* model, const ContextOptions& options);
  ~LlamaBackend() override;  // defined where VocabTrie is complete

  int32_t n_seq_max() const override { return info_.n_seq_max; }
  int32_t n_cells() const override { return info_.kv_cells; }
  int32_t n_ctx_seq() const override { return info_.n_ctx_seq; }
  int32_t n_batch() const override { return info_.n_batch; }
  int32_t n_vocab() const override { return n_vocab_; }

  void CopySeq(int32_t src, int32_t dst, int32_t n) override;
  bool PartialForks() const override { return partial_forks_; }
  void RemoveSeq(int32_t seq) override;
  Status Decode(const std::vector<BatchToken>& batch) override;
  const float* Logits(int32_t batch_index) override;
  void SetDeviceGreedy(int32_t seq, bool on) override;
  bool DeviceGreedy(int32_t seq) const override {
    return seq >= 0 && seq < static_cast<int32_t>(device_on_.size()) && device_on_[seq];
  }
  Token DeviceToken(int32_t batch_index) override;
  std::unique_ptr<Sampler> NewSampler(const SamplingParams& params) override;
  bool IsEndOfGeneration(Token t) const override;
  std::string Piece(Token t) const override { return model_->Piece(t); }
  std::string SpecialPiece(Token t) const override { return model_->Piece(t, /*special=*/true); }

  const ContextInfo& info() const { return info_; }
  // Free and total memory of the device holding the KV cache (bytes).
  void DeviceMemory(size_t* free, size_t* total) const;

 private:
  LlamaBackend() = default;
  void ClearGrammars();
  static constexpr size_t kMaxCachedGrammars = 64;

  const Model* model_ = nullptr;
  // Parsed grammars by GBNF text (null: does not parse), cloned per request.
  std::unordered_map<std::string, llama_sampler*> grammars_;  // by grammar, triggers and prefill
  llama_sampler* NewGrammar(const SamplingParams& p) const;   // null when it does not parse
  std::unique_ptr<VocabTrie> trie_;  // built on the first grammar request
  llama_context* ctx_ = nullptr;
  int32_t n_vocab_ = 0;
  bool partial_forks_ = true;
  ContextInfo info_;
  struct BatchBuffer;
  std::unique_ptr<BatchBuffer> batch_;
  // Device sampling: a greedy sampler chain per request sequence id (kept
  // alive for the context), and which are attached now.
  std::vector<llama_sampler*> device_chains_;
  std::vector<char> device_on_;
};

}  // namespace kvb::engine

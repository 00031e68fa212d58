// Embeddings: a llama_context of its own (embeddings on, pooled), on a
// thread of its own, fed many inputs per llama_decode/llama_encode call.
// Created on the first embeddings request (EngineHub), beside the engine
// that generates; it shares the model's weights, not its KV cache.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "engine/llama_backend.h"
#include "engine/model.h"
#include "engine/types.h"

struct llama_context;

namespace kvb::engine {

class Embedder {
 public:
  // on_start runs on the embedder's thread before a request's first decode
  // (the crash guard's mark); on_result once per request.
  static StatusOr<std::unique_ptr<Embedder>> Start(const Model* model, const ContextOptions& options,
                                                   std::function<void(Result&&)> on_result,
                                                   std::function<void(const std::vector<uint64_t>&)> on_start);
  ~Embedder();

  void Submit(Request request);  // Request::embed non-empty
  void Cancel(uint64_t id);       // a queued request's Result comes Cancelled
  int32_t n_embd() const { return n_embd_; }
  const char* pooling() const { return pooling_name_; }

 private:
  Embedder() = default;
  void Loop();
  // One input: requests[request].embed[input].
  struct Slot {
    size_t request;
    size_t input;
  };
  // Embeds `inputs` (one call's worth) into results[request].embeddings[input].
  Status Decode(const std::vector<Slot>& inputs, const std::vector<Request>& requests, std::vector<Result>& results);

  const Model* model_ = nullptr;
  llama_context* ctx_ = nullptr;
  int32_t n_embd_ = 0;
  int32_t n_batch_ = 0;  // the longest input (one micro-batch)
  int32_t n_call_ = 0;   // tokens per call
  int32_t n_seq_max_ = 0;
  bool encoder_only_ = false;
  const char* pooling_name_ = "";
  std::function<void(Result&&)> on_result_;
  std::function<void(const std::vector<uint64_t>&)> on_start_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Request> queue_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace kvb::engine

// One engine shared by the batch driver and the online endpoints. The engine
// reports every result (and streamed text) through one callback; the hub
// routes each to the callbacks its submitter registered with the request.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine/embedder.h"
#include "engine/engine.h"
#include "engine/model.h"
#include "worker/engine_client.h"

namespace kvb::worker {

class EngineHub : public EngineClient {
 public:
  // `observe` sees every Result first, on the engine thread (metrics).
  static StatusOr<std::unique_ptr<EngineHub>> Start(const engine::Model* model, const engine::EngineOptions& options,
                                                    std::function<void(const engine::Result&)> observe = nullptr);

  // A fresh engine::Request::id.
  uint64_t NextId() { return next_id_->fetch_add(1); }
  // Hubs of one process that share a router draw ids from one counter, so
  // an id names one request across all of them (set before any request).
  void ShareIds(std::shared_ptr<std::atomic<uint64_t>> ids) { next_id_ = std::move(ids); }
  // Requests submitted and not yet answered (batch, online and embeddings).
  size_t pending() {
    std::lock_guard<std::mutex> lock(mu_);
    return pending_.size();
  }
  // `urgent`: interactive traffic, queued ahead of batch work.
  void Submit(engine::Request request, RequestCallbacks callbacks, bool urgent);
  // Queued together, so their shared prefixes are found (Engine::SubmitAll).
  void SubmitAll(std::vector<std::pair<engine::Request, RequestCallbacks>> requests) override;
  // The request's on_result still comes (status Cancelled, unless it finished first).
  void Cancel(uint64_t id) override;
  std::variant<engine::Request, batch::RequestFailure> Prepare(batch::ParsedRequest&& request,
                                                               int32_t default_max_tokens) override {
    return batch::PrepareRequest(std::move(request), *model_, default_max_tokens, NextId());
  }
  std::string model_name() const override { return model_->name(); }
  void SetAdmitFlush(std::function<void()> flush) override {
    std::lock_guard<std::mutex> lock(mu_);
    admit_flush_ = std::move(flush);
  }
  const engine::Model* model() const { return model_; }

  // The engine's counters, with the embedder's answered requests and their
  // tokens added to requests_done, prompt_tokens and prefill_tokens.
  engine::EngineStats Stats() const {
    engine::EngineStats s = engine_->Stats();
    const int64_t tokens = embed_tokens_.load();
    s.requests_done += embed_done_.load();
    s.prompt_tokens += tokens;
    s.prefill_tokens += tokens;
    return s;
  }
  // Stops the engine (an idle one, to unload it); Stats() is final after.
  void StopEngine() { engine_->Stop(); }
  const engine::ContextInfo& info() const { return engine_->info(); }
  void DeviceMemory(size_t* free, size_t* total) const { engine_->DeviceMemory(free, total); }
  int32_t max_seqs() const override;

 private:
  EngineHub() = default;
  void OnDelta(uint64_t id, int32_t choice, std::string_view text);
  void OnResult(engine::Result&& r);
  void OnAdmit(const std::vector<uint64_t>& ids);
  // Embeddings requests go to the embedder, made on the first one.
  bool RouteEmbedding(engine::Request& request);


  const engine::Model* model_ = nullptr;
  std::shared_ptr<std::atomic<uint64_t>> next_id_ = std::make_shared<std::atomic<uint64_t>>(1);
  std::mutex mu_;
  std::unordered_map<uint64_t, RequestCallbacks> pending_;
  std::function<void()> admit_flush_;
  std::function<void(const engine::Result&)> observe_;
  engine::ContextOptions context_options_;
  std::mutex embedder_mu_;
  std::atomic<int64_t> embed_done_{0}, embed_tokens_{0};  // embeddings answered, and their tokens
  std::unique_ptr<engine::Embedder> embedder_;  // stopped before the map goes
  std::unique_ptr<engine::Engine> engine_;      // last: stopped before the map goes
};

}  // namespace kvb::worker

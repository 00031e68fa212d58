// One engine shared by the batch worker and the online endpoints. The engine
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

#include "engine/engine.h"

namespace kvb::worker {

struct RequestCallbacks {
  // Both run on the engine thread: keep them short (hand off to a queue).
  std::function<void(int32_t choice, std::string_view text)> on_delta;  // streaming requests only
  std::function<void(engine::Result&&)> on_result;      // exactly once per request
  std::function<void()> on_admit;  // the engine starts running it (may come again after a requeue)
};

class EngineHub {
 public:
  static StatusOr<std::unique_ptr<EngineHub>> Start(const engine::Model* model, const engine::EngineOptions& options);

  // A fresh engine::Request::id.
  uint64_t NextId() { return next_id_.fetch_add(1); }
  // `urgent`: interactive traffic, queued ahead of batch work.
  void Submit(engine::Request request, RequestCallbacks callbacks, bool urgent);
  // Queued together, so their shared prefixes are found (Engine::SubmitAll).
  void SubmitAll(std::vector<std::pair<engine::Request, RequestCallbacks>> requests);
  // The request's on_result still comes (status Cancelled, unless it finished first).
  void Cancel(uint64_t id) { engine_->Cancel(id); }

  engine::EngineStats Stats() const { return engine_->Stats(); }
  const engine::ContextInfo& info() const { return engine_->info(); }
  void DeviceMemory(size_t* free, size_t* total) const { engine_->DeviceMemory(free, total); }
  int32_t max_seqs() const;

 private:
  EngineHub() = default;
  void OnDelta(uint64_t id, int32_t choice, std::string_view text);
  void OnResult(engine::Result&& r);
  void OnAdmit(uint64_t id);

  std::atomic<uint64_t> next_id_{1};
  std::mutex mu_;
  std::unordered_map<uint64_t, RequestCallbacks> pending_;
  std::unique_ptr<engine::Engine> engine_;  // last: stopped before the map goes
};

}  // namespace kvb::worker

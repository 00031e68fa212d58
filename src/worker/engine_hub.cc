#include "worker/engine_hub.h"

namespace kvb::worker {

StatusOr<std::unique_ptr<EngineHub>> EngineHub::Start(const engine::Model* model,
                                                      const engine::EngineOptions& options,
                                                      std::function<void(const engine::Result&)> observe) {
  std::unique_ptr<EngineHub> hub(new EngineHub());
  EngineHub* h = hub.get();
  h->model_ = model;
  h->observe_ = std::move(observe);
  auto engine = engine::Engine::Start(
      model, options, [h](engine::Result&& r) { h->OnResult(std::move(r)); },
      [h](uint64_t id, int32_t choice, std::string_view text) { h->OnDelta(id, choice, text); },
      [h](const std::vector<uint64_t>& ids) { h->OnAdmit(ids); });
  if (!engine.ok()) return engine.status();
  hub->engine_ = std::move(engine).value();
  return hub;
}

int32_t EngineHub::max_seqs() const { return engine_->info().max_seqs; }

void EngineHub::Submit(engine::Request request, RequestCallbacks callbacks, bool urgent) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_[request.id] = std::move(callbacks);
  }
  engine_->Submit(std::move(request), urgent);
}

void EngineHub::SubmitAll(std::vector<std::pair<engine::Request, RequestCallbacks>> requests) {
  std::vector<engine::Request> batch;
  batch.reserve(requests.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [r, cb] : requests) {
      pending_[r.id] = std::move(cb);
      batch.push_back(std::move(r));
    }
  }
  engine_->SubmitAll(std::move(batch));
}

void EngineHub::OnDelta(uint64_t id, int32_t choice, std::string_view text) {
  std::function<void(int32_t, std::string_view)> fn;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_.find(id);
    if (it == pending_.end()) return;
    fn = it->second.on_delta;
  }
  if (fn) fn(choice, text);
}

void EngineHub::OnAdmit(const std::vector<uint64_t>& ids) {
  std::vector<std::function<void()>> fns;
  std::function<void()> flush;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (uint64_t id : ids) {
      auto it = pending_.find(id);
      if (it != pending_.end() && it->second.on_admit) fns.push_back(it->second.on_admit);
    }
    flush = admit_flush_;
  }
  if (fns.empty()) return;
  for (auto& fn : fns) fn();
  if (flush) flush();
}

void EngineHub::OnResult(engine::Result&& r) {
  if (observe_) observe_(r);
  RequestCallbacks cb;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_.find(r.id);
    if (it == pending_.end()) return;
    cb = std::move(it->second);
    pending_.erase(it);
  }
  if (cb.on_result) cb.on_result(std::move(r));
}

}  // namespace kvb::worker

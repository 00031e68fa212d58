#include "worker/engine_hub.h"

namespace kvb::worker {

StatusOr<std::unique_ptr<EngineHub>> EngineHub::Start(const engine::Model* model,
                                                      const engine::EngineOptions& options,
                                                      std::function<void(const engine::Result&)> observe) {
  std::unique_ptr<EngineHub> hub(new EngineHub());
  EngineHub* h = hub.get();
  h->model_ = model;
  h->observe_ = std::move(observe);
  h->context_options_ = options.context;
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
  if (RouteEmbedding(request)) return;
  engine_->Submit(std::move(request), urgent);
}

void EngineHub::Cancel(uint64_t id) {
  engine_->Cancel(id);
  std::lock_guard<std::mutex> lock(embedder_mu_);
  if (embedder_) embedder_->Cancel(id);
}

bool EngineHub::RouteEmbedding(engine::Request& request) {
  if (request.embed.empty()) return false;
  std::unique_lock<std::mutex> lock(embedder_mu_);
  if (!embedder_) {
    auto e = engine::Embedder::Start(
        model_, context_options_, [this](engine::Result&& r) { OnResult(std::move(r)); },
        [this](const std::vector<uint64_t>& ids) { OnAdmit(ids); });
    if (!e.ok()) {
      lock.unlock();
      engine::Result r;
      r.id = request.id;
      r.status = e.status();
      OnResult(std::move(r));
      return true;
    }
    embedder_ = std::move(e).value();
  }
  embedder_->Submit(std::move(request));
  return true;
}

void EngineHub::SubmitAll(std::vector<std::pair<engine::Request, RequestCallbacks>> requests) {
  std::vector<engine::Request> batch;
  batch.reserve(requests.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [r, cb] : requests) pending_[r.id] = std::move(cb);
  }
  for (auto& [r, cb] : requests)
    if (!RouteEmbedding(r)) batch.push_back(std::move(r));
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
  if (r.status.ok() && !r.embeddings.empty()) {
    embed_done_.fetch_add(1);
    embed_tokens_.fetch_add(r.prompt_tokens);
  }
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

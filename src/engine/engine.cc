#include "engine/engine.h"

#include <exception>

namespace kvb::engine {

StatusOr<std::unique_ptr<Engine>> Engine::Start(const Model* model, const EngineOptions& options,
                                                std::function<void(Result&&)> on_result,
                                                Scheduler::DeltaFn on_delta, Scheduler::AdmitFn on_admit) {
  auto backend = LlamaBackend::Create(model, options.context);
  if (!backend.ok()) return backend.status();
  std::unique_ptr<Engine> e(new Engine);
  e->backend_ = std::move(backend).value();
  e->info_ = e->backend_->info();
  e->on_step_ = options.on_step;
  SchedulerOptions so = options.scheduler;
  so.max_anchors = options.context.anchors;
  so.monotonic_cells = options.context.deterministic;
  e->scheduler_ = std::make_unique<Scheduler>(e->backend_.get(), so, std::move(on_result), std::move(on_delta),
                                              std::move(on_admit));
  e->stats_ = e->scheduler_->stats();  // cells_total from the start
  e->thread_ = std::thread([raw = e.get()] { raw->Loop(); });
  return e;
}

Engine::~Engine() { Stop(); }

void Engine::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Engine::Submit(Request request, bool urgent) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (request.submitted_ns == 0) request.submitted_ns = SteadyNowNs();
    inbox_.emplace_back(std::move(request), urgent);
  }
  cv_.notify_all();
}

void Engine::SubmitAll(std::vector<Request> requests) {
  if (requests.empty()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t now = SteadyNowNs();
    for (auto& r : requests) {
      if (r.submitted_ns == 0) r.submitted_ns = now;
      inbox_.emplace_back(std::move(r), false);
    }
  }
  cv_.notify_all();
}

void Engine::Cancel(uint64_t id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancels_.push_back(id);
  }
  cv_.notify_all();
}

EngineStats Engine::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void Engine::Loop() {
  std::vector<std::pair<Request, bool>> incoming;
  std::vector<uint64_t> cancels;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !inbox_.empty() || !cancels_.empty() || !scheduler_->Idle(); });
      if (stop_) {
        stats_ = scheduler_->stats();  // final: what Stop()'s caller reads
        return;
      }
      incoming.swap(inbox_);
      cancels.swap(cancels_);
    }
    for (auto& [r, urgent] : incoming) scheduler_->Submit(std::move(r), urgent);
    incoming.clear();
    for (uint64_t id : cancels) scheduler_->Cancel(id);
    cancels.clear();
    const int64_t steps = scheduler_->stats().steps;
    const int64_t start = SteadyNowNs();
    try {
      scheduler_->Step();
    } catch (const std::exception& e) {
      scheduler_->RecoverFromException(e.what());
    }
    const double seconds = static_cast<double>(SteadyNowNs() - start) * 1e-9;
    if (scheduler_->stats().steps != steps) {
      scheduler_->RecordStepTime(seconds);
      if (on_step_) {
        StepInfo step = scheduler_->last_step();
        step.seconds = seconds;
        on_step_(step);
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    stats_ = scheduler_->stats();
  }
}

}  // namespace kvb::engine

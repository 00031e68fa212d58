// The engine: one thread owns the llama_context and runs the Scheduler;
// everything else talks to it through a queue (Submit) and a callback.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/llama_backend.h"
#include "engine/model.h"
#include "engine/scheduler.h"

namespace kvb::engine {

struct EngineOptions {
  ContextOptions context;
  SchedulerOptions scheduler;
  // After each step that decoded a batch, on the engine thread (metrics).
  std::function<void(const StepInfo&)> on_step;
};

class Engine {
 public:
  // `on_result` and `on_delta` (streaming requests' text, see
  // Scheduler::DeltaFn) run on the engine thread; keep them short.
  // `on_admit` (Scheduler::AdmitFn) runs on the engine thread too.
  static StatusOr<std::unique_ptr<Engine>> Start(const Model* model, const EngineOptions& options,
                                                 std::function<void(Result&&)> on_result,
                                                 Scheduler::DeltaFn on_delta = nullptr,
                                                 Scheduler::AdmitFn on_admit = nullptr);
  ~Engine();  // stops the thread; unfinished requests are dropped
  // Stops the thread now (the destructor's work); Stats() then stays valid
  // and final. Nothing may be submitted after.
  void Stop();

  void Submit(Request request, bool urgent = false);  // thread-safe
  // Queues several requests at once: the scheduler sees them together, so
  // the prefixes they share are found regardless of thread timing.
  void SubmitAll(std::vector<Request> requests);
  // Drops a queued or running request (thread-safe); its Result comes with
  // status Cancelled, unless it finished first.
  void Cancel(uint64_t id);
  EngineStats Stats() const;                           // a snapshot, thread-safe
  const ContextInfo& info() const { return info_; }
  void DeviceMemory(size_t* free, size_t* total) const { backend_->DeviceMemory(free, total); }

 private:
  Engine() = default;
  void Loop();

  std::unique_ptr<LlamaBackend> backend_;
  std::unique_ptr<Scheduler> scheduler_;
  ContextInfo info_;
  std::function<void(const StepInfo&)> on_step_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<Request, bool>> inbox_;
  std::vector<uint64_t> cancels_;
  EngineStats stats_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace kvb::engine

// Several models in one process (`-m A -m B ...`): each request goes to the
// model its `model` field names. The first model loads at start (so a bad
// path fails at once); the others load on first use. When loading one would
// not fit (the device's free memory, or --max-models), the least recently
// used idle model is unloaded first; when every loaded model is busy, the
// load waits for one to finish its requests.
//
// As an EngineClient it feeds the batch driver: Prepare picks the model,
// SubmitAll hands each request to its model's engine, Cancel finds it again.
// Online routes use Acquire directly.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/engine.h"
#include "engine/model.h"
#include "worker/engine_client.h"
#include "worker/engine_hub.h"

namespace kvb::worker {

struct ModelSpec {
  std::string name;  // what requests and /v1/models call it
  std::string path;
  std::string source = "path";  // models/model_store.h: where -m found it
};

struct RouterOptions {
  int32_t n_gpu_layers = -1;
  engine::EngineOptions engine;
  // Loaded at once at most (0: as many as the device's memory holds).
  int32_t max_loaded = 0;
  // Metrics hooks, by model index (the spec's position).
  std::function<void(int index, const engine::StepInfo&)> on_step;
  std::function<void(int index, const engine::Result&)> observe;
  // What a load failure says: the failure, and why for this model (the CLI
  // gives models::ExplainLoadFailure); default: the failure as is.
  std::function<std::string(const ModelSpec&, const std::string& failure)> explain_load_failure;
  // Free memory of the device models load on, in bytes (tests fake it);
  // default: the first GPU's, else the host's available memory.
  std::function<uint64_t()> free_memory;
};

class ModelRouter : public EngineClient {
 public:
  static StatusOr<std::unique_ptr<ModelRouter>> Start(std::vector<ModelSpec> specs, RouterOptions options);
  ~ModelRouter() override;

  const std::vector<ModelSpec>& specs() const { return specs_; }
  std::string Names() const;  // "a, b, c": every model's name, in order
  // The spec a request's `model` names: the only one when there is one
  // model (any value works, as with a single -m), else an exact name. -1: none.
  int Find(const std::string& model) const;

  // The engine of the model `model` names, loaded if need be. Holding the
  // pointer keeps it loaded for as long as it is held. Else the request's
  // answer: 404 model_not_found for a name no -m gave, 503 model_not_loaded
  // when loading failed, and (only without `wait`, which waits for a busy
  // model to go idle first) kModelBusy.
  std::variant<std::shared_ptr<EngineHub>, batch::RequestFailure> Acquire(const std::string& model,
                                                                         bool wait = true);

  // EngineClient.
  std::variant<engine::Request, batch::RequestFailure> Prepare(batch::ParsedRequest&& request,
                                                               int32_t default_max_tokens) override;
  void SubmitAll(std::vector<std::pair<engine::Request, RequestCallbacks>> requests) override;
  void Cancel(uint64_t id) override;
  void SetAdmitFlush(std::function<void()> flush) override;
  int32_t max_seqs() const override { return max_seqs_; }
  std::string model_name() const override { return specs_.front().name; }
  std::string ModelOf(uint64_t id) const override;

  // For /metrics and /v1/engines: the model's engine while it is loaded, else null.
  std::shared_ptr<EngineHub> LoadedHub(int index);
  // Every model's engine counters summed (unloaded ones' included), the
  // gauges of those loaded now: `kvbatch run`'s progress and summary.
  engine::EngineStats Stats();
  int64_t loads() const { return loads_.load(); }
  int64_t unloads() const { return unloads_.load(); }

 private:
  struct Loaded;
  ModelRouter() = default;
  // Under mu_: loads spec `index`, unloading idle ones first when needed.
  // Status::Unavailable: `wait` is false and only a busy model could make room.
  Status LoadLocked(int index, std::unique_lock<std::mutex>& lock, bool wait);
  // Acquire for spec `index` (-1: none; `model` is the name asked for).
  std::variant<std::shared_ptr<EngineHub>, batch::RequestFailure> AcquireAt(int index, const std::string& model,
                                                                           bool wait);
  bool Fits(const ModelSpec& spec) const;

  std::vector<ModelSpec> specs_;
  RouterOptions options_;
  int32_t max_seqs_ = 0;
  std::shared_ptr<std::atomic<uint64_t>> ids_ = std::make_shared<std::atomic<uint64_t>>(1);
  std::atomic<int64_t> loads_{0}, unloads_{0};

  mutable std::mutex mu_;
  std::condition_variable idle_cv_;
  std::vector<std::shared_ptr<Loaded>> loaded_;   // by spec index; null: not loaded
  std::vector<int64_t> last_use_;                 // by spec index (a use counter)
  int64_t uses_ = 0;
  bool loading_ = false;
  std::unordered_map<uint64_t, int> routes_;      // request id -> spec index (batch requests in flight)
  std::function<void()> admit_flush_;
  engine::EngineStats retired_;  // counters of engines unloaded so far
};

}  // namespace kvb::worker

// The batch worker of `kvbatch serve`: takes batches from the store and
// drives them through their lifecycle (DESIGN.md section 3):
//
//   validating -> failed | in_progress -> finalizing -> completed
//   in_progress -> cancelling -> cancelled;  in_progress -> expired
//
// It validates input files, feeds pending requests (highest priority batch
// first, requests sharing a prefix together) into the shared engine, commits
// results to the store in group commits as they finish, and writes the output
// and error files at the end. All state that matters is in the store: after a
// crash a new worker continues every batch from its committed results.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "batch/input_file.h"
#include "batch/request.h"
#include "engine/model.h"
#include "store/store.h"
#include "worker/engine_hub.h"

namespace kvb::worker {

struct WorkerOptions {
  std::string files_dir;  // where output and error files are written
  // max_tokens for requests that give none (0: until the context is full).
  int32_t default_max_tokens = 0;
  // Batch requests in the engine at once (0: 2 x max sequences + 64). Bounds
  // memory and how long an interactive request waits behind batch work.
  int32_t window = 0;
  std::chrono::milliseconds commit_interval{200};  // group commit period
  size_t max_listed_errors = 1000;                 // errors.data[] entries kept per batch
};

// Live figures for a running batch (the API's progress extension).
struct BatchProgress {
  double requests_per_second = 0;
  double tokens_per_second = 0;  // output tokens
  double eta_seconds = -1;       // -1: not known yet
  int64_t in_flight = 0;
};

class BatchWorker {
 public:
  BatchWorker(store::Store* store, EngineHub* hub, const engine::Model* model, WorkerOptions options);
  ~BatchWorker();

  void Start();
  // Commits what has finished and stops. Requests still in the engine are
  // left pending in the store: they run again on the next start.
  void Stop();
  // A batch was created: look at the store now rather than at the next tick.
  void Wake();

  // Batch changes requested through the API. They read-modify-write the
  // batch under the same lock as the worker's own writes, so neither side
  // overwrites the other's change. FailedPrecondition when the batch's
  // status does not allow it (e.g. cancelling a completed batch).
  StatusOr<store::BatchRecord> Cancel(const std::string& id);
  StatusOr<store::BatchRecord> SetPaused(const std::string& id, bool paused);

  std::optional<BatchProgress> Progress(const std::string& id) const;

 private:
  struct Active;
  struct Done {
    std::string batch_id;
    int64_t line;
    std::string custom_id;
    engine::Result result;
  };

  void Loop();
  void Refresh();
  void Validate(store::BatchRecord rec);
  void Activate(const store::BatchRecord& rec);
  void Feed();
  void Collect();
  void CommitOutcomes(bool force);
  void FinishIdle();
  Status Finalize(Active& a);
  Status WriteResultFiles(Active& a, std::vector<store::FileRecord>& files);
  void Stopping(Active& a, const char* code);
  store::RequestOutcome OutcomeFor(Active& a, Done& d);
  int64_t Now() const;

  store::Store* store_;
  EngineHub* hub_;
  const engine::Model* model_;
  WorkerOptions options_;

  std::mutex record_mu_;  // serializes batch record read-modify-writes

  mutable std::mutex mu_;  // guards everything below
  std::condition_variable cv_;
  bool stop_ = false;
  bool wake_ = false;
  std::vector<Done> done_;  // results from the engine, not yet turned into outcomes
  std::map<std::string, std::unique_ptr<Active>> active_;
  std::map<std::string, BatchProgress> progress_;

  // Worker thread only.
  std::unordered_map<uint64_t, std::pair<std::string, int64_t>> inflight_;  // engine id -> batch, line
  std::map<std::string, std::vector<store::RequestOutcome>> outcomes_;   // not yet committed
  std::chrono::steady_clock::time_point last_commit_;
  std::chrono::steady_clock::time_point last_refresh_;
  std::thread thread_;
};

}  // namespace kvb::worker

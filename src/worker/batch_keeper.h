// The batch lifecycle work every node does (API nodes without a model too):
// validating new batches, ending finished, cancelled and expired ones, and
// the progress figures of the batch object. Each step is guarded by the
// batch's task lease and applied as a compare-and-set (store.h), so any
// number of nodes can run a keeper on one store.
//
//   validating: ValidateBatchInput -> AddRequests (in_progress) | FailBatch
//   in_progress, all rows answered: -> finalizing -> files -> completed
//   cancelling, or in_progress past expires_at: once no chunk is leased
//     (holders stop within a poll; a dead holder's lease runs out), every
//     unanswered row fails (batch_cancelled / batch_expired), files are
//     written, -> cancelled / expired
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>

#include "store/store.h"
#include "worker/driver_options.h"

namespace kvb::worker {

class BatchKeeper {
 public:
  BatchKeeper(store::Store* store, DriverOptions options);
  ~BatchKeeper();

  void Start();
  void Stop();
  void Wake();  // a batch was created or changed: look now
  // One pass over the unfinished batches (what the thread does each tick).
  void Tick();

  std::optional<BatchProgress> Progress(const std::string& id) const;

 private:
  void Loop();
  // Each of these runs under the batch's task lease (Leased).
  void Validate(const store::BatchRecord& rec);
  void End(const store::BatchRecord& rec, store::BatchStatus to);  // files, then the final status
  void Stop(const store::BatchRecord& rec, const char* code, store::BatchStatus to);
  void Sample(const store::BatchRecord& rec);
  bool Lease(const std::string& id);
  void Leased(const std::string& id, const std::function<void()>& task);

  store::Store* store_;
  DriverOptions options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool wake_ = false;
  // Per batch: (time, rows answered, output tokens) samples of the last ~30 s.
  std::map<std::string, std::deque<std::tuple<std::chrono::steady_clock::time_point, int64_t, int64_t>>> samples_;
  std::map<std::string, BatchProgress> progress_;
  std::thread thread_;
};

const char* StoppedMessage(std::string_view code, bool ran);

}  // namespace kvb::worker

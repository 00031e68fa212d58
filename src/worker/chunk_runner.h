// The batch work of a node with an engine: claims chunks of requests from the
// store (preferring prefix groups its engine has just run), feeds their rows
// into the engine, and commits the answers in fenced group commits while its
// lease holds (store.h). A chunk whose lease was lost (this node paused or
// cut off past its lease, another node took it over) is dropped: whatever it
// had not committed is not committed by this node, so no row is answered
// twice. Requests that crash the process are found through the in-flight
// marks (DESIGN.md section 5); a chunk reclaimed `max_reclaims` times fails
// its unanswered rows instead of looping.
//
// One thread; the engine's callbacks only hand results over to it.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "batch/input_file.h"
#include "batch/request.h"
#include "store/store.h"
#include "worker/driver_options.h"
#include "worker/engine_client.h"

namespace kvb::worker {

// What a runner has done (for logs, tests and the scale-out report).
struct RunnerStats {
  int64_t chunks_claimed = 0;
  int64_t chunks_lost = 0;      // lease taken over before all was committed
  int64_t results_committed = 0;
  int64_t results_dropped = 0;  // computed, but the lease was lost first
  int64_t distinct_prefixes = 0;  // prefix groups of the chunks it claimed
  std::map<std::string, int64_t> errors_by_code;  // failed lines committed, by error code
};

class ChunkRunner {
 public:
  ChunkRunner(store::Store* store, EngineClient* engine, DriverOptions options);
  ~ChunkRunner();

  void Start();
  // Commits what has finished and gives its chunks back (their unanswered
  // rows are claimed again by any node). Requests still in the engine are
  // abandoned: their answers, if they come, are not committed.
  void Stop();
  void Wake();  // new work may be claimable

  // The batch's requests in this engine or answered and not committed yet.
  int64_t InFlight(const std::string& batch_id) const;
  RunnerStats Stats() const;

 private:
  struct Held;
  struct Batch;
  struct Done {
    std::string batch_id;
    int64_t chunk;
    int64_t line;
    batch::Endpoint endpoint;  // the line's own url
    engine::Result result;
    std::string model;  // the model that answered (EngineClient::ModelOf)
  };
  using Key = std::pair<std::string, int64_t>;  // batch, chunk

  void Loop();
  void FlushMarks();
  void Collect();
  void Commit(bool force);
  void Refresh();
  void Renew();
  void Feed();
  bool Claim();
  void Retire();
  void Drop(Held& h, const Status& why);
  void Settled(const std::string& batch_id, int64_t n);
  Batch* BatchFor(const std::string& id);
  store::RequestOutcome OutcomeFor(const Held& h, const Batch& b, Done& d) const;

  store::Store* store_;
  EngineClient* engine_;
  DriverOptions options_;

  mutable std::mutex mu_;  // guards the fields up to thread_
  std::condition_variable cv_;
  bool stop_ = false;
  bool wake_ = false;
  std::vector<Done> done_;
  std::vector<std::pair<std::string, int64_t>> marks_;    // admitted, not yet recorded (batch, line)
  std::vector<std::pair<std::string, int64_t>> unmarks_;  // finished since the last flush
  std::map<std::string, int64_t> in_flight_by_batch_;
  RunnerStats stats_;
  std::thread thread_;

  // Runner thread only.
  std::map<Key, std::unique_ptr<Held>> held_;  // claimed chunks, by claim order within a batch
  std::vector<Key> order_;                     // claim order
  std::map<std::string, std::unique_ptr<Batch>> batches_;
  std::unordered_map<uint64_t, Key> inflight_;  // engine request id -> its chunk
  std::deque<uint64_t> resident_;               // prefix hashes of recent chunks, newest last
  std::chrono::steady_clock::time_point last_commit_, last_refresh_, next_claim_;
};

}  // namespace kvb::worker

// The one batch driver of `kvbatch serve` and `kvbatch worker` (DESIGN.md
// section 3): every node runs a BatchKeeper (validation, finalization,
// cancel and expiry, progress); a node with an engine also runs a
// ChunkRunner (claims chunks, runs them, commits fenced results). All state
// that matters is in the store, so a node that dies loses nothing: its
// leases run out and any node carries on.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "store/store.h"
#include "worker/batch_keeper.h"
#include "worker/chunk_runner.h"
#include "worker/driver_options.h"
#include "worker/engine_client.h"

namespace kvb::worker {

class BatchDriver {
 public:
  // `engine` may be null: an API node that only keeps batches.
  BatchDriver(store::Store* store, EngineClient* engine, DriverOptions options) {
    if (options.owner.empty()) options.owner = NewOwnerName();
    keeper_ = std::make_unique<BatchKeeper>(store, options);
    if (engine != nullptr) runner_ = std::make_unique<ChunkRunner>(store, engine, options);
  }
  ~BatchDriver() { Stop(); }

  void Start() {
    if (runner_) runner_->Start();
    keeper_->Start();
  }
  // Commits what has finished and gives claimed chunks back.
  void Stop() {
    keeper_->Stop();
    if (runner_) runner_->Stop();
  }
  void Wake() {
    keeper_->Wake();
    if (runner_) runner_->Wake();
  }
  std::optional<BatchProgress> Progress(const std::string& id) const {
    auto p = keeper_->Progress(id);
    if (p && runner_) p->in_flight = runner_->InFlight(id);
    return p;
  }
  bool has_engine() const { return runner_ != nullptr; }
  std::optional<RunnerStats> Stats() const {
    if (!runner_) return std::nullopt;
    return runner_->Stats();
  }

 private:
  std::unique_ptr<BatchKeeper> keeper_;
  std::unique_ptr<ChunkRunner> runner_;
};

}  // namespace kvb::worker

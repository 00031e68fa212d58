// The one batch driver of `kvbatch serve` and `kvbatch worker` (DESIGN.md
// section 3): every node runs a BatchKeeper (validation, finalization,
// cancel and expiry, progress); a node with engines also runs one
// ChunkRunner per engine (claims chunks, runs them, commits fenced results):
// with several devices (`--devices`), each engine claims its own chunks, as
// separate workers would. All state that matters is in the store, so a node
// that dies loses nothing: its leases run out and any node carries on.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "store/store.h"
#include "worker/batch_keeper.h"
#include "worker/chunk_runner.h"
#include "worker/driver_options.h"
#include "worker/engine_client.h"

namespace kvb::worker {

class BatchDriver {
 public:
  // No engines: an API node that only keeps batches.
  BatchDriver(store::Store* store, std::vector<EngineClient*> engines, DriverOptions options) {
    if (options.owner.empty()) options.owner = NewOwnerName();
    keeper_ = std::make_unique<BatchKeeper>(store, options);
    for (size_t i = 0; i < engines.size(); ++i) {
      DriverOptions o = options;
      if (engines.size() > 1) o.owner += "/" + std::to_string(i);  // each engine holds its own leases
      runners_.push_back(std::make_unique<ChunkRunner>(store, engines[i], o));
    }
  }
  // One engine, or none (null).
  BatchDriver(store::Store* store, EngineClient* engine, DriverOptions options)
      : BatchDriver(store, engine ? std::vector<EngineClient*>{engine} : std::vector<EngineClient*>{},
                    std::move(options)) {}
  ~BatchDriver() { Stop(); }

  void Start() {
    for (auto& r : runners_) r->Start();
    keeper_->Start();
  }
  // Commits what has finished and gives claimed chunks back.
  void Stop() {
    keeper_->Stop();
    for (auto& r : runners_) r->Stop();
  }
  void Wake() {
    keeper_->Wake();
    for (auto& r : runners_) r->Wake();
  }
  std::optional<BatchProgress> Progress(const std::string& id) const {
    auto p = keeper_->Progress(id);
    if (p)
      for (const auto& r : runners_) p->in_flight += r->InFlight(id);
    return p;
  }
  bool has_engine() const { return !runners_.empty(); }
  // Summed over the engines; std::nullopt without one.
  std::optional<RunnerStats> Stats() const {
    if (runners_.empty()) return std::nullopt;
    RunnerStats sum;
    for (const auto& r : runners_) {
      RunnerStats s = r->Stats();
      sum.chunks_claimed += s.chunks_claimed;
      sum.chunks_lost += s.chunks_lost;
      sum.results_committed += s.results_committed;
      sum.results_dropped += s.results_dropped;
      sum.distinct_prefixes += s.distinct_prefixes;
      for (const auto& [code, n] : s.errors_by_code) sum.errors_by_code[code] += n;
    }
    return sum;
  }
  // Per engine, in --devices order.
  std::vector<RunnerStats> EngineStats() const {
    std::vector<RunnerStats> out;
    for (const auto& r : runners_) out.push_back(r->Stats());
    return out;
  }

 private:
  std::unique_ptr<BatchKeeper> keeper_;
  std::vector<std::unique_ptr<ChunkRunner>> runners_;
};

}  // namespace kvb::worker

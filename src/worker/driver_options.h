// Options and shared small types of the batch driver (batch_keeper.h,
// chunk_runner.h, batch_driver.h).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace kvb::worker {

struct DriverOptions {
  // This node's name in leases (host:pid:random when empty).
  std::string owner;
  // Local scratch: copies of input files kept in the store (PostgreSQL) and
  // result files while they are written.
  std::string cache_dir;
  // max_tokens for requests that give none (0: until the context is full).
  int32_t default_max_tokens = 0;
  // Batch requests in this node's engine at once (0: 2 x max sequences + 64).
  // Bounds memory and how long an interactive request waits behind batch work.
  int32_t window = 0;
  // Rows per chunk at validation: the unit a worker claims.
  int32_t chunk_rows = 64;
  // A chunk's lease: renewed as its results commit; a holder silent for this
  // long is presumed dead and its chunk is claimed again.
  int64_t lease_ms = 30'000;
  // A chunk claimed again after this many expired leases fails its
  // unanswered rows (request_crashed_engine) instead of looping.
  int32_t max_reclaims = 3;
  std::chrono::milliseconds commit_interval{200};  // group commit period
  std::chrono::milliseconds poll_interval{250};    // how often the store is looked at when idle
  size_t max_listed_errors = 1000;                 // errors.data[] entries kept per batch
};

// Live figures for a running batch (the API's progress extension), from the
// batch's committed counts as this node sees them, so they hold across nodes.
struct BatchProgress {
  double requests_per_second = 0;
  double tokens_per_second = 0;  // output tokens
  double eta_seconds = -1;       // -1: not known yet
  int64_t in_flight = 0;         // in this node's engine
};

// A fresh owner name: host:pid:random.
std::string NewOwnerName();

}  // namespace kvb::worker

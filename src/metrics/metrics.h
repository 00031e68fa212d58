// Prometheus metrics of a kvbatch node (`GET /metrics` on serve and worker,
// `kvbatch run --metrics-port`), on prometheus-cpp: its registry holds every
// series, its text serializer writes the exposition format.
//
// Two kinds of input. Events, observed as they happen from any thread
// (decode steps, finished requests): the histograms. Sources, read at each
// scrape (engine counters and gauges, batch counts, device memory, process
// memory, NVML): cheap snapshots the node already keeps, turned into series
// only when someone asks. Series are listed in docs/monitoring.md.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/scheduler.h"
#include "engine/types.h"

namespace prometheus {
class Registry;
class Counter;
class Gauge;
class Histogram;
template <typename T>
class Family;
}  // namespace prometheus

namespace kvb::metrics {

// What an engine looks like now (EngineHub has all of it).
struct EngineSnapshot {
  std::string model;
  std::string device;
  engine::EngineStats stats;
  int32_t max_seqs = 0;
  int64_t kv_bytes = 0;          // the KV cache's size
  uint64_t memory_total = 0;     // the device's memory (host RAM for the CPU)
  uint64_t memory_free = 0;
};

// One active batch, by this node's view.
struct BatchSample {
  std::string id;
  std::string status;
  int64_t total = 0;
  int64_t completed = 0;
  int64_t failed = 0;
  double requests_per_second = 0;
  double eta_seconds = -1;  // -1: unknown
};

// The batch driver's counters (summed over its chunk runners).
struct DriverSample {
  int64_t chunks_claimed = 0;
  int64_t chunks_lost = 0;
  int64_t results_committed = 0;
  int64_t results_dropped = 0;
  std::map<std::string, int64_t> errors_by_code;  // failed result lines committed, by error code
};

struct Sources {
  std::vector<std::function<EngineSnapshot()>> engines;  // by engine index
  std::function<std::vector<BatchSample>()> batches;     // active batches only
  std::function<DriverSample()> driver;
  std::function<int64_t()> online_requests;              // online completions running
};

class Metrics {
 public:
  Metrics();
  ~Metrics();

  // Set once, before the first Render.
  void SetSources(Sources sources);

  // Events: thread-safe, cheap (a histogram observation each).
  void ObserveStep(int engine, const engine::StepInfo& step);
  void ObserveResult(int engine, const engine::Result& result);
  // One HTTP response (api::Server's logger).
  void ObserveHttp(int status);

  // Reads the sources and writes every series in the text format (0.0.4).
  std::string Render();

 private:
  struct EngineSeries;
  EngineSeries& Engine(int index);  // created on first use; mu_ held
  void Refresh();                   // mu_ held

  std::shared_ptr<prometheus::Registry> registry_;
  std::mutex mu_;
  Sources sources_;
  std::vector<std::unique_ptr<EngineSeries>> engines_;
  // One active batch's series (removed from their families when it ends).
  struct BatchSeries {
    prometheus::Gauge *completed, *failed, *pending, *rate, *eta;
  };
  std::map<std::string, BatchSeries> batch_series_;  // by batch id
  std::map<int, prometheus::Counter*> http_by_status_;
  int64_t started_ns_ = 0;

  // Families (owned by registry_).
  prometheus::Family<prometheus::Gauge>* running_;
  prometheus::Family<prometheus::Gauge>* waiting_;
  prometheus::Family<prometheus::Gauge>* anchors_;
  prometheus::Family<prometheus::Gauge>* cells_used_;
  prometheus::Family<prometheus::Gauge>* cells_reserved_;
  prometheus::Family<prometheus::Counter>* cells_total_;
  prometheus::Family<prometheus::Gauge>* kv_bytes_;
  prometheus::Family<prometheus::Gauge>* max_seqs_;
  prometheus::Family<prometheus::Gauge>* mem_used_;
  prometheus::Family<prometheus::Gauge>* mem_total_;
  prometheus::Family<prometheus::Gauge>* info_;
  prometheus::Family<prometheus::Counter>* prompt_tokens_;
  prometheus::Family<prometheus::Counter>* cached_tokens_;
  prometheus::Family<prometheus::Counter>* prefill_tokens_;
  prometheus::Family<prometheus::Counter>* generation_tokens_;
  prometheus::Family<prometheus::Counter>* device_picks_;
  prometheus::Family<prometheus::Counter>* step_time_;
  prometheus::Family<prometheus::Counter>* engine_requests_;
  prometheus::Family<prometheus::Counter>* steps_;
  prometheus::Family<prometheus::Counter>* failed_steps_;
  prometheus::Family<prometheus::Counter>* requeued_;
  prometheus::Family<prometheus::Histogram>* duration_;
  prometheus::Family<prometheus::Histogram>* queue_;
  prometheus::Family<prometheus::Histogram>* ttft_;
  prometheus::Family<prometheus::Histogram>* step_seconds_;
  prometheus::Family<prometheus::Histogram>* step_tokens_;
  prometheus::Family<prometheus::Gauge>* batch_requests_;
  prometheus::Family<prometheus::Gauge>* batch_rps_;
  prometheus::Family<prometheus::Gauge>* batch_eta_;
  prometheus::Family<prometheus::Gauge>* batches_active_;
  prometheus::Family<prometheus::Counter>* errors_;
  prometheus::Family<prometheus::Counter>* chunks_;
  prometheus::Family<prometheus::Counter>* results_;
  prometheus::Family<prometheus::Gauge>* online_;
  prometheus::Family<prometheus::Counter>* http_;
  prometheus::Family<prometheus::Gauge>* rss_;
  prometheus::Family<prometheus::Gauge>* uptime_;
  prometheus::Family<prometheus::Gauge>* gpu_util_;
  prometheus::Family<prometheus::Gauge>* gpu_temp_;
  prometheus::Family<prometheus::Gauge>* gpu_power_;
  prometheus::Family<prometheus::Gauge>* gpu_mem_used_;
};

// The process's resident set size in bytes (0 when unknown).
uint64_t ResidentBytes();

}  // namespace kvb::metrics

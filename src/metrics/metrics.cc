#include "metrics/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <set>
#include <sstream>

#include "metrics/nvml.h"

namespace kvb::metrics {

using prometheus::Counter;
using prometheus::Gauge;
using prometheus::Histogram;
using prometheus::Labels;

namespace {

template <typename T>
prometheus::Family<T>* Build(prometheus::Registry& r, const char* name, const char* help);

template <>
prometheus::Family<Gauge>* Build<Gauge>(prometheus::Registry& r, const char* name, const char* help) {
  return &prometheus::BuildGauge().Name(name).Help(help).Register(r);
}
template <>
prometheus::Family<Counter>* Build<Counter>(prometheus::Registry& r, const char* name, const char* help) {
  return &prometheus::BuildCounter().Name(name).Help(help).Register(r);
}
template <>
prometheus::Family<Histogram>* Build<Histogram>(prometheus::Registry& r, const char* name, const char* help) {
  return &prometheus::BuildHistogram().Name(name).Help(help).Register(r);
}

// A counter fed from a running total kept elsewhere: adds what is new.
void Advance(Counter& c, double total) {
  const double delta = total - c.Value();
  if (delta > 0) c.Increment(delta);
}

const Histogram::BucketBoundaries kRequestSeconds = {0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600};
const Histogram::BucketBoundaries kQueueSeconds = {0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800};
const Histogram::BucketBoundaries kFirstTokenSeconds = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
const Histogram::BucketBoundaries kStepSeconds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                  0.1,   0.25,   0.5,   1,    2.5};
const Histogram::BucketBoundaries kStepTokens = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048};

}  // namespace

// The series of one engine, labelled engine="N".
struct Metrics::EngineSeries {
  Labels labels;
  Gauge *running, *waiting, *anchors, *cells_used, *cells_reserved, *kv_bytes, *max_seqs, *mem_used,
      *mem_total;
  Counter* cells_total;
  Counter *prompt, *cached, *prefill, *generated, *done, *failed, *steps, *failed_steps, *requeued;
  Counter *device_picks, *step_decode, *step_host;
  Histogram *duration, *queue, *ttft, *step_seconds, *step_tokens;
  Gauge* info = nullptr;  // kvbatch_engine_info{engine,model,device} 1
};

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()), started_ns_(engine::SteadyNowNs()) {
  auto& r = *registry_;
  running_ = Build<Gauge>(r, "kvbatch_requests_running", "Requests (sequences) the engine is running now.");
  waiting_ = Build<Gauge>(r, "kvbatch_requests_waiting", "Requests queued in the engine, not yet admitted.");
  anchors_ = Build<Gauge>(r, "kvbatch_anchors", "Shared prefixes resident in the KV cache (anchor sequences).");
  cells_used_ = Build<Gauge>(r, "kvbatch_kv_cells_used", "KV cells holding tokens now (shared cells counted once).");
  cells_reserved_ =
      Build<Gauge>(r, "kvbatch_kv_cells_reserved", "KV cells reserved by admitted work (its worst case).");
  // A counter by type only: the name is fixed (the contract) and
  // promtool wants "_total" on counters alone. It never changes while the
  // engine lives, so it reads as the cache's size and its rate is 0.
  cells_total_ = Build<Counter>(r, "kvbatch_kv_cells_total", "KV cells in the engine's cache (constant).");
  kv_bytes_ = Build<Gauge>(r, "kvbatch_kv_cache_bytes", "Size of the engine's KV cache in bytes.");
  max_seqs_ = Build<Gauge>(r, "kvbatch_max_sequences", "Sequences the engine runs in parallel at most.");
  mem_used_ = Build<Gauge>(r, "kvbatch_device_memory_used_bytes",
                           "Memory in use on the engine's device (host RAM for the CPU), all processes.");
  mem_total_ = Build<Gauge>(r, "kvbatch_device_memory_total_bytes", "Memory of the engine's device.");
  info_ = Build<Gauge>(r, "kvbatch_engine_info", "1 per engine, labelled with its model and device.");
  prompt_tokens_ = Build<Counter>(r, "kvbatch_prompt_tokens_total", "Prompt tokens of finished requests.");
  cached_tokens_ = Build<Counter>(r, "kvbatch_prompt_tokens_cached_total",
                                  "Prompt tokens of finished requests served from a shared prefix.");
  prefill_tokens_ = Build<Counter>(r, "kvbatch_prefill_tokens_total",
                                   "Prompt tokens actually computed (shared prefixes once, requeues again).");
  generation_tokens_ = Build<Counter>(r, "kvbatch_generation_tokens_total",
                                      "Tokens generated, counted as they are sampled.");
  device_picks_ = Build<Counter>(r, "kvbatch_generation_tokens_device_picked_total",
                                 "Generated tokens picked on the device (greedy, --device-sampling): no logits copied.");
  step_time_ = Build<Counter>(r, "kvbatch_step_time_seconds_total",
                              "Engine steps' time by part: decode (llama_decode until its outputs are ready) "
                              "and host (admission, sampling, output).");
  engine_requests_ = Build<Counter>(r, "kvbatch_engine_requests_total", "Requests the engine finished, by result.");
  steps_ = Build<Counter>(r, "kvbatch_decode_steps_total", "Decode steps run.");
  failed_steps_ = Build<Counter>(r, "kvbatch_decode_steps_failed_total", "Decode steps that failed.");
  requeued_ = Build<Counter>(r, "kvbatch_requests_requeued_total",
                             "Running requests pushed back to the queue after a failed decode.");
  duration_ = Build<Histogram>(r, "kvbatch_request_duration_seconds",
                               "Time from a request's arrival in the engine to its answer.");
  queue_ = Build<Histogram>(r, "kvbatch_request_queue_seconds",
                            "Time a request waited in the engine's queue before it started.");
  ttft_ = Build<Histogram>(r, "kvbatch_time_to_first_token_seconds",
                           "Time from a request's arrival in the engine to its first generated token.");
  step_seconds_ = Build<Histogram>(r, "kvbatch_decode_step_seconds",
                                   "Duration of one engine step (admission, decode, sampling).");
  step_tokens_ = Build<Histogram>(r, "kvbatch_decode_step_tokens", "Tokens decoded in one engine step.");
  batch_requests_ = Build<Gauge>(r, "kvbatch_batch_requests",
                                 "Requests of each active batch by state (completed, failed, pending).");
  batch_rps_ = Build<Gauge>(r, "kvbatch_batch_requests_per_second", "Answer rate of each active batch.");
  batch_eta_ = Build<Gauge>(r, "kvbatch_batch_eta_seconds", "Estimated seconds until each active batch is done.");
  batches_active_ = Build<Gauge>(r, "kvbatch_batches_active", "Batches not yet ended, by status.");
  errors_ = Build<Counter>(r, "kvbatch_request_errors_total",
                           "Batch requests answered with an error by this node, by error code.");
  chunks_ = Build<Counter>(r, "kvbatch_chunks_total", "Chunks of batch requests this node claimed, or lost.");
  results_ = Build<Counter>(r, "kvbatch_results_total",
                            "Batch results this node committed, or dropped because its lease was lost.");
  online_ = Build<Gauge>(r, "kvbatch_online_requests_running", "Online completions being answered now.");
  http_ = Build<Counter>(r, "kvbatch_http_responses_total", "HTTP responses sent, by status code.");
  rss_ = Build<Gauge>(r, "kvbatch_process_resident_memory_bytes", "Resident memory of this process.");
  uptime_ = Build<Gauge>(r, "kvbatch_uptime_seconds", "Seconds since this process started serving.");
  gpu_util_ = Build<Gauge>(r, "kvbatch_gpu_utilization_ratio", "GPU utilisation (NVML), 0 to 1.");
  gpu_temp_ = Build<Gauge>(r, "kvbatch_gpu_temperature_celsius", "GPU temperature (NVML).");
  gpu_power_ = Build<Gauge>(r, "kvbatch_gpu_power_watts", "GPU power draw (NVML).");
  gpu_mem_used_ = Build<Gauge>(r, "kvbatch_gpu_memory_used_bytes", "GPU memory in use, all processes (NVML).");
  // Known codes exist from the start at 0: Prometheus ignores a series'
  // first sample, so one born at 1 would hide its first error from rate().
  for (const char* code : {"invalid_request", "unsupported", "context_length_exceeded", "server_error",
                           "request_crashed_engine", "batch_cancelled", "batch_expired"})
    errors_->Add({{"code", code}});
  for (int status : {200, 400, 401, 404, 409, 413, 429, 500, 503})
    http_by_status_[status] = &http_->Add({{"code", std::to_string(status)}});
}

Metrics::~Metrics() = default;

void Metrics::SetSources(Sources sources) {
  std::lock_guard<std::mutex> lock(mu_);
  sources_ = std::move(sources);
  for (size_t i = 0; i < sources_.engines.size(); ++i) Engine(static_cast<int>(i));
}

Metrics::EngineSeries& Metrics::Engine(int index) {
  while (static_cast<int>(engines_.size()) <= index) {
    auto e = std::make_unique<EngineSeries>();
    e->labels = {{"engine", std::to_string(engines_.size())}};
    const Labels& l = e->labels;
    e->running = &running_->Add(l);
    e->waiting = &waiting_->Add(l);
    e->anchors = &anchors_->Add(l);
    e->cells_used = &cells_used_->Add(l);
    e->cells_reserved = &cells_reserved_->Add(l);
    e->cells_total = &cells_total_->Add(l);
    e->kv_bytes = &kv_bytes_->Add(l);
    e->max_seqs = &max_seqs_->Add(l);
    e->mem_used = &mem_used_->Add(l);
    e->mem_total = &mem_total_->Add(l);
    e->prompt = &prompt_tokens_->Add(l);
    e->cached = &cached_tokens_->Add(l);
    e->prefill = &prefill_tokens_->Add(l);
    e->generated = &generation_tokens_->Add(l);
    e->device_picks = &device_picks_->Add(l);
    Labels decode = l, host = l;
    decode["part"] = "decode";
    host["part"] = "host";
    e->step_decode = &step_time_->Add(decode);
    e->step_host = &step_time_->Add(host);
    Labels ok = l, failed = l;
    ok["result"] = "ok";
    failed["result"] = "failed";
    e->done = &engine_requests_->Add(ok);
    e->failed = &engine_requests_->Add(failed);
    e->steps = &steps_->Add(l);
    e->failed_steps = &failed_steps_->Add(l);
    e->requeued = &requeued_->Add(l);
    e->duration = &duration_->Add(l, kRequestSeconds);
    e->queue = &queue_->Add(l, kQueueSeconds);
    e->ttft = &ttft_->Add(l, kFirstTokenSeconds);
    e->step_seconds = &step_seconds_->Add(l, kStepSeconds);
    e->step_tokens = &step_tokens_->Add(l, kStepTokens);
    engines_.push_back(std::move(e));
  }
  return *engines_[static_cast<size_t>(index)];
}

void Metrics::ObserveStep(int engine, const engine::StepInfo& step) {
  std::lock_guard<std::mutex> lock(mu_);
  EngineSeries& e = Engine(engine);
  e.step_seconds->Observe(step.seconds);
  e.step_tokens->Observe(step.tokens);
}

void Metrics::ObserveResult(int engine, const engine::Result& result) {
  std::lock_guard<std::mutex> lock(mu_);
  EngineSeries& e = Engine(engine);
  const auto& t = result.timing;
  if (t.total >= 0) e.duration->Observe(t.total);
  if (t.queued >= 0) e.queue->Observe(t.queued);
  if (t.first_token >= 0) e.ttft->Observe(t.first_token);
}

void Metrics::ObserveHttp(int status) {
  std::lock_guard<std::mutex> lock(mu_);
  Counter*& c = http_by_status_[status];
  if (c == nullptr) c = &http_->Add({{"code", std::to_string(status)}});
  c->Increment();
}

void Metrics::Refresh() {
  for (size_t i = 0; i < sources_.engines.size(); ++i) {
    const EngineSnapshot snap = sources_.engines[i]();
    EngineSeries& e = Engine(static_cast<int>(i));
    const engine::EngineStats& s = snap.stats;
    if (e.info == nullptr) {
      Labels l = e.labels;
      l["model"] = snap.model;
      l["device"] = snap.device;
      e.info = &info_->Add(l);
      e.info->Set(1);
    }
    e.running->Set(s.active);
    e.waiting->Set(s.waiting);
    e.anchors->Set(s.anchors);
    e.cells_used->Set(s.cells_used);
    e.cells_reserved->Set(s.cells_reserved);
    Advance(*e.cells_total, s.cells_total);
    e.kv_bytes->Set(static_cast<double>(snap.kv_bytes));
    e.max_seqs->Set(snap.max_seqs);
    e.mem_total->Set(static_cast<double>(snap.memory_total));
    e.mem_used->Set(static_cast<double>(snap.memory_total - std::min(snap.memory_free, snap.memory_total)));
    Advance(*e.prompt, static_cast<double>(s.prompt_tokens));
    Advance(*e.cached, static_cast<double>(s.cached_tokens));
    Advance(*e.prefill, static_cast<double>(s.prefill_tokens));
    Advance(*e.generated, static_cast<double>(s.generated_tokens));
    Advance(*e.device_picks, static_cast<double>(s.device_picks));
    Advance(*e.step_decode, s.decode_seconds);
    Advance(*e.step_host, s.host_seconds());
    Advance(*e.done, static_cast<double>(s.requests_done));
    Advance(*e.failed, static_cast<double>(s.requests_failed));
    Advance(*e.steps, static_cast<double>(s.steps));
    Advance(*e.failed_steps, static_cast<double>(s.failed_steps));
    Advance(*e.requeued, static_cast<double>(s.requeued));
  }

  if (sources_.batches) {
    std::map<std::string, int> by_status;
    std::set<std::string> live;
    for (const BatchSample& b : sources_.batches()) {
      ++by_status[b.status];
      live.insert(b.id);
      auto [it, fresh] = batch_series_.try_emplace(b.id);
      BatchSeries& series = it->second;
      if (fresh) {
        series.completed = &batch_requests_->Add({{"batch_id", b.id}, {"state", "completed"}});
        series.failed = &batch_requests_->Add({{"batch_id", b.id}, {"state", "failed"}});
        series.pending = &batch_requests_->Add({{"batch_id", b.id}, {"state", "pending"}});
        series.rate = &batch_rps_->Add({{"batch_id", b.id}});
        series.eta = &batch_eta_->Add({{"batch_id", b.id}});
      }
      series.completed->Set(static_cast<double>(b.completed));
      series.failed->Set(static_cast<double>(b.failed));
      series.pending->Set(static_cast<double>(std::max<int64_t>(0, b.total - b.completed - b.failed)));
      series.rate->Set(b.requests_per_second);
      series.eta->Set(b.eta_seconds);
    }
    // Ended batches leave: the series set stays bounded by the active batches.
    for (auto it = batch_series_.begin(); it != batch_series_.end();) {
      if (live.count(it->first)) {
        ++it;
        continue;
      }
      const BatchSeries& series = it->second;
      for (prometheus::Gauge* g : {series.completed, series.failed, series.pending}) batch_requests_->Remove(g);
      batch_rps_->Remove(series.rate);
      batch_eta_->Remove(series.eta);
      it = batch_series_.erase(it);
    }
    for (const char* status : {"validating", "in_progress", "finalizing", "cancelling"})
      batches_active_->Add({{"status", status}}).Set(by_status[status]);
  }

  if (sources_.driver) {
    const DriverSample d = sources_.driver();
    Advance(chunks_->Add({{"event", "claimed"}}), static_cast<double>(d.chunks_claimed));
    Advance(chunks_->Add({{"event", "lost"}}), static_cast<double>(d.chunks_lost));
    Advance(results_->Add({{"event", "committed"}}), static_cast<double>(d.results_committed));
    Advance(results_->Add({{"event", "dropped"}}), static_cast<double>(d.results_dropped));
    for (const auto& [code, n] : d.errors_by_code) Advance(errors_->Add({{"code", code}}), static_cast<double>(n));
  }
  if (sources_.online_requests) online_->Add({}).Set(static_cast<double>(sources_.online_requests()));

  rss_->Add({}).Set(static_cast<double>(ResidentBytes()));
  uptime_->Add({}).Set(static_cast<double>(engine::SteadyNowNs() - started_ns_) * 1e-9);
  for (const GpuSample& g : Nvml::Get().Sample()) {
    const Labels l = {{"gpu", std::to_string(g.index)}, {"name", g.name}};
    if (g.utilization >= 0) gpu_util_->Add(l).Set(g.utilization);
    if (g.temperature_c >= 0) gpu_temp_->Add(l).Set(g.temperature_c);
    if (g.power_w >= 0) gpu_power_->Add(l).Set(g.power_w);
    if (g.memory_used >= 0) gpu_mem_used_->Add(l).Set(static_cast<double>(g.memory_used));
  }
}

std::string Metrics::Render() {
  std::lock_guard<std::mutex> lock(mu_);
  Refresh();
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, registry_->Collect());
  return out.str();
}

uint64_t ResidentBytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  unsigned long long size = 0, resident = 0;
  const int n = std::fscanf(f, "%llu %llu", &size, &resident);
  std::fclose(f);
  if (n != 2) return 0;
  return static_cast<uint64_t>(resident) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

}  // namespace kvb::metrics

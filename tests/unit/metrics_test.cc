// metrics::Metrics on fake sources: what a scrape shows, counters following
// the engine's running totals, batch series coming and going with batches.
#include "metrics/metrics.h"

#include <gtest/gtest.h>

#include <string>

namespace kvb::metrics {
namespace {

// The value of one series line, e.g. Value(text, R"(kvbatch_kv_cells_used{engine="0"})"); -1 when absent.
double Value(const std::string& text, const std::string& series) {
  const std::string key = series + " ";
  for (size_t pos = 0; (pos = text.find(key, pos)) != std::string::npos; pos += key.size())
    if (pos == 0 || text[pos - 1] == '\n') return std::stod(text.substr(pos + key.size()));
  return -1;
}

struct Fake {
  EngineSnapshot engine;
  std::vector<BatchSample> batches;
  DriverSample driver;
  int64_t online = 0;

  Sources MakeSources() {
    Sources s;
    s.engines.push_back([this] { return engine; });
    s.batches = [this] { return batches; };
    s.driver = [this] { return driver; };
    s.online_requests = [this] { return online; };
    return s;
  }
};

TEST(Metrics, ScrapeShowsTheEngineAsItIsNow) {
  Fake f;
  f.engine.model = "tiny";
  f.engine.device = "CPU";
  f.engine.stats.active = 3;
  f.engine.stats.waiting = 7;
  f.engine.stats.cells_used = 120;
  f.engine.stats.cells_total = 4096;
  f.engine.stats.prompt_tokens = 1000;
  f.engine.stats.cached_tokens = 800;
  f.engine.stats.generated_tokens = 50;
  f.engine.stats.device_picks = 40;
  f.engine.stats.step_seconds = 2.5;
  f.engine.stats.decode_seconds = 2.0;
  f.engine.memory_total = 1000;
  f.engine.memory_free = 250;
  f.online = 2;
  Metrics m;
  m.SetSources(f.MakeSources());
  std::string text = m.Render();
  EXPECT_EQ(Value(text, R"(kvbatch_requests_running{engine="0"})"), 3);
  EXPECT_EQ(Value(text, R"(kvbatch_requests_waiting{engine="0"})"), 7);
  EXPECT_EQ(Value(text, R"(kvbatch_kv_cells_used{engine="0"})"), 120);
  EXPECT_EQ(Value(text, R"(kvbatch_kv_cells_total{engine="0"})"), 4096);
  EXPECT_EQ(Value(text, R"(kvbatch_prompt_tokens_total{engine="0"})"), 1000);
  EXPECT_EQ(Value(text, R"(kvbatch_prompt_tokens_cached_total{engine="0"})"), 800);
  EXPECT_EQ(Value(text, R"(kvbatch_generation_tokens_total{engine="0"})"), 50);
  EXPECT_EQ(Value(text, R"(kvbatch_generation_tokens_device_picked_total{engine="0"})"), 40);
  EXPECT_DOUBLE_EQ(Value(text, R"(kvbatch_step_time_seconds_total{engine="0",part="decode"})"), 2.0);
  EXPECT_DOUBLE_EQ(Value(text, R"(kvbatch_step_time_seconds_total{engine="0",part="host"})"), 0.5);
  EXPECT_EQ(Value(text, R"(kvbatch_device_memory_used_bytes{engine="0"})"), 750);
  EXPECT_EQ(Value(text, R"(kvbatch_device_memory_total_bytes{engine="0"})"), 1000);
  EXPECT_EQ(Value(text, R"(kvbatch_engine_info{device="CPU",engine="0",model="tiny"})"), 1);
  EXPECT_EQ(Value(text, "kvbatch_online_requests_running"), 2);
  EXPECT_GT(Value(text, "kvbatch_process_resident_memory_bytes"), 0);
  // Every family carries HELP and TYPE (the text format promtool checks).
  EXPECT_NE(text.find("# TYPE kvbatch_request_duration_seconds histogram"), std::string::npos);
  EXPECT_NE(text.find("# HELP kvbatch_requests_running "), std::string::npos);

  // Counters follow the engine's running totals.
  f.engine.stats.prompt_tokens = 1500;
  f.engine.stats.active = 0;
  text = m.Render();
  EXPECT_EQ(Value(text, R"(kvbatch_prompt_tokens_total{engine="0"})"), 1500);
  EXPECT_EQ(Value(text, R"(kvbatch_requests_running{engine="0"})"), 0);
}

TEST(Metrics, HistogramsCountEveryObservation) {
  Fake f;
  Metrics m;
  m.SetSources(f.MakeSources());
  engine::Result r;
  r.timing.queued = 0.02;
  r.timing.first_token = 0.3;
  r.timing.total = 2.0;
  m.ObserveResult(0, r);
  engine::Result failed;  // never started: only its total time
  failed.timing.total = 0.01;
  m.ObserveResult(0, failed);
  m.ObserveStep(0, {0.004, 0.003, 40, 8, true});
  m.ObserveHttp(200);
  m.ObserveHttp(200);
  m.ObserveHttp(404);
  const std::string text = m.Render();
  EXPECT_EQ(Value(text, R"(kvbatch_request_duration_seconds_count{engine="0"})"), 2);
  EXPECT_EQ(Value(text, R"(kvbatch_request_queue_seconds_count{engine="0"})"), 1);
  EXPECT_EQ(Value(text, R"(kvbatch_time_to_first_token_seconds_count{engine="0"})"), 1);
  EXPECT_EQ(Value(text, R"(kvbatch_time_to_first_token_seconds_bucket{engine="0",le="0.25"})"), 0);
  EXPECT_EQ(Value(text, R"(kvbatch_time_to_first_token_seconds_bucket{engine="0",le="0.5"})"), 1);
  EXPECT_EQ(Value(text, R"(kvbatch_decode_step_seconds_count{engine="0"})"), 1);
  EXPECT_EQ(Value(text, R"(kvbatch_decode_step_tokens_sum{engine="0"})"), 40);
  EXPECT_EQ(Value(text, R"(kvbatch_http_responses_total{code="200"})"), 2);
  EXPECT_EQ(Value(text, R"(kvbatch_http_responses_total{code="404"})"), 1);
}

TEST(Metrics, BatchSeriesLastAsLongAsTheBatch) {
  Fake f;
  f.batches = {{"batch_a", "in_progress", 10, 4, 1, 2.5, 2.0}, {"batch_b", "validating", 5, 0, 0, 0, -1}};
  Metrics m;
  m.SetSources(f.MakeSources());
  std::string text = m.Render();
  EXPECT_EQ(Value(text, R"(kvbatch_batch_requests{batch_id="batch_a",state="completed"})"), 4);
  EXPECT_EQ(Value(text, R"(kvbatch_batch_requests{batch_id="batch_a",state="failed"})"), 1);
  EXPECT_EQ(Value(text, R"(kvbatch_batch_requests{batch_id="batch_a",state="pending"})"), 5);
  EXPECT_EQ(Value(text, R"(kvbatch_batch_requests_per_second{batch_id="batch_a"})"), 2.5);
  EXPECT_EQ(Value(text, R"(kvbatch_batch_eta_seconds{batch_id="batch_a"})"), 2);
  EXPECT_EQ(Value(text, R"(kvbatch_batches_active{status="in_progress"})"), 1);
  EXPECT_EQ(Value(text, R"(kvbatch_batches_active{status="validating"})"), 1);

  f.batches.erase(f.batches.begin());  // batch_a ended
  text = m.Render();
  EXPECT_EQ(text.find("\"batch_a\""), std::string::npos);
  EXPECT_EQ(Value(text, R"(kvbatch_batch_requests{batch_id="batch_b",state="pending"})"), 5);
  EXPECT_EQ(Value(text, R"(kvbatch_batches_active{status="in_progress"})"), 0);
}

TEST(Metrics, ErrorsByCodeAndDriverCounters) {
  Fake f;
  f.driver.chunks_claimed = 4;
  f.driver.results_committed = 100;
  f.driver.errors_by_code = {{"context_length_exceeded", 3}};
  Metrics m;
  m.SetSources(f.MakeSources());
  std::string text = m.Render();
  EXPECT_EQ(Value(text, R"(kvbatch_request_errors_total{code="context_length_exceeded"})"), 3);
  EXPECT_EQ(Value(text, R"(kvbatch_chunks_total{event="claimed"})"), 4);
  EXPECT_EQ(Value(text, R"(kvbatch_results_total{event="committed"})"), 100);
  f.driver.errors_by_code["invalid_request"] = 1;
  f.driver.errors_by_code["context_length_exceeded"] = 5;
  text = m.Render();
  EXPECT_EQ(Value(text, R"(kvbatch_request_errors_total{code="context_length_exceeded"})"), 5);
  EXPECT_EQ(Value(text, R"(kvbatch_request_errors_total{code="invalid_request"})"), 1);
}

TEST(Metrics, NoSourcesStillRenders) {
  Metrics m;
  const std::string text = m.Render();
  EXPECT_GT(Value(text, "kvbatch_uptime_seconds"), -1);
  EXPECT_EQ(text.find("kvbatch_requests_running{"), std::string::npos);
}

}  // namespace
}  // namespace kvb::metrics

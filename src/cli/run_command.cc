#include "cli/run_command.h"

#include <algorithm>
#include <chrono>
#include <atomic>
#include <csignal>
#include <filesystem>
#include <map>
#include <memory>
#include <thread>
#include <unordered_map>

#include "api/metrics_server.h"
#include "api/server.h"
#include "batch/crash_guard.h"
#include "batch/input_file.h"
#include "batch/response.h"
#include "batch/result_log.h"
#include "cli/progress.h"
#include "metrics/metrics.h"
#include "cli/models_command.h"
#include "worker/batch_files.h"
#include "worker/chunk_runner.h"
#include "worker/engine_hub.h"
#include "worker/run_store.h"

namespace kvb::cli {

namespace {

std::atomic<bool> g_interrupted{false};

void OnSignal(int) { g_interrupted = true; }

int Fail(const Status& st) {
  std::fprintf(stderr, "kvbatch: %s\n", st.message().c_str());
  return 1;
}

// What the summary reports of the engine's part of a run.
struct EngineRun {
  worker::RunTally tally;
  engine::EngineStats stats;
  std::string device_memory;  // "GPU memory 20.1 of 79.6 GiB in use", or empty on a CPU
};

std::string DeviceMemoryLine(const worker::EngineHub& hub) {
  size_t free = 0, total = 0;
  hub.DeviceMemory(&free, &total);
  if (total == 0 || hub.info().device == "CPU") return "";  // host RAM: not worth a line
  char buf[96];
  std::snprintf(buf, sizeof buf, "GPU memory %.1f of %.1f GiB in use", static_cast<double>(total - free) / (1 << 30),
                static_cast<double>(total) / (1 << 30));
  return buf;
}

// The request rows of a run: chunked over every valid line, as `serve`
// chunks a batch (worker/batch_files.h), then filtered, so a resumed run
// keeps the prefix groups and chunks of the first. Crash counts come from
// the journal.
std::vector<store::PendingRequest> PendingRows(const batch::InputScan& scan, const batch::ResultLog& log,
                                               const batch::CrashJournal& journal, int32_t chunk_rows) {
  std::vector<store::PendingRequest> rows;
  rows.reserve(scan.valid.size());
  for (const batch::InputLine& l : scan.valid) {
    store::PendingRequest& p = rows.emplace_back();
    p.line = l.line_no;
    p.custom_id = l.custom_id;
    p.offset = static_cast<int64_t>(l.offset);
    p.length = static_cast<int64_t>(l.length);
    p.prefix_hash = l.prefix_hash;
  }
  worker::AssignChunks(rows, chunk_rows);
  std::erase_if(rows, [&](const store::PendingRequest& p) { return log.answered().count(p.custom_id) > 0; });
  for (store::PendingRequest& p : rows)
    if (auto c = journal.crashes().find(p.line); c != journal.crashes().end()) p.crashes = c->second;
  return rows;
}

// Runs `rows` through the batch driver's chunk runner over a RunStore (the
// result log and journal are its durable parts), showing progress until
// every row is answered. Returns the exit code (0, 1 on runtime errors, 130
// when interrupted).
int Execute(const RunOptions& o, std::vector<store::PendingRequest> rows, batch::ResultLog& log,
            batch::CrashJournal& journal, Progress& progress, int64_t resumed, EngineRun* out) {
  // Declared before the engine: its thread reports to the metrics until it stops.
  metrics::Metrics metrics;
  // Every -m: the first loaded now, the others on first use.
  auto started =
      StartModels({o.model, o.model_name, o.model_source, o.more_models, o.max_models, o.n_gpu_layers}, o.engine, &metrics);
  if (!started.ok()) return Fail(started.status());
  std::unique_ptr<worker::ModelRouter> hub = std::move(started).value();

  const int64_t total = static_cast<int64_t>(rows.size());
  const engine::ContextInfo info = hub->LoadedHub(0)->info();
  if (!o.quiet) {
    std::fprintf(stderr,
                 "kvbatch: %lld requests (%lld already answered) | model %s | %s | KV %d cells (%.0f MiB) | "
                 "%d parallel sequences | context %d\n",
                 static_cast<long long>(total), static_cast<long long>(resumed), hub->Names().c_str(),
                 info.device.c_str(), info.kv_cells, static_cast<double>(info.kv_bytes) / (1 << 20), info.max_seqs,
                 info.n_ctx_seq);
  }
  worker::RunStore store(o.input, std::move(rows), &log, &journal);
  worker::DriverOptions d;
  d.owner = "run";
  d.cache_dir = std::filesystem::path(o.output).parent_path().string();
  d.default_max_tokens = o.default_max_tokens;
  // Enough requests queued for the scheduler to see shared prefixes ahead,
  // but not the whole file: memory stays bounded.
  d.window = info.max_seqs * 2 + o.engine.scheduler.lookahead;
  // Every answer is written to the OS as it finishes (a killed process
  // loses nothing): an append to the log costs a write(2).
  d.commit_interval = std::chrono::milliseconds(0);
  auto runner = std::make_unique<worker::ChunkRunner>(&store, hub.get(), d);
  runner->Start();

  // Before the metrics line is printed: whoever reads it may interrupt at once.
  auto prev_int = std::signal(SIGINT, OnSignal);
  auto prev_term = std::signal(SIGTERM, OnSignal);
  // --metrics-port: the same series as serve's /metrics, the run as batch "run".
  std::unique_ptr<api::MetricsServer> metrics_server;
  if (o.metrics_port >= 0) {
    metrics::Sources src;
    for (int i = 0; i < static_cast<int>(hub->specs().size()); ++i)
      src.engines.push_back([h = hub.get(), i] { return api::RouterSnapshot(*h, i); });
    src.batches = [&store, &progress, total] {
      const worker::RunTally t = store.Tally();
      metrics::BatchSample b{"run", "in_progress", total, t.ok, t.failed};
      const double elapsed = progress.elapsed();
      if (elapsed > 0 && t.ok + t.failed > 0) {
        b.requests_per_second = static_cast<double>(t.ok + t.failed) / elapsed;
        b.eta_seconds = static_cast<double>(total - t.ok - t.failed) / b.requests_per_second;
      }
      return std::vector<metrics::BatchSample>{b};
    };
    src.driver = [r = runner.get()] { return api::DriverSampleOf(r->Stats()); };
    metrics.SetSources(std::move(src));
    metrics_server = std::make_unique<api::MetricsServer>(&metrics, o.metrics_host, o.metrics_port);
    if (Status st = metrics_server->Start(); !st.ok()) {
      runner->Stop();
      hub.reset();
      std::signal(SIGINT, prev_int);
      std::signal(SIGTERM, prev_term);
      return Fail(st);
    }
    std::fprintf(stderr, "kvbatch: metrics on http://%s:%d/metrics\n", o.metrics_host.c_str(), metrics_server->port());
  }

  int exit_code = 0;
  // A group fdatasync every 2 s bounds what a power loss can cost to
  // recomputing that long.
  constexpr auto kSyncInterval = std::chrono::seconds(2);
  auto last_sync = std::chrono::steady_clock::now();
  auto snapshot = [&] {
    const worker::RunTally t = store.Tally();
    return ProgressSnapshot{t.ok + t.failed, total, resumed, hub->Stats()};
  };
  while (!store.Done()) {
    if (g_interrupted) {
      exit_code = 130;
      break;
    }
    if (Status st = store.Fatal(); !st.ok()) {
      exit_code = Fail(st);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (auto now = std::chrono::steady_clock::now(); now - last_sync >= kSyncInterval) {
      if (Status sync = store.Sync(); !sync.ok()) {
        exit_code = Fail(sync);
        break;
      }
      last_sync = now;
    }
    progress.Update(snapshot());
  }
  // Commits what finished; requests still in the engine are abandoned.
  if (metrics_server) metrics_server->Stop();
  runner->Stop();
  progress.Update(snapshot(), true);
  progress.Finish();
  out->tally = store.Tally();
  out->stats = hub->Stats();
  if (auto first = hub->LoadedHub(0)) out->device_memory = DeviceMemoryLine(*first);
  // The engine goes before the runner: its thread may still call back into it.
  hub.reset();
  runner.reset();
  std::signal(SIGINT, prev_int);
  std::signal(SIGTERM, prev_term);
  if (Status st = store.Sync(); !st.ok()) Fail(st);
  if (exit_code == 130) {
    std::fprintf(stderr, "kvbatch: interrupted; %lld of %lld answered this run are saved; rerun the same command to resume\n",
                 static_cast<long long>(out->tally.ok + out->tally.failed), static_cast<long long>(total));
  }
  return exit_code;
}

void PrintSummary(const RunOptions& o, const EngineRun& run, const std::map<std::string, int64_t>& failures,
                  int64_t resumed, double wall) {
  const engine::EngineStats& e = run.stats;
  const int64_t done = run.tally.ok + run.tally.failed;
  int64_t failed = 0;
  for (auto& [_, n] : failures) failed += n;
  auto pct = [](int64_t a, int64_t b) { return b ? 100.0 * static_cast<double>(a) / static_cast<double>(b) : 0.0; };
  std::fprintf(stderr, "\nkvbatch: done in %s (%.1f s)\n", HumanDuration(wall).c_str(), wall);
  std::fprintf(stderr, "  requests     %lld ok, %lld failed", static_cast<long long>(run.tally.ok),
               static_cast<long long>(failed));
  if (resumed > 0) std::fprintf(stderr, ", %lld answered by an earlier run", static_cast<long long>(resumed));
  std::fprintf(stderr, "\n");
  for (auto& [kind, n] : failures) std::fprintf(stderr, "    %-28s %lld\n", kind.c_str(), static_cast<long long>(n));
  std::fprintf(stderr, "  prompt       %lld tokens: %lld computed, %lld served from shared prefixes (%.1f%%)\n",
               static_cast<long long>(e.prompt_tokens), static_cast<long long>(e.prefill_tokens),
               static_cast<long long>(e.cached_tokens), pct(e.cached_tokens, e.prompt_tokens));
  std::fprintf(stderr, "  completion   %lld tokens\n", static_cast<long long>(e.completion_tokens));
  std::fprintf(stderr, "  throughput   %.2f req/s, %.0f tok/s\n", wall > 0 ? static_cast<double>(done) / wall : 0.0,
               wall > 0 ? static_cast<double>(e.prefill_tokens + e.completion_tokens) / wall : 0.0);
  // Running each request alone would decode every prompt token.
  std::fprintf(stderr, "  saved        %lld prompt tokens not recomputed vs running each request alone (%.1fx less prefill)\n",
               static_cast<long long>(e.prompt_tokens - e.prefill_tokens),
               e.prefill_tokens ? static_cast<double>(e.prompt_tokens) / static_cast<double>(e.prefill_tokens) : 0.0);
  std::fprintf(stderr, "  KV cells     peak %d in use of %d\n", e.cells_peak, e.cells_total);
  if (e.steps > 0) {
    // Decode: llama_decode until its outputs are ready (the device's work on
    // a GPU); host: the rest of the step (admission, sampling, output).
    const double step_ms = 1e3 * e.step_seconds / static_cast<double>(e.steps);
    const double decode_ms = 1e3 * e.decode_seconds / static_cast<double>(e.steps);
    const double host_ms = 1e3 * e.host_seconds() / static_cast<double>(e.steps);
    std::fprintf(stderr, "  steps        %lld, %.2f ms each: decode %.2f ms, host %.2f ms", static_cast<long long>(e.steps),
                 step_ms, decode_ms, host_ms);
    if (e.device_picks > 0)
      std::fprintf(stderr, "; %.0f%% of tokens picked on the device", pct(e.device_picks, e.generated_tokens));
    std::fprintf(stderr, "\n");
  }
  if (!run.device_memory.empty()) std::fprintf(stderr, "  device       %s\n", run.device_memory.c_str());
  std::fprintf(stderr, "  output       %s%s%s\n", o.output.c_str(), o.errors.empty() ? "" : ", errors in ",
               o.errors.c_str());
}

}  // namespace

int Run(const RunOptions& o) {
  // 1. Validate the whole input before anything runs.
  auto scan = batch::ScanInputFile(o.input);
  if (!scan.ok()) return Fail(scan.status());
  for (const auto& e : scan->errors)
    std::fprintf(stderr, "%s:%lld: %s [%s]\n", o.input.c_str(), static_cast<long long>(e.line), e.message.c_str(),
                 e.code.c_str());
  if (!scan->errors.empty() && !o.skip_invalid) {
    std::fprintf(stderr, "kvbatch: %zu invalid line(s) in %s; nothing was run (use --skip-invalid to run the rest)\n",
                 scan->errors.size(), o.input.c_str());
    return 2;
  }

  // A missing model is reported before any output file is created.
  if (std::error_code ec; !std::filesystem::is_regular_file(o.model, ec)) {
    std::fprintf(stderr, "kvbatch: model file not found: %s\n", o.model.c_str());
    return 1;
  }

  // 2. Open (or resume) the result files; invalid lines go to the error file.
  auto log = batch::ResultLog::Open(o.output, o.errors);
  if (!log.ok()) return Fail(log.status());
  const int64_t resumed = static_cast<int64_t>(log->answered().size());
  std::map<std::string, int64_t> failures;  // by error kind, this run
  if (o.skip_invalid) {
    for (const auto& e : scan->errors) {
      // A duplicate's id belongs to the first line; an unreadable line has no id.
      if (e.custom_id.empty() || e.code == batch::kDuplicateCustomId || log->answered().count(e.custom_id)) continue;
      const std::string msg = "line " + std::to_string(e.line) + ": " + e.message;
      if (Status st = log->AppendFailure(e.custom_id, batch::RequestErrorLine(e.custom_id, e.code, msg)); !st.ok())
        return Fail(st);
      ++failures[e.code];
    }
  }

  // 3. Requests in flight during earlier crashes run first, each alone, and
  // fail after kMaxCrashes (batch/crash_guard.h): the journal counts the
  // crashes, the chunk runner acts on them.
  std::vector<int64_t> answered_lines;
  for (const auto& l : scan->valid)
    if (log->answered().count(l.custom_id)) answered_lines.push_back(l.line_no);
  auto journal = batch::CrashJournal::Open(o.output + ".inflight", answered_lines);
  if (!journal.ok()) return Fail(journal.status());
  worker::DriverOptions defaults;
  auto rows = PendingRows(*scan, *log, *journal, defaults.chunk_rows);
  const auto suspects = std::count_if(rows.begin(), rows.end(), [](const store::PendingRequest& p) {
    return p.crashes > 0 && p.crashes < batch::kMaxCrashes;
  });
  if (suspects > 0)
    std::fprintf(stderr, "kvbatch: %lld request(s) were running when an earlier run crashed; each runs again alone first\n",
                 static_cast<long long>(suspects));

  // 4. Run what is left.
  Progress progress(stderr, o.quiet, o.progress_interval);
  EngineRun run;
  if (!rows.empty()) {
    const int rc = Execute(o, std::move(rows), *log, *journal, progress, resumed, &run);
    // Finished, interrupted or stopped by an error: not a crash.
    if (Status st = journal->EndSession(); !st.ok()) return Fail(st);
    if (rc != 0) return rc;
    for (const auto& [code, n] : run.tally.failures) failures[code] += n;
  }

  // 5. Everything is answered: put the files in input order.
  std::unordered_map<std::string_view, int64_t> line_of;
  for (const auto& l : scan->valid) line_of.emplace(l.custom_id, l.line_no);
  for (const auto& e : scan->errors)
    if (!e.custom_id.empty() && e.code != batch::kDuplicateCustomId) line_of.emplace(e.custom_id, e.line);
  Status st = log->Finalize([&](std::string_view id) {
    auto it = line_of.find(id);
    return it == line_of.end() ? INT64_MAX : it->second;
  });
  if (!st.ok()) return Fail(st);
  if (Status rm = journal->Remove(); !rm.ok()) return Fail(rm);
  if (!o.quiet) PrintSummary(o, run, failures, resumed, progress.elapsed());
  return 0;
}

}  // namespace kvb::cli

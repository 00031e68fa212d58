#include "cli/run_command.h"

#include <algorithm>
#include <chrono>
#include <atomic>
#include <condition_variable>
#include <csignal>
#include <ctime>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "batch/crash_guard.h"
#include "batch/input_file.h"
#include "batch/prefix_order.h"
#include "batch/prepare.h"
#include "batch/request.h"
#include "batch/response.h"
#include "batch/result_log.h"
#include "cli/progress.h"

namespace kvb::cli {

namespace {

std::atomic<bool> g_interrupted{false};

void OnSignal(int) { g_interrupted = true; }

// Results cross from the engine thread to the main thread here.
class ResultQueue {
 public:
  void Push(engine::Result&& r) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      q_.push_back(std::move(r));
    }
    cv_.notify_one();
  }
  std::vector<engine::Result> Wait(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, timeout, [&] { return !q_.empty(); });
    std::vector<engine::Result> out(std::make_move_iterator(q_.begin()), std::make_move_iterator(q_.end()));
    q_.clear();
    return out;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<engine::Result> q_;
};

int Fail(const Status& st) {
  std::fprintf(stderr, "kvbatch: %s\n", st.message().c_str());
  return 1;
}

// Requests sharing a prefix run together: groups by prefix hash in order of
// first appearance, input order within a group. Answered lines are dropped.
std::vector<const batch::InputLine*> OrderPending(const batch::InputScan& scan,
                                                  const std::unordered_set<std::string>& answered) {
  // Grouped over every line, then filtered: a resumed run keeps the groups'
  // order of the first run.
  std::vector<const batch::InputLine*> all;
  all.reserve(scan.valid.size());
  for (const auto& l : scan.valid) all.push_back(&l);
  batch::GroupBySharedPrefix(all, [](const batch::InputLine* l) { return l->prefix_hash; });
  std::vector<const batch::InputLine*> pending;
  for (const batch::InputLine* l : all)
    if (!answered.count(l->custom_id)) pending.push_back(l);
  return pending;
}

// One `kvbatch run` after validation: feeds the engine a bounded window of
// requests, commits results as they finish, shows progress.
class BatchRun {
 public:
  // pending_[0, suspects) were in flight during a crash: each runs alone.
  BatchRun(const RunOptions& o, batch::ResultLog& log, batch::CrashJournal& journal,
           std::vector<const batch::InputLine*> pending, size_t suspects, std::map<std::string, int64_t>& failures)
      : o_(o), log_(log), journal_(journal), pending_(std::move(pending)), suspects_(suspects), failures_(failures) {}

  // Returns the exit code (0, 1 on runtime errors, 130 when interrupted).
  int Execute(Progress& progress, int64_t resumed);

  int64_t done() const { return done_; }
  // "GPU memory 20.1 of 79.6 GiB in use", or empty on a CPU.
  std::string DeviceMemoryLine() const;
  int64_t ok() const { return ok_; }
  const engine::EngineStats& stats() const { return stats_; }

 private:
  Status Feed();
  Status Commit(engine::Result& r);
  Status Failure(const std::string& custom_id, const batch::RequestFailure& f);

  const RunOptions& o_;
  batch::ResultLog& log_;
  batch::CrashJournal& journal_;
  std::vector<const batch::InputLine*> pending_;
  size_t suspects_ = 0;
  std::map<std::string, int64_t>& failures_;

  std::unique_ptr<engine::Model> model_;
  std::unique_ptr<engine::Engine> engine_;
  std::optional<batch::InputReader> reader_;
  ResultQueue results_;
  std::unordered_map<uint64_t, batch::Endpoint> inflight_;  // by index into pending_
  size_t next_ = 0;
  size_t window_ = 0;
  int64_t created_ = 0;
  int64_t done_ = 0;
  int64_t ok_ = 0;
  engine::EngineStats stats_;
};

int BatchRun::Execute(Progress& progress, int64_t resumed) {
  const int64_t total = static_cast<int64_t>(pending_.size());
  auto model = engine::Model::Load({o_.model, o_.n_gpu_layers});
  if (!model.ok()) return Fail(model.status());
  model_ = std::move(model).value();
  // Each request is journaled as the engine starts and ends it (batch/crash_guard.h);
  // pending_ does not change while the engine runs.
  auto eng = engine::Engine::Start(
      model_.get(), o_.engine,
      [this](engine::Result&& r) {
        if (Status st = journal_.MarkDone(pending_[r.id]->line_no); !st.ok())
          std::fprintf(stderr, "kvbatch: %s\n", st.message().c_str());
        results_.Push(std::move(r));
      },
      nullptr,
      [this](const std::vector<uint64_t>& ids) {
        std::vector<int64_t> lines;
        lines.reserve(ids.size());
        for (uint64_t id : ids) lines.push_back(pending_[id]->line_no);
        if (Status st = journal_.MarkInFlight(lines); !st.ok())
          std::fprintf(stderr, "kvbatch: %s\n", st.message().c_str());
      });
  if (!eng.ok()) return Fail(eng.status());
  engine_ = std::move(eng).value();
  auto reader = batch::InputReader::Open(o_.input);
  if (!reader.ok()) return Fail(reader.status());
  reader_.emplace(std::move(reader).value());

  const engine::ContextInfo& info = engine_->info();
  if (!o_.quiet) {
    std::fprintf(stderr,
                 "kvbatch: %lld requests (%lld already answered) | model %s | %s | KV %d cells (%.0f MiB) | "
                 "%d parallel sequences | context %d\n",
                 static_cast<long long>(total), static_cast<long long>(resumed), model_->name().c_str(),
                 info.device.c_str(), info.kv_cells, static_cast<double>(info.kv_bytes) / (1 << 20), info.max_seqs,
                 info.n_ctx_seq);
  }
  // Keep enough requests queued for the scheduler to see shared prefixes
  // ahead, but not the whole file: memory stays bounded.
  window_ = static_cast<size_t>(info.max_seqs) * 2 + static_cast<size_t>(o_.engine.scheduler.lookahead);
  created_ = static_cast<int64_t>(std::time(nullptr));

  auto prev_int = std::signal(SIGINT, OnSignal);
  auto prev_term = std::signal(SIGTERM, OnSignal);
  int exit_code = 0;
  constexpr auto kSyncInterval = std::chrono::seconds(2);
  auto last_sync = std::chrono::steady_clock::now();
  while (done_ < total) {
    if (g_interrupted) {
      exit_code = 130;
      break;
    }
    Status st = Feed();
    for (engine::Result& r : results_.Wait(std::chrono::milliseconds(200)))
      if (st.ok()) st = Commit(r);
    if (!st.ok()) {
      exit_code = Fail(st);
      break;
    }
    // Every line is written to the OS as it finishes (a killed process
    // loses nothing); a group fdatasync every 2 s bounds what a power loss
    // can cost to recomputing that long (interleaved A/B runs showed no
    // throughput cost).
    if (auto now = std::chrono::steady_clock::now(); now - last_sync >= kSyncInterval) {
      if (Status sync = log_.Sync(); !sync.ok()) {
        exit_code = Fail(sync);
        break;
      }
      last_sync = now;
    }
    stats_ = engine_->Stats();
    progress.Update({done_, total, resumed, stats_});
  }
  stats_ = engine_->Stats();
  progress.Update({done_, total, resumed, stats_}, true);
  progress.Finish();
  std::signal(SIGINT, prev_int);
  std::signal(SIGTERM, prev_term);
  if (Status st = log_.Sync(); !st.ok()) Fail(st);
  if (exit_code == 130) {
    std::fprintf(stderr, "kvbatch: interrupted; %lld of %lld answered this run are saved; rerun the same command to resume\n",
                 static_cast<long long>(done_), static_cast<long long>(total));
  }
  return exit_code;
}

std::string BatchRun::DeviceMemoryLine() const {
  size_t free = 0, total = 0;
  if (engine_) engine_->DeviceMemory(&free, &total);
  if (total == 0) return "";
  char buf[96];
  std::snprintf(buf, sizeof buf, "GPU memory %.1f of %.1f GiB in use", static_cast<double>(total - free) / (1 << 30),
                static_cast<double>(total) / (1 << 30));
  return buf;
}

Status BatchRun::Failure(const std::string& custom_id, const batch::RequestFailure& f) {
  ++failures_[f.code];
  ++done_;
  return log_.AppendFailure(custom_id, batch::FailureLine(custom_id, f.http_status, batch::FailureBody(f)));
}

// Reads, parses and tokenizes lines until the window is full, then hands
// them to the engine in one go.
Status BatchRun::Feed() {
  std::vector<engine::Request> ready;
  while (next_ < pending_.size() && inflight_.size() < window_) {
    // A suspect of an earlier crash runs alone (the engine admits nothing
    // beside it), so a crash while it runs blames it alone.
    const bool suspect = next_ < suspects_;
    const batch::InputLine& line = *pending_[next_];
    const size_t index = next_++;
    auto text = reader_->ReadLine(line);
    if (!text.ok()) return text.status();
    std::string param;
    auto req = batch::ParseRequest(*text, &param);
    if (!req.ok()) {
      if (Status st = Failure(line.custom_id, {400, "invalid_request", req.status().message(), param}); !st.ok())
        return st;
      continue;
    }
    const batch::Endpoint endpoint = req->endpoint;
    auto prepared = batch::PrepareRequest(std::move(req).value(), *model_, o_.default_max_tokens, index);
    if (auto* f = std::get_if<batch::RequestFailure>(&prepared)) {
      if (Status st = Failure(line.custom_id, *f); !st.ok()) return st;
      continue;
    }
    inflight_.emplace(index, endpoint);
    engine::Request& er = ready.emplace_back(std::get<engine::Request>(std::move(prepared)));
    er.isolate = suspect;
    er.test_abort = batch::TestCrashOn(line.custom_id);
  }
  engine_->SubmitAll(std::move(ready));
  return Status::Ok();
}

Status BatchRun::Commit(engine::Result& r) {
  auto it = inflight_.find(r.id);
  if (it == inflight_.end()) return Status::Internal("result for an unknown request");
  const std::string& custom_id = pending_[r.id]->custom_id;
  const batch::Endpoint endpoint = it->second;
  inflight_.erase(it);
  if (!r.status.ok()) return Failure(custom_id, batch::FailureFromStatus(r.status));
  auto body = batch::ResponseBody(endpoint, r, model_->name(), created_);
  ++ok_;
  ++done_;
  return log_.AppendSuccess(custom_id, batch::SuccessLine(custom_id, body));
}

void PrintSummary(const RunOptions& o, const BatchRun* run, const std::map<std::string, int64_t>& failures,
                  int64_t resumed, double wall) {
  engine::EngineStats e = run ? run->stats() : engine::EngineStats{};
  const int64_t done = run ? run->done() : 0;
  int64_t failed = 0;
  for (auto& [_, n] : failures) failed += n;
  auto pct = [](int64_t a, int64_t b) { return b ? 100.0 * static_cast<double>(a) / static_cast<double>(b) : 0.0; };
  std::fprintf(stderr, "\nkvbatch: done in %s (%.1f s)\n", HumanDuration(wall).c_str(), wall);
  std::fprintf(stderr, "  requests     %lld ok, %lld failed", static_cast<long long>(run ? run->ok() : 0),
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
  if (run && !run->DeviceMemoryLine().empty()) std::fprintf(stderr, "  device       %s\n", run->DeviceMemoryLine().c_str());
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

  // 3. Requests in flight during earlier crashes: failed after kMaxCrashes,
  // else run first, each alone (batch/crash_guard.h).
  std::vector<int64_t> answered_lines;
  for (const auto& l : scan->valid)
    if (log->answered().count(l.custom_id)) answered_lines.push_back(l.line_no);
  auto journal = batch::CrashJournal::Open(o.output + ".inflight", answered_lines);
  if (!journal.ok()) return Fail(journal.status());
  auto pending = OrderPending(*scan, log->answered());
  std::vector<const batch::InputLine*> suspects, rest;
  for (const batch::InputLine* l : pending) {
    auto c = journal->crashes().find(l->line_no);
    const int32_t crashes = c == journal->crashes().end() ? 0 : c->second;
    if (crashes >= batch::kMaxCrashes) {
      const std::string msg = batch::CrashedMessage(crashes);
      std::fprintf(stderr, "kvbatch: line %lld (custom_id %s): %s\n", static_cast<long long>(l->line_no),
                   l->custom_id.c_str(), msg.c_str());
      if (Status st = log->AppendFailure(l->custom_id, batch::RequestErrorLine(l->custom_id, batch::kCrashedEngine, msg));
          !st.ok())
        return Fail(st);
      ++failures[batch::kCrashedEngine];
    } else {
      (crashes > 0 ? suspects : rest).push_back(l);
    }
  }
  if (!suspects.empty())
    std::fprintf(stderr, "kvbatch: %zu request(s) were running when an earlier run crashed; each runs again alone first\n",
                 suspects.size());
  const size_t n_suspects = suspects.size();
  suspects.insert(suspects.end(), rest.begin(), rest.end());
  pending = std::move(suspects);

  // 4. Run what is left.
  Progress progress(stderr, o.quiet, o.progress_interval);
  std::unique_ptr<BatchRun> run;
  if (!pending.empty()) {
    run = std::make_unique<BatchRun>(o, *log, *journal, std::move(pending), n_suspects, failures);
    const int rc = run->Execute(progress, resumed);
    // Finished, interrupted or stopped by an error: not a crash.
    if (Status st = journal->EndSession(); !st.ok()) return Fail(st);
    if (rc != 0) return rc;
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
  if (!o.quiet) PrintSummary(o, run.get(), failures, resumed, progress.elapsed());
  return 0;
}

}  // namespace kvb::cli

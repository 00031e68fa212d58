#include "cli/run_command.h"

#include <algorithm>
#include <atomic>
#include <csignal>
#include <ctime>
#include <deque>
#include <map>
#include <mutex>
#include <unordered_map>

#include "batch/input_file.h"
#include "batch/request.h"
#include "batch/response.h"
#include "batch/result_log.h"
#include "cli/progress.h"

namespace kvb::cli {

namespace {

std::atomic<bool> g_interrupted{false};

void OnSignal(int) { g_interrupted = true; }

// What the run remembers about a request in flight.
struct InFlight {
  size_t index;  // into the ordered pending list
  batch::Endpoint endpoint;
};

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

// Error kinds for the summary and the error body's code.
std::string ErrorCode(const Status& s) {
  switch (s.code()) {
    case StatusCode::kResourceExhausted: return "context_length_exceeded";
    case StatusCode::kInvalidArgument: return "invalid_request";
    case StatusCode::kFailedPrecondition: return "unsupported";
    default: return "server_error";
  }
}

int StatusCodeFor(const Status& s) {
  switch (s.code()) {
    case StatusCode::kResourceExhausted:
    case StatusCode::kInvalidArgument:
    case StatusCode::kFailedPrecondition: return 400;
    default: return 500;
  }
}

}  // namespace

int Run(const RunOptions& o) {
  // 1. Validate the whole input before anything runs.
  auto scan = batch::ScanInputFile(o.input);
  if (!scan.ok()) {
    std::fprintf(stderr, "kvbatch: %s\n", scan.status().message().c_str());
    return 1;
  }
  if (!scan->errors.empty()) {
    for (const auto& e : scan->errors)
      std::fprintf(stderr, "%s:%lld: %s [%s]\n", o.input.c_str(), static_cast<long long>(e.line), e.message.c_str(),
                   e.code.c_str());
    if (!o.skip_invalid) {
      std::fprintf(stderr, "kvbatch: %zu invalid line(s) in %s; nothing was run (use --skip-invalid to run the rest)\n",
                   scan->errors.size(), o.input.c_str());
      return 2;
    }
  }

  // 2. Open (or resume) the result files.
  auto log = batch::ResultLog::Open(o.output, o.errors);
  if (!log.ok()) {
    std::fprintf(stderr, "kvbatch: %s\n", log.status().message().c_str());
    return 1;
  }
  int64_t resumed = static_cast<int64_t>(log->answered().size());
  std::map<std::string, int64_t> failures;  // by error kind, this run
  if (o.skip_invalid) {
    for (const auto& e : scan->errors) {
      // A duplicate's id belongs to the first line; an unreadable line has no id.
      if (e.custom_id.empty() || e.code == batch::kDuplicateCustomId || log->answered().count(e.custom_id)) continue;
      std::string msg = "line " + std::to_string(e.line) + ": " + e.message;
      Status st = log->AppendFailure(e.custom_id, batch::RequestErrorLine(e.custom_id, e.code, msg));
      if (!st.ok()) {
        std::fprintf(stderr, "kvbatch: %s\n", st.message().c_str());
        return 1;
      }
      ++failures[e.code];
    }
  }

  // 3. Order what is left so that requests sharing a prefix run together:
  //    groups by prefix hash, in order of first appearance; input order within.
  std::vector<const batch::InputLine*> pending;
  std::unordered_map<uint64_t, size_t> group_first;
  for (const auto& l : scan->valid) {
    group_first.emplace(l.prefix_hash, group_first.size());
    if (!log->answered().count(l.custom_id)) pending.push_back(&l);
  }
  std::stable_sort(pending.begin(), pending.end(), [&](const batch::InputLine* a, const batch::InputLine* b) {
    return group_first[a->prefix_hash] < group_first[b->prefix_hash];
  });

  const int64_t total = static_cast<int64_t>(pending.size());
  Progress progress(stderr, o.quiet, o.progress_interval);
  int64_t done = 0, ok_count = 0;
  engine::EngineStats last_stats;
  std::string model_name;
  engine::ContextInfo info;

  if (!pending.empty()) {
    auto model = engine::Model::Load({o.model, o.n_gpu_layers});
    if (!model.ok()) {
      std::fprintf(stderr, "kvbatch: %s\n", model.status().message().c_str());
      return 1;
    }
    model_name = (*model)->name();
    ResultQueue results;
    auto eng = engine::Engine::Start(model->get(), o.engine, [&](engine::Result&& r) { results.Push(std::move(r)); });
    if (!eng.ok()) {
      std::fprintf(stderr, "kvbatch: %s\n", eng.status().message().c_str());
      return 1;
    }
    info = (*eng)->info();
    if (!o.quiet) {
      std::fprintf(stderr,
                   "kvbatch: %lld requests (%lld already answered) | model %s | %s | KV %d cells (%.0f MiB) | "
                   "%d parallel sequences | context %d\n",
                   static_cast<long long>(total), static_cast<long long>(resumed), model_name.c_str(),
                   info.device.c_str(), info.kv_cells, static_cast<double>(info.kv_bytes) / (1 << 20), info.max_seqs,
                   info.n_ctx_seq);
    }
    auto reader = batch::InputReader::Open(o.input);
    if (!reader.ok()) {
      std::fprintf(stderr, "kvbatch: %s\n", reader.status().message().c_str());
      return 1;
    }

    auto prev_int = std::signal(SIGINT, OnSignal);
    auto prev_term = std::signal(SIGTERM, OnSignal);
    // Keep enough requests queued for the scheduler to see shared prefixes
    // ahead, but not the whole file: memory stays bounded.
    const size_t window = static_cast<size_t>(info.max_seqs) * 2 + static_cast<size_t>(o.engine.scheduler.lookahead);
    std::unordered_map<uint64_t, InFlight> inflight;
    size_t next = 0;
    const int64_t created = static_cast<int64_t>(std::time(nullptr));
    int exit_code = 0;

    auto fail = [&](const std::string& custom_id, int code, const std::string& kind, const std::string& msg,
                    const std::string& param) {
      ++failures[kind];
      return log->AppendFailure(custom_id,
                                batch::FailureLine(custom_id, code, batch::ErrorBody(msg, code >= 500 ? "server_error" : "invalid_request_error", param, kind)));
    };

    while (done < total) {
      if (g_interrupted) {
        exit_code = 130;
        break;
      }
      // Feed the engine.
      std::vector<engine::Request> batch_in;
      while (next < pending.size() && inflight.size() < window) {
        const batch::InputLine& line = *pending[next];
        const size_t index = next++;
        Status st;
        auto text = reader->ReadLine(line);
        if (!text.ok()) {
          std::fprintf(stderr, "kvbatch: %s\n", text.status().message().c_str());
          return 1;
        }
        std::string param;
        auto req = batch::ParseRequest(*text, &param);
        if (!req.ok()) {
          st = fail(line.custom_id, 400, "invalid_request", req.status().message(), param);
          ++done;
        } else {
          std::string prompt;
          if (req->endpoint == batch::Endpoint::kChatCompletions) {
            auto formatted = (*model)->FormatChat(req->messages);
            if (!formatted.ok()) {
              st = fail(line.custom_id, 400, "unsupported", formatted.status().message(), "messages");
              ++done;
              if (!st.ok()) {
                std::fprintf(stderr, "kvbatch: %s\n", st.message().c_str());
                return 1;
              }
              continue;
            }
            prompt = std::move(formatted).value();
          } else {
            prompt = std::move(req->prompt);
          }
          engine::Request er;
          er.id = index;
          er.prompt = (*model)->Tokenize(prompt);
          er.sampling = std::move(req->sampling);
          inflight.emplace(index, InFlight{index, req->endpoint});
          batch_in.push_back(std::move(er));
        }
        if (!st.ok()) {
          std::fprintf(stderr, "kvbatch: %s\n", st.message().c_str());
          return 1;
        }
      }
      (*eng)->SubmitAll(std::move(batch_in));
      // Commit what finished.
      for (engine::Result& r : results.Wait(std::chrono::milliseconds(200))) {
        auto it = inflight.find(r.id);
        if (it == inflight.end()) continue;
        const std::string& custom_id = pending[it->second.index]->custom_id;
        Status st;
        if (!r.status.ok()) {
          st = fail(custom_id, StatusCodeFor(r.status), ErrorCode(r.status), r.status.message(), "");
        } else {
          auto body = it->second.endpoint == batch::Endpoint::kChatCompletions
                          ? batch::ChatCompletionBody(r, model_name, created, batch::NewId("chatcmpl-"))
                          : batch::TextCompletionBody(r, model_name, created, batch::NewId("cmpl-"));
          st = log->AppendSuccess(custom_id, batch::SuccessLine(custom_id, body));
          ++ok_count;
        }
        if (!st.ok()) {
          std::fprintf(stderr, "kvbatch: %s\n", st.message().c_str());
          return 1;
        }
        inflight.erase(it);
        ++done;
      }
      last_stats = (*eng)->Stats();
      progress.Update({done, total, resumed, last_stats});
    }
    last_stats = (*eng)->Stats();
    progress.Update({done, total, resumed, last_stats}, true);
    progress.Finish();
    std::signal(SIGINT, prev_int);
    std::signal(SIGTERM, prev_term);
    if (Status st = log->Sync(); !st.ok()) std::fprintf(stderr, "kvbatch: %s\n", st.message().c_str());
    if (exit_code != 0) {
      std::fprintf(stderr, "kvbatch: interrupted; %lld of %lld answered this run are saved; rerun the same command to resume\n",
                   static_cast<long long>(done), static_cast<long long>(total));
      return exit_code;
    }
  }

  // 4. Everything answered: put the files in input order.
  std::unordered_map<std::string_view, int64_t> line_of;
  for (const auto& l : scan->valid) line_of.emplace(l.custom_id, l.line_no);
  for (const auto& e : scan->errors)
    if (!e.custom_id.empty() && e.code != batch::kDuplicateCustomId) line_of.emplace(e.custom_id, e.line);
  Status st = log->Finalize([&](std::string_view id) {
    auto it = line_of.find(id);
    return it == line_of.end() ? INT64_MAX : it->second;
  });
  if (!st.ok()) {
    std::fprintf(stderr, "kvbatch: %s\n", st.message().c_str());
    return 1;
  }

  if (!o.quiet) {
    const auto& e = last_stats;
    const double wall = progress.elapsed();
    int64_t failed = 0;
    for (auto& [_, n] : failures) failed += n;
    std::fprintf(stderr, "\nkvbatch: done in %s (%.1f s)\n", HumanDuration(wall).c_str(), wall);
    std::fprintf(stderr, "  requests     %lld ok, %lld failed", static_cast<long long>(ok_count), static_cast<long long>(failed));
    if (resumed > 0) std::fprintf(stderr, ", %lld answered by an earlier run", static_cast<long long>(resumed));
    std::fprintf(stderr, "\n");
    for (auto& [kind, n] : failures) std::fprintf(stderr, "    %-28s %lld\n", kind.c_str(), static_cast<long long>(n));
    const int64_t saved = e.prompt_tokens - e.prefill_tokens;
    std::fprintf(stderr, "  prompt       %lld tokens: %lld computed, %lld served from shared prefixes (%.1f%%)\n",
                 static_cast<long long>(e.prompt_tokens), static_cast<long long>(e.prefill_tokens),
                 static_cast<long long>(e.cached_tokens),
                 e.prompt_tokens ? 100.0 * static_cast<double>(e.cached_tokens) / static_cast<double>(e.prompt_tokens) : 0.0);
    std::fprintf(stderr, "  completion   %lld tokens\n", static_cast<long long>(e.completion_tokens));
    std::fprintf(stderr, "  throughput   %.2f req/s, %.0f tok/s\n", wall > 0 ? static_cast<double>(done) / wall : 0.0,
                 wall > 0 ? static_cast<double>(e.prefill_tokens + e.completion_tokens) / wall : 0.0);
    std::fprintf(stderr, "  saved        %lld prompt tokens not recomputed vs running each request alone (%.1fx less prefill)\n",
                 static_cast<long long>(saved),
                 e.prefill_tokens ? static_cast<double>(e.prompt_tokens) / static_cast<double>(e.prefill_tokens) : 0.0);
    std::fprintf(stderr, "  KV cells     peak %d of %d\n", e.cells_peak, e.cells_total);
    std::fprintf(stderr, "  output       %s%s%s\n", o.output.c_str(), o.errors.empty() ? "" : ", errors in ", o.errors.c_str());
  }
  return 0;
}

}  // namespace kvb::cli

#include "worker/batch_worker.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <filesystem>

#include "batch/crash_guard.h"
#include "batch/prefix_order.h"
#include "batch/prepare.h"
#include "batch/response.h"

namespace kvb::worker {

namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kCommitBatch = 512;  // outcomes that force a group commit

bool Unfinished(const std::string& status) {
  return std::find(store::kUnfinishedStatuses.begin(), store::kUnfinishedStatuses.end(), status) !=
         store::kUnfinishedStatuses.end();
}

const char* StoppedMessage(std::string_view code, bool ran) {
  if (code == "batch_expired") return "The batch expired before this request ran.";
  return ran ? "The batch was cancelled before this request finished." : "The batch was cancelled before this request ran.";
}

// Appends to a file opened for writing; fsyncs on Close.
class FileWriter {
 public:
  ~FileWriter() {
    if (fd_ >= 0) ::close(fd_);
  }
  Status Open(const std::string& path) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd_ < 0) return Status::IoError("cannot create " + path);
    return Status::Ok();
  }
  Status Append(std::string_view line) {
    buf_.append(line);
    buf_.push_back('\n');
    return buf_.size() >= (1 << 20) ? Flush() : Status::Ok();
  }
  Status Close() {
    if (Status st = Flush(); !st.ok()) return st;
    if (::fsync(fd_) != 0) return Status::IoError("fsync failed");
    ::close(fd_);
    fd_ = -1;
    return Status::Ok();
  }
  int64_t bytes() const { return bytes_; }

 private:
  Status Flush() {
    size_t off = 0;
    while (off < buf_.size()) {
      ssize_t n = ::write(fd_, buf_.data() + off, buf_.size() - off);
      if (n < 0) return Status::IoError("write failed");
      off += static_cast<size_t>(n);
    }
    bytes_ += static_cast<int64_t>(buf_.size());
    buf_.clear();
    return Status::Ok();
  }
  int fd_ = -1;
  std::string buf_;
  int64_t bytes_ = 0;
};

}  // namespace

struct BatchWorker::Active {
  store::BatchRecord rec;
  batch::Endpoint endpoint = batch::Endpoint::kChatCompletions;
  std::optional<batch::InputReader> reader;
  std::vector<store::PendingRequest> queue;  // in feeding order
  size_t suspects = 0;  // queue[0, suspects) were in flight in a crash: each runs alone
  size_t next = 0;
  int64_t in_flight = 0;
  const char* stop_code = nullptr;  // "batch_cancelled" / "batch_expired" once stopping
  int64_t created = 0;              // `created` of the response bodies
  // Progress samples: (time, requests answered, output tokens) in this process.
  std::deque<std::tuple<Clock::time_point, int64_t, int64_t>> samples;
  int64_t answered = 0;
  int64_t output_tokens = 0;
};

BatchWorker::BatchWorker(store::Store* store, EngineHub* hub, const engine::Model* model, WorkerOptions options)
    : store_(store), hub_(hub), model_(model), options_(std::move(options)) {
  if (options_.window <= 0) options_.window = 2 * hub_->max_seqs() + 64;
}

BatchWorker::~BatchWorker() { Stop(); }

void BatchWorker::Start() {
  // Requests still marked in flight were running when the process died.
  if (auto n = store_->RecoverInFlight(); !n.ok()) {
    std::fprintf(stderr, "kvbatch: store: %s\n", n.status().message().c_str());
  } else if (*n > 0) {
    std::fprintf(stderr,
                 "kvbatch: %lld request(s) were running when the server stopped unexpectedly; each runs again "
                 "alone (one in flight during %d crashes fails with %s)\n",
                 static_cast<long long>(*n), batch::kMaxCrashes, batch::kCrashedEngine);
  }
  last_commit_ = last_refresh_ = Clock::now();
  thread_ = std::thread([this] { Loop(); });
}

void BatchWorker::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // A clean stop: what was in the engine did not crash it.
  if (Status st = store_->ClearInFlight(); !st.ok())
    std::fprintf(stderr, "kvbatch: store: %s\n", st.message().c_str());
}

void BatchWorker::Wake() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    wake_ = true;
  }
  cv_.notify_all();
}

int64_t BatchWorker::Now() const { return static_cast<int64_t>(std::time(nullptr)); }

StatusOr<store::BatchRecord> BatchWorker::Cancel(const std::string& id) {
  std::lock_guard<std::mutex> lock(record_mu_);
  auto rec = store_->GetBatch(id);
  if (!rec.ok()) return rec.status();
  if (rec->status == "cancelling" || rec->status == "cancelled") return rec;
  if (rec->status != "validating" && rec->status != "in_progress")
    return Status::FailedPrecondition("Cannot cancel a batch with status '" + rec->status + "'.");
  rec->status = "cancelling";
  rec->cancelling_at = Now();
  if (Status st = store_->UpdateBatch(*rec); !st.ok()) return st;
  Wake();
  return rec;
}

StatusOr<store::BatchRecord> BatchWorker::SetPaused(const std::string& id, bool paused) {
  std::lock_guard<std::mutex> lock(record_mu_);
  auto rec = store_->GetBatch(id);
  if (!rec.ok()) return rec.status();
  if (!Unfinished(rec->status))
    return Status::FailedPrecondition("Cannot " + std::string(paused ? "pause" : "resume") +
                                      " a batch with status '" + rec->status + "'.");
  rec->paused = paused;
  if (Status st = store_->UpdateBatch(*rec); !st.ok()) return st;
  Wake();
  return rec;
}

std::optional<BatchProgress> BatchWorker::Progress(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = progress_.find(id);
  if (it == progress_.end()) return std::nullopt;
  return it->second;
}

void BatchWorker::Loop() {
  Refresh();
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(50), [&] { return stop_ || wake_ || !done_.empty(); });
      if (stop_) break;
    }
    Collect();
    CommitOutcomes(false);
    bool woken;
    {
      std::lock_guard<std::mutex> lock(mu_);
      woken = wake_;
      wake_ = false;
    }
    if (woken || Clock::now() - last_refresh_ > std::chrono::milliseconds(500)) Refresh();
    Feed();
    FinishIdle();
  }
  Collect();
  CommitOutcomes(true);
}

// Picks up batch changes from the store: new batches (validated here),
// cancellations, pauses, priorities, expiry.
void BatchWorker::Refresh() {
  last_refresh_ = Clock::now();
  auto recs = store_->BatchesWithStatus(store::kUnfinishedStatuses);
  if (!recs.ok()) {
    std::fprintf(stderr, "kvbatch: store: %s\n", recs.status().message().c_str());
    return;
  }
  const int64_t now = Now();
  for (store::BatchRecord& rec : *recs) {
    if (rec.status == "validating") {
      Validate(std::move(rec));
      last_refresh_ = Clock::time_point{};  // pick it up as in_progress on the next tick
      continue;
    }
    auto it = active_.find(rec.id);
    if (it == active_.end()) {
      Activate(rec);
      it = active_.find(rec.id);
      if (it == active_.end()) continue;
    }
    Active& a = *it->second;
    a.rec = rec;
    if (rec.status == "cancelling") {
      Stopping(a, "batch_cancelled");
    } else if (rec.status == "in_progress" && rec.expires_at > 0 && now >= rec.expires_at) {
      Stopping(a, "batch_expired");
    }
  }
}

void BatchWorker::Validate(store::BatchRecord rec) {
  std::vector<store::BatchError> errors;
  std::vector<store::PendingRequest> rows;
  auto file = store_->GetFile(rec.input_file_id);
  auto endpoint = batch::EndpointFromPath(rec.endpoint);
  if (!file.ok()) {
    errors.push_back({"invalid_input_file", "The input file " + rec.input_file_id + " no longer exists.",
                      "input_file_id", 0});
  } else if (!endpoint) {
    errors.push_back({"invalid_endpoint", "Unsupported endpoint " + rec.endpoint + ".", "endpoint", 0});
  } else {
    auto scan = batch::ScanInputFile(file->path);
    if (!scan.ok()) {
      errors.push_back({"invalid_input_file", scan.status().message(), "input_file_id", 0});
    } else {
      size_t dropped = 0;
      auto add = [&](store::BatchError e) {
        if (errors.size() < options_.max_listed_errors) {
          errors.push_back(std::move(e));
        } else {
          ++dropped;
        }
      };
      for (const batch::LineError& e : scan->errors) add({e.code, e.message, e.param, e.line});
      for (const batch::InputLine& l : scan->valid) {
        if (l.endpoint != *endpoint) {
          add({"mismatched_endpoint",
               "Line " + std::to_string(l.line_no) + ": the url " + std::string(batch::EndpointPath(l.endpoint)) +
                   " does not match the batch's endpoint " + rec.endpoint + ".",
               "url", l.line_no});
        }
        rows.push_back({l.line_no, l.custom_id, static_cast<int64_t>(l.offset), static_cast<int64_t>(l.length),
                        l.prefix_hash});
      }
      if (scan->total_lines == 0) errors.push_back({"empty_file", "The input file has no requests.", "", 0});
      if (dropped > 0)
        errors.push_back({"too_many_errors", std::to_string(dropped) + " more errors are not listed.", "", 0});
    }
  }
  std::lock_guard<std::mutex> lock(record_mu_);
  auto fresh = store_->GetBatch(rec.id);
  if (!fresh.ok() || fresh->status != "validating") return;  // cancelled meanwhile: Refresh handles it
  rec = *fresh;
  const int64_t now = Now();
  Status st;
  if (!errors.empty()) {
    rec.status = "failed";
    rec.failed_at = now;
    rec.errors = std::move(errors);
    st = store_->UpdateBatch(rec);
  } else {
    st = store_->AddRequests(rec.id, rows);
    if (st.ok()) {
      rec.status = "in_progress";
      rec.in_progress_at = now;
      rec.counts.total = static_cast<int64_t>(rows.size());
      st = store_->UpdateBatch(rec);
    }
  }
  if (!st.ok()) std::fprintf(stderr, "kvbatch: batch %s: %s\n", rec.id.c_str(), st.message().c_str());
}

// Loads a batch's pending requests, ordered so requests sharing a prefix run together.
void BatchWorker::Activate(const store::BatchRecord& rec) {
  auto a = std::make_unique<Active>();
  a->rec = rec;
  a->created = Now();
  auto endpoint = batch::EndpointFromPath(rec.endpoint);
  if (endpoint) a->endpoint = *endpoint;
  if (rec.status != "finalizing") {
    auto pending = store_->PendingRequests(rec.id);
    if (!pending.ok()) {
      std::fprintf(stderr, "kvbatch: batch %s: %s\n", rec.id.c_str(), pending.status().message().c_str());
      return;
    }
    a->queue = std::move(pending).value();
    batch::GroupBySharedPrefix(a->queue, [](const store::PendingRequest& p) { return p.prefix_hash; });
    // Poison requests (batch/crash_guard.h): failed after kMaxCrashes, else
    // suspects first, each fed alone.
    std::vector<store::PendingRequest> suspects, rest;
    for (store::PendingRequest& p : a->queue) {
      if (p.crashes >= batch::kMaxCrashes) {
        const std::string msg = batch::CrashedMessage(p.crashes);
        std::fprintf(stderr, "kvbatch: batch %s line %lld (custom_id %s): %s\n", rec.id.c_str(),
                     static_cast<long long>(p.line), p.custom_id.c_str(), msg.c_str());
        outcomes_[rec.id].push_back(
            {p.line, false, batch::RequestErrorLine(p.custom_id, batch::kCrashedEngine, msg), 0, 0, 0});
      } else {
        (p.crashes > 0 ? suspects : rest).push_back(std::move(p));
      }
    }
    a->suspects = suspects.size();
    suspects.insert(suspects.end(), std::make_move_iterator(rest.begin()), std::make_move_iterator(rest.end()));
    a->queue = std::move(suspects);
    if (!a->queue.empty()) {
      auto file = store_->GetFile(rec.input_file_id);
      auto reader = file.ok() ? batch::InputReader::Open(file->path) : StatusOr<batch::InputReader>(file.status());
      if (reader.ok()) {
        a->reader.emplace(std::move(reader).value());
      } else {
        // The input is gone (deleted after a crash): its requests cannot run.
        std::fprintf(stderr, "kvbatch: batch %s: input file: %s\n", rec.id.c_str(),
                     reader.status().message().c_str());
      }
    }
  }
  active_[rec.id] = std::move(a);
}

void BatchWorker::Stopping(Active& a, const char* code) {
  if (a.stop_code != nullptr) return;
  a.stop_code = code;
  a.next = a.queue.size();  // feed nothing more
  for (const auto& [id, where] : inflight_)
    if (where.first == a.rec.id) hub_->Cancel(id);
}

void BatchWorker::Feed() {
  int64_t in_flight = static_cast<int64_t>(inflight_.size());
  if (in_flight >= options_.window) return;
  std::vector<Active*> order;
  for (auto& [id, a] : active_)
    if (a->rec.status == "in_progress" && !a->rec.paused && a->stop_code == nullptr && a->next < a->queue.size())
      order.push_back(a.get());
  std::stable_sort(order.begin(), order.end(), [](const Active* x, const Active* y) {
    if (x->rec.priority != y->rec.priority) return x->rec.priority > y->rec.priority;
    return x->rec.created_at < y->rec.created_at;
  });
  std::vector<std::pair<engine::Request, RequestCallbacks>> ready;
  for (Active* a : order) {
    while (a->next < a->queue.size() && in_flight < options_.window) {
      const bool suspect = a->next < a->suspects;
      const store::PendingRequest& p = a->queue[a->next++];
      std::optional<batch::RequestFailure> failure;
      std::optional<engine::Request> request;
      if (!a->reader) {
        failure = batch::RequestFailure{500, "server_error", "the batch's input file is gone", ""};
      } else {
        batch::InputLine line;
        line.line_no = p.line;
        line.offset = static_cast<uint64_t>(p.offset);
        line.length = static_cast<uint32_t>(p.length);
        auto text = a->reader->ReadLine(line);
        std::string param;
        auto parsed = text.ok() ? batch::ParseRequest(*text, &param) : StatusOr<batch::ParsedRequest>(text.status());
        if (!parsed.ok()) {
          failure = batch::RequestFailure{text.ok() ? 400 : 500, text.ok() ? "invalid_request" : "server_error",
                                          parsed.status().message(), param};
        } else {
          auto prepared =
              batch::PrepareRequest(std::move(parsed).value(), *model_, options_.default_max_tokens, hub_->NextId());
          if (auto* f = std::get_if<batch::RequestFailure>(&prepared)) {
            failure = *f;
          } else {
            request = std::get<engine::Request>(std::move(prepared));
          }
        }
      }
      if (failure) {
        std::string line = batch::FailureLine(p.custom_id, failure->http_status, batch::FailureBody(*failure));
        outcomes_[a->rec.id].push_back({p.line, false, std::move(line), 0, 0, 0});
        continue;
      }
      const uint64_t id = request->id;
      request->isolate = suspect;
      request->test_abort = batch::TestCrashOn(p.custom_id);
      inflight_[id] = {a->rec.id, p.line};
      ++a->in_flight;
      ++in_flight;
      RequestCallbacks cb;
      cb.on_result = [this, batch_id = a->rec.id, line = p.line, custom_id = p.custom_id](engine::Result&& r) {
        // Done with the engine: a crash before the commit is not this request's.
        if (Status st = store_->UnmarkInFlight(batch_id, {line}); !st.ok())
          std::fprintf(stderr, "kvbatch: store: %s\n", st.message().c_str());
        {
          std::lock_guard<std::mutex> lock(mu_);
          done_.push_back({batch_id, line, custom_id, std::move(r)});
        }
        cv_.notify_all();
      };
      // Recorded in the store as the engine starts it, before its first
      // token, and cleared as it ends (batch/crash_guard.h).
      cb.on_admit = [this, batch_id = a->rec.id, line = p.line] {
        if (Status st = store_->MarkInFlight(batch_id, {line}); !st.ok())
          std::fprintf(stderr, "kvbatch: store: %s\n", st.message().c_str());
      };
      ready.emplace_back(std::move(*request), std::move(cb));
    }
  }
  if (!ready.empty()) hub_->SubmitAll(std::move(ready));
}

store::RequestOutcome BatchWorker::OutcomeFor(Active& a, Done& d) {
  const engine::Result& r = d.result;
  if (r.status.code() == StatusCode::kCancelled && a.stop_code != nullptr)
    return {d.line, false, batch::RequestErrorLine(d.custom_id, a.stop_code, StoppedMessage(a.stop_code, true)), 0, 0,
            0};
  if (!r.status.ok()) {
    batch::RequestFailure f = batch::FailureFromStatus(r.status);
    return {d.line, false, batch::FailureLine(d.custom_id, f.http_status, batch::FailureBody(f)), r.prompt_tokens, 0,
            0};
  }
  auto body = batch::ResponseBody(a.endpoint, r, model_->name(), a.created);
  return {d.line, true, batch::SuccessLine(d.custom_id, body), r.prompt_tokens, r.cached_tokens,
          r.completion_tokens};
}

void BatchWorker::Collect() {
  std::vector<Done> done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    done.swap(done_);
  }
  for (Done& d : done) {
    inflight_.erase(d.result.id);
    auto a = active_.find(d.batch_id);
    if (a == active_.end()) continue;
    --a->second->in_flight;
    outcomes_[d.batch_id].push_back(OutcomeFor(*a->second, d));
  }
}

void BatchWorker::CommitOutcomes(bool force) {
  size_t n = 0;
  for (const auto& [id, v] : outcomes_) n += v.size();
  if (n == 0) return;
  if (!force && n < kCommitBatch && Clock::now() - last_commit_ < options_.commit_interval) return;
  last_commit_ = Clock::now();
  for (auto it = outcomes_.begin(); it != outcomes_.end();) {
    auto recorded = store_->CommitResults(it->first, it->second);
    if (!recorded.ok()) {
      // Kept for the next try: a failing disk must not lose answers.
      std::fprintf(stderr, "kvbatch: committing results of %s: %s\n", it->first.c_str(),
                   recorded.status().message().c_str());
      ++it;
      continue;
    }
    auto a = active_.find(it->first);
    if (a != active_.end()) {
      Active& b = *a->second;
      int64_t tokens = 0;
      for (const auto& o : it->second) tokens += o.output_tokens;
      b.answered += static_cast<int64_t>(it->second.size());
      b.output_tokens += tokens;
      if (auto fresh = store_->GetBatch(it->first); fresh.ok()) {
        b.rec.counts = fresh->counts;
        b.rec.usage = fresh->usage;
      }
      const auto now = Clock::now();
      b.samples.emplace_back(now, b.answered, b.output_tokens);
      while (b.samples.size() > 2 && now - std::get<0>(b.samples.front()) > std::chrono::seconds(30))
        b.samples.pop_front();
      BatchProgress pr;
      pr.in_flight = b.in_flight;
      if (b.samples.size() >= 2) {
        const auto& [t0, r0, k0] = b.samples.front();
        const double dt = std::chrono::duration<double>(now - t0).count();
        if (dt > 0.2) {
          pr.requests_per_second = static_cast<double>(b.answered - r0) / dt;
          pr.tokens_per_second = static_cast<double>(b.output_tokens - k0) / dt;
          const int64_t left = b.rec.counts.total - b.rec.counts.completed - b.rec.counts.failed;
          if (pr.requests_per_second > 0) pr.eta_seconds = static_cast<double>(left) / pr.requests_per_second;
        }
      }
      std::lock_guard<std::mutex> lock(mu_);
      progress_[it->first] = pr;
    }
    it = outcomes_.erase(it);
  }
}

void BatchWorker::FinishIdle() {
  std::vector<std::string> ready;
  for (auto& [id, a] : active_) {
    if (a->in_flight > 0 || a->next < a->queue.size() || outcomes_.count(id)) continue;
    if (a->rec.paused && a->stop_code == nullptr && a->rec.status == "in_progress" && !a->queue.empty()) continue;
    ready.push_back(id);
  }
  for (const std::string& id : ready) {
    auto it = active_.find(id);
    if (Status st = Finalize(*it->second); !st.ok()) {
      // Left active: the next tick tries again.
      std::fprintf(stderr, "kvbatch: finalizing %s: %s\n", id.c_str(), st.message().c_str());
      continue;
    }
    active_.erase(it);
    std::lock_guard<std::mutex> lock(mu_);
    progress_.erase(id);
  }
}

Status BatchWorker::Finalize(Active& a) {
  // A stopped batch: every request that never ran goes to the error file.
  if (a.stop_code != nullptr) {
    auto pending = store_->PendingRequests(a.rec.id);
    if (!pending.ok()) return pending.status();
    std::vector<store::RequestOutcome> outs;
    outs.reserve(pending->size());
    for (const auto& p : *pending)
      outs.push_back(
          {p.line, false, batch::RequestErrorLine(p.custom_id, a.stop_code, StoppedMessage(a.stop_code, false)), 0, 0,
           0});
    if (!outs.empty()) {
      auto n = store_->CommitResults(a.rec.id, outs);
      if (!n.ok()) return n.status();
    }
  }
  std::string final_status = a.stop_code == nullptr                              ? "completed"
                             : std::string_view(a.stop_code) == "batch_expired" ? "expired"
                                                                                 : "cancelled";
  {
    std::lock_guard<std::mutex> lock(record_mu_);
    auto fresh = store_->GetBatch(a.rec.id);
    if (!fresh.ok()) return fresh.status();
    if (fresh->status == "cancelling") final_status = "cancelled";
    if (final_status == "completed" && fresh->status != "finalizing") {
      fresh->status = "finalizing";
      fresh->finalizing_at = Now();
      if (Status st = store_->UpdateBatch(*fresh); !st.ok()) return st;
    }
  }
  std::vector<store::FileRecord> files;
  if (Status st = WriteResultFiles(a, files); !st.ok()) return st;
  std::lock_guard<std::mutex> lock(record_mu_);
  auto fresh = store_->GetBatch(a.rec.id);
  if (!fresh.ok()) return fresh.status();
  store::BatchRecord rec = std::move(fresh).value();
  if (rec.status == "cancelling") final_status = "cancelled";
  const int64_t now = Now();
  rec.status = final_status;
  if (final_status == "completed") rec.completed_at = now;
  if (final_status == "cancelled") rec.cancelled_at = now;
  if (final_status == "expired") rec.expired_at = now;
  for (const auto& f : files) {
    if (f.filename.find("_output") != std::string::npos) rec.output_file_id = f.id;
    if (f.filename.find("_error") != std::string::npos) rec.error_file_id = f.id;
  }
  return store_->FinalizeBatch(rec, files);
}

// The output file (answered with 2xx) and the error file (everything else),
// in input order, each custom_id exactly once across the two. A file with no
// lines is not created (its id stays null, as with OpenAI).
Status BatchWorker::WriteResultFiles(Active& a, std::vector<store::FileRecord>& files) {
  struct Out {
    std::string id, path, name;
    FileWriter w;
    bool open = false;
  };
  Out outs[2];
  outs[0].name = a.rec.id + "_output.jsonl";
  outs[1].name = a.rec.id + "_error.jsonl";
  Status st = store_->ForEachRequest(a.rec.id, [&](const store::StoredRequest& r) -> Status {
    if (r.state == store::RequestState::kPending)
      return Status::Internal("request on line " + std::to_string(r.line) + " is still pending");
    Out& o = outs[r.state == store::RequestState::kCompleted ? 0 : 1];
    if (!o.open) {
      o.id = batch::NewId("file-");
      o.path = options_.files_dir + "/" + o.id + ".jsonl";
      if (Status s = o.w.Open(o.path + ".tmp"); !s.ok()) return s;
      o.open = true;
    }
    return o.w.Append(r.result_line);
  });
  for (Out& o : outs) {
    if (!o.open) continue;
    if (st.ok()) st = o.w.Close();
    std::error_code ec;
    if (st.ok()) {
      std::filesystem::rename(o.path + ".tmp", o.path, ec);
      if (ec) st = Status::IoError("cannot rename " + o.path + ": " + ec.message());
    }
    if (!st.ok()) {
      std::filesystem::remove(o.path + ".tmp", ec);
      continue;
    }
    store::FileRecord f;
    f.id = o.id;
    f.filename = o.name;
    f.purpose = "batch_output";
    f.path = o.path;
    f.bytes = o.w.bytes();
    f.created_at = Now();
    files.push_back(std::move(f));
  }
  return st;
}

}  // namespace kvb::worker

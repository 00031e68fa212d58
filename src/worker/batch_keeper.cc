#include "worker/batch_keeper.h"

#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <random>
#include <vector>

#include "batch/response.h"
#include "worker/batch_files.h"

namespace kvb::worker {
namespace {

using Clock = std::chrono::steady_clock;
using store::BatchStatus;

int64_t Now() { return static_cast<int64_t>(std::time(nullptr)); }

void Log(const std::string& batch_id, const std::string& what, const Status& st) {
  std::fprintf(stderr, "kvbatch: batch %s: %s: %s\n", batch_id.c_str(), what.c_str(), st.message().c_str());
}

}  // namespace

std::string NewOwnerName() {
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0) std::snprintf(host, sizeof host, "host");
  std::random_device rd;
  char tail[16];
  std::snprintf(tail, sizeof tail, "%08x", rd());
  return std::string(host) + ":" + std::to_string(::getpid()) + ":" + tail;
}

const char* StoppedMessage(std::string_view code, bool ran) {
  if (code == "batch_expired") return "The batch expired before this request ran.";
  return ran ? "The batch was cancelled before this request finished." : "The batch was cancelled before this request ran.";
}

BatchKeeper::BatchKeeper(store::Store* store, DriverOptions options) : store_(store), options_(std::move(options)) {
  if (options_.owner.empty()) options_.owner = NewOwnerName();
}

BatchKeeper::~BatchKeeper() { Stop(); }

void BatchKeeper::Start() {
  thread_ = std::thread([this] { Loop(); });
}

void BatchKeeper::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void BatchKeeper::Wake() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    wake_ = true;
  }
  cv_.notify_all();
}

std::optional<BatchProgress> BatchKeeper::Progress(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = progress_.find(id);
  if (it == progress_.end()) return std::nullopt;
  return it->second;
}

void BatchKeeper::Loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, options_.poll_interval, [&] { return stop_ || wake_; });
      if (stop_) return;
      wake_ = false;
    }
    Tick();
  }
}

// Task leases (validation, finalization) last longer than a chunk's: the
// work is one long step without commits to renew it.
bool BatchKeeper::Lease(const std::string& id) {
  auto held = store_->LeaseBatch(id, options_.owner, 4 * options_.lease_ms);
  if (!held.ok()) {
    Log(id, "lease", held.status());
    return false;
  }
  return *held;
}

void BatchKeeper::Tick() {
  std::vector<BatchStatus> unfinished(store::kUnfinishedStatuses.begin(), store::kUnfinishedStatuses.end());
  auto recs = store_->BatchesWithStatus(unfinished);
  if (!recs.ok()) {
    std::fprintf(stderr, "kvbatch: store: %s\n", recs.status().message().c_str());
    return;
  }
  std::map<std::string, bool> seen;
  const int64_t now = Now();
  for (const store::BatchRecord& rec : *recs) {
    seen[rec.id] = true;
    switch (rec.status) {
      case BatchStatus::kValidating: Leased(rec.id, [&] { Validate(rec); }); break;
      case BatchStatus::kInProgress:
        Sample(rec);
        if (rec.counts.completed + rec.counts.failed >= rec.counts.total) {
          auto moved = store_->TransitionBatch(rec.id, {BatchStatus::kInProgress}, BatchStatus::kFinalizing, now);
          if (moved.ok()) Leased(rec.id, [&] { End(*moved, BatchStatus::kCompleted); });
        } else if (rec.expires_at > 0 && now >= rec.expires_at) {
          Leased(rec.id, [&] { Stop(rec, "batch_expired", BatchStatus::kExpired); });
        }
        break;
      case BatchStatus::kFinalizing: Leased(rec.id, [&] { End(rec, BatchStatus::kCompleted); }); break;
      case BatchStatus::kCancelling:
        Leased(rec.id, [&] { Stop(rec, "batch_cancelled", BatchStatus::kCancelled); });
        break;
      default: break;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = samples_.begin(); it != samples_.end();) {
    if (seen.count(it->first)) {
      ++it;
      continue;
    }
    progress_.erase(it->first);
    it = samples_.erase(it);
  }
}

// Runs `task` under the batch's task lease (so one node does it) and gives
// the lease back after, done or waiting, so another node can take the next
// step at once instead of waiting for the lease to lapse.
void BatchKeeper::Leased(const std::string& id, const std::function<void()>& task) {
  if (!Lease(id)) return;
  task();
  if (auto r = store_->LeaseBatch(id, options_.owner, 0); !r.ok()) Log(id, "lease", r.status());
}

void BatchKeeper::Validate(const store::BatchRecord& rec) {
  auto input = store_->LocalFile(rec.input_file_id, options_.cache_dir);
  if (!input.ok() && input.status().code() != StatusCode::kNotFound) {
    // The database away or a full disk: not the file's fault; next tick.
    return Log(rec.id, "reading the input file (will retry)", input.status());
  }
  Validation v = ValidateBatchInput(rec, input, options_.max_listed_errors, options_.chunk_rows);
  Status st = v.errors.empty() ? store_->AddRequests(rec.id, v.rows, Now()) : store_->FailBatch(rec.id, v.errors, Now());
  // FailedPrecondition: cancelled (or validated by another node) meanwhile.
  if (!st.ok() && st.code() != StatusCode::kFailedPrecondition) Log(rec.id, "validation", st);
}

// Writes the output and error files and moves the batch from its status to
// `to` with them; another node having ended it first is not an error.
void BatchKeeper::End(const store::BatchRecord& rec, BatchStatus to) {
  auto files = WriteResultFiles(store_, rec, options_.cache_dir, Now());
  if (!files.ok()) return Log(rec.id, "writing result files", files.status());
  auto done = store_->FinalizeBatch(rec.id, rec.status, to, Now(), files->output, files->error);
  if (!done.ok()) {
    DiscardResultFiles(*files);
    if (done.status().code() != StatusCode::kFailedPrecondition) Log(rec.id, "finalizing", done.status());
  }
}

void BatchKeeper::Stop(const store::BatchRecord& rec, const char* code, BatchStatus to) {
  // Holders of its chunks answer what they are running and let go first.
  auto leased = store_->LeasedChunks(rec.id);
  if (!leased.ok()) return Log(rec.id, "leases", leased.status());
  if (*leased > 0) return;
  auto pending = store_->PendingRequests(rec.id);
  if (!pending.ok()) return Log(rec.id, "pending requests", pending.status());
  std::vector<store::RequestOutcome> outs;
  outs.reserve(pending->size());
  for (const store::PendingRequest& p : *pending)
    outs.push_back({p.line, false, batch::RequestErrorLine(p.custom_id, code, StoppedMessage(code, false)), 0, 0, 0});
  if (!outs.empty()) {
    if (auto n = store_->CommitResults(rec.id, outs); !n.ok()) return Log(rec.id, "stopping", n.status());
  }
  End(rec, to);
}

void BatchKeeper::Sample(const store::BatchRecord& rec) {
  const auto now = Clock::now();
  const int64_t answered = rec.counts.completed + rec.counts.failed;
  std::lock_guard<std::mutex> lock(mu_);
  auto& s = samples_[rec.id];
  s.emplace_back(now, answered, rec.usage.output_tokens);
  while (s.size() > 2 && now - std::get<0>(s.front()) > std::chrono::seconds(30)) s.pop_front();
  BatchProgress pr;
  const auto& [t0, r0, k0] = s.front();
  const double dt = std::chrono::duration<double>(now - t0).count();
  if (dt > 0.2) {
    pr.requests_per_second = static_cast<double>(answered - r0) / dt;
    pr.tokens_per_second = static_cast<double>(rec.usage.output_tokens - k0) / dt;
    const int64_t left = rec.counts.total - answered;
    if (pr.requests_per_second > 0) pr.eta_seconds = static_cast<double>(left) / pr.requests_per_second;
  }
  progress_[rec.id] = pr;
}

}  // namespace kvb::worker

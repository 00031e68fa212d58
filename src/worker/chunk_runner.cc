#include "worker/chunk_runner.h"

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <utility>

#include "batch/crash_guard.h"
#include "batch/prefix_order.h"
#include "batch/prepare.h"
#include "batch/response.h"
#include "worker/batch_keeper.h"

namespace kvb::worker {

namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kCommitRows = 512;          // outcomes that force a group commit
constexpr size_t kResidentPrefixes = 32;     // prefix groups remembered as in the engine
constexpr auto kRefreshPeriod = std::chrono::milliseconds(500);

int64_t Now() { return static_cast<int64_t>(std::time(nullptr)); }

}  // namespace

struct ChunkRunner::Held {
  store::Fence fence;
  std::vector<store::PendingRequest> rows;  // in feeding order: suspects first
  size_t next = 0;
  size_t suspects = 0;  // rows[0, suspects) were in flight in a crash: each runs alone
  int64_t in_flight = 0;
  std::vector<store::RequestOutcome> outcomes;  // not committed yet
  int64_t engine_outcomes = 0;                  // of them, answers from the engine (still "in flight")
  const char* stop_code = nullptr;  // batch cancelled / expired: nothing more is fed
  bool paused = false;
  Clock::time_point last_renew;
};

struct ChunkRunner::Batch {
  store::BatchRecord rec;
  int64_t created = 0;  // `created` of the response bodies
  std::optional<batch::InputReader> reader;
  std::string reader_error;  // why there is no reader
};

ChunkRunner::ChunkRunner(store::Store* store, EngineClient* engine, DriverOptions options)
    : store_(store), engine_(engine), options_(std::move(options)) {
  if (options_.owner.empty()) options_.owner = NewOwnerName();
  if (options_.window <= 0) options_.window = 2 * engine_->max_seqs() + 64;
  engine_->SetAdmitFlush([this] { FlushMarks(); });
}

// On the engine thread, once per step that admits requests, before their
// first token: the rows that finished since the last flush lose their
// in-flight mark and the rows admitted now get one, one write per batch
// each (batch/crash_guard.h). So when an admitted request crashes the
// process, the requests that finished before it are not blamed, even if
// their answers were not committed yet.
void ChunkRunner::FlushMarks() {
  std::vector<std::pair<std::string, int64_t>> marks, unmarks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    marks.swap(marks_);
    unmarks.swap(unmarks_);
  }
  auto write = [this](std::vector<std::pair<std::string, int64_t>>& rows, bool mark) {
    std::map<std::string, std::vector<int64_t>> by_batch;
    for (auto& [batch_id, line] : rows) by_batch[batch_id].push_back(line);
    for (const auto& [batch_id, lines] : by_batch) {
      Status st = mark ? store_->MarkInFlight(batch_id, lines) : store_->UnmarkInFlight(batch_id, lines);
      if (!st.ok()) std::fprintf(stderr, "kvbatch: store: %s\n", st.message().c_str());
    }
  };
  write(unmarks, false);
  write(marks, true);
}

ChunkRunner::~ChunkRunner() { Stop(); }

void ChunkRunner::Start() {
  last_commit_ = last_refresh_ = Clock::now();
  thread_ = std::thread([this] { Loop(); });
}

void ChunkRunner::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void ChunkRunner::Wake() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    wake_ = true;
  }
  cv_.notify_all();
}

int64_t ChunkRunner::InFlight(const std::string& batch_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = in_flight_by_batch_.find(batch_id);
  return it == in_flight_by_batch_.end() ? 0 : it->second;
}

RunnerStats ChunkRunner::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void ChunkRunner::Loop() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(50), [&] { return stop_ || wake_ || !done_.empty(); });
      if (stop_) break;
      // Woken (a batch created, cancelled, paused...): look at the store now.
      if (wake_) next_claim_ = last_refresh_ = Clock::time_point{};
      wake_ = false;
    }
    Collect();
    Commit(false);
    if (Clock::now() - last_refresh_ >= kRefreshPeriod) Refresh();
    Renew();
    Feed();
    Retire();
  }
  // A clean stop: commit what finished, give every chunk back.
  Collect();
  Commit(true);
  for (auto& [key, h] : held_) {
    if (Status st = store_->ReleaseChunk(h->fence); !st.ok())
      std::fprintf(stderr, "kvbatch: releasing chunk %lld of %s: %s\n", static_cast<long long>(key.second),
                   key.first.c_str(), st.message().c_str());
  }
  held_.clear();
}

ChunkRunner::Batch* ChunkRunner::BatchFor(const std::string& id) {
  auto it = batches_.find(id);
  if (it != batches_.end()) return it->second.get();
  auto rec = store_->GetBatch(id);
  if (!rec.ok()) return nullptr;
  auto b = std::make_unique<Batch>();
  b->rec = std::move(rec).value();
  b->created = Now();
  auto path = store_->LocalFile(b->rec.input_file_id, options_.cache_dir);
  // The database away (or a full disk): try again later rather than fail
  // the rows. Only an input that is gone for good fails them.
  if (!path.ok() && path.status().code() != StatusCode::kNotFound) {
    std::fprintf(stderr, "kvbatch: batch %s: input file: %s (will retry)\n", id.c_str(),
                 path.status().message().c_str());
    return nullptr;
  }
  auto reader = path.ok() ? batch::InputReader::Open(*path) : StatusOr<batch::InputReader>(path.status());
  if (reader.ok()) {
    b->reader.emplace(std::move(reader).value());
  } else {
    b->reader_error = reader.status().message();
    std::fprintf(stderr, "kvbatch: batch %s: input file: %s\n", id.c_str(), b->reader_error.c_str());
  }
  Batch* out = b.get();
  batches_[id] = std::move(b);
  return out;
}

bool ChunkRunner::Claim() {
  std::vector<uint64_t> resident(resident_.begin(), resident_.end());
  auto claim = store_->ClaimChunk(options_.owner, resident, options_.lease_ms);
  if (!claim.ok()) {
    std::fprintf(stderr, "kvbatch: claiming work: %s\n", claim.status().message().c_str());
    return false;
  }
  if (!claim->has_value()) return false;
  store::ChunkClaim c = std::move(**claim);
  Batch* b = BatchFor(c.fence.batch_id);
  auto h = std::make_unique<Held>();
  h->fence = c.fence;
  h->last_renew = Clock::now();
  if (b == nullptr) {
    // Not now (see BatchFor): given back, and no claim before the next poll.
    (void)store_->ReleaseChunk(c.fence);
    return false;
  }
  // Poison requests (batch/crash_guard.h): failed after kMaxCrashes (or when
  // the chunk itself keeps losing its holders), else suspects first, alone.
  std::vector<store::PendingRequest> suspects, rest;
  for (store::PendingRequest& p : c.rows) {
    if (c.reclaims >= options_.max_reclaims || p.crashes >= batch::kMaxCrashes) {
      const std::string msg = p.crashes >= batch::kMaxCrashes
                                  ? batch::CrashedMessage(p.crashes)
                                  : "The worker running this request stopped answering " +
                                        std::to_string(c.reclaims) + " times; it was not run again.";
      std::fprintf(stderr, "kvbatch: batch %s line %lld (custom_id %s): %s\n", c.fence.batch_id.c_str(),
                   static_cast<long long>(p.line), p.custom_id.c_str(), msg.c_str());
      h->outcomes.push_back({p.line, false, batch::RequestErrorLine(p.custom_id, batch::kCrashedEngine, msg), 0, 0, 0,
                             batch::kCrashedEngine});
    } else {
      (p.crashes > 0 ? suspects : rest).push_back(std::move(p));
    }
  }
  h->suspects = suspects.size();
  // Stores give a chunk's rows in line order: requests sharing a prefix (and
  // so a model, batch/request.h) are fed together again.
  batch::GroupBySharedPrefix(rest, [](const store::PendingRequest& p) { return p.prefix_hash; });
  suspects.insert(suspects.end(), std::make_move_iterator(rest.begin()), std::make_move_iterator(rest.end()));
  h->rows = std::move(suspects);
  if (std::find(resident_.begin(), resident_.end(), c.prefix_hash) == resident_.end()) {
    resident_.push_back(c.prefix_hash);
    if (resident_.size() > kResidentPrefixes) resident_.pop_front();
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.distinct_prefixes;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.chunks_claimed;
  }
  const Key key{c.fence.batch_id, c.fence.chunk};
  held_[key] = std::move(h);
  order_.push_back(key);
  return true;
}

void ChunkRunner::Feed() {
  int64_t in_flight = static_cast<int64_t>(inflight_.size());
  std::vector<std::pair<engine::Request, RequestCallbacks>> ready;
  size_t k = 0;
  while (in_flight < options_.window) {
    // The oldest claimed chunk with rows left; else a new claim.
    Held* h = nullptr;
    for (; k < order_.size(); ++k) {
      Held& c = *held_.at(order_[k]);
      if (c.stop_code == nullptr && !c.paused && c.next < c.rows.size()) {
        h = &c;
        break;
      }
    }
    if (h == nullptr) {
      if (Clock::now() < next_claim_) break;
      if (!Claim()) {
        next_claim_ = Clock::now() + options_.poll_interval;  // nothing to claim (or no store): look again later
        break;
      }
      continue;
    }
    Batch* b = BatchFor(h->fence.batch_id);
    if (b == nullptr) break;  // cannot happen while it holds a chunk of the batch; defensive
    const bool suspect = h->next < h->suspects;
    const store::PendingRequest& p = h->rows[h->next++];
    std::optional<batch::RequestFailure> failure;
    std::optional<engine::Request> request;
    batch::Endpoint endpoint = batch::Endpoint::kChatCompletions;
    if (!b->reader) {
      failure = batch::RequestFailure{500, "server_error", "the batch's input file cannot be read: " + b->reader_error, ""};
    } else {
      batch::InputLine line;
      line.line_no = p.line;
      line.offset = static_cast<uint64_t>(p.offset);
      line.length = static_cast<uint32_t>(p.length);
      auto text = b->reader->ReadLine(line);
      std::string param;
      auto parsed = text.ok() ? batch::ParseRequest(*text, &param) : StatusOr<batch::ParsedRequest>(text.status());
      if (!parsed.ok()) {
        failure = batch::RequestFailure{text.ok() ? 400 : 500, text.ok() ? "invalid_request" : "server_error",
                                        parsed.status().message(), param};
      } else {
        // Each line is answered for its own url: a stored batch's lines all
        // match its endpoint (validation), `kvbatch run`'s may be mixed.
        endpoint = parsed->endpoint;
        auto prepared = engine_->Prepare(std::move(parsed).value(), options_.default_max_tokens);
        if (auto* f = std::get_if<batch::RequestFailure>(&prepared); f && f->code == kModelBusy) {
          --h->next;  // its model loads once another goes idle: offered again on a later round
          break;
        } else if (f) {
          failure = *f;
        } else {
          request = std::get<engine::Request>(std::move(prepared));
        }
      }
    }
    if (failure) {
      h->outcomes.push_back(
          {p.line, false, batch::FailureLine(p.custom_id, failure->http_status, batch::FailureBody(*failure)), 0, 0, 0,
           failure->code});
      continue;
    }
    const uint64_t id = request->id;
    request->isolate = suspect;
    request->test_abort = batch::TestCrashOn(p.custom_id);
    inflight_[id] = {h->fence.batch_id, h->fence.chunk};
    ++h->in_flight;
    ++in_flight;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++in_flight_by_batch_[h->fence.batch_id];
    }
    RequestCallbacks cb;
    // Its in-flight mark goes with the next admissions' flush (or with the
    // commit of its answer, whichever comes first).
    cb.on_result = [this, batch_id = h->fence.batch_id, chunk = h->fence.chunk, line = p.line, endpoint,
                    model = engine_->ModelOf(id)](engine::Result&& r) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        unmarks_.emplace_back(batch_id, line);
        done_.push_back({batch_id, chunk, line, endpoint, std::move(r), model});
      }
      cv_.notify_all();
    };
    // Recorded as the engine starts it (FlushMarks writes the step's marks).
    cb.on_admit = [this, batch_id = h->fence.batch_id, line = p.line] {
      std::lock_guard<std::mutex> lock(mu_);
      marks_.emplace_back(batch_id, line);
    };
    ready.emplace_back(std::move(*request), std::move(cb));
  }
  if (!ready.empty()) engine_->SubmitAll(std::move(ready));
}

store::RequestOutcome ChunkRunner::OutcomeFor(const Held& h, const Batch& b, Done& d) const {
  const engine::Result& r = d.result;
  const store::PendingRequest* row = nullptr;
  for (const auto& p : h.rows)
    if (p.line == d.line) row = &p;
  const std::string custom_id = row ? row->custom_id : std::string();
  if (r.status.code() == StatusCode::kCancelled && h.stop_code != nullptr)
    return {d.line, false, batch::RequestErrorLine(custom_id, h.stop_code, StoppedMessage(h.stop_code, true)), 0, 0,
            0, h.stop_code};
  if (!r.status.ok()) {
    batch::RequestFailure f = batch::FailureFromStatus(r.status);
    return {d.line, false, batch::FailureLine(custom_id, f.http_status, batch::FailureBody(f)), r.prompt_tokens, 0, 0,
            f.code};
  }
  auto body = batch::ResponseBody(d.endpoint, r, d.model, b.created);
  return {d.line, true, batch::SuccessLine(custom_id, body), r.prompt_tokens, r.cached_tokens, r.completion_tokens};
}

void ChunkRunner::Collect() {
  std::vector<Done> done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    done.swap(done_);
  }
  for (Done& d : done) {
    inflight_.erase(d.result.id);
    auto it = held_.find({d.batch_id, d.chunk});
    Held* h = it == held_.end() ? nullptr : it->second.get();
    if (h) --h->in_flight;
    if (h == nullptr || h->fence.token < 0) {
      // Lost meanwhile: not ours to answer.
      Settled(d.batch_id, 1);
      continue;
    }
    // Still counted in flight until its commit (InFlight).
    h->outcomes.push_back(OutcomeFor(*h, *batches_.at(d.batch_id), d));
    ++h->engine_outcomes;
  }
}

// `n` requests of the batch are committed or dropped: no longer in flight.
void ChunkRunner::Settled(const std::string& batch_id, int64_t n) {
  if (n == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = in_flight_by_batch_.find(batch_id);
  if (it == in_flight_by_batch_.end()) return;
  it->second -= n;
  if (it->second <= 0) in_flight_by_batch_.erase(it);
}

void ChunkRunner::Commit(bool force) {
  size_t n = 0;
  for (const auto& [key, h] : held_) n += h->outcomes.size();
  if (n == 0) return;
  if (!force && n < kCommitRows && Clock::now() - last_commit_ < options_.commit_interval) return;
  last_commit_ = Clock::now();
  for (auto& [key, hp] : held_) {
    Held& h = *hp;
    if (h.outcomes.empty() || h.fence.token < 0) continue;
    auto recorded = store_->CommitFenced(h.fence, h.outcomes, options_.lease_ms);
    if (recorded.ok()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        stats_.results_committed += *recorded;
        for (const auto& o : h.outcomes)
          if (!o.ok) ++stats_.errors_by_code[o.error_code.empty() ? "unknown" : o.error_code];
      }
      h.outcomes.clear();
      h.last_renew = Clock::now();
      Settled(h.fence.batch_id, std::exchange(h.engine_outcomes, 0));
    } else if (recorded.status().code() == StatusCode::kFailedPrecondition ||
               recorded.status().code() == StatusCode::kNotFound) {
      Drop(h, recorded.status());
    } else {
      // Kept for the next try (the database restarting, a full disk): the
      // lease may run out meanwhile, and then these are dropped, not doubled.
      std::fprintf(stderr, "kvbatch: committing results of %s: %s\n", key.first.c_str(),
                   recorded.status().message().c_str());
    }
  }
}

// A lost lease: this node's work on the chunk stops, uncommitted answers go.
void ChunkRunner::Drop(Held& h, const Status& why) {
  std::fprintf(stderr, "kvbatch: chunk %lld of %s: %s; its uncommitted results are dropped\n",
               static_cast<long long>(h.fence.chunk), h.fence.batch_id.c_str(), why.message().c_str());
  for (const auto& [id, key] : inflight_)
    if (key.first == h.fence.batch_id && key.second == h.fence.chunk) engine_->Cancel(id);
  Settled(h.fence.batch_id, std::exchange(h.engine_outcomes, 0));
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.chunks_lost;
  stats_.results_dropped += static_cast<int64_t>(h.outcomes.size());
  h.outcomes.clear();
  h.next = h.rows.size();
  h.stop_code = "lease_lost";
  h.fence.token = -1;  // marks it lost for Retire
}

void ChunkRunner::Renew() {
  const auto now = Clock::now();
  for (auto& [key, h] : held_) {
    if (h->fence.token < 0 || now - h->last_renew < std::chrono::milliseconds(options_.lease_ms / 3)) continue;
    Status st = store_->RenewLease(h->fence, options_.lease_ms);
    if (st.ok()) {
      h->last_renew = now;
    } else if (st.code() == StatusCode::kFailedPrecondition || st.code() == StatusCode::kNotFound) {
      Drop(*h, st);
    } else {
      std::fprintf(stderr, "kvbatch: renewing a lease: %s\n", st.message().c_str());
    }
  }
}

// Batch changes made through any node: cancel, pause, expiry.
void ChunkRunner::Refresh() {
  last_refresh_ = Clock::now();
  const int64_t now = Now();
  for (auto& [id, b] : batches_) {
    auto rec = store_->GetBatch(id);
    if (!rec.ok()) {
      if (rec.status().code() != StatusCode::kNotFound) continue;  // the database is away: keep going
    } else {
      b->rec = std::move(rec).value();
    }
    const char* code = nullptr;
    if (!rec.ok() || b->rec.status == store::BatchStatus::kCancelling || store::IsFinal(b->rec.status))
      code = "batch_cancelled";
    else if (b->rec.expires_at > 0 && now >= b->rec.expires_at)
      code = "batch_expired";
    for (auto& [key, h] : held_) {
      if (key.first != id) continue;
      h->paused = b->rec.paused;
      if (code != nullptr && h->stop_code == nullptr) {
        h->stop_code = code;
        for (const auto& [rid, k] : inflight_)
          if (k == key) engine_->Cancel(rid);
      }
    }
  }
}

void ChunkRunner::Retire() {
  for (auto it = order_.begin(); it != order_.end();) {
    auto hit = held_.find(*it);
    Held& h = *hit->second;
    const bool drained = h.next == h.rows.size() || h.stop_code != nullptr || h.paused;
    if (!drained || h.in_flight > 0 || !h.outcomes.empty()) {
      ++it;
      continue;
    }
    const bool answered_all = h.next == h.rows.size() && h.stop_code == nullptr;
    if (h.fence.token >= 0 && !answered_all) {
      // Rows it did not answer (stopped, paused) become claimable at once.
      // A chunk answered whole needs no call: the commit of its last row
      // freed its lease.
      if (Status st = store_->ReleaseChunk(h.fence); !st.ok()) {
        ++it;  // the database is away: try again later
        continue;
      }
    }
    const std::string batch_id = it->first;
    held_.erase(hit);
    it = order_.erase(it);
    bool used = false;
    for (const auto& [key, other] : held_) used = used || key.first == batch_id;
    if (!used) batches_.erase(batch_id);
  }
}

}  // namespace kvb::worker

#include "worker/run_store.h"

#include <algorithm>
#include <ctime>
#include <nlohmann/json.hpp>

namespace kvb::worker {

namespace {

Status NotForRun(const char* what) { return Status::Internal(std::string(what) + " is not part of kvbatch run"); }

// The error code of a failed result line, for run's summary: a request that
// never ran carries it in "error", one that ran and failed in the response body.
std::string FailureCode(const std::string& line) {
  const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
  auto code_of = [](const nlohmann::json& holder) -> std::string {
    if (!holder.is_object()) return "";
    auto e = holder.find("error");
    if (e == holder.end() || !e->is_object()) return "";
    auto c = e->find("code");
    return c != e->end() && c->is_string() ? c->get<std::string>() : "";
  };
  std::string code = code_of(j);
  if (code.empty() && j.is_object() && j.contains("response") && j["response"].is_object())
    code = code_of(j["response"].value("body", nlohmann::json()));
  return code.empty() ? "unknown" : code;
}

}  // namespace

RunStore::RunStore(std::string input_path, std::vector<store::PendingRequest> rows, batch::ResultLog* log,
                   batch::CrashJournal* journal)
    : input_path_(std::move(input_path)),
      log_(log),
      journal_(journal),
      created_at_(static_cast<int64_t>(std::time(nullptr))) {
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.line < b.line; });
  rows_.reserve(rows.size());
  for (store::PendingRequest& p : rows) {
    Chunk& c = chunks_[p.chunk];
    c.rows.push_back(rows_.size());
    ++c.pending;
    c.suspects = c.suspects || p.crashes > 0;
    row_of_line_[p.line] = rows_.size();
    rows_.push_back({std::move(p), false});
  }
  tally_.total = static_cast<int64_t>(rows_.size());
}

RunTally RunStore::Tally() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tally_;
}

bool RunStore::Done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return answered_ >= static_cast<int64_t>(rows_.size());
}

Status RunStore::Fatal() const {
  std::lock_guard<std::mutex> lock(mu_);
  return fatal_;
}

Status RunStore::Sync() {
  std::lock_guard<std::mutex> lock(mu_);
  return log_->Sync();
}

Status RunStore::CheckBatch(std::string_view id) const {
  return id == kBatchId ? Status::Ok() : Status::NotFound("no batch " + std::string(id));
}

store::BatchRecord RunStore::RecordLocked() const {
  store::BatchRecord rec;
  rec.id = kBatchId;
  // Lines of one run may use different endpoints: the runner answers each
  // line for its own url, so this is only what the record needs to hold.
  rec.endpoint = "/v1/chat/completions";
  rec.input_file_id = kInputFileId;
  rec.completion_window = "24h";
  rec.status = store::BatchStatus::kInProgress;
  rec.created_at = rec.in_progress_at = created_at_;
  rec.counts = {tally_.total, tally_.ok, tally_.failed};
  rec.usage = tally_.usage;
  return rec;
}

// --- files: the input file is the only one ---

Status RunStore::PutFile(const store::FileRecord&, const std::string&) { return NotForRun("PutFile"); }

StatusOr<store::FileRecord> RunStore::GetFile(std::string_view id) {
  if (id != kInputFileId) return Status::NotFound("no file " + std::string(id));
  store::FileRecord f;
  f.id = kInputFileId;
  f.filename = input_path_;
  f.purpose = "batch";
  f.created_at = created_at_;
  return f;
}

StatusOr<std::vector<store::FileRecord>> RunStore::ListFiles(std::string_view, std::string_view, int, bool) {
  return NotForRun("ListFiles");
}

Status RunStore::DeleteFile(std::string_view) { return NotForRun("DeleteFile"); }

Status RunStore::ReadFile(std::string_view, int64_t, int64_t, std::string*) { return NotForRun("ReadFile"); }

StatusOr<std::string> RunStore::LocalFile(std::string_view id, const std::string&) {
  if (id != kInputFileId) return Status::NotFound("no file " + std::string(id));
  return input_path_;
}

// --- the batch: always in progress; run decides when it ends ---

Status RunStore::PutBatch(const store::BatchRecord&) { return NotForRun("PutBatch"); }

StatusOr<store::BatchRecord> RunStore::GetBatch(std::string_view id) {
  if (Status st = CheckBatch(id); !st.ok()) return st;
  std::lock_guard<std::mutex> lock(mu_);
  return RecordLocked();
}

StatusOr<std::vector<store::BatchRecord>> RunStore::ListBatches(std::string_view, int) {
  std::lock_guard<std::mutex> lock(mu_);
  return std::vector<store::BatchRecord>{RecordLocked()};
}

StatusOr<std::vector<store::BatchRecord>> RunStore::BatchesWithStatus(const std::vector<store::BatchStatus>& statuses) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<store::BatchRecord> out;
  if (std::find(statuses.begin(), statuses.end(), store::BatchStatus::kInProgress) != statuses.end())
    out.push_back(RecordLocked());
  return out;
}

StatusOr<store::BatchRecord> RunStore::TransitionBatch(std::string_view, const std::vector<store::BatchStatus>&,
                                                       store::BatchStatus, int64_t) {
  return NotForRun("TransitionBatch");
}

StatusOr<store::BatchRecord> RunStore::SetBatchControl(std::string_view, std::optional<bool>, std::optional<int32_t>) {
  return NotForRun("SetBatchControl");
}

StatusOr<bool> RunStore::LeaseBatch(std::string_view, std::string_view, int64_t) { return NotForRun("LeaseBatch"); }

Status RunStore::FailBatch(std::string_view, const std::vector<store::BatchError>&, int64_t) {
  return NotForRun("FailBatch");
}

StatusOr<store::BatchRecord> RunStore::FinalizeBatch(std::string_view, store::BatchStatus, store::BatchStatus, int64_t,
                                                     const std::optional<store::ResultFile>&,
                                                     const std::optional<store::ResultFile>&) {
  return NotForRun("FinalizeBatch");
}

// --- rows and chunks ---

Status RunStore::AddRequests(std::string_view, const std::vector<store::PendingRequest>&, int64_t) {
  return NotForRun("AddRequests");  // the rows are given at construction
}

StatusOr<std::vector<store::PendingRequest>> RunStore::PendingRequests(std::string_view batch_id) {
  if (Status st = CheckBatch(batch_id); !st.ok()) return st;
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<store::PendingRequest> out;
  for (const Row& r : rows_)
    if (!r.answered) out.push_back(r.req);
  return out;
}

// Chunks holding suspects of an earlier crash first (run has always run
// those before anything else), then a prefix group already in the engine,
// then chunk order, which is the input's prefix-group order.
StatusOr<std::optional<store::ChunkClaim>> RunStore::ClaimChunk(std::string_view, const std::vector<uint64_t>& resident,
                                                                int64_t) {
  std::lock_guard<std::mutex> lock(mu_);
  auto rank = [&](const Chunk& c) {
    const uint64_t prefix = rows_[c.rows.front()].req.prefix_hash;
    const bool warm = std::find(resident.begin(), resident.end(), prefix) != resident.end();
    return c.suspects ? 0 : warm ? 1 : 2;
  };
  std::map<int64_t, Chunk>::iterator best = chunks_.end();
  for (auto it = chunks_.begin(); it != chunks_.end(); ++it) {
    if (it->second.leased || it->second.pending == 0) continue;
    if (best == chunks_.end() || rank(it->second) < rank(best->second)) best = it;
  }
  if (best == chunks_.end()) return std::optional<store::ChunkClaim>();
  Chunk& c = best->second;
  c.leased = true;
  ++c.token;
  store::ChunkClaim claim;
  claim.fence = {kBatchId, best->first, c.token};
  claim.prefix_hash = rows_[c.rows.front()].req.prefix_hash;
  for (size_t i : c.rows)
    if (!rows_[i].answered) claim.rows.push_back(rows_[i].req);
  return std::optional<store::ChunkClaim>(std::move(claim));
}

Status RunStore::RenewLease(const store::Fence& fence, int64_t) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = chunks_.find(fence.chunk);
  if (fence.batch_id != kBatchId || it == chunks_.end() || it->second.token != fence.token || !it->second.leased)
    return Status::FailedPrecondition("the chunk's lease is not held");
  return Status::Ok();
}

// The journal's marks are not cleared here: a runner releases only when it
// stops or its batch stops, and run then ends the journal's session (a clean
// stop blames no request).
Status RunStore::ReleaseChunk(const store::Fence& fence) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = chunks_.find(fence.chunk);
  if (fence.batch_id == kBatchId && it != chunks_.end() && it->second.token == fence.token) it->second.leased = false;
  return Status::Ok();
}

StatusOr<int64_t> RunStore::LeasedChunks(std::string_view batch_id) {
  if (Status st = CheckBatch(batch_id); !st.ok()) return st;
  std::lock_guard<std::mutex> lock(mu_);
  int64_t n = 0;
  for (const auto& [_, c] : chunks_) n += c.leased ? 1 : 0;
  return n;
}

StatusOr<int64_t> RunStore::CommitLocked(int64_t chunk, const std::vector<store::RequestOutcome>& outcomes) {
  if (!fatal_.ok()) return fatal_;
  int64_t recorded = 0;
  for (const store::RequestOutcome& o : outcomes) {
    auto at = row_of_line_.find(o.line);
    if (at == row_of_line_.end()) continue;
    Row& row = rows_[at->second];
    if (row.answered || (chunk >= 0 && row.req.chunk != chunk)) continue;
    // Each line goes to the OS as it is committed (a killed process loses
    // nothing committed); run fdatasyncs the log every few seconds.
    Status st = o.ok ? log_->AppendSuccess(row.req.custom_id, o.result_line)
                     : log_->AppendFailure(row.req.custom_id, o.result_line);
    if (!st.ok() && st.code() != StatusCode::kFailedPrecondition) {  // FailedPrecondition: already in the log
      fatal_ = st;
      return st;
    }
    row.answered = true;
    ++answered_;
    --chunks_[row.req.chunk].pending;
    if (st.ok()) {
      ++recorded;
      if (o.ok) {
        ++tally_.ok;
      } else {
        ++tally_.failed;
        ++tally_.failures[FailureCode(o.result_line)];
      }
      tally_.usage.input_tokens += o.input_tokens;
      tally_.usage.cached_tokens += o.cached_tokens;
      tally_.usage.output_tokens += o.output_tokens;
    }
  }
  return recorded;
}

StatusOr<int64_t> RunStore::CommitResults(std::string_view batch_id,
                                          const std::vector<store::RequestOutcome>& outcomes) {
  if (Status st = CheckBatch(batch_id); !st.ok()) return st;
  std::lock_guard<std::mutex> lock(mu_);
  return CommitLocked(-1, outcomes);
}

StatusOr<int64_t> RunStore::CommitFenced(const store::Fence& fence, const std::vector<store::RequestOutcome>& outcomes,
                                         int64_t) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = chunks_.find(fence.chunk);
  if (fence.batch_id != kBatchId || it == chunks_.end() || it->second.token != fence.token || !it->second.leased)
    return Status::FailedPrecondition("the chunk's lease is not held");
  auto n = CommitLocked(fence.chunk, outcomes);
  // As in the other stores, the commit of a chunk's last row frees its lease.
  if (n.ok() && it->second.pending == 0) it->second.leased = false;
  return n;
}

Status RunStore::MarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) {
  if (Status st = CheckBatch(batch_id); !st.ok()) return st;
  return journal_->MarkInFlight(lines);
}

Status RunStore::UnmarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) {
  if (Status st = CheckBatch(batch_id); !st.ok()) return st;
  for (int64_t line : lines)
    if (Status st = journal_->MarkDone(line); !st.ok()) return st;
  return Status::Ok();
}

// The journal already turned earlier sessions' marks into crash counts
// (CrashJournal::Open), which the rows carry from the start.
StatusOr<int64_t> RunStore::RecoverInFlight() { return int64_t{0}; }

// The answers live in the result log, not here: run's output is that log,
// put in input order by ResultLog::Finalize.
Status RunStore::ForEachRequest(std::string_view, const std::function<Status(const store::StoredRequest&)>&) {
  return NotForRun("ForEachRequest");
}

}  // namespace kvb::worker

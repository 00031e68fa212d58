// The durable store behind `kvbatch serve`: files, batches, and one row per
// batch request with its state and result. SQLite is the embedded default
// (sqlite_store.h); a PostgreSQL store implements the same interface so the
// API and the worker do not change.
//
// Contracts every implementation keeps:
// - Thread-safe: HTTP handler threads and the batch worker call it at once.
// - Every mutating call is one transaction: after a crash (kill -9, power
//   loss) it either happened whole or not at all.
// - Exactly once: a request row, once answered, is never answered again
//   (CommitResults skips it), so a resumed batch cannot duplicate a line.
// - Errors are Status values: NotFound for unknown ids, InvalidArgument
//   ("... already exists") for a duplicate id (util/status.h has no
//   AlreadyExists code), Internal for the database failing.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace kvb::store {

// Times are Unix seconds; 0 means "not set" (null in the API).

// A file's metadata. Its bytes live on disk at `path` (the server owns that
// directory); the store never reads them.
struct FileRecord {
  std::string id;        // "file-<hex>"
  std::string filename;  // as uploaded (shown to clients, never used as a path)
  std::string purpose;   // "batch" (uploads), "batch_output" (results)
  std::string path;      // absolute path of the bytes on disk
  int64_t bytes = 0;
  int64_t created_at = 0;
  int64_t expires_at = 0;
};

// One entry of a batch's errors.data[]: validation failures with line numbers.
struct BatchError {
  std::string code;
  std::string message;
  std::string param;  // empty = null
  int64_t line = 0;   // 1-based input line; 0 = null
};

struct RequestCounts {
  int64_t total = 0;
  int64_t completed = 0;  // answered with a 2xx response
  int64_t failed = 0;     // answered otherwise (4xx/5xx, cancelled, expired)
};

struct Usage {
  int64_t input_tokens = 0;
  int64_t cached_tokens = 0;
  int64_t output_tokens = 0;
};

struct BatchRecord {
  std::string id;  // "batch_<hex>"
  std::string endpoint;
  std::string input_file_id;
  std::string completion_window;  // "24h"
  std::string status;             // validating, failed, in_progress, finalizing, completed,
                                  // expired, cancelling, cancelled
  std::string output_file_id;     // empty = null
  std::string error_file_id;      // empty = null
  std::string metadata_json;      // a JSON object's text; empty = null
  std::vector<BatchError> errors;
  int64_t created_at = 0;
  int64_t in_progress_at = 0;
  int64_t expires_at = 0;
  int64_t finalizing_at = 0;
  int64_t completed_at = 0;
  int64_t failed_at = 0;
  int64_t expired_at = 0;
  int64_t cancelling_at = 0;
  int64_t cancelled_at = 0;
  RequestCounts counts;
  Usage usage;
  // Extensions: higher priority batches are fed first; a paused batch is not fed.
  int32_t priority = 0;
  bool paused = false;
};

// A request row still to be answered: where its line is in the input file.
struct PendingRequest {
  int64_t line = 0;  // 1-based input line
  std::string custom_id;
  int64_t offset = 0;  // byte offset of the line in the input file
  int64_t length = 0;  // bytes, without the newline
  uint64_t prefix_hash = 0;  // batch::LineInfo::prefix_hash, for ordering
  int32_t crashes = 0;       // crashes of the server this request was in flight for
};

// The answer to one request.
struct RequestOutcome {
  int64_t line = 0;
  bool ok = true;           // true: counts as completed (output file); false: failed (error file)
  std::string result_line;  // the output/error file line, without newline
  int64_t input_tokens = 0;
  int64_t cached_tokens = 0;
  int64_t output_tokens = 0;
};

// Batch statuses the worker still has work for.
inline const std::vector<std::string> kUnfinishedStatuses = {"validating", "in_progress", "finalizing", "cancelling"};

enum class RequestState { kPending, kCompleted, kFailed };

struct StoredRequest {
  int64_t line = 0;
  std::string custom_id;
  RequestState state = RequestState::kPending;
  std::string result_line;  // empty while pending
};

class Store {
 public:
  virtual ~Store() = default;

  // --- files ---
  virtual Status PutFile(const FileRecord& file) = 0;
  virtual StatusOr<FileRecord> GetFile(std::string_view id) = 0;
  // Files with `purpose` (all when empty), in creation order; `after` is
  // the id of the last file of the previous page (empty: from the start).
  virtual StatusOr<std::vector<FileRecord>> ListFiles(std::string_view purpose, std::string_view after, int limit,
                                                      bool ascending) = 0;
  virtual Status DeleteFile(std::string_view id) = 0;

  // --- batches ---
  virtual Status PutBatch(const BatchRecord& batch) = 0;  // inserts
  virtual StatusOr<BatchRecord> GetBatch(std::string_view id) = 0;
  // Newest first (reverse creation order); `after` is the id of the
  // last batch of the previous page.
  virtual StatusOr<std::vector<BatchRecord>> ListBatches(std::string_view after, int limit) = 0;
  // Batches in any of `statuses`, oldest first (what the worker picks up).
  virtual StatusOr<std::vector<BatchRecord>> BatchesWithStatus(const std::vector<std::string>& statuses) = 0;
  // Writes every field except counts.completed, counts.failed and usage,
  // which only CommitResults changes (so a stale copy cannot undo results).
  virtual Status UpdateBatch(const BatchRecord& batch) = 0;
  // Marks a batch finished in one transaction: inserts `files` (its output
  // and error files) and writes the batch as UpdateBatch does.
  virtual Status FinalizeBatch(const BatchRecord& batch, const std::vector<FileRecord>& files) = 0;

  // --- batch requests ---
  // Replaces the batch's request rows by `rows` (all pending, completed and
  // failed counts 0, usage 0) and sets counts.total, in one transaction.
  // Replacing (not appending) makes re-validation after a crash safe.
  virtual Status AddRequests(std::string_view batch_id, const std::vector<PendingRequest>& rows) = 0;
  // The batch's rows still pending, by line.
  virtual StatusOr<std::vector<PendingRequest>> PendingRequests(std::string_view batch_id) = 0;
  // Records answers in one transaction (a group commit). A row that is not
  // pending any more, or does not exist, is skipped: exactly once. Counts and
  // usage grow by what was recorded. Returns how many rows were recorded.
  virtual StatusOr<int64_t> CommitResults(std::string_view batch_id, const std::vector<RequestOutcome>& outcomes) = 0;
  // Poison requests (DESIGN.md section 5). Marks pending rows as in the
  // engine before they run; the mark must survive the process dying (not
  // necessarily a power loss: it is there for crashes of the process).
  virtual Status MarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) = 0;
  // The engine is done with them (answered, maybe not committed yet): a
  // crash from now on is not theirs.
  virtual Status UnmarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) = 0;
  // At startup: every row still marked in flight was running when the
  // process died; its `crashes` grows by one and the mark is cleared.
  // Returns how many rows that was.
  virtual StatusOr<int64_t> RecoverInFlight() = 0;
  // After a clean stop: the marks are cleared without counting a crash.
  virtual Status ClearInFlight() = 0;
  // Visits every request row of the batch in line order, streaming (rows are
  // not all held in memory). A non-OK status from `fn` stops and is returned.
  virtual Status ForEachRequest(std::string_view batch_id, const std::function<Status(const StoredRequest&)>& fn) = 0;
};

}  // namespace kvb::store

// The durable store behind `kvbatch serve` and `kvbatch worker`: files and
// their content, batches, one row per batch request with its state and
// result, and the chunks that workers claim. SQLite is the embedded default
// for one process (sqlite_store.h); PostgreSQL (pg_store.h) coordinates any
// number of API nodes and workers on several machines. Both pass one shared
// test suite (tests/unit/store_conformance_test.cc).
//
// Contracts every implementation keeps:
// - Thread-safe: HTTP handler threads and the batch driver call it at once.
// - Every mutating call is one transaction: after a crash (kill -9, power
//   loss) it either happened whole or not at all.
// - Exactly once: a request row, once answered, is never answered again
//   (commits skip it), so a resumed or reclaimed chunk cannot duplicate a
//   line; a fenced commit from a worker whose lease was taken over changes
//   nothing.
// - Lifecycle changes are compare-and-set (batch_status.h): two nodes racing
//   on one batch cannot both move it.
// - Lease times are measured by the store's own clock (PostgreSQL's, for
//   every node alike), so clocks of different machines need not agree.
// - Errors are Status values: NotFound for unknown ids, InvalidArgument
//   ("... already exists") for a duplicate id (util/status.h has no
//   AlreadyExists code), FailedPrecondition for a lost race (a lease taken
//   over, a batch no longer in the expected status), Unavailable when the
//   database cannot be reached (callers retry), Internal for the database
//   failing otherwise.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "store/batch_status.h"
#include "util/status.h"

namespace kvb::store {

// Times are Unix seconds; 0 means "not set" (null in the API).

// A file's metadata. Its content is kept by the store (PutFile, ReadFile,
// LocalFile): on local disk for SQLite, in the database for PostgreSQL.
struct FileRecord {
  std::string id;        // "file-<hex>"
  std::string filename;  // as uploaded (shown to clients, never used as a path)
  std::string purpose;   // "batch" (uploads), "batch_output" (results)
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
  BatchStatus status = BatchStatus::kValidating;
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
  int64_t chunk = 0;         // the chunk (claimed by one worker at a time) this row belongs to
};

// The answer to one request.
struct RequestOutcome {
  int64_t line = 0;
  bool ok = true;           // true: counts as completed (output file); false: failed (error file)
  std::string result_line;  // the output/error file line, without newline
  int64_t input_tokens = 0;
  int64_t cached_tokens = 0;
  int64_t output_tokens = 0;
  std::string error_code;  // failed: the error's code (metrics; not stored apart from result_line)
};

// A worker's hold on one chunk: valid while `token` is still the chunk's
// token (every claim increments it) and the lease has not expired.
struct Fence {
  std::string batch_id;
  int64_t chunk = 0;
  int64_t token = 0;
};

struct ChunkClaim {
  Fence fence;
  uint64_t prefix_hash = 0;  // the prefix group of the chunk's rows
  // Times this chunk was taken back from a holder whose lease expired (the
  // holder died, hung or lost the database), this claim included.
  int32_t reclaims = 0;
  std::vector<PendingRequest> rows;  // the chunk's pending rows, by line
};

// An output or error file written by finalization: its record and a
// complete local file holding its content.
struct ResultFile {
  FileRecord record;
  std::string local_path;
};

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
  // Stores `local_path` (a complete, closed file of `file.bytes` bytes) as
  // the content of `file` and inserts its record, together: a record never
  // exists without its content. On success `local_path` is consumed (moved
  // into the store or removed).
  virtual Status PutFile(const FileRecord& file, const std::string& local_path) = 0;
  virtual StatusOr<FileRecord> GetFile(std::string_view id) = 0;
  // Files with `purpose` (all when empty), in creation order; `after` is
  // the id of the last file of the previous page (empty: from the start).
  // An `after` that does not exist gives an empty page; limit <= 0 no rows.
  virtual StatusOr<std::vector<FileRecord>> ListFiles(std::string_view purpose, std::string_view after, int limit,
                                                      bool ascending) = 0;
  // Removes the record and the content.
  virtual Status DeleteFile(std::string_view id) = 0;
  // Up to `max_bytes` of the content from `offset` (fewer only at the end),
  // appended to `out`: content is streamed in pieces, never held whole.
  virtual Status ReadFile(std::string_view id, int64_t offset, int64_t max_bytes, std::string* out) = 0;
  // A path on this machine holding the file's content, for random access
  // (reading request lines by offset). SQLite: the store's own file.
  // PostgreSQL: a copy under `cache_dir`, fetched once (streamed), reused
  // while it is complete.
  virtual StatusOr<std::string> LocalFile(std::string_view id, const std::string& cache_dir) = 0;

  // --- batches ---
  virtual Status PutBatch(const BatchRecord& batch) = 0;  // inserts
  virtual StatusOr<BatchRecord> GetBatch(std::string_view id) = 0;
  // Newest first (reverse creation order); `after` is the id of the
  // last batch of the previous page. Same `after`/`limit` rules as ListFiles.
  virtual StatusOr<std::vector<BatchRecord>> ListBatches(std::string_view after, int limit) = 0;
  // Batches in any of `statuses`, oldest first.
  virtual StatusOr<std::vector<BatchRecord>> BatchesWithStatus(const std::vector<BatchStatus>& statuses) = 0;
  // Compare-and-set: moves the batch from any of `from` to `to` and sets
  // to's timestamp (in_progress_at, finalizing_at, ...) to `now`.
  // FailedPrecondition naming the current status when it is in none of
  // `from`; InvalidArgument when a `from` -> `to` is not a lifecycle
  // transition (CanTransition). Returns the updated batch.
  virtual StatusOr<BatchRecord> TransitionBatch(std::string_view id, const std::vector<BatchStatus>& from,
                                                BatchStatus to, int64_t now) = 0;
  // Extensions: pause/resume and priority, each changed only when given.
  // FailedPrecondition when the batch is final. Returns the updated batch.
  virtual StatusOr<BatchRecord> SetBatchControl(std::string_view id, std::optional<bool> paused,
                                                std::optional<int32_t> priority) = 0;
  // A task lease on the batch (validation, finalization), so one node does
  // it while others wait: true when `owner` holds it now (it was free,
  // expired, or already `owner`'s; it is renewed to `lease_ms` from now).
  // lease_ms 0 gives the lease back: another owner may take it from the
  // next millisecond on.
  virtual StatusOr<bool> LeaseBatch(std::string_view id, std::string_view owner, int64_t lease_ms) = 0;
  // validating -> failed with `errors` (errors.data[]), failed_at = now.
  // FailedPrecondition when the batch is not validating any more.
  virtual Status FailBatch(std::string_view id, const std::vector<BatchError>& errors, int64_t now) = 0;
  // Ends a batch in one transaction: moves it from `from` to the final
  // status `to` (CanTransition), stores `output` and `error` (content and
  // record; either may be absent: no lines, no file) and sets
  // output_file_id / error_file_id. FailedPrecondition, storing nothing,
  // when the batch is not in `from` any more (another node ended it); the
  // local files are then left to the caller.
  virtual StatusOr<BatchRecord> FinalizeBatch(std::string_view id, BatchStatus from, BatchStatus to, int64_t now,
                                              const std::optional<ResultFile>& output,
                                              const std::optional<ResultFile>& error) = 0;

  // --- batch requests and chunks ---
  // validating -> in_progress (in_progress_at = now) with `rows` as the
  // batch's request rows (all pending; each names its chunk) and their
  // chunks, counts.total = rows.size(), completed/failed and usage 0, in one
  // transaction. Any earlier rows and chunks are replaced, so re-validation
  // after a crash is safe. FailedPrecondition when not validating any more.
  virtual Status AddRequests(std::string_view batch_id, const std::vector<PendingRequest>& rows, int64_t now) = 0;
  // The batch's rows still pending, by line.
  virtual StatusOr<std::vector<PendingRequest>> PendingRequests(std::string_view batch_id) = 0;
  // Claims one chunk with pending rows of a batch that is in_progress, not
  // paused and not past expires_at, whose lease is free or expired: highest
  // batch priority first, then chunks whose prefix_hash is in `resident`
  // (prefix groups already in the claimer's engine), then oldest batch,
  // then chunks of a prefix group no live lease works on (so claimers
  // spread over the groups instead of all starting on the first), then
  // chunk number. The claim increments the chunk's token and sets its
  // lease to `lease_ms` from now. Taking a chunk whose lease expired (not
  // released) counts a reclaim, and each of its rows still marked in flight
  // gets one more crash (and loses the mark). std::nullopt: nothing to claim.
  // PostgreSQL: FOR UPDATE SKIP LOCKED, so claimers never wait on each other.
  virtual StatusOr<std::optional<ChunkClaim>> ClaimChunk(std::string_view owner,
                                                         const std::vector<uint64_t>& resident,
                                                         int64_t lease_ms) = 0;
  // Extends the lease to `lease_ms` from now. FailedPrecondition when the
  // token does not hold any more (the chunk was claimed again).
  virtual Status RenewLease(const Fence& fence, int64_t lease_ms) = 0;
  // Gives the chunk back (lease free, in-flight marks of its rows cleared)
  // without counting a reclaim: a clean stop, a pause, a cancelled batch.
  // OK and no change when the token does not hold any more.
  virtual Status ReleaseChunk(const Fence& fence) = 0;
  // How many of the batch's chunks are held by an unexpired lease.
  virtual StatusOr<int64_t> LeasedChunks(std::string_view batch_id) = 0;
  // Records answers in one transaction (a group commit). A row that is not
  // pending any more, or does not exist, is skipped: exactly once. Counts and
  // usage grow by what was recorded. Returns how many rows were recorded.
  // Unfenced: for nodes that own the batch's end (finalization of a stopped
  // batch, lines failed before they were claimed).
  virtual StatusOr<int64_t> CommitResults(std::string_view batch_id, const std::vector<RequestOutcome>& outcomes) = 0;
  // The same, by a chunk's holder: every outcome is a row of that chunk;
  // nothing is recorded, FailedPrecondition, unless `fence.token` still
  // holds; the lease is renewed to `lease_ms` from now.
  virtual StatusOr<int64_t> CommitFenced(const Fence& fence, const std::vector<RequestOutcome>& outcomes,
                                         int64_t lease_ms) = 0;
  // Poison requests (DESIGN.md section 5). Marks pending rows as in the
  // engine before they run; the mark must survive the process dying (not
  // necessarily a power loss or a database crash: it is there for crashes
  // of the worker).
  virtual Status MarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) = 0;
  // The engine is done with them (answered, maybe not committed yet): a
  // crash from now on is not theirs.
  virtual Status UnmarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) = 0;
  // For an embedded store that one process uses alone, at its start: every
  // lease left is a dead process's and expires now (so the next claim of its
  // chunks counts the crash; batch task leases are freed). Returns how many
  // rows are marked in flight.
  // PostgreSQL: leases expire by time (other workers are alive); returns 0.
  virtual StatusOr<int64_t> RecoverInFlight() = 0;
  // Visits every request row of the batch in line order, streaming (rows are
  // not all held in memory). A non-OK status from `fn` stops and is returned.
  virtual Status ForEachRequest(std::string_view batch_id, const std::function<Status(const StoredRequest&)>& fn) = 0;
};

}  // namespace kvb::store

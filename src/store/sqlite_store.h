// The embedded SQLite store: one database file (or ":memory:") holding files,
// batches and per-request rows, behind the Store interface.
//
// Durability: file databases run in WAL mode with synchronous=FULL, so a
// call that returned OK survives kill -9 and power loss. Every mutating call
// is one BEGIN IMMEDIATE ... COMMIT transaction.
//
// Concurrency: one write connection behind a mutex serves every call except
// ForEachRequest. On a file database ForEachRequest streams from a separate
// read-only connection (WAL readers do not block the writer), so visiting a
// 170,000-row batch does not stall the worker's commits; it sees one
// snapshot, taken when it starts. On ":memory:" (one connection only) it
// reads in chunks of rows, releasing the mutex between chunks, so it is not
// one snapshot (nor is a file database that could not be put in WAL mode,
// which takes the same path). In both cases `fn` runs without the write mutex
// held and may call the store (including writes).
//
// Schema: sqlite_schema.h, versioned by PRAGMA user_version. Open creates it
// in an empty database and refuses a database written by a newer version.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "store/store.h"

struct sqlite3;

namespace kvb::store {

class SqliteStore : public Store {
 public:
  // Opens (creating if needed) the database at `path`; ":memory:" is a
  // private in-memory database that lives as long as the store. File
  // content lives in `files_dir` (one file per id; empty: files cannot be
  // stored). FailedPrecondition when the database was written by a newer
  // schema version (sqlite_schema.h).
  static StatusOr<std::unique_ptr<SqliteStore>> Open(const std::string& path, const std::string& files_dir = "");

  ~SqliteStore() override;
  SqliteStore(const SqliteStore&) = delete;
  SqliteStore& operator=(const SqliteStore&) = delete;

  // Content is renamed into files_dir (copied when on another file system),
  // the directory fsynced, then the record inserted.
  Status PutFile(const FileRecord& file, const std::string& local_path) override;
  StatusOr<FileRecord> GetFile(std::string_view id) override;
  StatusOr<std::vector<FileRecord>> ListFiles(std::string_view purpose, std::string_view after, int limit,
                                              bool ascending) override;
  Status DeleteFile(std::string_view id) override;
  Status ReadFile(std::string_view id, int64_t offset, int64_t max_bytes, std::string* out) override;
  // The file in files_dir itself; `cache_dir` is not used.
  StatusOr<std::string> LocalFile(std::string_view id, const std::string& cache_dir) override;

  Status PutBatch(const BatchRecord& batch) override;
  StatusOr<BatchRecord> GetBatch(std::string_view id) override;
  StatusOr<std::vector<BatchRecord>> ListBatches(std::string_view after, int limit) override;
  StatusOr<std::vector<BatchRecord>> BatchesWithStatus(const std::vector<BatchStatus>& statuses) override;
  StatusOr<BatchRecord> TransitionBatch(std::string_view id, const std::vector<BatchStatus>& from, BatchStatus to,
                                        int64_t now) override;
  StatusOr<BatchRecord> SetBatchControl(std::string_view id, std::optional<bool> paused,
                                        std::optional<int32_t> priority) override;
  StatusOr<bool> LeaseBatch(std::string_view id, std::string_view owner, int64_t lease_ms) override;
  Status FailBatch(std::string_view id, const std::vector<BatchError>& errors, int64_t now) override;
  StatusOr<BatchRecord> FinalizeBatch(std::string_view id, BatchStatus from, BatchStatus to, int64_t now,
                                      const std::optional<ResultFile>& output,
                                      const std::optional<ResultFile>& error) override;

  // The request calls give NotFound when the batch itself does not exist
  // (sqlite_work.cc).
  Status AddRequests(std::string_view batch_id, const std::vector<PendingRequest>& rows, int64_t now) override;
  StatusOr<std::vector<PendingRequest>> PendingRequests(std::string_view batch_id) override;
  StatusOr<std::optional<ChunkClaim>> ClaimChunk(std::string_view owner, const std::vector<uint64_t>& resident,
                                                 int64_t lease_ms) override;
  Status RenewLease(const Fence& fence, int64_t lease_ms) override;
  Status ReleaseChunk(const Fence& fence) override;
  StatusOr<int64_t> LeasedChunks(std::string_view batch_id) override;
  StatusOr<int64_t> CommitResults(std::string_view batch_id, const std::vector<RequestOutcome>& outcomes) override;
  StatusOr<int64_t> CommitFenced(const Fence& fence, const std::vector<RequestOutcome>& outcomes,
                                 int64_t lease_ms) override;
  Status MarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) override;
  Status UnmarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) override;
  StatusOr<int64_t> RecoverInFlight() override;
  Status ForEachRequest(std::string_view batch_id, const std::function<Status(const StoredRequest&)>& fn) override;

 private:
  SqliteStore(sqlite3* db, std::string path, std::string files_dir, bool use_readers);
  Status SetInFlight(std::string_view batch_id, const std::vector<int64_t>& lines, bool in_flight);
  // Records outcomes on the write connection inside a transaction; with
  // `chunk` >= 0 only rows of that chunk.
  StatusOr<int64_t> CommitLocked(std::string_view batch_id, const std::vector<RequestOutcome>& outcomes,
                                 int64_t chunk);
  // Moves a complete local file into files_dir as `id`'s content; its path.
  StatusOr<std::string> AdoptContent(std::string_view id, const std::string& local_path);
  StatusOr<std::string> ContentPath(std::string_view id);

  // Read-only connections for ForEachRequest on file databases: a small pool
  // so repeated calls do not reopen, and concurrent calls do not share one.
  StatusOr<sqlite3*> AcquireReader();
  void ReleaseReader(sqlite3* reader);
  Status ForEachRequestFromReader(std::string_view batch_id, const std::function<Status(const StoredRequest&)>& fn);
  Status ForEachRequestInChunks(std::string_view batch_id, const std::function<Status(const StoredRequest&)>& fn);

  std::mutex mu_;  // guards db_ (every statement on it)
  sqlite3* db_;    // the write connection
  const std::string path_;
  const std::string files_dir_;
  const bool use_readers_;  // file database in WAL mode

  std::mutex readers_mu_;  // guards idle_readers_
  std::vector<sqlite3*> idle_readers_;
};

}  // namespace kvb::store

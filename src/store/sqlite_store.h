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
  // private in-memory database that lives as long as the store.
  // FailedPrecondition when the database was written by a newer schema
  // version (sqlite_schema.h).
  static StatusOr<std::unique_ptr<SqliteStore>> Open(const std::string& path);

  ~SqliteStore() override;
  SqliteStore(const SqliteStore&) = delete;
  SqliteStore& operator=(const SqliteStore&) = delete;

  // Duplicate ids give InvalidArgument ("... already exists"): util/status.h
  // has no AlreadyExists code.
  Status PutFile(const FileRecord& file) override;
  StatusOr<FileRecord> GetFile(std::string_view id) override;
  // An `after` id that does not exist gives an empty page (as if the listing
  // had ended), not an error. limit <= 0 gives no rows.
  StatusOr<std::vector<FileRecord>> ListFiles(std::string_view purpose, std::string_view after, int limit,
                                              bool ascending) override;
  Status DeleteFile(std::string_view id) override;

  Status PutBatch(const BatchRecord& batch) override;
  StatusOr<BatchRecord> GetBatch(std::string_view id) override;
  // Same `after` and `limit` rules as ListFiles.
  StatusOr<std::vector<BatchRecord>> ListBatches(std::string_view after, int limit) override;
  StatusOr<std::vector<BatchRecord>> BatchesWithStatus(const std::vector<std::string>& statuses) override;
  Status UpdateBatch(const BatchRecord& batch) override;
  Status FinalizeBatch(const BatchRecord& batch, const std::vector<FileRecord>& files) override;

  // The request calls give NotFound when the batch itself does not exist.
  Status AddRequests(std::string_view batch_id, const std::vector<PendingRequest>& rows) override;
  StatusOr<std::vector<PendingRequest>> PendingRequests(std::string_view batch_id) override;
  StatusOr<int64_t> CommitResults(std::string_view batch_id, const std::vector<RequestOutcome>& outcomes) override;
  Status MarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) override;
  Status UnmarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) override;
  StatusOr<int64_t> RecoverInFlight() override;
  Status ClearInFlight() override;
  Status ForEachRequest(std::string_view batch_id, const std::function<Status(const StoredRequest&)>& fn) override;

 private:
  SqliteStore(sqlite3* db, std::string path, bool use_readers);
  Status SetInFlight(std::string_view batch_id, const std::vector<int64_t>& lines, bool in_flight);

  // Read-only connections for ForEachRequest on file databases: a small pool
  // so repeated calls do not reopen, and concurrent calls do not share one.
  StatusOr<sqlite3*> AcquireReader();
  void ReleaseReader(sqlite3* reader);
  Status ForEachRequestFromReader(std::string_view batch_id, const std::function<Status(const StoredRequest&)>& fn);
  Status ForEachRequestInChunks(std::string_view batch_id, const std::function<Status(const StoredRequest&)>& fn);

  std::mutex mu_;  // guards db_ (every statement on it)
  sqlite3* db_;    // the write connection
  const std::string path_;
  const bool use_readers_;  // file database in WAL mode

  std::mutex readers_mu_;  // guards idle_readers_
  std::vector<sqlite3*> idle_readers_;
};

}  // namespace kvb::store

// The PostgreSQL store: files (content included), batches, request rows and
// chunks in one PostgreSQL database that any number of API nodes and
// workers share, behind the Store interface.
//
// Connections: a pool of up to 8, opened when first needed; each call takes
// one, runs, and gives it back, so calls from several threads run at once.
// Every statement is prepared once per connection, with binary parameters.
//
// Losing the database: a call whose connection was lost (or that lost a
// deadlock) reconnects and runs again, with backoff, for about three
// seconds; then Unavailable, and the caller keeps its results and retries
// later. Running a call again is safe: a transaction that failed did not
// commit, and one whose COMMIT was lost in flight is harmless to repeat
// (commits skip rows already answered; PutFile and FinalizeBatch recognize
// their own earlier success). Two things can be seen after such a lost
// COMMIT that did succeed: a claim made again may take a second chunk and
// leave the first to expire (counted then as a reclaim), and a commit made
// again reports fewer rows recorded than it recorded.
//
// Times: batch times are the callers' Unix seconds; lease times are
// milliseconds of the database's clock (clock_timestamp()), the one clock
// all nodes share. A batch's expires_at is also compared with that clock.
//
// Schema: pg_schema.cc, created by Open when absent (under an advisory lock,
// so nodes starting together create it once) and versioned in kvb_meta.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "store/store.h"

namespace kvb::store {

namespace pg {
class Pool;
class Conn;
}  // namespace pg

class PgStore : public Store {
 public:
  // `conninfo`: a "postgresql://..." URI or "key=value ..." connection
  // string (libpq's). InvalidArgument when it does not parse; Unavailable
  // when the server cannot be reached; FailedPrecondition when the
  // database has a newer schema version.
  static StatusOr<std::unique_ptr<PgStore>> Open(const std::string& conninfo);

  ~PgStore() override;
  PgStore(const PgStore&) = delete;
  PgStore& operator=(const PgStore&) = delete;

  // pg_files.cc
  Status PutFile(const FileRecord& file, const std::string& local_path) override;
  StatusOr<FileRecord> GetFile(std::string_view id) override;
  StatusOr<std::vector<FileRecord>> ListFiles(std::string_view purpose, std::string_view after, int limit,
                                              bool ascending) override;
  Status DeleteFile(std::string_view id) override;
  Status ReadFile(std::string_view id, int64_t offset, int64_t max_bytes, std::string* out) override;
  StatusOr<std::string> LocalFile(std::string_view id, const std::string& cache_dir) override;

  // pg_store.cc
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

  // pg_requests.cc
  Status AddRequests(std::string_view batch_id, const std::vector<PendingRequest>& rows, int64_t now) override;
  StatusOr<std::vector<PendingRequest>> PendingRequests(std::string_view batch_id) override;
  StatusOr<int64_t> LeasedChunks(std::string_view batch_id) override;
  Status MarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) override;
  Status UnmarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) override;
  // Leases expire by time (other workers are alive): 0, and nothing changes.
  StatusOr<int64_t> RecoverInFlight() override { return int64_t{0}; }
  // Pages of rows by line, each page its own query: not one snapshot, and
  // `fn` runs with no connection held (it may call the store).
  Status ForEachRequest(std::string_view batch_id, const std::function<Status(const StoredRequest&)>& fn) override;

  // pg_chunks.cc
  StatusOr<std::optional<ChunkClaim>> ClaimChunk(std::string_view owner, const std::vector<uint64_t>& resident,
                                                 int64_t lease_ms) override;
  Status RenewLease(const Fence& fence, int64_t lease_ms) override;
  Status ReleaseChunk(const Fence& fence) override;
  StatusOr<int64_t> CommitResults(std::string_view batch_id, const std::vector<RequestOutcome>& outcomes) override;
  StatusOr<int64_t> CommitFenced(const Fence& fence, const std::vector<RequestOutcome>& outcomes,
                                 int64_t lease_ms) override;

 private:
  explicit PgStore(std::unique_ptr<pg::Pool> pool);
  Status SetInFlight(std::string_view batch_id, const std::vector<int64_t>& lines, bool in_flight);

  std::unique_ptr<pg::Pool> pool_;
};

}  // namespace kvb::store

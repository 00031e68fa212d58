// The store behind `kvbatch run`: one batch of one process, held in memory,
// whose durable parts are run's own files (DESIGN.md, `kvbatch run`): the
// input file is the batch's input, answers are appended to the output and
// error files (batch::ResultLog) as they are committed, and in-flight marks
// go to the crash journal beside them (batch::CrashJournal). So `run` feeds
// its engine through the same ChunkRunner as `serve` and `worker`, while its
// files, resume and poison-request handling stay what they were.
//
// What a restart needs is in those files, not here: rows answered in the
// log are not given to the store at all, and crash counts come from the
// journal. Leases never expire: one process, one runner per engine, and a
// runner that stops gives its chunks back.
//
// Only what the ChunkRunner and `run` use is implemented; the rest of the
// Store interface (file listing, lifecycle transitions, finalization)
// answers Internal ("not part of kvbatch run"): run's end step is
// ResultLog::Finalize, done by run itself.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "batch/crash_guard.h"
#include "batch/result_log.h"
#include "store/store.h"

namespace kvb::worker {

// Counts of what was committed through the store (this run only).
struct RunTally {
  int64_t total = 0;   // rows given to the store
  int64_t ok = 0;      // answered with a 2xx line
  int64_t failed = 0;  // answered otherwise
  std::map<std::string, int64_t> failures;  // failed rows by error code
  store::Usage usage;
};

class RunStore : public store::Store {
 public:
  static constexpr char kBatchId[] = "batch_run";
  static constexpr char kInputFileId[] = "file-run-input";

  // `rows`: the unanswered requests, each with its chunk (AssignChunks) and
  // crash count. `log` and `journal` outlive the store.
  RunStore(std::string input_path, std::vector<store::PendingRequest> rows, batch::ResultLog* log,
           batch::CrashJournal* journal);

  RunTally Tally() const;
  bool Done() const;  // every row answered
  // The first error writing the result log (the run must stop), else OK.
  Status Fatal() const;
  // fdatasync the result log (appends happen under the same lock).
  Status Sync();

  // --- store::Store ---
  Status PutFile(const store::FileRecord& file, const std::string& local_path) override;
  StatusOr<store::FileRecord> GetFile(std::string_view id) override;
  StatusOr<std::vector<store::FileRecord>> ListFiles(std::string_view purpose, std::string_view after, int limit,
                                                     bool ascending) override;
  Status DeleteFile(std::string_view id) override;
  Status ReadFile(std::string_view id, int64_t offset, int64_t max_bytes, std::string* out) override;
  StatusOr<std::string> LocalFile(std::string_view id, const std::string& cache_dir) override;

  Status PutBatch(const store::BatchRecord& batch) override;
  StatusOr<store::BatchRecord> GetBatch(std::string_view id) override;
  StatusOr<std::vector<store::BatchRecord>> ListBatches(std::string_view after, int limit) override;
  StatusOr<std::vector<store::BatchRecord>> BatchesWithStatus(const std::vector<store::BatchStatus>& statuses) override;
  StatusOr<store::BatchRecord> TransitionBatch(std::string_view id, const std::vector<store::BatchStatus>& from,
                                               store::BatchStatus to, int64_t now) override;
  StatusOr<store::BatchRecord> SetBatchControl(std::string_view id, std::optional<bool> paused,
                                               std::optional<int32_t> priority) override;
  StatusOr<bool> LeaseBatch(std::string_view id, std::string_view owner, int64_t lease_ms) override;
  Status FailBatch(std::string_view id, const std::vector<store::BatchError>& errors, int64_t now) override;
  StatusOr<store::BatchRecord> FinalizeBatch(std::string_view id, store::BatchStatus from, store::BatchStatus to,
                                             int64_t now, const std::optional<store::ResultFile>& output,
                                             const std::optional<store::ResultFile>& error) override;

  Status AddRequests(std::string_view batch_id, const std::vector<store::PendingRequest>& rows, int64_t now) override;
  StatusOr<std::vector<store::PendingRequest>> PendingRequests(std::string_view batch_id) override;
  StatusOr<std::optional<store::ChunkClaim>> ClaimChunk(std::string_view owner, const std::vector<uint64_t>& resident,
                                                        int64_t lease_ms) override;
  Status RenewLease(const store::Fence& fence, int64_t lease_ms) override;
  Status ReleaseChunk(const store::Fence& fence) override;
  StatusOr<int64_t> LeasedChunks(std::string_view batch_id) override;
  StatusOr<int64_t> CommitResults(std::string_view batch_id,
                                  const std::vector<store::RequestOutcome>& outcomes) override;
  StatusOr<int64_t> CommitFenced(const store::Fence& fence, const std::vector<store::RequestOutcome>& outcomes,
                                 int64_t lease_ms) override;
  Status MarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) override;
  Status UnmarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) override;
  StatusOr<int64_t> RecoverInFlight() override;
  Status ForEachRequest(std::string_view batch_id,
                        const std::function<Status(const store::StoredRequest&)>& fn) override;

 private:
  struct Row {
    store::PendingRequest req;
    bool answered = false;
  };
  struct Chunk {
    std::vector<size_t> rows;  // into rows_, by line
    int64_t pending = 0;
    int64_t token = 0;
    bool leased = false;
    bool suspects = false;  // holds a row in flight during an earlier crash
  };

  Status CheckBatch(std::string_view id) const;
  // Appends the outcomes of still-pending rows to the log; `chunk` >= 0
  // restricts them to that chunk's rows. Caller holds mu_.
  StatusOr<int64_t> CommitLocked(int64_t chunk, const std::vector<store::RequestOutcome>& outcomes);
  store::BatchRecord RecordLocked() const;

  const std::string input_path_;
  batch::ResultLog* log_;
  batch::CrashJournal* journal_;

  mutable std::mutex mu_;
  std::vector<Row> rows_;
  std::map<int64_t, size_t> row_of_line_;
  std::map<int64_t, Chunk> chunks_;
  RunTally tally_;
  int64_t answered_ = 0;  // rows no longer pending (a line already in the log counts too)
  Status fatal_ = Status::Ok();
  const int64_t created_at_;
};

}  // namespace kvb::worker

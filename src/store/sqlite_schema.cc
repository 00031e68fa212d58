#include "store/sqlite_schema.h"

#include "store/sqlite_util.h"

namespace kvb::store::sqlite {
namespace {

// Version 1.
constexpr const char* kSchema = R"sql(
CREATE TABLE files (
  id TEXT PRIMARY KEY NOT NULL,
  filename TEXT NOT NULL,
  purpose TEXT NOT NULL,
  path TEXT NOT NULL,
  bytes INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL
);
CREATE INDEX files_by_created ON files (created_at, id);
CREATE INDEX files_by_purpose ON files (purpose, created_at, id);

-- Times are Unix seconds, 0 = not set. NULL text = null in the API.
CREATE TABLE batches (
  id TEXT PRIMARY KEY NOT NULL,
  endpoint TEXT NOT NULL,
  input_file_id TEXT NOT NULL,
  completion_window TEXT NOT NULL,
  status TEXT NOT NULL,
  output_file_id TEXT,
  error_file_id TEXT,
  metadata_json TEXT,  -- a JSON object's text
  errors_json TEXT,    -- JSON array of {code, message, param, line}
  created_at INTEGER NOT NULL,
  in_progress_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  finalizing_at INTEGER NOT NULL,
  completed_at INTEGER NOT NULL,
  failed_at INTEGER NOT NULL,
  expired_at INTEGER NOT NULL,
  cancelling_at INTEGER NOT NULL,
  cancelled_at INTEGER NOT NULL,
  priority INTEGER NOT NULL,
  paused INTEGER NOT NULL,
  total INTEGER NOT NULL,
  completed INTEGER NOT NULL,  -- completed, failed and the tokens: only CommitResults adds
  failed INTEGER NOT NULL,
  input_tokens INTEGER NOT NULL,
  cached_tokens INTEGER NOT NULL,
  output_tokens INTEGER NOT NULL
);
CREATE INDEX batches_by_created ON batches (created_at, id);
CREATE INDEX batches_by_status ON batches (status, created_at, id);

CREATE TABLE requests (
  batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
  line INTEGER NOT NULL,         -- 1-based input line
  custom_id TEXT NOT NULL,
  byte_offset INTEGER NOT NULL,  -- of the line in the input file
  byte_length INTEGER NOT NULL,
  prefix_hash INTEGER NOT NULL,  -- the uint64 bit-cast to int64
  state INTEGER NOT NULL,        -- 0 pending, 1 completed, 2 failed
  result_line TEXT,              -- NULL while pending
  PRIMARY KEY (batch_id, line)
);
-- Pending rows of a batch by line, without scanning the answered ones.
CREATE INDEX requests_pending ON requests (batch_id, line) WHERE state = 0;
)sql";

// Version 2: which requests were in the engine (inflight) and how many
// crashes each was in flight for (poison requests, DESIGN.md section 5).
constexpr const char* kMigrateTo2 = R"sql(
ALTER TABLE requests ADD COLUMN inflight INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;
CREATE INDEX requests_inflight ON requests (batch_id, line) WHERE inflight = 1;
)sql";

// Version 3: chunks that workers claim (one prefix group, tens to a few
// hundred rows each) with a lease and a fencing token; a task lease on the
// batch (validation, finalization). Lease times are Unix milliseconds,
// 0 = free. Rows of a version-2 batch become chunk 0 of their batch.
constexpr const char* kMigrateTo3 = R"sql(
ALTER TABLE requests ADD COLUMN chunk INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN lease_owner TEXT;
ALTER TABLE batches ADD COLUMN lease_until INTEGER NOT NULL DEFAULT 0;
CREATE TABLE chunks (
  batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
  chunk INTEGER NOT NULL,
  prefix_hash INTEGER NOT NULL,
  pending INTEGER NOT NULL,          -- rows still unanswered
  token INTEGER NOT NULL DEFAULT 0,  -- fencing token: every claim increments it
  lease_owner TEXT,
  lease_until INTEGER NOT NULL DEFAULT 0,
  reclaims INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (batch_id, chunk)
);
CREATE INDEX chunks_open ON chunks (batch_id, chunk) WHERE pending > 0;
CREATE INDEX chunks_by_prefix ON chunks (batch_id, prefix_hash, lease_until);
CREATE INDEX requests_by_chunk ON requests (batch_id, chunk, line) WHERE state = 0;
INSERT INTO chunks (batch_id, chunk, prefix_hash, pending)
  SELECT batch_id, 0, 0, COUNT(*) FROM requests WHERE state = 0 GROUP BY batch_id;
)sql";
}  // namespace

Status EnsureSchema(sqlite3* db, const std::string& path) {
  // Inside BEGIN IMMEDIATE: two processes opening a new file create it once.
  return Transaction(db, [&]() -> Status {
    auto st = Prepare(db, "PRAGMA user_version");
    if (!st.ok()) return st.status();
    if (st->Step() != SQLITE_ROW) return SqlError(db, "read schema version");
    int64_t version = st->ColInt(0);
    if (version == kSchemaVersion) return Status::Ok();
    if (version > kSchemaVersion) {
      return Status::FailedPrecondition("database " + path + " has schema version " + std::to_string(version) +
                                        "; this kvbatch reads version " + std::to_string(kSchemaVersion));
    }
    if (version < 1)
      if (Status s = Exec(db, kSchema); !s.ok()) return s;
    if (version < 2)
      if (Status s = Exec(db, kMigrateTo2); !s.ok()) return s;
    if (version < 3)
      if (Status s = Exec(db, kMigrateTo3); !s.ok()) return s;
    return Exec(db, ("PRAGMA user_version = " + std::to_string(kSchemaVersion)).c_str());
  });
}

}  // namespace kvb::store::sqlite

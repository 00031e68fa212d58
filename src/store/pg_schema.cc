#include "store/pg_schema.h"

#include <string>

namespace kvb::store::pg {
namespace {

// Version 1. Times are Unix seconds (0 = not set) except lease times, which
// are milliseconds of the database's clock. Empty strings stand for the
// API's nulls. Free-form strings from clients (filenames, custom ids,
// results, metadata) are bytea: any bytes, NUL included, whatever the
// database's encoding; ids, statuses and the like are text, readable in psql.
constexpr const char* kSchema = R"sql(
CREATE TABLE files (
  id text PRIMARY KEY,
  seq bigint GENERATED ALWAYS AS IDENTITY,  -- creation order within one second
  filename bytea NOT NULL,
  purpose text NOT NULL,
  bytes bigint NOT NULL,
  created_at bigint NOT NULL,
  expires_at bigint NOT NULL
);
CREATE INDEX files_by_created ON files (created_at, seq);
CREATE INDEX files_by_purpose ON files (purpose, created_at, seq);

-- A file's content in pieces of 1 MiB: piece `seq` holds bytes
-- [seq * 1 MiB, (seq + 1) * 1 MiB). Stored uncompressed (EXTERNAL), so a
-- range read fetches only the TOAST pages it covers and writes cost no CPU.
CREATE TABLE file_chunks (
  file_id text NOT NULL REFERENCES files (id) ON DELETE CASCADE,
  seq integer NOT NULL,
  data bytea NOT NULL,
  PRIMARY KEY (file_id, seq)
);
ALTER TABLE file_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE batches (
  id text PRIMARY KEY,
  seq bigint GENERATED ALWAYS AS IDENTITY,
  endpoint text NOT NULL,
  input_file_id text NOT NULL,
  completion_window text NOT NULL,
  status text NOT NULL,
  output_file_id text NOT NULL,
  error_file_id text NOT NULL,
  metadata_json bytea NOT NULL,
  errors_json text NOT NULL,  -- JSON array of {code, message, param, line}
  created_at bigint NOT NULL,
  in_progress_at bigint NOT NULL,
  expires_at bigint NOT NULL,
  finalizing_at bigint NOT NULL,
  completed_at bigint NOT NULL,
  failed_at bigint NOT NULL,
  expired_at bigint NOT NULL,
  cancelling_at bigint NOT NULL,
  cancelled_at bigint NOT NULL,
  priority integer NOT NULL,
  paused boolean NOT NULL,
  total bigint NOT NULL,
  completed bigint NOT NULL,  -- completed, failed and the tokens: only commits add
  failed bigint NOT NULL,
  input_tokens bigint NOT NULL,
  cached_tokens bigint NOT NULL,
  output_tokens bigint NOT NULL,
  lease_owner text NOT NULL DEFAULT '',   -- LeaseBatch: validation, finalization
  lease_until bigint NOT NULL DEFAULT 0   -- ms; 0 = free
);
CREATE INDEX batches_by_created ON batches (created_at, seq);
CREATE INDEX batches_by_status ON batches (status, created_at, seq);

CREATE TABLE requests (
  batch_id text NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
  line bigint NOT NULL,         -- 1-based input line
  custom_id bytea NOT NULL,
  byte_offset bigint NOT NULL,  -- of the line in the input file
  byte_length bigint NOT NULL,
  prefix_hash bigint NOT NULL,  -- the uint64 bit-cast to int64
  chunk bigint NOT NULL,
  state smallint NOT NULL,      -- 0 pending, 1 completed, 2 failed
  result_line bytea NOT NULL,   -- empty while pending
  inflight boolean NOT NULL,    -- in a worker's engine now (poison requests)
  crashes integer NOT NULL,     -- crashes it was in flight for
  PRIMARY KEY (batch_id, line)
);
-- A chunk's pending rows (claims, commits, reclaims) without the answered ones.
CREATE INDEX requests_pending ON requests (batch_id, chunk, line) WHERE state = 0;

-- The unit workers claim. `pending` counts its rows with state 0, kept by
-- the commits, so a claim finds open chunks without counting rows.
CREATE TABLE chunks (
  batch_id text NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
  chunk bigint NOT NULL,
  prefix_hash bigint NOT NULL,
  pending bigint NOT NULL,
  token bigint NOT NULL,        -- from chunk_tokens at each claim; 0 = never claimed
  lease_owner text NOT NULL,
  lease_until bigint NOT NULL,  -- ms of the database clock; 0 = free (never claimed or released)
  reclaims integer NOT NULL,
  PRIMARY KEY (batch_id, chunk)
);
CREATE INDEX chunks_open ON chunks (batch_id, chunk) WHERE pending > 0;
-- Claims prefer prefix groups no live lease works on (one probe per candidate).
CREATE INDEX chunks_by_prefix ON chunks (batch_id, prefix_hash, lease_until);

-- Fencing tokens: one sequence for all chunks, so a token is never reused,
-- not even by a chunk created again.
CREATE SEQUENCE chunk_tokens;
)sql";

// A fixed advisory lock key ("kvbatch" and a 1), held by the transaction
// that checks and creates the schema.
constexpr const char* kLockSql = "SELECT pg_advisory_xact_lock(7743446345402541057)";

}  // namespace

Status EnsureSchema(Conn& conn) {
  if (Status s = conn.Command(kLockSql); !s.ok()) return s;
  if (Status s = conn.Command("CREATE TABLE IF NOT EXISTS kvb_meta (key text PRIMARY KEY, value text NOT NULL)");
      !s.ok())
    return s;
  auto r = conn.Exec("SELECT value FROM kvb_meta WHERE key = 'schema_version'");
  if (!r.ok()) return r.status();
  if (r->rows() > 0) {
    const std::string value = r->Str(0, 0);
    if (value == std::to_string(kSchemaVersion)) return Status::Ok();
    return Status::FailedPrecondition("the database has kvbatch schema version " + value +
                                      "; this kvbatch reads version " + std::to_string(kSchemaVersion));
  }
  if (Status s = conn.Command(kSchema); !s.ok()) return s;
  auto ins = conn.Exec("INSERT INTO kvb_meta (key, value) VALUES ('schema_version', $1)",
                       Params().Text(std::to_string(kSchemaVersion)));
  return ins.status();
}

}  // namespace kvb::store::pg

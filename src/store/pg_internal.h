// Pieces shared by the PostgreSQL store's files (pg_store.cc, pg_files.cc,
// pg_requests.cc, pg_chunks.cc). Internal to src/store.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "store/pg_conn.h"
#include "store/store.h"

namespace kvb::store::pg {

// The database clock in milliseconds: lease times are measured by it, so
// the clocks of the nodes need not agree. clock_timestamp(), not now(): the
// time the statement runs, not when its transaction began.
#define KVB_PG_NOW_MS "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"

// requests.state
enum RequestStateValue : int64_t { kStatePending = 0, kStateCompleted = 1, kStateFailed = 2 };

// The columns ReadBatch reads, in its order.
extern const char* const kBatchColumns;
StatusOr<BatchRecord> ReadBatch(const Result& r, int row);

// The columns ReadPending reads, in its order (a `requests` row).
inline constexpr const char* kPendingColumns = "line, custom_id, byte_offset, byte_length, prefix_hash, crashes, chunk";
PendingRequest ReadPending(const Result& r, int row);

// NotFound when batch `id` does not exist, else FailedPrecondition naming its
// status: for a conditional UPDATE that matched no row. `wanted` says what
// the condition asked for ("validating", "not final", ...).
Status BatchMismatch(Conn& conn, std::string_view id, std::string_view wanted);
Status NoBatch(std::string_view id);

// Inserts `file`'s record and its content, read from `local_path` piece by
// piece, on `conn` inside the caller's transaction. InvalidArgument for a
// duplicate id or a file whose size is not file.bytes. `local_path` is left
// in place (the caller removes it once the transaction committed).
Status InsertFile(Conn& conn, const FileRecord& file, const std::string& local_path);
// True when the file's record exists as `file` describes it: after a lost
// COMMIT, tells whether the earlier attempt stored it.
StatusOr<bool> FileStored(Conn& conn, const FileRecord& file);

}  // namespace kvb::store::pg

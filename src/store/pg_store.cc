// PgStore: opening, and the batch records and their lifecycle.
#include "store/pg_store.h"

#include <unistd.h>

#include "store/batch_errors.h"
#include "store/pg_internal.h"
#include "store/pg_schema.h"

namespace kvb::store {

using pg::Conn;
using pg::Mode;
using pg::Params;
using pg::Result;

namespace pg {

const char* const kBatchColumns =
    "id, endpoint, input_file_id, completion_window, status, output_file_id, error_file_id, metadata_json, "
    "errors_json, created_at, in_progress_at, expires_at, finalizing_at, completed_at, failed_at, expired_at, "
    "cancelling_at, cancelled_at, priority, paused, total, completed, failed, input_tokens, cached_tokens, "
    "output_tokens";

StatusOr<BatchRecord> ReadBatch(const Result& r, int row) {
  BatchRecord b;
  b.id = r.Str(row, 0);
  b.endpoint = r.Str(row, 1);
  b.input_file_id = r.Str(row, 2);
  b.completion_window = r.Str(row, 3);
  auto status = ParseBatchStatus(r.View(row, 4));
  if (!status) return Status::Internal("batch " + b.id + " has an unknown status " + r.Str(row, 4));
  b.status = *status;
  b.output_file_id = r.Str(row, 5);
  b.error_file_id = r.Str(row, 6);
  b.metadata_json = r.Str(row, 7);
  auto errors = DecodeBatchErrors(r.View(row, 8));
  if (!errors.ok()) return Status::Internal("batch " + b.id + ": " + errors.status().message());
  b.errors = std::move(*errors);
  int64_t* times[] = {&b.created_at, &b.in_progress_at, &b.expires_at,    &b.finalizing_at, &b.completed_at,
                      &b.failed_at,  &b.expired_at,     &b.cancelling_at, &b.cancelled_at};
  for (int i = 0; i < 9; ++i) *times[i] = r.Int(row, 9 + i);
  b.priority = static_cast<int32_t>(r.Int(row, 18));
  b.paused = r.Bool(row, 19);
  b.counts.total = r.Int(row, 20);
  b.counts.completed = r.Int(row, 21);
  b.counts.failed = r.Int(row, 22);
  b.usage.input_tokens = r.Int(row, 23);
  b.usage.cached_tokens = r.Int(row, 24);
  b.usage.output_tokens = r.Int(row, 25);
  return b;
}

Status NoBatch(std::string_view id) { return Status::NotFound("no batch " + std::string(id)); }

Status BatchMismatch(Conn& conn, std::string_view id, std::string_view wanted) {
  auto r = conn.Exec("SELECT status FROM batches WHERE id = $1", Params().Text(id));
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return NoBatch(id);
  return Status::FailedPrecondition("batch " + std::string(id) + " is " + r->Str(0, 0) + ", not " +
                                    std::string(wanted));
}

}  // namespace pg

namespace {

constexpr int kMaxConnections = 8;

// The timestamp a transition to `to` sets.
const char* TimeColumn(BatchStatus to) {
  switch (to) {
    case BatchStatus::kInProgress: return "in_progress_at";
    case BatchStatus::kFinalizing: return "finalizing_at";
    case BatchStatus::kCompleted: return "completed_at";
    case BatchStatus::kFailed: return "failed_at";
    case BatchStatus::kExpired: return "expired_at";
    case BatchStatus::kCancelling: return "cancelling_at";
    case BatchStatus::kCancelled: return "cancelled_at";
    case BatchStatus::kValidating: break;  // no transition leads back to it
  }
  return nullptr;
}

// Runs a one-row `SELECT kBatchColumns ... ` or `... RETURNING kBatchColumns`
// into *out; false when it matched no row.
StatusOr<bool> ExecBatch(Conn& conn, const std::string& sql, const Params& params, BatchRecord* out) {
  auto r = conn.Exec(sql, params);
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return false;
  auto b = pg::ReadBatch(*r, 0);
  if (!b.ok()) return b.status();
  *out = std::move(*b);
  return true;
}

// Runs a `SELECT kBatchColumns ...` into every batch it matched.
StatusOr<std::vector<BatchRecord>> QueryBatches(Conn& conn, const std::string& sql, const Params& params) {
  auto r = conn.Exec(sql, params);
  if (!r.ok()) return r.status();
  std::vector<BatchRecord> out;
  for (int i = 0; i < r->rows(); ++i) {
    auto b = pg::ReadBatch(*r, i);
    if (!b.ok()) return b.status();
    out.push_back(std::move(*b));
  }
  return out;
}

std::string JoinStatuses(const std::vector<BatchStatus>& statuses) {
  std::string s;
  for (BatchStatus st : statuses) s += (s.empty() ? "" : " or ") + std::string(ToString(st));
  return s.empty() ? "in any given status" : s;
}

std::vector<std::string> StatusTexts(const std::vector<BatchStatus>& statuses) {
  std::vector<std::string> out;
  for (BatchStatus s : statuses) out.emplace_back(ToString(s));
  return out;
}

}  // namespace

// --- open ---

PgStore::PgStore(std::unique_ptr<pg::Pool> pool) : pool_(std::move(pool)) {}
PgStore::~PgStore() = default;

StatusOr<std::unique_ptr<PgStore>> PgStore::Open(const std::string& conninfo) {
  char* error = nullptr;
  PQconninfoOption* options = PQconninfoParse(conninfo.c_str(), &error);
  if (options == nullptr) {
    std::string message = error ? error : "out of memory";
    if (error) PQfreemem(error);
    while (!message.empty() && message.back() == '\n') message.pop_back();
    return Status::InvalidArgument("PostgreSQL connection string: " + message);
  }
  PQconninfoFree(options);
  auto pool = std::make_unique<pg::Pool>(conninfo, kMaxConnections);
  Status s = pg::Run(*pool, "create the schema", Mode::kTransaction,
                     [](Conn& conn, bool) { return pg::EnsureSchema(conn); });
  if (!s.ok()) return s;
  return std::unique_ptr<PgStore>(new PgStore(std::move(pool)));
}

// --- batches ---

Status PgStore::PutBatch(const BatchRecord& b) {
  for (std::string_view text : {std::string_view(b.id), std::string_view(b.endpoint),
                                std::string_view(b.input_file_id), std::string_view(b.completion_window),
                                std::string_view(b.output_file_id), std::string_view(b.error_file_id)}) {
    if (!pg::IsText(text)) return Status::InvalidArgument("batch " + b.id + ": a field is not valid UTF-8 text");
  }
  auto errors = EncodeBatchErrors(b.errors);
  if (!errors.ok()) return errors.status();
  Params p;
  p.Text(b.id).Text(b.endpoint).Text(b.input_file_id).Text(b.completion_window).Text(ToString(b.status));
  p.Text(b.output_file_id).Text(b.error_file_id).Bytes(b.metadata_json).Text(*errors);
  for (int64_t t : {b.created_at, b.in_progress_at, b.expires_at, b.finalizing_at, b.completed_at, b.failed_at,
                    b.expired_at, b.cancelling_at, b.cancelled_at})
    p.Int(t);
  p.Int32(b.priority).Bool(b.paused).Int(b.counts.total).Int(b.counts.completed).Int(b.counts.failed);
  p.Int(b.usage.input_tokens).Int(b.usage.cached_tokens).Int(b.usage.output_tokens);
  const std::string sql = std::string("INSERT INTO batches (") + pg::kBatchColumns +
                          ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, "
                          "$18, $19, $20, $21, $22, $23, $24, $25, $26)";
  return pg::Run(*pool_, "put batch", Mode::kStatements, [&](Conn& conn, bool after_unknown_commit) -> Status {
    auto r = conn.Exec(sql, p);
    if (r.ok()) return Status::Ok();
    if (conn.sqlstate() != "23505") return r.status();
    // Our own insert, when its COMMIT was lost in flight and it took effect.
    if (after_unknown_commit) {
      auto same = conn.Exec("SELECT 1 FROM batches WHERE id = $1 AND created_at = $2",
                            Params().Text(b.id).Int(b.created_at));
      if (same.ok() && same->rows() > 0) return Status::Ok();
    }
    return Status::InvalidArgument("batch " + b.id + " already exists");
  });
}

StatusOr<BatchRecord> PgStore::GetBatch(std::string_view id) {
  if (!pg::IsText(id)) return pg::NoBatch(id);
  BatchRecord out;
  const std::string sql = std::string("SELECT ") + pg::kBatchColumns + " FROM batches WHERE id = $1";
  Status s = pg::Run(*pool_, "get batch", Mode::kStatements, [&](Conn& conn, bool) -> Status {
    auto found = ExecBatch(conn, sql, Params().Text(id), &out);
    if (!found.ok()) return found.status();
    return *found ? Status::Ok() : pg::NoBatch(id);
  });
  if (!s.ok()) return s;
  return out;
}

StatusOr<std::vector<BatchRecord>> PgStore::ListBatches(std::string_view after, int limit) {
  std::vector<BatchRecord> out;
  if (limit <= 0 || (!after.empty() && !pg::IsText(after))) return out;
  // Keyset pagination, newest first: rows strictly before (created_at, seq)
  // of the `after` batch; seq (insertion order) breaks ties within a second.
  // An `after` that does not exist matches no row: an empty page.
  std::string sql = std::string("SELECT ") + pg::kBatchColumns + " FROM batches";
  Params p;
  p.Int(limit);
  if (!after.empty()) {
    sql += " WHERE (created_at, seq) < (SELECT created_at, seq FROM batches WHERE id = $2)";
    p.Text(after);
  }
  sql += " ORDER BY created_at DESC, seq DESC LIMIT $1";
  Status s = pg::Run(*pool_, "list batches", Mode::kStatements, [&](Conn& conn, bool) -> Status {
    auto batches = QueryBatches(conn, sql, p);
    if (!batches.ok()) return batches.status();
    out = std::move(*batches);
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return out;
}

StatusOr<std::vector<BatchRecord>> PgStore::BatchesWithStatus(const std::vector<BatchStatus>& statuses) {
  std::vector<BatchRecord> out;
  if (statuses.empty()) return out;
  const std::string sql = std::string("SELECT ") + pg::kBatchColumns +
                          " FROM batches WHERE status = ANY($1::text[]) ORDER BY created_at, seq";
  Status s = pg::Run(*pool_, "list batches by status", Mode::kStatements, [&](Conn& conn, bool) -> Status {
    auto batches = QueryBatches(conn, sql, Params().TextArray(StatusTexts(statuses)));
    if (!batches.ok()) return batches.status();
    out = std::move(*batches);
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return out;
}

StatusOr<BatchRecord> PgStore::TransitionBatch(std::string_view id, const std::vector<BatchStatus>& from,
                                               BatchStatus to, int64_t now) {
  for (BatchStatus f : from) {
    if (!CanTransition(f, to))
      return Status::InvalidArgument("a batch cannot go from " + std::string(ToString(f)) + " to " +
                                     std::string(ToString(to)));
  }
  if (!pg::IsText(id)) return pg::NoBatch(id);
  // One conditional UPDATE: the compare-and-set. TimeColumn is not null
  // here: CanTransition never leads to validating, and `from` is checked
  // non-empty before the SQL is built.
  if (from.empty()) return Status::FailedPrecondition("batch " + std::string(id) + ": no status to move from");
  const std::string sql = std::string("UPDATE batches SET status = $2, ") + TimeColumn(to) +
                          " = $3 WHERE id = $1 AND status = ANY($4::text[]) RETURNING " + pg::kBatchColumns;
  const Params p = Params().Text(id).Text(ToString(to)).Int(now).TextArray(StatusTexts(from));
  BatchRecord out;
  Status s = pg::Run(*pool_, "change batch status", Mode::kStatements, [&](Conn& conn, bool) -> Status {
    auto moved = ExecBatch(conn, sql, p, &out);
    if (!moved.ok()) return moved.status();
    return *moved ? Status::Ok() : pg::BatchMismatch(conn, id, JoinStatuses(from));
  });
  if (!s.ok()) return s;
  return out;
}

StatusOr<BatchRecord> PgStore::SetBatchControl(std::string_view id, std::optional<bool> paused,
                                               std::optional<int32_t> priority) {
  if (!pg::IsText(id)) return pg::NoBatch(id);
  const std::string sql =
      std::string(
          "UPDATE batches SET paused = CASE WHEN $2 THEN $3 ELSE paused END, "
          "priority = CASE WHEN $4 THEN $5 ELSE priority END "
          "WHERE id = $1 AND status <> ALL($6::text[]) RETURNING ") +
      pg::kBatchColumns;
  const Params p = Params()
                       .Text(id)
                       .Bool(paused.has_value())
                       .Bool(paused.value_or(false))
                       .Bool(priority.has_value())
                       .Int32(priority.value_or(0))
                       .TextArray(StatusTexts({BatchStatus::kFailed, BatchStatus::kCompleted, BatchStatus::kExpired,
                                               BatchStatus::kCancelled}));
  BatchRecord out;
  Status s = pg::Run(*pool_, "set batch control", Mode::kStatements, [&](Conn& conn, bool) -> Status {
    auto changed = ExecBatch(conn, sql, p, &out);
    if (!changed.ok()) return changed.status();
    return *changed ? Status::Ok() : pg::BatchMismatch(conn, id, "unfinished (it is final)");
  });
  if (!s.ok()) return s;
  return out;
}

StatusOr<bool> PgStore::LeaseBatch(std::string_view id, std::string_view owner, int64_t lease_ms) {
  if (!pg::IsText(id)) return pg::NoBatch(id);
  if (!pg::IsText(owner)) return Status::InvalidArgument("lease owner is not valid UTF-8 text");
  // Taken when free (0), expired, or already the owner's; renewed either way.
  const char* sql =
      "WITH clk AS (SELECT " KVB_PG_NOW_MS
      " AS ms) UPDATE batches b SET lease_owner = $2, lease_until = clk.ms + $3 FROM clk "
      "WHERE b.id = $1 AND (b.lease_until < clk.ms OR b.lease_owner = $2) RETURNING 1";
  bool held = false;
  Status s = pg::Run(*pool_, "lease batch", Mode::kStatements, [&](Conn& conn, bool) -> Status {
    auto r = conn.Exec(sql, Params().Text(id).Text(owner).Int(lease_ms));
    if (!r.ok()) return r.status();
    held = r->rows() > 0;
    if (held) return Status::Ok();
    auto exists = conn.Exec("SELECT 1 FROM batches WHERE id = $1", Params().Text(id));
    if (!exists.ok()) return exists.status();
    return exists->rows() > 0 ? Status::Ok() : pg::NoBatch(id);
  });
  if (!s.ok()) return s;
  return held;
}

Status PgStore::FailBatch(std::string_view id, const std::vector<BatchError>& errors, int64_t now) {
  if (!pg::IsText(id)) return pg::NoBatch(id);
  auto json = EncodeBatchErrors(errors);
  if (!json.ok()) return json.status();
  return pg::Run(*pool_, "fail batch", Mode::kStatements, [&](Conn& conn, bool) -> Status {
    auto r = conn.Exec(
        "UPDATE batches SET status = 'failed', failed_at = $2, errors_json = $3 "
        "WHERE id = $1 AND status = 'validating' RETURNING 1",
        Params().Text(id).Int(now).Text(*json));
    if (!r.ok()) return r.status();
    return r->rows() > 0 ? Status::Ok() : pg::BatchMismatch(conn, id, "validating");
  });
}

StatusOr<BatchRecord> PgStore::FinalizeBatch(std::string_view id, BatchStatus from, BatchStatus to, int64_t now,
                                             const std::optional<ResultFile>& output,
                                             const std::optional<ResultFile>& error) {
  if (!CanTransition(from, to) || !IsFinal(to))
    return Status::InvalidArgument("finalization cannot go from " + std::string(ToString(from)) + " to " +
                                   std::string(ToString(to)));
  if (!pg::IsText(id)) return pg::NoBatch(id);
  const std::string output_id = output ? output->record.id : "";
  const std::string error_id = error ? error->record.id : "";
  const std::string sql = std::string("UPDATE batches SET status = $2, ") + TimeColumn(to) +
                          " = $3, output_file_id = $4, error_file_id = $5 WHERE id = $1 AND status = $6 RETURNING " +
                          pg::kBatchColumns;
  BatchRecord out;
  Status s = pg::Run(*pool_, "finalize batch", Mode::kTransaction, [&](Conn& conn, bool after_unknown_commit) -> Status {
    if (after_unknown_commit) {
      // Our earlier attempt committed when the batch has our status and file
      // ids (file ids are unique: no other node stores these files).
      auto ours = ExecBatch(conn, std::string("SELECT ") + pg::kBatchColumns + " FROM batches WHERE id = $1",
                            Params().Text(id), &out);
      if (!ours.ok()) return ours.status();
      if (*ours && out.status == to && out.output_file_id == output_id && out.error_file_id == error_id &&
          (!output_id.empty() || !error_id.empty()))
        return Status::Ok();
    }
    // The status first: a lost race is found before any content is copied.
    auto moved = ExecBatch(conn, sql, Params().Text(id).Text(ToString(to)).Int(now).Text(output_id).Text(error_id)
                                        .Text(ToString(from)), &out);
    if (!moved.ok()) return moved.status();
    if (!*moved) return pg::BatchMismatch(conn, id, ToString(from));
    for (const std::optional<ResultFile>* f : {&output, &error}) {
      if (!f->has_value()) continue;
      if (Status st = pg::InsertFile(conn, (*f)->record, (*f)->local_path); !st.ok()) return st;
    }
    return Status::Ok();
  });
  if (!s.ok()) return s;
  // Committed: the content is in the database now.
  if (output) ::unlink(output->local_path.c_str());
  if (error) ::unlink(error->local_path.c_str());
  return out;
}

}  // namespace kvb::store

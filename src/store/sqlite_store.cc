#include "store/sqlite_store.h"

#include <sqlite3.h>

#include <bit>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "store/sqlite_schema.h"
#include "store/sqlite_util.h"

namespace kvb::store {
namespace {

using sqlite::Exec;
using sqlite::IsDuplicateKey;
using sqlite::Prepare;
using sqlite::SqlError;
using sqlite::StepDone;
using sqlite::Stmt;
using sqlite::Transaction;

// How long a statement waits for another connection's lock (another process
// on the same file, or WAL checkpointing) before failing with SQLITE_BUSY.
constexpr int kBusyTimeoutMs = 10'000;
// Rows per chunk when ForEachRequest reads ":memory:" in chunks.
constexpr int kForEachChunk = 512;

// requests.state
enum RequestStateValue : int64_t { kStatePending = 0, kStateCompleted = 1, kStateFailed = 2 };

// NotFound unless the batch exists (on connection `db`).
Status CheckBatchExists(sqlite3* db, std::string_view batch_id) {
  auto st = Prepare(db, "SELECT 1 FROM batches WHERE id = ?1");
  if (!st.ok()) return st.status();
  st->Text(1, batch_id);
  int rc = st->Step();
  if (rc == SQLITE_ROW) return Status::Ok();
  if (rc == SQLITE_DONE) return Status::NotFound("no batch " + std::string(batch_id));
  return SqlError(db, "look up batch");
}

// --- files ---

constexpr const char* kFileColumns = "id, filename, purpose, path, bytes, created_at, expires_at";

FileRecord ReadFile(const Stmt& st) {
  FileRecord f;
  f.id = st.ColText(0);
  f.filename = st.ColText(1);
  f.purpose = st.ColText(2);
  f.path = st.ColText(3);
  f.bytes = st.ColInt(4);
  f.created_at = st.ColInt(5);
  f.expires_at = st.ColInt(6);
  return f;
}

Status InsertFile(sqlite3* db, const FileRecord& f) {
  auto st = Prepare(db,
                    "INSERT INTO files (id, filename, purpose, path, bytes, created_at, expires_at) "
                    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)");
  if (!st.ok()) return st.status();
  st->Text(1, f.id);
  st->Text(2, f.filename);
  st->Text(3, f.purpose);
  st->Text(4, f.path);
  st->Int(5, f.bytes);
  st->Int(6, f.created_at);
  st->Int(7, f.expires_at);
  int rc = SQLITE_OK;
  Status s = StepDone(db, *st, "insert file", &rc);
  if (IsDuplicateKey(rc)) return Status::InvalidArgument("file " + f.id + " already exists");
  return s;
}

// --- batches ---

// Column order shared by the SELECTs and ReadBatch.
constexpr const char* kBatchColumns =
    "id, endpoint, input_file_id, completion_window, status, output_file_id, error_file_id, metadata_json, "
    "errors_json, created_at, in_progress_at, expires_at, finalizing_at, completed_at, failed_at, expired_at, "
    "cancelling_at, cancelled_at, priority, paused, total, completed, failed, input_tokens, cached_tokens, "
    "output_tokens";

// The columns UpdateBatch writes, as ?1..?20 (the batch's id is ?21).
constexpr const char* kUpdateBatchSql =
    "UPDATE batches SET endpoint = ?1, input_file_id = ?2, completion_window = ?3, status = ?4, "
    "output_file_id = ?5, error_file_id = ?6, metadata_json = ?7, errors_json = ?8, created_at = ?9, "
    "in_progress_at = ?10, expires_at = ?11, finalizing_at = ?12, completed_at = ?13, failed_at = ?14, "
    "expired_at = ?15, cancelling_at = ?16, cancelled_at = ?17, priority = ?18, paused = ?19, total = ?20 "
    "WHERE id = ?21";
constexpr const char* kInsertBatchSql =
    "INSERT INTO batches (endpoint, input_file_id, completion_window, status, output_file_id, error_file_id, "
    "metadata_json, errors_json, created_at, in_progress_at, expires_at, finalizing_at, completed_at, failed_at, "
    "expired_at, cancelling_at, cancelled_at, priority, paused, total, id, completed, failed, input_tokens, "
    "cached_tokens, output_tokens) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, "
    "?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)";

StatusOr<std::string> ErrorsToJson(const std::vector<BatchError>& errors) {
  if (errors.empty()) return std::string();
  try {
    nlohmann::json arr = nlohmann::json::array();
    for (const BatchError& e : errors) {
      arr.push_back({{"code", e.code},
                     {"message", e.message},
                     {"param", e.param.empty() ? nlohmann::json(nullptr) : nlohmann::json(e.param)},
                     {"line", e.line == 0 ? nlohmann::json(nullptr) : nlohmann::json(e.line)}});
    }
    // Messages may quote user input: replace invalid UTF-8 instead of throwing.
    return arr.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } catch (const std::exception& e) {
    return Status::Internal(std::string("encode batch errors: ") + e.what());
  }
}

StatusOr<std::vector<BatchError>> ErrorsFromJson(const std::string& text) {
  std::vector<BatchError> errors;
  if (text.empty()) return errors;
  try {
    for (const nlohmann::json& j : nlohmann::json::parse(text)) {
      BatchError e;
      e.code = j.at("code").get<std::string>();
      e.message = j.at("message").get<std::string>();
      if (j.contains("param") && !j["param"].is_null()) e.param = j["param"].get<std::string>();
      if (j.contains("line") && !j["line"].is_null()) e.line = j["line"].get<int64_t>();
      errors.push_back(std::move(e));
    }
  } catch (const std::exception& e) {
    return Status::Internal(std::string("stored batch errors are not valid: ") + e.what());
  }
  return errors;
}

// Binds ?1..?20 of kUpdateBatchSql / kInsertBatchSql.
Status BindBatchFields(Stmt& st, const BatchRecord& b) {
  auto errors = ErrorsToJson(b.errors);
  if (!errors.ok()) return errors.status();
  st.Text(1, b.endpoint);
  st.Text(2, b.input_file_id);
  st.Text(3, b.completion_window);
  st.Text(4, b.status);
  st.OptText(5, b.output_file_id);
  st.OptText(6, b.error_file_id);
  st.OptText(7, b.metadata_json);
  st.OptText(8, *errors);
  const int64_t times[] = {b.created_at, b.in_progress_at, b.expires_at,    b.finalizing_at, b.completed_at,
                           b.failed_at,  b.expired_at,     b.cancelling_at, b.cancelled_at};
  for (int i = 0; i < 9; ++i) st.Int(9 + i, times[i]);
  st.Int(18, b.priority);
  st.Int(19, b.paused ? 1 : 0);
  st.Int(20, b.counts.total);
  return Status::Ok();
}

StatusOr<BatchRecord> ReadBatch(const Stmt& st) {
  BatchRecord b;
  b.id = st.ColText(0);
  b.endpoint = st.ColText(1);
  b.input_file_id = st.ColText(2);
  b.completion_window = st.ColText(3);
  b.status = st.ColText(4);
  b.output_file_id = st.ColText(5);
  b.error_file_id = st.ColText(6);
  b.metadata_json = st.ColText(7);
  auto errors = ErrorsFromJson(st.ColText(8));
  if (!errors.ok()) return Status::Internal("batch " + b.id + ": " + errors.status().message());
  b.errors = std::move(*errors);
  int64_t* times[] = {&b.created_at, &b.in_progress_at, &b.expires_at,    &b.finalizing_at, &b.completed_at,
                      &b.failed_at,  &b.expired_at,     &b.cancelling_at, &b.cancelled_at};
  for (int i = 0; i < 9; ++i) *times[i] = st.ColInt(9 + i);
  b.priority = static_cast<int32_t>(st.ColInt(18));
  b.paused = st.ColInt(19) != 0;
  b.counts.total = st.ColInt(20);
  b.counts.completed = st.ColInt(21);
  b.counts.failed = st.ColInt(22);
  b.usage.input_tokens = st.ColInt(23);
  b.usage.cached_tokens = st.ColInt(24);
  b.usage.output_tokens = st.ColInt(25);
  return b;
}

// Steps a SELECT of kBatchColumns to the end.
StatusOr<std::vector<BatchRecord>> ReadBatches(sqlite3* db, Stmt& st) {
  std::vector<BatchRecord> out;
  int rc;
  while ((rc = st.Step()) == SQLITE_ROW) {
    auto b = ReadBatch(st);
    if (!b.ok()) return b.status();
    out.push_back(std::move(*b));
  }
  if (rc != SQLITE_DONE) return SqlError(db, "read batches");
  return out;
}

Status UpdateBatchLocked(sqlite3* db, const BatchRecord& b) {
  auto st = Prepare(db, kUpdateBatchSql);
  if (!st.ok()) return st.status();
  if (Status s = BindBatchFields(*st, b); !s.ok()) return s;
  st->Text(21, b.id);
  if (Status s = StepDone(db, *st, "update batch"); !s.ok()) return s;
  if (sqlite3_changes(db) == 0) return Status::NotFound("no batch " + b.id);
  return Status::Ok();
}

// --- requests ---

constexpr const char* kForEachSql =
    "SELECT line, custom_id, state, result_line FROM requests WHERE batch_id = ?1 AND line > ?2 ORDER BY line "
    "LIMIT ?3";

StoredRequest ReadStoredRequest(const Stmt& st) {
  StoredRequest r;
  r.line = st.ColInt(0);
  r.custom_id = st.ColText(1);
  int64_t state = st.ColInt(2);
  r.state = state == kStateCompleted ? RequestState::kCompleted
            : state == kStateFailed  ? RequestState::kFailed
                                     : RequestState::kPending;
  r.result_line = st.ColText(3);
  return r;
}

}  // namespace

// --- open / close ---

StatusOr<std::unique_ptr<SqliteStore>> SqliteStore::Open(const std::string& path) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr) != SQLITE_OK) {
    Status s = Status::Internal("open database " + path + ": " + (db ? sqlite3_errmsg(db) : "out of memory"));
    sqlite3_close(db);
    return s;
  }
  // Owns db until the store does.
  std::unique_ptr<sqlite3, int (*)(sqlite3*)> guard(db, sqlite3_close_v2);
  sqlite3_extended_result_codes(db, 1);
  sqlite3_busy_timeout(db, kBusyTimeoutMs);

  // "" is a private temporary file: like ":memory:", no second connection can see it.
  const bool is_file = path != ":memory:" && !path.empty();
  bool wal = false;
  if (is_file) {
    auto st = Prepare(db, "PRAGMA journal_mode = WAL");
    if (!st.ok()) return st.status();
    if (st->Step() != SQLITE_ROW) return SqlError(db, "set WAL journal mode");
    wal = st->ColText(0) == "wal";
  }
  // FULL: a commit is on disk (WAL fsynced) before it returns, so results
  // survive power loss, not only a crash of the process.
  if (Status s = Exec(db, "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;"); !s.ok()) return s;

  if (Status s = sqlite::EnsureSchema(db, path); !s.ok()) return s;
  return std::unique_ptr<SqliteStore>(new SqliteStore(guard.release(), path, is_file && wal));
}

SqliteStore::SqliteStore(sqlite3* db, std::string path, bool use_readers)
    : db_(db), path_(std::move(path)), use_readers_(use_readers) {}

SqliteStore::~SqliteStore() {
  for (sqlite3* r : idle_readers_) sqlite3_close_v2(r);
  sqlite3_close_v2(db_);
}

// --- files ---

Status SqliteStore::PutFile(const FileRecord& file) {
  std::lock_guard lock(mu_);
  return Transaction(db_, [&] { return InsertFile(db_, file); });
}

StatusOr<FileRecord> SqliteStore::GetFile(std::string_view id) {
  std::lock_guard lock(mu_);
  auto st = Prepare(db_, std::string("SELECT ") + kFileColumns + " FROM files WHERE id = ?1");
  if (!st.ok()) return st.status();
  st->Text(1, id);
  int rc = st->Step();
  if (rc == SQLITE_ROW) return ReadFile(*st);
  if (rc == SQLITE_DONE) return Status::NotFound("no file " + std::string(id));
  return SqlError(db_, "get file");
}

StatusOr<std::vector<FileRecord>> SqliteStore::ListFiles(std::string_view purpose, std::string_view after, int limit,
                                                         bool ascending) {
  std::vector<FileRecord> out;
  if (limit <= 0) return out;
  std::lock_guard lock(mu_);
  // Keyset pagination: rows strictly past (created_at, rowid) of the `after`
  // file. rowid (insertion order) breaks ties within a second, so the order is
  // the order of creation.
  int64_t after_created = 0;
  int64_t after_rowid = 0;
  if (!after.empty()) {
    auto st = Prepare(db_, "SELECT created_at, rowid FROM files WHERE id = ?1");
    if (!st.ok()) return st.status();
    st->Text(1, after);
    int rc = st->Step();
    if (rc == SQLITE_DONE) return out;  // unknown cursor: the listing has ended
    if (rc != SQLITE_ROW) return SqlError(db_, "list files");
    after_created = st->ColInt(0);
    after_rowid = st->ColInt(1);
  }
  // Built from constant fragments only; every value is a bound parameter.
  std::string sql = std::string("SELECT ") + kFileColumns + " FROM files WHERE 1";
  if (!purpose.empty()) sql += " AND purpose = ?1";
  if (!after.empty())
    sql += ascending ? " AND (created_at, rowid) > (?2, ?3)" : " AND (created_at, rowid) < (?2, ?3)";
  sql += ascending ? " ORDER BY created_at, rowid" : " ORDER BY created_at DESC, rowid DESC";
  sql += " LIMIT ?4";
  auto st = Prepare(db_, sql);
  if (!st.ok()) return st.status();
  if (!purpose.empty()) st->Text(1, purpose);
  if (!after.empty()) {
    st->Int(2, after_created);
    st->Int(3, after_rowid);
  }
  st->Int(4, limit);
  int rc;
  while ((rc = st->Step()) == SQLITE_ROW) out.push_back(ReadFile(*st));
  if (rc != SQLITE_DONE) return SqlError(db_, "list files");
  return out;
}

Status SqliteStore::DeleteFile(std::string_view id) {
  std::lock_guard lock(mu_);
  return Transaction(db_, [&]() -> Status {
    auto st = Prepare(db_, "DELETE FROM files WHERE id = ?1");
    if (!st.ok()) return st.status();
    st->Text(1, id);
    if (Status s = StepDone(db_, *st, "delete file"); !s.ok()) return s;
    if (sqlite3_changes(db_) == 0) return Status::NotFound("no file " + std::string(id));
    return Status::Ok();
  });
}

// --- batches ---

Status SqliteStore::PutBatch(const BatchRecord& batch) {
  std::lock_guard lock(mu_);
  return Transaction(db_, [&]() -> Status {
    auto st = Prepare(db_, kInsertBatchSql);
    if (!st.ok()) return st.status();
    if (Status s = BindBatchFields(*st, batch); !s.ok()) return s;
    st->Text(21, batch.id);
    st->Int(22, batch.counts.completed);
    st->Int(23, batch.counts.failed);
    st->Int(24, batch.usage.input_tokens);
    st->Int(25, batch.usage.cached_tokens);
    st->Int(26, batch.usage.output_tokens);
    int rc = SQLITE_OK;
    Status s = StepDone(db_, *st, "insert batch", &rc);
    if (IsDuplicateKey(rc)) return Status::InvalidArgument("batch " + batch.id + " already exists");
    return s;
  });
}

StatusOr<BatchRecord> SqliteStore::GetBatch(std::string_view id) {
  std::lock_guard lock(mu_);
  auto st = Prepare(db_, std::string("SELECT ") + kBatchColumns + " FROM batches WHERE id = ?1");
  if (!st.ok()) return st.status();
  st->Text(1, id);
  int rc = st->Step();
  if (rc == SQLITE_ROW) return ReadBatch(*st);
  if (rc == SQLITE_DONE) return Status::NotFound("no batch " + std::string(id));
  return SqlError(db_, "get batch");
}

StatusOr<std::vector<BatchRecord>> SqliteStore::ListBatches(std::string_view after, int limit) {
  if (limit <= 0) return std::vector<BatchRecord>();
  std::lock_guard lock(mu_);
  int64_t after_created = 0;
  int64_t after_rowid = 0;  // insertion order breaks ties within a second
  if (!after.empty()) {
    auto st = Prepare(db_, "SELECT created_at, rowid FROM batches WHERE id = ?1");
    if (!st.ok()) return st.status();
    st->Text(1, after);
    int rc = st->Step();
    if (rc == SQLITE_DONE) return std::vector<BatchRecord>();  // unknown cursor: the listing has ended
    if (rc != SQLITE_ROW) return SqlError(db_, "list batches");
    after_created = st->ColInt(0);
    after_rowid = st->ColInt(1);
  }
  std::string sql = std::string("SELECT ") + kBatchColumns + " FROM batches";
  if (!after.empty()) sql += " WHERE (created_at, rowid) < (?1, ?2)";
  sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?3";
  auto st = Prepare(db_, sql);
  if (!st.ok()) return st.status();
  if (!after.empty()) {
    st->Int(1, after_created);
    st->Int(2, after_rowid);
  }
  st->Int(3, limit);
  return ReadBatches(db_, *st);
}

StatusOr<std::vector<BatchRecord>> SqliteStore::BatchesWithStatus(const std::vector<std::string>& statuses) {
  if (statuses.empty()) return std::vector<BatchRecord>();
  std::lock_guard lock(mu_);
  std::string sql = std::string("SELECT ") + kBatchColumns + " FROM batches WHERE status IN (";
  for (size_t i = 0; i < statuses.size(); ++i) sql += i == 0 ? "?" : ", ?";
  sql += ") ORDER BY created_at, rowid";
  auto st = Prepare(db_, sql);
  if (!st.ok()) return st.status();
  for (size_t i = 0; i < statuses.size(); ++i) st->Text(static_cast<int>(i) + 1, statuses[i]);
  return ReadBatches(db_, *st);
}

Status SqliteStore::UpdateBatch(const BatchRecord& batch) {
  std::lock_guard lock(mu_);
  return Transaction(db_, [&] { return UpdateBatchLocked(db_, batch); });
}

Status SqliteStore::FinalizeBatch(const BatchRecord& batch, const std::vector<FileRecord>& files) {
  std::lock_guard lock(mu_);
  return Transaction(db_, [&]() -> Status {
    for (const FileRecord& f : files) {
      if (Status s = InsertFile(db_, f); !s.ok()) return s;
    }
    return UpdateBatchLocked(db_, batch);
  });
}

// --- batch requests ---

Status SqliteStore::AddRequests(std::string_view batch_id, const std::vector<PendingRequest>& rows) {
  std::lock_guard lock(mu_);
  return Transaction(db_, [&]() -> Status {
    if (Status s = CheckBatchExists(db_, batch_id); !s.ok()) return s;
    auto del = Prepare(db_, "DELETE FROM requests WHERE batch_id = ?1");
    if (!del.ok()) return del.status();
    del->Text(1, batch_id);
    if (Status s = StepDone(db_, *del, "delete requests"); !s.ok()) return s;

    // One statement reused for every row; the batch id stays bound across resets.
    auto ins = Prepare(db_,
                       "INSERT INTO requests (batch_id, line, custom_id, byte_offset, byte_length, prefix_hash, "
                       "state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)");
    if (!ins.ok()) return ins.status();
    ins->Text(1, batch_id);
    for (const PendingRequest& r : rows) {
      ins->Int(2, r.line);
      ins->Text(3, r.custom_id);
      ins->Int(4, r.offset);
      ins->Int(5, r.length);
      ins->Int(6, std::bit_cast<int64_t>(r.prefix_hash));
      int rc = SQLITE_OK;
      Status s = StepDone(db_, *ins, "insert request", &rc);
      if (IsDuplicateKey(rc)) return Status::InvalidArgument("line " + std::to_string(r.line) + " given twice");
      if (!s.ok()) return s;
    }

    auto upd = Prepare(db_,
                       "UPDATE batches SET total = ?1, completed = 0, failed = 0, input_tokens = 0, "
                       "cached_tokens = 0, output_tokens = 0 WHERE id = ?2");
    if (!upd.ok()) return upd.status();
    upd->Int(1, static_cast<int64_t>(rows.size()));
    upd->Text(2, batch_id);
    return StepDone(db_, *upd, "set request counts");
  });
}

StatusOr<std::vector<PendingRequest>> SqliteStore::PendingRequests(std::string_view batch_id) {
  std::lock_guard lock(mu_);
  if (Status s = CheckBatchExists(db_, batch_id); !s.ok()) return s;
  // `state = 0` matches the partial index requests_pending.
  auto st = Prepare(db_,
                    "SELECT line, custom_id, byte_offset, byte_length, prefix_hash, crashes FROM requests "
                    "WHERE batch_id = ?1 AND state = 0 ORDER BY line");
  if (!st.ok()) return st.status();
  st->Text(1, batch_id);
  std::vector<PendingRequest> out;
  int rc;
  while ((rc = st->Step()) == SQLITE_ROW) {
    PendingRequest r;
    r.line = st->ColInt(0);
    r.custom_id = st->ColText(1);
    r.offset = st->ColInt(2);
    r.length = st->ColInt(3);
    r.prefix_hash = std::bit_cast<uint64_t>(st->ColInt(4));
    r.crashes = static_cast<int32_t>(st->ColInt(5));
    out.push_back(std::move(r));
  }
  if (rc != SQLITE_DONE) return SqlError(db_, "read pending requests");
  return out;
}

// Called on the engine thread as each request starts and ends: committed
// without an fsync (synchronous=NORMAL in WAL mode), which survives the
// process dying, the only crash a mark is for, at the cost of a write(2).
Status SqliteStore::SetInFlight(std::string_view batch_id, const std::vector<int64_t>& lines, bool in_flight) {
  if (lines.empty()) return Status::Ok();
  std::lock_guard lock(mu_);
  if (Status s = Exec(db_, "PRAGMA synchronous = NORMAL"); !s.ok()) return s;
  Status marked = Transaction(db_, [&]() -> Status {
    auto upd = Prepare(db_, "UPDATE requests SET inflight = ?3 WHERE batch_id = ?1 AND line = ?2 AND state = 0");
    if (!upd.ok()) return upd.status();
    upd->Text(1, batch_id);
    upd->Int(3, in_flight ? 1 : 0);
    for (int64_t line : lines) {
      upd->Int(2, line);
      if (Status s = StepDone(db_, *upd, "mark in flight"); !s.ok()) return s;
    }
    return Status::Ok();
  });
  Status restored = Exec(db_, "PRAGMA synchronous = FULL");
  return marked.ok() ? restored : marked;
}

Status SqliteStore::MarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) {
  return SetInFlight(batch_id, lines, true);
}

Status SqliteStore::UnmarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) {
  return SetInFlight(batch_id, lines, false);
}

StatusOr<int64_t> SqliteStore::RecoverInFlight() {
  std::lock_guard lock(mu_);
  int64_t n = 0;
  Status s = Transaction(db_, [&]() -> Status {
    if (Status e = Exec(db_, "UPDATE requests SET crashes = crashes + 1, inflight = 0 WHERE inflight = 1 AND state = 0");
        !e.ok())
      return e;
    n = sqlite3_changes(db_);
    return Exec(db_, "UPDATE requests SET inflight = 0 WHERE inflight = 1");
  });
  if (!s.ok()) return s;
  return n;
}

Status SqliteStore::ClearInFlight() {
  std::lock_guard lock(mu_);
  return Transaction(db_, [&]() -> Status { return Exec(db_, "UPDATE requests SET inflight = 0 WHERE inflight = 1"); });
}

StatusOr<int64_t> SqliteStore::CommitResults(std::string_view batch_id, const std::vector<RequestOutcome>& outcomes) {
  std::lock_guard lock(mu_);
  int64_t recorded = 0;
  Status s = Transaction(db_, [&]() -> Status {
    if (Status s = CheckBatchExists(db_, batch_id); !s.ok()) return s;
    // `state = 0`: a row answered before (by this call or an earlier one) is
    // left alone, so nothing is answered or counted twice.
    auto upd = Prepare(db_,
                       "UPDATE requests SET state = ?1, result_line = ?2, inflight = 0 "
                       "WHERE batch_id = ?3 AND line = ?4 AND state = 0");
    if (!upd.ok()) return upd.status();
    upd->Text(3, batch_id);
    Usage usage;
    int64_t completed = 0, failed = 0;
    for (const RequestOutcome& o : outcomes) {
      upd->Int(1, o.ok ? kStateCompleted : kStateFailed);
      upd->Text(2, o.result_line);
      upd->Int(4, o.line);
      if (Status s = StepDone(db_, *upd, "record result"); !s.ok()) return s;
      if (sqlite3_changes(db_) == 0) continue;
      ++recorded;
      ++(o.ok ? completed : failed);
      usage.input_tokens += o.input_tokens;
      usage.cached_tokens += o.cached_tokens;
      usage.output_tokens += o.output_tokens;
    }
    if (recorded == 0) return Status::Ok();
    auto counts = Prepare(db_,
                          "UPDATE batches SET completed = completed + ?1, failed = failed + ?2, "
                          "input_tokens = input_tokens + ?3, cached_tokens = cached_tokens + ?4, "
                          "output_tokens = output_tokens + ?5 WHERE id = ?6");
    if (!counts.ok()) return counts.status();
    counts->Int(1, completed);
    counts->Int(2, failed);
    counts->Int(3, usage.input_tokens);
    counts->Int(4, usage.cached_tokens);
    counts->Int(5, usage.output_tokens);
    counts->Text(6, batch_id);
    return StepDone(db_, *counts, "add to batch counts");
  });
  if (!s.ok()) return s;
  return recorded;
}

Status SqliteStore::ForEachRequest(std::string_view batch_id, const std::function<Status(const StoredRequest&)>& fn) {
  return use_readers_ ? ForEachRequestFromReader(batch_id, fn) : ForEachRequestInChunks(batch_id, fn);
}

Status SqliteStore::ForEachRequestInChunks(std::string_view batch_id,
                                           const std::function<Status(const StoredRequest&)>& fn) {
  // Keyset by line; the mutex is held only while a chunk is read, never
  // while `fn` runs.
  int64_t after_line = std::numeric_limits<int64_t>::min();
  std::vector<StoredRequest> chunk;
  for (bool first = true;; first = false) {
    chunk.clear();
    {
      std::lock_guard lock(mu_);
      if (first) {
        if (Status s = CheckBatchExists(db_, batch_id); !s.ok()) return s;
      }
      auto st = Prepare(db_, kForEachSql);
      if (!st.ok()) return st.status();
      st->Text(1, batch_id);
      st->Int(2, after_line);
      st->Int(3, kForEachChunk);
      int rc;
      while ((rc = st->Step()) == SQLITE_ROW) chunk.push_back(ReadStoredRequest(*st));
      if (rc != SQLITE_DONE) return SqlError(db_, "read requests");
    }
    for (const StoredRequest& r : chunk) {
      if (Status s = fn(r); !s.ok()) return s;
    }
    if (chunk.size() < static_cast<size_t>(kForEachChunk)) return Status::Ok();
    after_line = chunk.back().line;
  }
}

Status SqliteStore::ForEachRequestFromReader(std::string_view batch_id,
                                             const std::function<Status(const StoredRequest&)>& fn) {
  auto acquired = AcquireReader();
  if (!acquired.ok()) return acquired.status();
  sqlite3* reader = *acquired;
  struct Lease {  // gives the connection back, its read transaction ended
    SqliteStore* store;
    sqlite3* reader;
    ~Lease() {
      if (!sqlite3_get_autocommit(reader)) sqlite3_exec(reader, "ROLLBACK", nullptr, nullptr, nullptr);
      store->ReleaseReader(reader);
    }
  } lease{this, reader};

  // One read transaction: the existence check and every row see one snapshot.
  if (Status s = Exec(reader, "BEGIN"); !s.ok()) return s;
  if (Status s = CheckBatchExists(reader, batch_id); !s.ok()) return s;
  auto st = Prepare(reader, kForEachSql);
  if (!st.ok()) return st.status();
  st->Text(1, batch_id);
  st->Int(2, std::numeric_limits<int64_t>::min());
  st->Int(3, -1);  // no limit
  int rc;
  while ((rc = st->Step()) == SQLITE_ROW) {
    if (Status s = fn(ReadStoredRequest(*st)); !s.ok()) return s;
  }
  if (rc != SQLITE_DONE) return SqlError(reader, "read requests");
  return Status::Ok();
}

StatusOr<sqlite3*> SqliteStore::AcquireReader() {
  {
    std::lock_guard lock(readers_mu_);
    if (!idle_readers_.empty()) {
      sqlite3* r = idle_readers_.back();
      idle_readers_.pop_back();
      return r;
    }
  }
  sqlite3* r = nullptr;
  if (sqlite3_open_v2(path_.c_str(), &r, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    Status s = Status::Internal("open read connection " + path_ + ": " + (r ? sqlite3_errmsg(r) : "out of memory"));
    sqlite3_close(r);
    return s;
  }
  sqlite3_extended_result_codes(r, 1);
  sqlite3_busy_timeout(r, kBusyTimeoutMs);
  return r;
}

void SqliteStore::ReleaseReader(sqlite3* reader) {
  // Keep a couple idle; a burst of concurrent calls closes its extras.
  constexpr size_t kMaxIdleReaders = 2;
  {
    std::lock_guard lock(readers_mu_);
    if (idle_readers_.size() < kMaxIdleReaders) {
      idle_readers_.push_back(reader);
      return;
    }
  }
  sqlite3_close_v2(reader);
}

}  // namespace kvb::store

#include "store/sqlite_store.h"

#include <sqlite3.h>

#include <filesystem>
#include <limits>
#include <utility>

#include "store/batch_errors.h"
#include "store/sqlite_schema.h"
#include "store/sqlite_util.h"

namespace kvb::store {
namespace {

using sqlite::BatchStatusText;
using sqlite::CheckBatchExists;
using sqlite::Exec;
using sqlite::IsDuplicateKey;
using sqlite::Prepare;
using sqlite::SqlError;
using sqlite::StepDone;
using sqlite::Stmt;
using sqlite::Transaction;


// --- files ---

constexpr const char* kFileColumns = "id, filename, purpose, path, bytes, created_at, expires_at";

FileRecord ReadFileRow(const Stmt& st) {
  FileRecord f;
  f.id = st.ColText(0);
  f.filename = st.ColText(1);
  f.purpose = st.ColText(2);
  f.bytes = st.ColInt(4);
  f.created_at = st.ColInt(5);
  f.expires_at = st.ColInt(6);
  return f;
}

Status InsertFile(sqlite3* db, const FileRecord& f, const std::string& path) {
  auto st = Prepare(db,
                    "INSERT INTO files (id, filename, purpose, path, bytes, created_at, expires_at) "
                    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)");
  if (!st.ok()) return st.status();
  st->Text(1, f.id);
  st->Text(2, f.filename);
  st->Text(3, f.purpose);
  st->Text(4, path);
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

constexpr const char* kInsertBatchSql =
    "INSERT INTO batches (endpoint, input_file_id, completion_window, status, output_file_id, error_file_id, "
    "metadata_json, errors_json, created_at, in_progress_at, expires_at, finalizing_at, completed_at, failed_at, "
    "expired_at, cancelling_at, cancelled_at, priority, paused, total, id, completed, failed, input_tokens, "
    "cached_tokens, output_tokens) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, "
    "?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)";

// Binds ?1..?20 of kInsertBatchSql.
Status BindBatchFields(Stmt& st, const BatchRecord& b) {
  auto errors = EncodeBatchErrors(b.errors);
  if (!errors.ok()) return errors.status();
  st.Text(1, b.endpoint);
  st.Text(2, b.input_file_id);
  st.Text(3, b.completion_window);
  st.Text(4, ToString(b.status));
  st.OptText(5, b.output_file_id);
  st.OptText(6, b.error_file_id);
  st.OptText(7, b.metadata_json);
  st.OptText(8, b.errors.empty() ? std::string_view() : std::string_view(*errors));  // none: NULL
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
  auto status = ParseBatchStatus(st.ColText(4));
  if (!status) return Status::Internal("batch " + b.id + " has an unknown status " + st.ColText(4));
  b.status = *status;
  b.output_file_id = st.ColText(5);
  b.error_file_id = st.ColText(6);
  b.metadata_json = st.ColText(7);
  auto errors = DecodeBatchErrors(st.ColText(8));
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

// Reads one batch on `db`.
StatusOr<BatchRecord> GetBatchOn(sqlite3* db, std::string_view id) {
  auto st = Prepare(db, std::string("SELECT ") + kBatchColumns + " FROM batches WHERE id = ?1");
  if (!st.ok()) return st.status();
  st->Text(1, id);
  int rc = st->Step();
  if (rc == SQLITE_ROW) return ReadBatch(*st);
  if (rc == SQLITE_DONE) return Status::NotFound("no batch " + std::string(id));
  return SqlError(db, "get batch");
}

// The column holding the time a batch entered `s`.
const char* TimeColumn(BatchStatus s) {
  switch (s) {
    case BatchStatus::kValidating: return "created_at";
    case BatchStatus::kFailed: return "failed_at";
    case BatchStatus::kInProgress: return "in_progress_at";
    case BatchStatus::kFinalizing: return "finalizing_at";
    case BatchStatus::kCompleted: return "completed_at";
    case BatchStatus::kExpired: return "expired_at";
    case BatchStatus::kCancelling: return "cancelling_at";
    case BatchStatus::kCancelled: return "cancelled_at";
  }
  return "created_at";
}

Status NotInStatus(std::string_view id, std::string_view status, BatchStatus to) {
  return Status::FailedPrecondition("batch " + std::string(id) + " is " + std::string(status) + ", it cannot become " +
                                    std::string(ToString(to)));
}

}  // namespace

// --- open / close ---

StatusOr<std::unique_ptr<SqliteStore>> SqliteStore::Open(const std::string& path, const std::string& files_dir) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr) != SQLITE_OK) {
    Status s = Status::Internal("open database " + path + ": " + (db ? sqlite3_errmsg(db) : "out of memory"));
    sqlite3_close(db);
    return s;
  }
  // Owns db until the store does.
  std::unique_ptr<sqlite3, int (*)(sqlite3*)> guard(db, sqlite3_close_v2);
  sqlite3_extended_result_codes(db, 1);
  sqlite3_busy_timeout(db, sqlite::kBusyTimeoutMs);

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
  return std::unique_ptr<SqliteStore>(new SqliteStore(guard.release(), path, files_dir, is_file && wal));
}

SqliteStore::SqliteStore(sqlite3* db, std::string path, std::string files_dir, bool use_readers)
    : db_(db), path_(std::move(path)), files_dir_(std::move(files_dir)), use_readers_(use_readers) {}

SqliteStore::~SqliteStore() {
  for (sqlite3* r : idle_readers_) sqlite3_close_v2(r);
  sqlite3_close_v2(db_);
}

// --- files ---


Status SqliteStore::PutFile(const FileRecord& file, const std::string& local_path) {
  // A duplicate id must not touch the existing file's content.
  if (ContentPath(file.id).ok()) return Status::InvalidArgument("file " + file.id + " already exists");
  auto path = AdoptContent(file.id, local_path);
  if (!path.ok()) return path.status();
  std::lock_guard lock(mu_);
  Status s = Transaction(db_, [&] { return InsertFile(db_, file, *path); });
  if (!s.ok()) {
    // Handed back: the caller still owns its file when the call fails.
    std::error_code ec;
    std::filesystem::rename(*path, local_path, ec);
  }
  return s;
}




StatusOr<FileRecord> SqliteStore::GetFile(std::string_view id) {
  std::lock_guard lock(mu_);
  auto st = Prepare(db_, std::string("SELECT ") + kFileColumns + " FROM files WHERE id = ?1");
  if (!st.ok()) return st.status();
  st->Text(1, id);
  int rc = st->Step();
  if (rc == SQLITE_ROW) return ReadFileRow(*st);
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
  while ((rc = st->Step()) == SQLITE_ROW) out.push_back(ReadFileRow(*st));
  if (rc != SQLITE_DONE) return SqlError(db_, "list files");
  return out;
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
  return GetBatchOn(db_, id);
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

StatusOr<std::vector<BatchRecord>> SqliteStore::BatchesWithStatus(const std::vector<BatchStatus>& statuses) {
  if (statuses.empty()) return std::vector<BatchRecord>();
  std::lock_guard lock(mu_);
  std::string sql = std::string("SELECT ") + kBatchColumns + " FROM batches WHERE status IN (";
  for (size_t i = 0; i < statuses.size(); ++i) sql += i == 0 ? "?" : ", ?";
  sql += ") ORDER BY created_at, rowid";
  auto st = Prepare(db_, sql);
  if (!st.ok()) return st.status();
  for (size_t i = 0; i < statuses.size(); ++i) st->Text(static_cast<int>(i) + 1, ToString(statuses[i]));
  return ReadBatches(db_, *st);
}

StatusOr<BatchRecord> SqliteStore::TransitionBatch(std::string_view id, const std::vector<BatchStatus>& from,
                                                   BatchStatus to, int64_t now) {
  for (BatchStatus f : from)
    if (!CanTransition(f, to))
      return Status::InvalidArgument("a batch cannot go from " + std::string(ToString(f)) + " to " +
                                     std::string(ToString(to)));
  std::lock_guard lock(mu_);
  StatusOr<BatchRecord> out = Status::Internal("unset");
  Status s = Transaction(db_, [&]() -> Status {
    auto cur = BatchStatusText(db_, id);
    if (!cur.ok()) return cur.status();
    bool allowed = false;
    for (BatchStatus f : from) allowed = allowed || ToString(f) == *cur;
    if (!allowed) return NotInStatus(id, *cur, to);
    auto st = Prepare(db_, std::string("UPDATE batches SET status = ?1, ") + TimeColumn(to) + " = ?2 WHERE id = ?3");
    if (!st.ok()) return st.status();
    st->Text(1, ToString(to));
    st->Int(2, now);
    st->Text(3, id);
    if (Status e = StepDone(db_, *st, "update batch status"); !e.ok()) return e;
    out = GetBatchOn(db_, id);
    return out.status();
  });
  if (!s.ok()) return s;
  return out;
}

StatusOr<BatchRecord> SqliteStore::SetBatchControl(std::string_view id, std::optional<bool> paused,
                                                   std::optional<int32_t> priority) {
  std::lock_guard lock(mu_);
  StatusOr<BatchRecord> out = Status::Internal("unset");
  Status s = Transaction(db_, [&]() -> Status {
    auto cur = BatchStatusText(db_, id);
    if (!cur.ok()) return cur.status();
    auto status = ParseBatchStatus(*cur);
    if (status && IsFinal(*status))
      return Status::FailedPrecondition("Cannot change a batch with status '" + *cur + "'.");
    auto st = Prepare(db_,
                      "UPDATE batches SET paused = COALESCE(?1, paused), priority = COALESCE(?2, priority) "
                      "WHERE id = ?3");
    if (!st.ok()) return st.status();
    if (paused) st->Int(1, *paused ? 1 : 0);
    if (priority) st->Int(2, *priority);
    st->Text(3, id);
    if (Status e = StepDone(db_, *st, "update batch controls"); !e.ok()) return e;
    out = GetBatchOn(db_, id);
    return out.status();
  });
  if (!s.ok()) return s;
  return out;
}

StatusOr<bool> SqliteStore::LeaseBatch(std::string_view id, std::string_view owner, int64_t lease_ms) {
  std::lock_guard lock(mu_);
  bool held = false;
  Status s = Transaction(db_, [&]() -> Status {
    if (Status e = CheckBatchExists(db_, id); !e.ok()) return e;
    const int64_t now = sqlite::NowMs();
    auto st = Prepare(db_,
                      "UPDATE batches SET lease_owner = ?1, lease_until = ?2 "
                      "WHERE id = ?3 AND (lease_until < ?4 OR lease_owner = ?1)");
    if (!st.ok()) return st.status();
    st->Text(1, owner);
    st->Int(2, now + lease_ms);
    st->Text(3, id);
    st->Int(4, now);
    if (Status e = StepDone(db_, *st, "lease batch"); !e.ok()) return e;
    held = sqlite3_changes(db_) > 0;
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return held;
}

Status SqliteStore::FailBatch(std::string_view id, const std::vector<BatchError>& errors, int64_t now) {
  auto json = EncodeBatchErrors(errors);
  if (!json.ok()) return json.status();
  std::lock_guard lock(mu_);
  return Transaction(db_, [&]() -> Status {
    auto cur = BatchStatusText(db_, id);
    if (!cur.ok()) return cur.status();
    if (*cur != ToString(BatchStatus::kValidating)) return NotInStatus(id, *cur, BatchStatus::kFailed);
    auto st = Prepare(db_, "UPDATE batches SET status = 'failed', failed_at = ?1, errors_json = ?2 WHERE id = ?3");
    if (!st.ok()) return st.status();
    st->Int(1, now);
    st->OptText(2, errors.empty() ? std::string_view() : std::string_view(*json));  // none: NULL
    st->Text(3, id);
    return StepDone(db_, *st, "fail batch");
  });
}

StatusOr<BatchRecord> SqliteStore::FinalizeBatch(std::string_view id, BatchStatus from, BatchStatus to, int64_t now,
                                                 const std::optional<ResultFile>& output,
                                                 const std::optional<ResultFile>& error) {
  if (!CanTransition(from, to) || !IsFinal(to))
    return Status::InvalidArgument("a batch cannot be finalized from " + std::string(ToString(from)) + " to " +
                                   std::string(ToString(to)));
  {
    std::lock_guard lock(mu_);
    auto cur = BatchStatusText(db_, id);
    if (!cur.ok()) return cur.status();
    if (*cur != ToString(from)) return NotInStatus(id, *cur, to);
  }
  // Content first (outside the transaction: renames), handed back if the
  // transaction does not happen.
  std::vector<std::pair<const ResultFile*, std::string>> adopted;
  auto give_back = [&] {
    std::error_code ec;
    for (auto& [f, path] : adopted) std::filesystem::rename(path, f->local_path, ec);
  };
  for (const auto* f : {&output, &error}) {
    if (!f->has_value()) continue;
    auto path = AdoptContent((*f)->record.id, (*f)->local_path);
    if (!path.ok()) {
      give_back();
      return path.status();
    }
    adopted.emplace_back(&**f, *path);
  }
  std::lock_guard lock(mu_);
  StatusOr<BatchRecord> out = Status::Internal("unset");
  Status s = Transaction(db_, [&]() -> Status {
    auto cur = BatchStatusText(db_, id);
    if (!cur.ok()) return cur.status();
    if (*cur != ToString(from)) return NotInStatus(id, *cur, to);
    for (auto& [f, path] : adopted)
      if (Status e = InsertFile(db_, f->record, path); !e.ok()) return e;
    auto st = Prepare(db_, std::string("UPDATE batches SET status = ?1, ") + TimeColumn(to) +
                               " = ?2, output_file_id = ?3, error_file_id = ?4 WHERE id = ?5");
    if (!st.ok()) return st.status();
    st->Text(1, ToString(to));
    st->Int(2, now);
    st->OptText(3, output ? std::string_view(output->record.id) : std::string_view());
    st->OptText(4, error ? std::string_view(error->record.id) : std::string_view());
    st->Text(5, id);
    if (Status e = StepDone(db_, *st, "finalize batch"); !e.ok()) return e;
    out = GetBatchOn(db_, id);
    return out.status();
  });
  if (!s.ok()) {
    give_back();
    return s;
  }
  return out;
}

}  // namespace kvb::store

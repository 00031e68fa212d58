// Small RAII helpers over the SQLite C API, shared by the SQLite store's
// files. Internal to src/store: not part of the Store interface.
#pragma once

#include <sqlite3.h>

#include <chrono>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>

#include "util/status.h"

namespace kvb::store::sqlite {

// Owns a prepared statement. A failed bind is remembered and returned by the
// next Step, so call sites bind without checking each call.
class Stmt {
 public:
  explicit Stmt(sqlite3_stmt* s) : s_(s) {}
  Stmt(Stmt&& o) noexcept : s_(std::exchange(o.s_, nullptr)), bind_rc_(o.bind_rc_) {}
  Stmt& operator=(Stmt&&) = delete;
  ~Stmt() { sqlite3_finalize(s_); }

  // Empty text binds '' (sqlite3_bind_text would bind NULL for a null data()).
  void Text(int i, std::string_view v) {
    Check(sqlite3_bind_text(s_, i, v.empty() ? "" : v.data(), Len(v), SQLITE_TRANSIENT));
  }
  // Empty text binds NULL: for the API's nullable strings.
  void OptText(int i, std::string_view v) {
    Check(v.empty() ? sqlite3_bind_null(s_, i) : sqlite3_bind_text(s_, i, v.data(), Len(v), SQLITE_TRANSIENT));
  }
  void Int(int i, int64_t v) { Check(sqlite3_bind_int64(s_, i, v)); }

  int Step() { return bind_rc_ != SQLITE_OK ? bind_rc_ : sqlite3_step(s_); }
  void Reset() { sqlite3_reset(s_); }

  std::string ColText(int i) const {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s_, i));
    return p ? std::string(p, static_cast<size_t>(sqlite3_column_bytes(s_, i))) : std::string();
  }
  int64_t ColInt(int i) const { return sqlite3_column_int64(s_, i); }

 private:
  static int Len(std::string_view v) {
    return v.size() > static_cast<size_t>(std::numeric_limits<int>::max()) ? -1 : static_cast<int>(v.size());
  }
  void Check(int rc) {
    if (rc != SQLITE_OK && bind_rc_ == SQLITE_OK) bind_rc_ = rc;
  }

  sqlite3_stmt* s_;
  int bind_rc_ = SQLITE_OK;
};

inline Status SqlError(sqlite3* db, std::string_view what) {
  return Status::Internal(std::string(what) + ": " + sqlite3_errmsg(db));
}

inline bool IsDuplicateKey(int rc) { return rc == SQLITE_CONSTRAINT_PRIMARYKEY || rc == SQLITE_CONSTRAINT_UNIQUE; }

inline StatusOr<Stmt> Prepare(sqlite3* db, std::string_view sql) {
  sqlite3_stmt* s = nullptr;
  if (sqlite3_prepare_v2(db, sql.data(), static_cast<int>(sql.size()), &s, nullptr) != SQLITE_OK) {
    sqlite3_finalize(s);
    return SqlError(db, "prepare");
  }
  return Stmt(s);
}

inline Status Exec(sqlite3* db, const char* sql) {
  if (sqlite3_exec(db, sql, nullptr, nullptr, nullptr) != SQLITE_OK) return SqlError(db, sql);
  return Status::Ok();
}

// Steps a statement that returns no rows. *rc_out gets the step's result code
// (to tell a duplicate key from other failures).
inline Status StepDone(sqlite3* db, Stmt& st, std::string_view what, int* rc_out = nullptr) {
  int rc = st.Step();
  if (rc_out) *rc_out = rc;
  Status s = rc == SQLITE_DONE ? Status::Ok() : SqlError(db, what);
  st.Reset();
  return s;
}

// Runs `body` in BEGIN IMMEDIATE ... COMMIT; rolls back when it or the
// commit fails. IMMEDIATE takes the write lock up front, so a busy database
// waits in the busy handler instead of failing halfway through.
template <typename Body>
Status Transaction(sqlite3* db, Body&& body) {
  if (Status s = Exec(db, "BEGIN IMMEDIATE"); !s.ok()) return s;
  Status s = body();
  if (s.ok()) s = Exec(db, "COMMIT");
  // Some errors (disk full, I/O) roll back by themselves; only roll back an open one.
  if (!s.ok() && !sqlite3_get_autocommit(db)) sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
  return s;
}

// How long a statement waits for another connection's lock (another process
// on the same file, or WAL checkpointing) before failing with SQLITE_BUSY.
inline constexpr int kBusyTimeoutMs = 10'000;

// requests.state
enum RequestStateValue : int64_t { kStatePending = 0, kStateCompleted = 1, kStateFailed = 2 };

// Lease clock: Unix milliseconds (leases outlive the process that took them).
inline int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The batch's stored status text; NotFound when there is no such batch.
inline StatusOr<std::string> BatchStatusText(sqlite3* db, std::string_view batch_id) {
  auto st = Prepare(db, "SELECT status FROM batches WHERE id = ?1");
  if (!st.ok()) return st.status();
  st->Text(1, batch_id);
  int rc = st->Step();
  if (rc == SQLITE_ROW) return st->ColText(0);
  if (rc == SQLITE_DONE) return Status::NotFound("no batch " + std::string(batch_id));
  return SqlError(db, "look up batch");
}

// NotFound unless the batch exists.
inline Status CheckBatchExists(sqlite3* db, std::string_view batch_id) {
  auto s = BatchStatusText(db, batch_id);
  return s.ok() ? Status::Ok() : s.status();
}

}  // namespace kvb::store::sqlite

// The SQLite store's request rows and chunks: validation's rows, claims,
// leases, fenced group commits, in-flight marks, streaming reads.
#include <sqlite3.h>

#include <bit>
#include <limits>
#include <map>
#include <utility>

#include "store/sqlite_store.h"
#include "store/sqlite_util.h"

namespace kvb::store {
namespace {

using sqlite::BatchStatusText;
using sqlite::CheckBatchExists;
using sqlite::Exec;
using sqlite::IsDuplicateKey;
using sqlite::kStateCompleted;
using sqlite::kStateFailed;
using sqlite::kStatePending;
using sqlite::NowMs;
using sqlite::Prepare;
using sqlite::SqlError;
using sqlite::StepDone;
using sqlite::Stmt;
using sqlite::Transaction;

// Rows per chunk when ForEachRequest reads ":memory:" in chunks.
constexpr int kForEachChunk = 512;

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

// Columns: line, custom_id, byte_offset, byte_length, prefix_hash, crashes, chunk.
PendingRequest ReadPending(const Stmt& st) {
  PendingRequest r;
  r.line = st.ColInt(0);
  r.custom_id = st.ColText(1);
  r.offset = st.ColInt(2);
  r.length = st.ColInt(3);
  r.prefix_hash = std::bit_cast<uint64_t>(st.ColInt(4));
  r.crashes = static_cast<int32_t>(st.ColInt(5));
  r.chunk = st.ColInt(6);
  return r;
}

Status LeaseLost(const Fence& f) {
  return Status::FailedPrecondition("lease lost: chunk " + std::to_string(f.chunk) + " of " + f.batch_id +
                                    " was claimed again");
}

}  // namespace

Status SqliteStore::AddRequests(std::string_view batch_id, const std::vector<PendingRequest>& rows, int64_t now) {
  std::lock_guard lock(mu_);
  return Transaction(db_, [&]() -> Status {
    auto cur = BatchStatusText(db_, batch_id);
    if (!cur.ok()) return cur.status();
    if (*cur != ToString(BatchStatus::kValidating))
      return Status::FailedPrecondition("batch " + std::string(batch_id) + " is " + *cur + ", not validating");
    for (const char* sql : {"DELETE FROM requests WHERE batch_id = ?1", "DELETE FROM chunks WHERE batch_id = ?1"}) {
      auto del = Prepare(db_, sql);
      if (!del.ok()) return del.status();
      del->Text(1, batch_id);
      if (Status s = StepDone(db_, *del, "delete requests"); !s.ok()) return s;
    }
    // One statement reused for every row; the batch id stays bound across resets.
    auto ins = Prepare(db_,
                       "INSERT INTO requests (batch_id, line, custom_id, byte_offset, byte_length, prefix_hash, "
                       "state, chunk) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7)");
    if (!ins.ok()) return ins.status();
    ins->Text(1, batch_id);
    std::map<int64_t, std::pair<uint64_t, int64_t>> chunks;  // chunk -> (prefix hash, rows)
    for (const PendingRequest& r : rows) {
      ins->Int(2, r.line);
      ins->Text(3, r.custom_id);
      ins->Int(4, r.offset);
      ins->Int(5, r.length);
      ins->Int(6, std::bit_cast<int64_t>(r.prefix_hash));
      ins->Int(7, r.chunk);
      int rc = SQLITE_OK;
      Status s = StepDone(db_, *ins, "insert request", &rc);
      if (IsDuplicateKey(rc)) return Status::InvalidArgument("line " + std::to_string(r.line) + " given twice");
      if (!s.ok()) return s;
      auto [it, fresh] = chunks.try_emplace(r.chunk, r.prefix_hash, 0);
      ++it->second.second;
    }
    auto chunk = Prepare(db_, "INSERT INTO chunks (batch_id, chunk, prefix_hash, pending) VALUES (?1, ?2, ?3, ?4)");
    if (!chunk.ok()) return chunk.status();
    chunk->Text(1, batch_id);
    for (const auto& [no, c] : chunks) {
      chunk->Int(2, no);
      chunk->Int(3, std::bit_cast<int64_t>(c.first));
      chunk->Int(4, c.second);
      if (Status s = StepDone(db_, *chunk, "insert chunk"); !s.ok()) return s;
    }
    auto upd = Prepare(db_,
                       "UPDATE batches SET total = ?1, completed = 0, failed = 0, input_tokens = 0, "
                       "cached_tokens = 0, output_tokens = 0, status = 'in_progress', in_progress_at = ?2 "
                       "WHERE id = ?3");
    if (!upd.ok()) return upd.status();
    upd->Int(1, static_cast<int64_t>(rows.size()));
    upd->Int(2, now);
    upd->Text(3, batch_id);
    return StepDone(db_, *upd, "set request counts");
  });
}

StatusOr<std::optional<ChunkClaim>> SqliteStore::ClaimChunk(std::string_view owner,
                                                            const std::vector<uint64_t>& resident,
                                                            int64_t lease_ms) {
  std::lock_guard lock(mu_);
  std::optional<ChunkClaim> claim;
  Status s = Transaction(db_, [&]() -> Status {
    const int64_t now = NowMs();
    // Built from constant fragments only; every value is a bound parameter.
    std::string resident_sql = "c.chunk < 0";  // false (a bare 0 would be a column number in ORDER BY)
    if (!resident.empty()) {
      resident_sql = "c.prefix_hash IN (";
      for (size_t i = 0; i < resident.size(); ++i) resident_sql += i == 0 ? "?" + std::to_string(i + 3) : ", ?" + std::to_string(i + 3);
      resident_sql += ")";
    }
    auto pick = Prepare(db_,
                        "SELECT c.batch_id, c.chunk, c.lease_until, c.prefix_hash FROM chunks c "
                        "JOIN batches b ON b.id = c.batch_id "
                        "WHERE b.status = 'in_progress' AND b.paused = 0 AND (b.expires_at = 0 OR b.expires_at > ?1) "
                        "AND c.pending > 0 AND c.lease_until < ?2 "
                        "ORDER BY b.priority DESC, (" + resident_sql + ") DESC, b.created_at, b.rowid, "
                        "EXISTS (SELECT 1 FROM chunks h WHERE h.batch_id = c.batch_id AND h.prefix_hash = c.prefix_hash "
                        "AND h.lease_until >= ?2), c.chunk LIMIT 1");
    if (!pick.ok()) return pick.status();
    pick->Int(1, now / 1000);
    pick->Int(2, now);
    for (size_t i = 0; i < resident.size(); ++i)
      pick->Int(static_cast<int>(i) + 3, std::bit_cast<int64_t>(resident[i]));
    int rc = pick->Step();
    if (rc == SQLITE_DONE) return Status::Ok();
    if (rc != SQLITE_ROW) return SqlError(db_, "pick a chunk");
    ChunkClaim c;
    c.fence.batch_id = pick->ColText(0);
    c.fence.chunk = pick->ColInt(1);
    const bool reclaim = pick->ColInt(2) > 0;  // held, not released: its holder is gone
    c.prefix_hash = std::bit_cast<uint64_t>(pick->ColInt(3));
    auto take = Prepare(db_,
                        "UPDATE chunks SET token = token + 1, lease_owner = ?1, lease_until = ?2, "
                        "reclaims = reclaims + ?3 WHERE batch_id = ?4 AND chunk = ?5 RETURNING token, reclaims");
    if (!take.ok()) return take.status();
    take->Text(1, owner);
    take->Int(2, now + lease_ms);
    take->Int(3, reclaim ? 1 : 0);
    take->Text(4, c.fence.batch_id);
    take->Int(5, c.fence.chunk);
    if (take->Step() != SQLITE_ROW) return SqlError(db_, "claim a chunk");
    c.fence.token = take->ColInt(0);
    c.reclaims = static_cast<int32_t>(take->ColInt(1));
    take->Reset();
    if (reclaim) {
      // Rows that were in the engine when their holder went away.
      auto crashed = Prepare(db_,
                             "UPDATE requests SET crashes = crashes + 1, inflight = 0 "
                             "WHERE batch_id = ?1 AND chunk = ?2 AND inflight = 1 AND state = 0");
      if (!crashed.ok()) return crashed.status();
      crashed->Text(1, c.fence.batch_id);
      crashed->Int(2, c.fence.chunk);
      if (Status e = StepDone(db_, *crashed, "count crashes"); !e.ok()) return e;
    }
    auto rows = Prepare(db_,
                        "SELECT line, custom_id, byte_offset, byte_length, prefix_hash, crashes, chunk FROM requests "
                        "WHERE batch_id = ?1 AND chunk = ?2 AND state = 0 ORDER BY line");
    if (!rows.ok()) return rows.status();
    rows->Text(1, c.fence.batch_id);
    rows->Int(2, c.fence.chunk);
    while ((rc = rows->Step()) == SQLITE_ROW) c.rows.push_back(ReadPending(*rows));
    if (rc != SQLITE_DONE) return SqlError(db_, "read a chunk's rows");
    claim = std::move(c);
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return claim;
}

Status SqliteStore::RenewLease(const Fence& fence, int64_t lease_ms) {
  std::lock_guard lock(mu_);
  return Transaction(db_, [&]() -> Status {
    auto st = Prepare(db_, "UPDATE chunks SET lease_until = ?1 WHERE batch_id = ?2 AND chunk = ?3 AND token = ?4");
    if (!st.ok()) return st.status();
    st->Int(1, NowMs() + lease_ms);
    st->Text(2, fence.batch_id);
    st->Int(3, fence.chunk);
    st->Int(4, fence.token);
    if (Status e = StepDone(db_, *st, "renew lease"); !e.ok()) return e;
    return sqlite3_changes(db_) > 0 ? Status::Ok() : LeaseLost(fence);
  });
}

Status SqliteStore::ReleaseChunk(const Fence& fence) {
  std::lock_guard lock(mu_);
  return Transaction(db_, [&]() -> Status {
    auto st = Prepare(db_,
                      "UPDATE chunks SET lease_until = 0, lease_owner = NULL "
                      "WHERE batch_id = ?1 AND chunk = ?2 AND token = ?3");
    if (!st.ok()) return st.status();
    st->Text(1, fence.batch_id);
    st->Int(2, fence.chunk);
    st->Int(3, fence.token);
    if (Status e = StepDone(db_, *st, "release chunk"); !e.ok()) return e;
    if (sqlite3_changes(db_) == 0) return Status::Ok();  // not ours any more
    auto clear = Prepare(db_, "UPDATE requests SET inflight = 0 WHERE batch_id = ?1 AND chunk = ?2 AND inflight = 1");
    if (!clear.ok()) return clear.status();
    clear->Text(1, fence.batch_id);
    clear->Int(2, fence.chunk);
    return StepDone(db_, *clear, "clear in-flight marks");
  });
}

StatusOr<int64_t> SqliteStore::LeasedChunks(std::string_view batch_id) {
  std::lock_guard lock(mu_);
  if (Status s = CheckBatchExists(db_, batch_id); !s.ok()) return s;
  auto st = Prepare(db_, "SELECT COUNT(*) FROM chunks WHERE batch_id = ?1 AND lease_until >= ?2");
  if (!st.ok()) return st.status();
  st->Text(1, batch_id);
  st->Int(2, NowMs());
  if (st->Step() != SQLITE_ROW) return SqlError(db_, "count leases");
  return st->ColInt(0);
}

StatusOr<int64_t> SqliteStore::CommitLocked(std::string_view batch_id, const std::vector<RequestOutcome>& outcomes,
                                            int64_t chunk) {
  if (Status s = CheckBatchExists(db_, batch_id); !s.ok()) return s;
  // `state = 0`: a row answered before (by this call or an earlier one) is
  // left alone, so nothing is answered or counted twice.
  auto upd = Prepare(db_,
                     "UPDATE requests SET state = ?1, result_line = ?2, inflight = 0 "
                     "WHERE batch_id = ?3 AND line = ?4 AND state = 0 AND (?5 < 0 OR chunk = ?5) RETURNING chunk");
  if (!upd.ok()) return upd.status();
  upd->Text(3, batch_id);
  upd->Int(5, chunk);
  Usage usage;
  int64_t completed = 0, failed = 0, recorded = 0;
  std::map<int64_t, int64_t> answered;  // chunk -> rows recorded
  for (const RequestOutcome& o : outcomes) {
    upd->Int(1, o.ok ? kStateCompleted : kStateFailed);
    upd->Text(2, o.result_line);
    upd->Int(4, o.line);
    int rc = upd->Step();
    if (rc == SQLITE_ROW) {
      ++answered[upd->ColInt(0)];
      rc = upd->Step();
    } else if (rc == SQLITE_DONE) {
      upd->Reset();
      continue;
    }
    upd->Reset();
    if (rc != SQLITE_DONE) return SqlError(db_, "record result");
    ++recorded;
    ++(o.ok ? completed : failed);
    usage.input_tokens += o.input_tokens;
    usage.cached_tokens += o.cached_tokens;
    usage.output_tokens += o.output_tokens;
  }
  if (recorded == 0) return int64_t{0};
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
  if (Status s = StepDone(db_, *counts, "add to batch counts"); !s.ok()) return s;
  // A chunk with nothing left pending holds no lease.
  auto left = Prepare(db_,
                      "UPDATE chunks SET pending = pending - ?1, "
                      "lease_until = CASE WHEN pending - ?1 <= 0 THEN 0 ELSE lease_until END "
                      "WHERE batch_id = ?2 AND chunk = ?3");
  if (!left.ok()) return left.status();
  left->Text(2, batch_id);
  for (const auto& [no, n] : answered) {
    left->Int(1, n);
    left->Int(3, no);
    if (Status s = StepDone(db_, *left, "count a chunk's pending rows"); !s.ok()) return s;
  }
  return recorded;
}

StatusOr<int64_t> SqliteStore::CommitResults(std::string_view batch_id, const std::vector<RequestOutcome>& outcomes) {
  std::lock_guard lock(mu_);
  int64_t recorded = 0;
  Status s = Transaction(db_, [&]() -> Status {
    auto n = CommitLocked(batch_id, outcomes, -1);
    if (!n.ok()) return n.status();
    recorded = *n;
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return recorded;
}

StatusOr<int64_t> SqliteStore::CommitFenced(const Fence& fence, const std::vector<RequestOutcome>& outcomes,
                                            int64_t lease_ms) {
  std::lock_guard lock(mu_);
  int64_t recorded = 0;
  Status s = Transaction(db_, [&]() -> Status {
    // Renewal first: it is also the token check (no row when it does not hold).
    auto renew = Prepare(db_,
                         "UPDATE chunks SET lease_until = CASE WHEN lease_until = 0 THEN 0 ELSE ?1 END "
                         "WHERE batch_id = ?2 AND chunk = ?3 AND token = ?4");
    if (!renew.ok()) return renew.status();
    renew->Int(1, NowMs() + lease_ms);
    renew->Text(2, fence.batch_id);
    renew->Int(3, fence.chunk);
    renew->Int(4, fence.token);
    if (Status e = StepDone(db_, *renew, "renew lease"); !e.ok()) return e;
    if (sqlite3_changes(db_) == 0) {
      if (Status e = CheckBatchExists(db_, fence.batch_id); !e.ok()) return e;
      return LeaseLost(fence);
    }
    auto n = CommitLocked(fence.batch_id, outcomes, fence.chunk);
    if (!n.ok()) return n.status();
    recorded = *n;
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return recorded;
}

StatusOr<std::vector<PendingRequest>> SqliteStore::PendingRequests(std::string_view batch_id) {
  std::lock_guard lock(mu_);
  if (Status s = CheckBatchExists(db_, batch_id); !s.ok()) return s;
  // `state = 0` matches the partial index requests_pending.
  auto st = Prepare(db_,
                    "SELECT line, custom_id, byte_offset, byte_length, prefix_hash, crashes, chunk FROM requests "
                    "WHERE batch_id = ?1 AND state = 0 ORDER BY line");
  if (!st.ok()) return st.status();
  st->Text(1, batch_id);
  std::vector<PendingRequest> out;
  int rc;
  while ((rc = st->Step()) == SQLITE_ROW) {
    out.push_back(ReadPending(*st));
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
    auto count = Prepare(db_, "SELECT COUNT(*) FROM requests WHERE inflight = 1 AND state = 0");
    if (!count.ok()) return count.status();
    if (count->Step() != SQLITE_ROW) return SqlError(db_, "count in-flight rows");
    n = count->ColInt(0);
    // Held leases are a dead process's: expired now (not freed), so the next
    // claim counts the reclaim and the crashes of the rows marked in flight.
    if (Status e = Exec(db_, "UPDATE chunks SET lease_until = 1 WHERE lease_until > 1"); !e.ok()) return e;
    // Its task leases (validation, finalization) go too: nobody holds them.
    return Exec(db_, "UPDATE batches SET lease_until = 0, lease_owner = NULL WHERE lease_until > 0");
  });
  if (!s.ok()) return s;
  return n;
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
  sqlite3_busy_timeout(r, sqlite::kBusyTimeoutMs);
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


#include "store/pg_conn.h"

#include <array>
#include <chrono>
#include <cstring>
#include <thread>

namespace kvb::store::pg {
namespace {

// Type OIDs (catalog/pg_type_d.h is a server header, not in libpq-dev).
constexpr Oid kBoolOid = 16;
constexpr Oid kByteaOid = 17;
constexpr Oid kInt8Oid = 20;
constexpr Oid kInt4Oid = 23;
constexpr Oid kTextOid = 25;
constexpr Oid kByteaArrayOid = 1001;
constexpr Oid kTextArrayOid = 1009;
constexpr Oid kInt8ArrayOid = 1016;

void PutBig(std::string& out, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint64_t GetBig(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

// SQLSTATEs after which running the call again can succeed: the connection
// is gone (class 08), the server is shutting down or starting (57P01..03),
// too many connections (53300), or the transaction lost a lock race
// (40001 serialization failure, 40P01 deadlock). In each case the
// transaction did not commit.
bool IsTransient(const std::string& sqlstate) {
  if (sqlstate.rfind("08", 0) == 0) return true;
  static constexpr std::array<const char*, 6> kCodes = {"57P01", "57P02", "57P03", "53300", "40001", "40P01"};
  for (const char* c : kCodes)
    if (sqlstate == c) return true;
  return false;
}

std::string Trimmed(const char* message) {
  std::string s = message ? message : "";
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

}  // namespace

// --- Params ---

Params& Params::Add(Oid type, std::string bytes) {
  types_.push_back(type);
  values_.push_back(std::move(bytes));
  return *this;
}

Params& Params::Int(int64_t v) {
  std::string b;
  PutBig(b, static_cast<uint64_t>(v), 8);
  return Add(kInt8Oid, std::move(b));
}

Params& Params::Int32(int32_t v) {
  std::string b;
  PutBig(b, static_cast<uint32_t>(v), 4);
  return Add(kInt4Oid, std::move(b));
}

Params& Params::Bool(bool v) { return Add(kBoolOid, std::string(1, v ? '\1' : '\0')); }
Params& Params::Text(std::string_view v) { return Add(kTextOid, std::string(v)); }
Params& Params::Bytes(std::string_view v) { return Add(kByteaOid, std::string(v)); }

// The binary array format (array_recv): dimensions, a has-nulls flag, the
// element type, then per dimension its length and lower bound; an empty
// array has no dimensions.
std::string Params::ArrayHeader(Oid element_type, size_t n) const {
  std::string b;
  PutBig(b, n == 0 ? 0 : 1, 4);
  PutBig(b, 0, 4);
  PutBig(b, element_type, 4);
  if (n > 0) {
    PutBig(b, n, 4);
    PutBig(b, 1, 4);
  }
  return b;
}

Params& Params::IntArray(const std::vector<int64_t>& v) {
  std::string b = ArrayHeader(kInt8Oid, v.size());
  b.reserve(b.size() + v.size() * 12);
  for (int64_t x : v) {
    PutBig(b, 8, 4);
    PutBig(b, static_cast<uint64_t>(x), 8);
  }
  return Add(kInt8ArrayOid, std::move(b));
}

Params& Params::TextArray(const std::vector<std::string>& v) {
  std::string b = ArrayHeader(kTextOid, v.size());
  for (const std::string& x : v) {
    PutBig(b, x.size(), 4);
    b += x;
  }
  return Add(kTextArrayOid, std::move(b));
}

Params& Params::BytesArray(const std::vector<std::string_view>& v) {
  std::string b = ArrayHeader(kByteaOid, v.size());
  for (std::string_view x : v) {
    PutBig(b, x.size(), 4);
    b += x;
  }
  return Add(kByteaArrayOid, std::move(b));
}

bool IsText(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c == 0) return false;
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 ? 2 : 0;
    if (len == 0 || c > 0xf4 || i + len > s.size()) return false;
    uint32_t cp = c & (0x3f >> (len - 1));
    for (int k = 1; k < len; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    // Overlong forms, surrogates and code points past U+10FFFF.
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += len;
  }
  return true;
}

// --- Result ---

int64_t Result::Int(int row, int col) const {
  if (PQgetisnull(r_.get(), row, col)) return 0;
  const char* p = PQgetvalue(r_.get(), row, col);
  switch (PQgetlength(r_.get(), row, col)) {
    case 8: return static_cast<int64_t>(GetBig(p, 8));
    case 4: return static_cast<int32_t>(GetBig(p, 4));
    case 2: return static_cast<int16_t>(GetBig(p, 2));
    case 1: return static_cast<unsigned char>(p[0]);  // boolean
    default: return 0;  // not an integer column: a bug in the SQL (every sum() is cast to bigint)
  }
}

std::string_view Result::View(int row, int col) const {
  if (PQgetisnull(r_.get(), row, col)) return {};
  return {PQgetvalue(r_.get(), row, col), static_cast<size_t>(PQgetlength(r_.get(), row, col))};
}

int64_t Result::Affected() const {
  const char* n = PQcmdTuples(r_.get());
  return n && *n ? std::strtoll(n, nullptr, 10) : 0;
}

// --- Conn ---

Conn::~Conn() {
  if (pg_) PQfinish(pg_);
}

Status Conn::Connect() {
  if (pg_) PQfinish(pg_);
  prepared_.clear();
  // Defaults first: the caller's conninfo (expanded from dbname) overrides
  // them. A connect timeout (2 s, libpq's least) bounds how long an
  // unreachable host blocks an attempt; keepalives notice a peer that
  // vanished without closing the connection.
  const char* keys[] = {"connect_timeout",     "application_name", "keepalives_idle",
                        "keepalives_interval", "keepalives_count", "dbname",
                        nullptr};
  const char* values[] = {"2", "kvbatch", "30", "5", "3", conninfo_->c_str(), nullptr};
  pg_ = PQconnectdbParams(keys, values, /*expand_dbname=*/1);
  if (pg_ && PQstatus(pg_) == CONNECTION_OK) {
    // NOTICEs ("relation ... already exists, skipping" while the schema is
    // checked) are not errors; libpq would print them on stderr.
    PQsetNoticeProcessor(pg_, [](void*, const char*) {}, nullptr);
    return Status::Ok();
  }
  Status s = Status::Unavailable("connect to PostgreSQL: " + Trimmed(pg_ ? PQerrorMessage(pg_) : "out of memory"));
  if (pg_) PQfinish(pg_);
  pg_ = nullptr;
  return s;
}

bool Conn::InTransaction() const {
  if (!pg_) return false;
  PGTransactionStatusType t = PQtransactionStatus(pg_);
  return t == PQTRANS_INTRANS || t == PQTRANS_INERROR;
}

Status Conn::Failure(PGresult* r, std::string_view what) {
  const char* state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : nullptr;
  sqlstate_ = state ? state : "";
  std::string message = Trimmed(r && *PQresultErrorMessage(r) ? PQresultErrorMessage(r) : PQerrorMessage(pg_));
  if (r) PQclear(r);
  // A lost connection often comes without an SQLSTATE; the status says it.
  if (PQstatus(pg_) != CONNECTION_OK || IsTransient(sqlstate_))
    return Status::Unavailable(std::string(what) + ": " + message);
  return Status::Internal(std::string(what) + ": " + message);
}

StatusOr<std::string> Conn::Prepared(std::string_view sql, const Params& params) {
  std::string key(sql);
  for (Oid t : params.types()) {
    key += '|';
    key += std::to_string(t);
  }
  auto it = prepared_.find(key);
  if (it != prepared_.end()) return it->second;
  std::string name = "kvb";
  name += std::to_string(next_statement_++);
  PGresult* r = PQprepare(pg_, name.c_str(), std::string(sql).c_str(), params.size(), params.types().data());
  if (PQresultStatus(r) != PGRES_COMMAND_OK) return Failure(r, "prepare");
  PQclear(r);
  prepared_.emplace(std::move(key), name);
  return name;
}

StatusOr<Result> Conn::Exec(std::string_view sql, const Params& params) {
  sqlstate_.clear();
  if (!Connected()) return Status::Unavailable("not connected to PostgreSQL");
  auto name = Prepared(sql, params);
  if (!name.ok()) return name.status();
  const int n = params.size();
  std::vector<const char*> values(n);
  std::vector<int> lengths(n), formats(n, 1);
  for (int i = 0; i < n; ++i) {
    values[i] = params.values()[i].data();
    lengths[i] = static_cast<int>(params.values()[i].size());
  }
  PGresult* r = PQexecPrepared(pg_, name->c_str(), n, values.data(), lengths.data(), formats.data(), /*binary=*/1);
  ExecStatusType st = PQresultStatus(r);
  if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) return Failure(r, "query");
  return Result(r);
}

Status Conn::Command(const char* sql) {
  sqlstate_.clear();
  if (!Connected()) return Status::Unavailable("not connected to PostgreSQL");
  PGresult* r = PQexec(pg_, sql);
  if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) return Failure(r, sql);
  PQclear(r);
  return Status::Ok();
}

// --- Pool ---

Pool::~Pool() = default;

Pool::Lease Pool::Acquire() {
  std::unique_lock lock(mu_);
  idle_cv_.wait(lock, [&] { return !idle_.empty() || static_cast<int>(all_.size()) < max_; });
  if (!idle_.empty()) {
    Conn* c = idle_.back();
    idle_.pop_back();
    return Lease(this, c);
  }
  // Connected by the runner, outside this mutex.
  all_.push_back(std::make_unique<Conn>(&conninfo_));
  return Lease(this, all_.back().get());
}

void Pool::Release(Conn* conn) {
  {
    std::lock_guard lock(mu_);
    idle_.push_back(conn);
  }
  idle_cv_.notify_one();
}

// --- Run ---

Status Run(Pool& pool, std::string_view what, Mode mode, const Body& body) {
  // ~3.2 s of waiting in all: long enough for a connection reset or a
  // restart to finish, short enough that callers (who keep their results
  // and retry later) are not stalled. No retry starts after 4 s, so an
  // unreachable host (each connect up to its 2 s timeout) gives up in ~6 s.
  static constexpr std::array<int, 7> kBackoffMs = {0, 50, 100, 200, 400, 800, 1600};
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(4);
  bool unknown_commit = false;
  Status last;
  for (int delay : kBackoffMs) {
    if (delay > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay));
    if (delay > 0 && std::chrono::steady_clock::now() > deadline) break;
    Pool::Lease conn = pool.Acquire();
    if (!conn->Connected()) {
      last = conn->Connect();
      if (!last.ok()) continue;
    }
    Status s;
    if (mode == Mode::kStatements) {
      s = body(*conn, unknown_commit);
      // A single-statement write commits by itself: lost while it ran, it
      // may or may not have taken effect.
      if (!s.ok() && !conn->Connected()) unknown_commit = true;
    } else {
      s = conn->Command(mode == Mode::kTransaction ? "BEGIN" : "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
      if (s.ok()) s = body(*conn, unknown_commit);
      if (s.ok()) {
        s = conn->Command("COMMIT");
        // The COMMIT was sent; whether it took effect is unknown.
        if (!s.ok() && !conn->Connected() && mode == Mode::kTransaction) unknown_commit = true;
      }
      // A body that failed (or decided not to commit) leaves the
      // transaction open or aborted: end it so the connection is clean.
      if (conn->InTransaction()) (void)conn->Command("ROLLBACK");
    }
    if (s.ok() || s.code() != StatusCode::kUnavailable) return s;
    last = s;
  }
  return Status::Unavailable(std::string(what) + ": the database cannot be reached: " + last.message());
}

}  // namespace kvb::store::pg

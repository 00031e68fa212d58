// A thin layer over libpq for the PostgreSQL store: parameters and results
// in binary format, statements prepared once per connection, a small pool of
// connections, and a runner that reconnects and retries a call when the
// database went away. Internal to src/store: not part of the Store interface.
#pragma once

#include <libpq-fe.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "util/status.h"

namespace kvb::store::pg {

// Parameters of one statement. Everything goes in binary format: bytea and
// text as their raw bytes (no escaping, NUL bytes kept in bytea), integers
// big-endian. Each value is copied, so temporaries may be passed.
class Params {
 public:
  Params& Int(int64_t v);                                // bigint
  Params& Int32(int32_t v);                              // integer
  Params& Bool(bool v);                                  // boolean
  Params& Text(std::string_view v);                      // text: must be valid UTF-8 without NUL (IsText)
  Params& Bytes(std::string_view v);                     // bytea
  Params& IntArray(const std::vector<int64_t>& v);       // bigint[]
  Params& TextArray(const std::vector<std::string>& v);  // text[]
  Params& BytesArray(const std::vector<std::string_view>& v);  // bytea[]

  int size() const { return static_cast<int>(types_.size()); }
  const std::vector<Oid>& types() const { return types_; }
  const std::vector<std::string>& values() const { return values_; }

 private:
  Params& Add(Oid type, std::string bytes);
  std::string ArrayHeader(Oid element_type, size_t n) const;

  std::vector<Oid> types_;
  std::vector<std::string> values_;
};

// True when `s` can be a text value: valid UTF-8 and no NUL byte. Ids and
// other short strings are text columns (readable in psql); a lookup by an id
// that is not valid text cannot match anything and is answered NotFound
// without asking the database (which would reject the parameter).
bool IsText(std::string_view s);

// Owns a PGresult with rows in binary format.
class Result {
 public:
  explicit Result(PGresult* r) : r_(r, PQclear) {}
  int rows() const { return PQntuples(r_.get()); }
  // smallint, integer, bigint or boolean; NULL reads as 0.
  int64_t Int(int row, int col) const;
  bool Bool(int row, int col) const { return Int(row, col) != 0; }
  // text or bytea bytes; NULL reads as empty.
  std::string_view View(int row, int col) const;
  std::string Str(int row, int col) const { return std::string(View(row, col)); }
  // Rows changed by an INSERT, UPDATE or DELETE.
  int64_t Affected() const;

 private:
  std::unique_ptr<PGresult, void (*)(PGresult*)> r_;
};

// One database connection, used by one thread at a time (the pool hands it
// out). Statements are prepared on first use and kept until the connection
// is reset.
class Conn {
 public:
  explicit Conn(const std::string* conninfo) : conninfo_(conninfo) {}
  ~Conn();
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;

  bool Connected() const { return pg_ != nullptr && PQstatus(pg_) == CONNECTION_OK; }
  // Connects, or reconnects a connection that was lost. Unavailable when
  // the server cannot be reached.
  Status Connect();

  // Runs one statement. Failures: Unavailable when the connection was lost
  // or the failure is transient (deadlock, serialization failure, the
  // server shutting down or starting): the call may be retried as a whole.
  // Internal otherwise; sqlstate() tells which (e.g. "23505" for a
  // duplicate key).
  StatusOr<Result> Exec(std::string_view sql, const Params& params = Params());
  // A statement without parameters or rows (BEGIN, COMMIT, SET LOCAL ...).
  Status Command(const char* sql);
  // The SQLSTATE of the last failed statement ("" after a success).
  const std::string& sqlstate() const { return sqlstate_; }
  // Inside a transaction block (open or failed).
  bool InTransaction() const;

 private:
  Status Failure(PGresult* r, std::string_view what);
  StatusOr<std::string> Prepared(std::string_view sql, const Params& params);

  const std::string* conninfo_;  // owned by the pool
  PGconn* pg_ = nullptr;
  std::string sqlstate_;
  // SQL text (with its parameter types) -> prepared statement name.
  std::unordered_map<std::string, std::string> prepared_;
  int next_statement_ = 0;
};

// Up to `max` connections, created when needed and kept open.
class Pool {
 public:
  Pool(std::string conninfo, int max) : conninfo_(std::move(conninfo)), max_(max) {}
  ~Pool();

  // A connection for the holder alone, given back when the lease ends.
  class Lease {
   public:
    Lease(Pool* pool, Conn* conn) : pool_(pool), conn_(conn) {}
    Lease(Lease&& o) noexcept : pool_(o.pool_), conn_(o.conn_) { o.conn_ = nullptr; }
    Lease& operator=(Lease&&) = delete;
    ~Lease() {
      if (conn_) pool_->Release(conn_);
    }
    Conn* operator->() const { return conn_; }
    Conn& operator*() const { return *conn_; }

   private:
    Pool* pool_;
    Conn* conn_;
  };
  // Waits while all `max` connections are in use.
  Lease Acquire();

 private:
  void Release(Conn* conn);

  const std::string conninfo_;
  const int max_;
  std::mutex mu_;
  std::condition_variable idle_cv_;
  std::vector<std::unique_ptr<Conn>> all_;
  std::vector<Conn*> idle_;
};

// How a call uses its connection.
enum class Mode {
  kStatements,   // single statements, each its own transaction (reads, one-statement writes)
  kTransaction,  // BEGIN ... COMMIT around the whole body
  kSnapshot,     // one read-only REPEATABLE READ transaction (consistent multi-statement reads)
};

// The body of a call. `after_unknown_commit` is true on a retry that follows
// a COMMIT whose outcome is unknown (the connection was lost while it ran):
// the earlier attempt may have committed, and the body may check for that.
using Body = std::function<Status(Conn& conn, bool after_unknown_commit)>;

// Runs `body` on a pooled connection, in `mode`. When it fails with
// Unavailable (connection lost, deadlock, ...), reconnects and runs it again,
// with backoff, for about three seconds in all; a transaction that failed was
// rolled back, so running it again is safe. The body must therefore produce
// its outputs afresh on each run. Then Unavailable naming `what`.
Status Run(Pool& pool, std::string_view what, Mode mode, const Body& body);

}  // namespace kvb::store::pg

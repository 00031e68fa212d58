// PgStore: a batch's request rows: adding them with their chunks, reading
// them, and the in-flight marks for poison requests.
#include <algorithm>
#include <bit>
#include <limits>

#include "store/pg_internal.h"
#include "store/pg_store.h"

namespace kvb::store {

using pg::Conn;
using pg::Mode;
using pg::Params;

namespace {

// Rows per INSERT when adding requests: each statement carries its rows as
// arrays (unnest), ~1 MB of parameters for typical custom ids.
constexpr size_t kInsertSlice = 10'000;
// Rows per page in ForEachRequest.
constexpr int kPageRows = 1000;

Status CheckBatch(Conn& conn, std::string_view batch_id) {
  auto r = conn.Exec("SELECT 1 FROM batches WHERE id = $1", Params().Text(batch_id));
  if (!r.ok()) return r.status();
  return r->rows() > 0 ? Status::Ok() : pg::NoBatch(batch_id);
}

Status InsertRows(Conn& conn, std::string_view batch_id, const std::vector<PendingRequest>& rows) {
  for (size_t begin = 0; begin < rows.size(); begin += kInsertSlice) {
    const size_t end = std::min(rows.size(), begin + kInsertSlice);
    std::vector<int64_t> lines, offsets, lengths, hashes, chunks, crashes;
    std::vector<std::string_view> custom_ids;
    for (size_t i = begin; i < end; ++i) {
      const PendingRequest& r = rows[i];
      lines.push_back(r.line);
      custom_ids.push_back(r.custom_id);
      offsets.push_back(r.offset);
      lengths.push_back(r.length);
      hashes.push_back(std::bit_cast<int64_t>(r.prefix_hash));
      chunks.push_back(r.chunk);
      crashes.push_back(r.crashes);
    }
    auto ins = conn.Exec(
        "INSERT INTO requests (batch_id, line, custom_id, byte_offset, byte_length, prefix_hash, chunk, state, "
        "result_line, inflight, crashes) "
        "SELECT $1, t.line, t.custom_id, t.off, t.len, t.hash, t.chunk, 0, ''::bytea, false, t.crashes::integer "
        "FROM unnest($2::bigint[], $3::bytea[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], "
        "$8::bigint[]) AS t(line, custom_id, off, len, hash, chunk, crashes)",
        Params().Text(batch_id).IntArray(lines).BytesArray(custom_ids).IntArray(offsets).IntArray(lengths)
            .IntArray(hashes).IntArray(chunks).IntArray(crashes));
    if (!ins.ok()) return ins.status();
  }
  return Status::Ok();
}

}  // namespace

namespace pg {

PendingRequest ReadPending(const Result& r, int row) {
  PendingRequest p;
  p.line = r.Int(row, 0);
  p.custom_id = r.Str(row, 1);
  p.offset = r.Int(row, 2);
  p.length = r.Int(row, 3);
  p.prefix_hash = std::bit_cast<uint64_t>(r.Int(row, 4));
  p.crashes = static_cast<int32_t>(r.Int(row, 5));
  p.chunk = r.Int(row, 6);
  return p;
}

}  // namespace pg

Status PgStore::AddRequests(std::string_view batch_id, const std::vector<PendingRequest>& rows, int64_t now) {
  if (!pg::IsText(batch_id)) return pg::NoBatch(batch_id);
  {
    std::vector<int64_t> lines;
    lines.reserve(rows.size());
    for (const PendingRequest& r : rows) lines.push_back(r.line);
    std::sort(lines.begin(), lines.end());
    auto dup = std::adjacent_find(lines.begin(), lines.end());
    if (dup != lines.end()) return Status::InvalidArgument("line " + std::to_string(*dup) + " given twice");
  }
  return pg::Run(*pool_, "add requests", Mode::kTransaction, [&](Conn& conn, bool) -> Status {
    // The status change first: it is the condition, and it locks the batch.
    auto moved = conn.Exec(
        "UPDATE batches SET status = 'in_progress', in_progress_at = $2, total = $3, completed = 0, failed = 0, "
        "input_tokens = 0, cached_tokens = 0, output_tokens = 0 WHERE id = $1 AND status = 'validating' "
        "RETURNING 1",
        Params().Text(batch_id).Int(now).Int(static_cast<int64_t>(rows.size())));
    if (!moved.ok()) return moved.status();
    if (moved->rows() == 0) return pg::BatchMismatch(conn, batch_id, "validating");
    for (const char* sql : {"DELETE FROM requests WHERE batch_id = $1", "DELETE FROM chunks WHERE batch_id = $1"}) {
      auto del = conn.Exec(sql, Params().Text(batch_id));
      if (!del.ok()) return del.status();
    }
    if (Status s = InsertRows(conn, batch_id, rows); !s.ok()) return s;
    // One chunk row per chunk number; its prefix group is its first row's.
    auto chunks = conn.Exec(
        "INSERT INTO chunks (batch_id, chunk, prefix_hash, pending, token, lease_owner, lease_until, reclaims) "
        "SELECT $1, chunk, (array_agg(prefix_hash ORDER BY line))[1], count(*), 0, '', 0, 0 "
        "FROM requests WHERE batch_id = $1 GROUP BY chunk",
        Params().Text(batch_id));
    return chunks.status();
  });
}

StatusOr<std::vector<PendingRequest>> PgStore::PendingRequests(std::string_view batch_id) {
  if (!pg::IsText(batch_id)) return pg::NoBatch(batch_id);
  std::vector<PendingRequest> out;
  Status s = pg::Run(*pool_, "read pending requests", Mode::kSnapshot, [&](Conn& conn, bool) -> Status {
    out.clear();
    if (Status st = CheckBatch(conn, batch_id); !st.ok()) return st;
    auto r = conn.Exec(std::string("SELECT ") + pg::kPendingColumns +
                           " FROM requests WHERE batch_id = $1 AND state = 0 ORDER BY line",
                       Params().Text(batch_id));
    if (!r.ok()) return r.status();
    out.reserve(static_cast<size_t>(r->rows()));
    for (int i = 0; i < r->rows(); ++i) out.push_back(pg::ReadPending(*r, i));
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return out;
}

StatusOr<int64_t> PgStore::LeasedChunks(std::string_view batch_id) {
  if (!pg::IsText(batch_id)) return pg::NoBatch(batch_id);
  int64_t n = 0;
  Status s = pg::Run(*pool_, "count leased chunks", Mode::kStatements, [&](Conn& conn, bool) -> Status {
    auto r = conn.Exec(
        "WITH clk AS (SELECT " KVB_PG_NOW_MS
        " AS ms) SELECT (SELECT count(*) FROM chunks c, clk WHERE c.batch_id = b.id AND c.lease_until > clk.ms) "
        "FROM batches b WHERE b.id = $1",
        Params().Text(batch_id));
    if (!r.ok()) return r.status();
    if (r->rows() == 0) return pg::NoBatch(batch_id);
    n = r->Int(0, 0);
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return n;
}

// Called by the engine as each request starts and ends. The mark only has
// to outlive the worker process, not the database server, so its commit
// does not wait for the WAL to reach disk (synchronous_commit off for this
// transaction only): no fsync on the engine's path.
Status PgStore::SetInFlight(std::string_view batch_id, const std::vector<int64_t>& lines, bool in_flight) {
  if (lines.empty() || !pg::IsText(batch_id)) return Status::Ok();
  // Found by primary key: `state + 0` rather than `state = 0`, which would
  // let the planner pick the pending-rows index (requests_pending) and test
  // the array against every pending row of the batch (measured: ~4 ms a
  // mark on a 20,000-row batch).
  const char* sql = in_flight ? "UPDATE requests SET inflight = true WHERE batch_id = $1 AND line = ANY($2::bigint[]) "
                                "AND state + 0 = 0"
                              : "UPDATE requests SET inflight = false WHERE batch_id = $1 AND line = ANY($2::bigint[]) "
                                "AND inflight";
  const Params p = Params().Text(batch_id).IntArray(lines);
  return pg::Run(*pool_, in_flight ? "mark in flight" : "unmark in flight", Mode::kTransaction,
                 [&](Conn& conn, bool) -> Status {
                   if (Status s = conn.Command("SET LOCAL synchronous_commit = off"); !s.ok()) return s;
                   return conn.Exec(sql, p).status();
                 });
}

Status PgStore::MarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) {
  return SetInFlight(batch_id, lines, true);
}

Status PgStore::UnmarkInFlight(std::string_view batch_id, const std::vector<int64_t>& lines) {
  return SetInFlight(batch_id, lines, false);
}

Status PgStore::ForEachRequest(std::string_view batch_id, const std::function<Status(const StoredRequest&)>& fn) {
  if (!pg::IsText(batch_id)) return pg::NoBatch(batch_id);
  // Keyset pagination by line: each page is one short query, retried on
  // its own after a lost connection, and resumes after the last row visited.
  int64_t after_line = std::numeric_limits<int64_t>::min();
  std::vector<StoredRequest> page;
  for (bool first = true;; first = false) {
    Status s = pg::Run(*pool_, "read requests", Mode::kStatements, [&](Conn& conn, bool) -> Status {
      page.clear();
      if (first) {
        if (Status st = CheckBatch(conn, batch_id); !st.ok()) return st;
      }
      auto r = conn.Exec(
          "SELECT line, custom_id, state, result_line FROM requests WHERE batch_id = $1 AND line > $2 "
          "ORDER BY line LIMIT $3",
          Params().Text(batch_id).Int(after_line).Int(kPageRows));
      if (!r.ok()) return r.status();
      for (int i = 0; i < r->rows(); ++i) {
        StoredRequest q;
        q.line = r->Int(i, 0);
        q.custom_id = r->Str(i, 1);
        const int64_t state = r->Int(i, 2);
        q.state = state == pg::kStateCompleted ? RequestState::kCompleted
                  : state == pg::kStateFailed  ? RequestState::kFailed
                                               : RequestState::kPending;
        q.result_line = r->Str(i, 3);
        page.push_back(std::move(q));
      }
      return Status::Ok();
    });
    if (!s.ok()) return s;
    for (const StoredRequest& q : page) {
      if (Status st = fn(q); !st.ok()) return st;
    }
    if (page.size() < static_cast<size_t>(kPageRows)) return Status::Ok();
    after_line = page.back().line;
  }
}

}  // namespace kvb::store

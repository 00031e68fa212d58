// PgStore: chunks (claims, leases, fencing) and the group commits of
// answers.
//
// Lock order, the same in every transaction so that they cannot deadlock
// each other: a chunk row, then request rows, then the batch row. (A
// deadlock that slipped through would be retried: Conn reports it as
// transient.)
#include <bit>
#include <map>
#include <unordered_map>

#include "store/pg_internal.h"
#include "store/pg_store.h"

namespace kvb::store {

using pg::Conn;
using pg::Mode;
using pg::Params;

namespace {

// Picks and takes one chunk in one statement. The subquery orders the open
// chunks as store.h says and locks the first one no other transaction holds
// (SKIP LOCKED: claimers never wait on each other, and two cannot pick the
// same chunk); the UPDATE gives it a fresh token and the lease. A lease
// that is not free (0) but expired is a reclaim.
constexpr const char* kClaimSql =
    "WITH clk AS (SELECT " KVB_PG_NOW_MS
    " AS ms), "
    "pick AS ("
    " SELECT c.batch_id, c.chunk, c.lease_until AS old_until FROM chunks c JOIN batches b ON b.id = c.batch_id, clk"
    " WHERE c.pending > 0 AND c.lease_until < clk.ms"
    "  AND b.status = 'in_progress' AND NOT b.paused AND (b.expires_at = 0 OR b.expires_at > clk.ms / 1000)"
    " ORDER BY b.priority DESC, (c.prefix_hash = ANY($2::bigint[])) DESC, b.created_at, b.seq,"
    "  EXISTS (SELECT 1 FROM chunks h WHERE h.batch_id = c.batch_id AND h.prefix_hash = c.prefix_hash"
    "          AND h.lease_until >= clk.ms),"
    "  c.chunk"
    " LIMIT 1 FOR UPDATE OF c SKIP LOCKED) "
    "UPDATE chunks c SET token = nextval('chunk_tokens'), lease_owner = $1, lease_until = clk.ms + $3,"
    " reclaims = c.reclaims + CASE WHEN pick.old_until <> 0 THEN 1 ELSE 0 END "
    "FROM pick, clk WHERE c.batch_id = pick.batch_id AND c.chunk = pick.chunk "
    "RETURNING c.batch_id, c.chunk, c.token, c.prefix_hash, c.reclaims, pick.old_until <> 0";

Status LeaseLost(const Fence& f) {
  return Status::FailedPrecondition("lease lost: chunk " + std::to_string(f.chunk) + " of batch " + f.batch_id +
                                    " was claimed again (token " + std::to_string(f.token) + " no longer holds)");
}

// What a commit recorded.
struct Recorded {
  int64_t rows = 0;
  std::map<int64_t, int64_t> per_chunk;  // chunk -> rows recorded
};

// Records `outcomes` for rows of the batch still pending (of `chunk` only,
// when >= 0) and adds what was recorded to the batch's counts and usage.
// Chunk rows (pending counts) are the caller's to update: it holds their
// locks. The first outcome given for a line wins, as if they were recorded
// one after the other.
StatusOr<Recorded> RecordOutcomes(Conn& conn, std::string_view batch_id, const std::vector<RequestOutcome>& outcomes,
                                  int64_t chunk) {
  Recorded rec;
  std::unordered_map<int64_t, const RequestOutcome*> by_line;
  std::vector<int64_t> lines, states;
  std::vector<std::string_view> results;
  for (const RequestOutcome& o : outcomes) {
    if (!by_line.emplace(o.line, &o).second) continue;
    lines.push_back(o.line);
    states.push_back(o.ok ? pg::kStateCompleted : pg::kStateFailed);
    results.push_back(o.result_line);
  }
  if (lines.empty()) return rec;
  // `r.state = 0`: a row answered before (by anyone, in any earlier commit)
  // is left alone, and a row locked by a concurrent commit is re-checked
  // once that commits: nothing is answered or counted twice.
  std::string sql =
      "UPDATE requests r SET state = o.state::smallint, result_line = o.result, inflight = false "
      "FROM unnest($2::bigint[], $3::bigint[], $4::bytea[]) AS o(line, state, result) "
      "WHERE r.batch_id = $1 AND r.line = o.line AND r.state = 0";
  Params p = Params().Text(batch_id).IntArray(lines).IntArray(states).BytesArray(results);
  if (chunk >= 0) {
    sql += " AND r.chunk = $5";
    p.Int(chunk);
  }
  sql += " RETURNING r.line, r.chunk";
  auto r = conn.Exec(sql, p);
  if (!r.ok()) return r.status();
  int64_t completed = 0, failed = 0;
  Usage usage;
  for (int i = 0; i < r->rows(); ++i) {
    const RequestOutcome& o = *by_line.at(r->Int(i, 0));
    ++rec.rows;
    ++rec.per_chunk[r->Int(i, 1)];
    ++(o.ok ? completed : failed);
    usage.input_tokens += o.input_tokens;
    usage.cached_tokens += o.cached_tokens;
    usage.output_tokens += o.output_tokens;
  }
  if (rec.rows == 0) return rec;
  auto counts = conn.Exec(
      "UPDATE batches SET completed = completed + $2, failed = failed + $3, input_tokens = input_tokens + $4, "
      "cached_tokens = cached_tokens + $5, output_tokens = output_tokens + $6 WHERE id = $1",
      Params().Text(batch_id).Int(completed).Int(failed).Int(usage.input_tokens).Int(usage.cached_tokens)
          .Int(usage.output_tokens));
  if (!counts.ok()) return counts.status();
  return rec;
}

}  // namespace

StatusOr<std::optional<ChunkClaim>> PgStore::ClaimChunk(std::string_view owner, const std::vector<uint64_t>& resident,
                                                        int64_t lease_ms) {
  if (!pg::IsText(owner)) return Status::InvalidArgument("lease owner is not valid UTF-8 text");
  std::vector<int64_t> hashes;
  for (uint64_t h : resident) hashes.push_back(std::bit_cast<int64_t>(h));
  const Params claim_params = Params().Text(owner).IntArray(hashes).Int(lease_ms);
  std::optional<ChunkClaim> claim;
  Status s = pg::Run(*pool_, "claim chunk", Mode::kTransaction, [&](Conn& conn, bool) -> Status {
    claim.reset();
    auto r = conn.Exec(kClaimSql, claim_params);
    if (!r.ok()) return r.status();
    if (r->rows() == 0) return Status::Ok();
    ChunkClaim c;
    c.fence.batch_id = r->Str(0, 0);
    c.fence.chunk = r->Int(0, 1);
    c.fence.token = r->Int(0, 2);
    c.prefix_hash = std::bit_cast<uint64_t>(r->Int(0, 3));
    c.reclaims = static_cast<int32_t>(r->Int(0, 4));
    const bool reclaimed = r->Bool(0, 5);
    const Params chunk_params = Params().Text(c.fence.batch_id).Int(c.fence.chunk);
    if (reclaimed) {
      // The holder's lease ran out: whatever it had in its engine was there
      // when it died (or hung), one more crash for each.
      auto crashed = conn.Exec(
          "UPDATE requests SET crashes = crashes + 1, inflight = false "
          "WHERE batch_id = $1 AND chunk = $2 AND state = 0 AND inflight",
          chunk_params);
      if (!crashed.ok()) return crashed.status();
    }
    auto rows = conn.Exec(std::string("SELECT ") + pg::kPendingColumns +
                              " FROM requests WHERE batch_id = $1 AND chunk = $2 AND state = 0 ORDER BY line",
                          chunk_params);
    if (!rows.ok()) return rows.status();
    for (int i = 0; i < rows->rows(); ++i) c.rows.push_back(pg::ReadPending(*rows, i));
    claim = std::move(c);
    return Status::Ok();
  });
  if (!s.ok()) return s;
  return claim;
}

Status PgStore::RenewLease(const Fence& fence, int64_t lease_ms) {
  if (!pg::IsText(fence.batch_id)) return LeaseLost(fence);
  // The token is the whole check (as for commits): a renewal by the holder
  // after its own release takes the lease again.
  return pg::Run(*pool_, "renew lease", Mode::kStatements, [&](Conn& conn, bool) -> Status {
    auto r = conn.Exec(
        "WITH clk AS (SELECT " KVB_PG_NOW_MS
        " AS ms) UPDATE chunks c SET lease_until = clk.ms + $4 FROM clk "
        "WHERE c.batch_id = $1 AND c.chunk = $2 AND c.token = $3 RETURNING 1",
        Params().Text(fence.batch_id).Int(fence.chunk).Int(fence.token).Int(lease_ms));
    if (!r.ok()) return r.status();
    return r->rows() > 0 ? Status::Ok() : LeaseLost(fence);
  });
}

Status PgStore::ReleaseChunk(const Fence& fence) {
  if (!pg::IsText(fence.batch_id)) return Status::Ok();
  return pg::Run(*pool_, "release chunk", Mode::kTransaction, [&](Conn& conn, bool) -> Status {
    const Params p = Params().Text(fence.batch_id).Int(fence.chunk);
    auto r = conn.Exec(
        "UPDATE chunks SET lease_until = 0, lease_owner = '' WHERE batch_id = $1 AND chunk = $2 AND token = $3 "
        "RETURNING 1",
        Params().Text(fence.batch_id).Int(fence.chunk).Int(fence.token));
    if (!r.ok()) return r.status();
    if (r->rows() == 0) return Status::Ok();  // claimed again meanwhile: not ours to release
    return conn.Exec("UPDATE requests SET inflight = false WHERE batch_id = $1 AND chunk = $2 AND inflight", p)
        .status();
  });
}

StatusOr<int64_t> PgStore::CommitResults(std::string_view batch_id, const std::vector<RequestOutcome>& outcomes) {
  if (!pg::IsText(batch_id)) return pg::NoBatch(batch_id);
  std::vector<int64_t> lines;
  for (const RequestOutcome& o : outcomes) lines.push_back(o.line);
  int64_t recorded = 0;
  Status s = pg::Run(*pool_, "commit results", Mode::kTransaction, [&](Conn& conn, bool) -> Status {
    recorded = 0;
    auto exists = conn.Exec("SELECT 1 FROM batches WHERE id = $1", Params().Text(batch_id));
    if (!exists.ok()) return exists.status();
    if (exists->rows() == 0) return pg::NoBatch(batch_id);
    if (lines.empty()) return Status::Ok();
    // The chunks of the rows first, in chunk order (the lock order above).
    auto locked = conn.Exec(
        "SELECT c.chunk FROM chunks c WHERE c.batch_id = $1 AND c.chunk IN "
        "(SELECT r.chunk FROM requests r WHERE r.batch_id = $1 AND r.line = ANY($2::bigint[]) "
        "AND r.state + 0 = 0) "  // by primary key (see SetInFlight)
        "ORDER BY c.chunk FOR UPDATE OF c",
        Params().Text(batch_id).IntArray(lines));
    if (!locked.ok()) return locked.status();
    auto rec = RecordOutcomes(conn, batch_id, outcomes, -1);
    if (!rec.ok()) return rec.status();
    recorded = rec->rows;
    if (rec->per_chunk.empty()) return Status::Ok();
    std::vector<int64_t> chunks, counts;
    for (const auto& [chunk, n] : rec->per_chunk) {
      chunks.push_back(chunk);
      counts.push_back(n);
    }
    return conn
        .Exec("UPDATE chunks c SET pending = c.pending - d.n, "
              "lease_until = CASE WHEN c.pending - d.n <= 0 THEN 0 ELSE c.lease_until END "
              "FROM unnest($2::bigint[], $3::bigint[]) AS d(chunk, n) WHERE c.batch_id = $1 AND c.chunk = d.chunk",
              Params().Text(batch_id).IntArray(chunks).IntArray(counts))
        .status();
  });
  if (!s.ok()) return s;
  return recorded;
}

StatusOr<int64_t> PgStore::CommitFenced(const Fence& fence, const std::vector<RequestOutcome>& outcomes,
                                        int64_t lease_ms) {
  if (!pg::IsText(fence.batch_id)) return pg::NoBatch(fence.batch_id);
  int64_t recorded = 0;
  Status s = pg::Run(*pool_, "commit results", Mode::kTransaction, [&](Conn& conn, bool) -> Status {
    recorded = 0;
    // The fence: the chunk row locked, so no claim can take it until this
    // commits, and its token compared.
    auto held = conn.Exec("SELECT token FROM chunks WHERE batch_id = $1 AND chunk = $2 FOR UPDATE",
                          Params().Text(fence.batch_id).Int(fence.chunk));
    if (!held.ok()) return held.status();
    if (held->rows() == 0) {
      auto exists = conn.Exec("SELECT 1 FROM batches WHERE id = $1", Params().Text(fence.batch_id));
      if (!exists.ok()) return exists.status();
      if (exists->rows() == 0) return pg::NoBatch(fence.batch_id);
    }
    if (held->rows() == 0 || held->Int(0, 0) != fence.token) return LeaseLost(fence);
    auto rec = RecordOutcomes(conn, fence.batch_id, outcomes, fence.chunk);
    if (!rec.ok()) return rec.status();
    recorded = rec->rows;
    // Renewed unless released (0): a commit after a release does not take
    // the chunk back. A chunk with nothing left pending holds no lease.
    return conn
        .Exec("WITH clk AS (SELECT " KVB_PG_NOW_MS
              " AS ms) UPDATE chunks c SET pending = c.pending - $3, "
              "lease_until = CASE WHEN c.lease_until = 0 OR c.pending - $3 <= 0 THEN 0 ELSE clk.ms + $4 END FROM clk "
              "WHERE c.batch_id = $1 AND c.chunk = $2",
              Params().Text(fence.batch_id).Int(fence.chunk).Int(recorded).Int(lease_ms))
        .status();
  });
  if (!s.ok()) return s;
  return recorded;
}

}  // namespace kvb::store

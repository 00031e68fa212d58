#include <gtest/gtest.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "store/sqlite_store.h"

namespace {

namespace ks = kvb::store;
using ks::BatchRecord;
using ks::FileRecord;
using ks::PendingRequest;
using ks::RequestOutcome;
using ks::RequestState;
using ks::StoredRequest;
using kvb::Status;
using kvb::StatusCode;

// SQLite-only behaviour: durability on disk, several processes, schema
// versions and migrations. The Store contract itself, shared with
// PostgreSQL, is tests/unit/store_conformance_test.cc.

// A fresh directory under the system temp dir, removed with its contents.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvb_store_test_XXXXXX").string();
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::unique_ptr<ks::SqliteStore> Open(const std::string& path) {
  auto store = ks::SqliteStore::Open(path, std::filesystem::path(path).parent_path().string());
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(*store) : nullptr;
}

FileRecord MakeFile(const std::string& id, int64_t created_at, const std::string& purpose = "batch") {
  return {id, id + ".jsonl", purpose, 4, created_at, created_at + 3600};
}

// A local file holding `text`, to hand to PutFile.
std::string Content(const TempDir& dir, const std::string& name, const std::string& text) {
  const std::string path = dir.File(name);
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
  return path;
}

// Puts the batch in validating, then moves it to in_progress with `n` rows.
void StartBatch(ks::Store& store, const std::string& id, int n) {
  ASSERT_TRUE(store.PutBatch([&] {
    BatchRecord b;
    b.id = id;
    b.endpoint = "/v1/chat/completions";
    b.input_file_id = "file-in";
    b.completion_window = "24h";
    b.created_at = 2;
    return b;
  }()).ok());
  std::vector<PendingRequest> rows;
  for (int i = 1; i <= n; ++i) rows.push_back({i, "req-" + std::to_string(i), int64_t{i} * 100, 50, 7, 0, 0});
  ASSERT_TRUE(store.AddRequests(id, rows, 3).ok());
}



RequestOutcome Outcome(int64_t line, bool ok, int64_t in = 10, int64_t cached = 8, int64_t out = 3) {
  return {line, ok, (ok ? "ok " : "err ") + std::to_string(line), in, cached, out};
}


std::vector<StoredRequest> AllRequests(ks::Store& store, const std::string& batch_id) {
  std::vector<StoredRequest> out;
  Status s = store.ForEachRequest(batch_id, [&](const StoredRequest& r) {
    out.push_back(r);
    return Status::Ok();
  });
  EXPECT_TRUE(s.ok()) << s.ToString();
  return out;
}

// --- on-disk only: what survives closing, and a process dying ---

TEST(SqliteStoreOnDisk, ReopenedDatabaseKeepsEverything) {
  TempDir dir;
  const std::string path = dir.File("kvb.db");
  {
    auto store = Open(path);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->PutFile(MakeFile("file-a", 1), Content(dir, "up", "abcd")).ok());
    StartBatch(*store, "batch_1", 3);
    ASSERT_EQ(*store->CommitResults("batch_1", {Outcome(2, true)}), 1);
  }
  auto store = Open(path);
  ASSERT_NE(store, nullptr);
  EXPECT_TRUE(store->GetFile("file-a").ok());
  std::string text;
  ASSERT_TRUE(store->ReadFile("file-a", 0, 100, &text).ok());
  EXPECT_EQ(text, "abcd");
  auto b = store->GetBatch("batch_1");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->status, ks::BatchStatus::kInProgress);
  EXPECT_EQ(b->counts.completed, 1);
  auto pending = store->PendingRequests("batch_1");
  ASSERT_EQ(pending->size(), 2u);
  EXPECT_EQ((*pending)[1].line, 3);
}

TEST(SqliteStoreOnDisk, ResultsCommittedByAProcessThatDiesWithoutClosingSurvive) {
  TempDir dir;
  const std::string path = dir.File("kvb.db");
  {
    auto store = Open(path);
    ASSERT_NE(store, nullptr);
    StartBatch(*store, "batch_1", 3);
  }
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // The child opens its own connection (never one made before fork),
    // commits, and dies without closing or checkpointing.
    auto store = ks::SqliteStore::Open(path, dir.File(""));
    bool ok = store.ok();
    if (ok) {
      auto n = (*store)->CommitResults("batch_1", {Outcome(1, true), Outcome(3, false)});
      ok = n.ok() && *n == 2;
    }
    _exit(ok ? 0 : 1);
  }
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFEXITED(wstatus));
  ASSERT_EQ(WEXITSTATUS(wstatus), 0);

  auto store = Open(path);
  ASSERT_NE(store, nullptr);
  auto b = store->GetBatch("batch_1");
  EXPECT_EQ(b->counts.completed, 1);
  EXPECT_EQ(b->counts.failed, 1);
  auto rows = AllRequests(*store, "batch_1");
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].result_line, "ok 1");
  EXPECT_EQ(rows[1].state, RequestState::kPending);
  EXPECT_EQ(rows[2].result_line, "err 3");
  // Exactly once across processes: the survivor cannot answer them again.
  EXPECT_EQ(*store->CommitResults("batch_1", {Outcome(1, true), Outcome(2, true), Outcome(3, true)}), 1);
}

TEST(SqliteStoreOnDisk, ForEachRequestReadsOneSnapshotWhileCommitsGoOn) {
  TempDir dir;
  auto store = Open(dir.File("kvb.db"));
  ASSERT_NE(store, nullptr);
  StartBatch(*store, "batch_1", 100);
  // While the walk is at line 1, every row gets answered; the walk still sees
  // the rows as they were when it started, and the commit is not blocked.
  int pending_seen = 0;
  Status s = store->ForEachRequest("batch_1", [&](const StoredRequest& r) -> Status {
    if (r.line == 1) {
      std::vector<RequestOutcome> all;
      for (int line = 1; line <= 100; ++line) all.push_back(Outcome(line, true));
      auto n = store->CommitResults("batch_1", all);
      if (!n.ok()) return n.status();
    }
    pending_seen += r.state == RequestState::kPending;
    return Status::Ok();
  });
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(pending_seen, 100);
  EXPECT_TRUE(store->PendingRequests("batch_1")->empty());
}

TEST(SqliteStoreOnDisk, MigratesAVersion1DatabaseKeepingItsRows) {
  TempDir dir;
  const std::string path = dir.File("kvb.db");
  {
    auto store = Open(path);
    StartBatch(*store, "batch_1", 3);
  }
  // Turn it back into what version 1 wrote.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db,
                         "DROP TABLE chunks; DROP INDEX requests_by_chunk; ALTER TABLE requests DROP COLUMN chunk; "
                         "ALTER TABLE batches DROP COLUMN lease_owner; ALTER TABLE batches DROP COLUMN lease_until; "
                         "DROP INDEX requests_inflight; ALTER TABLE requests DROP COLUMN inflight; "
                         "ALTER TABLE requests DROP COLUMN crashes; PRAGMA user_version = 1;",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto store = Open(path);
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->PendingRequests("batch_1")->size(), 3u);
  // Its rows became one chunk, claimable as any other.
  auto claim = store->ClaimChunk("w", {}, 60'000);
  ASSERT_TRUE(claim.ok() && claim->has_value());
  EXPECT_EQ((*claim)->rows.size(), 3u);
  EXPECT_TRUE(store->MarkInFlight("batch_1", {1}).ok());
  EXPECT_EQ(*store->RecoverInFlight(), 1);
}

// One process owns an embedded store: at its start every lease left is a
// dead process's. The next claim takes the chunk back at once (no waiting
// for the lease) and counts the crash of each row that was in flight.
TEST(SqliteStoreOnDisk, RecoverInFlightExpiresADeadProcesssLeases) {
  TempDir dir;
  const std::string path = dir.File("kvb.db");
  {
    auto store = Open(path);
    StartBatch(*store, "batch_1", 4);
    auto claim = store->ClaimChunk("dead", {}, 600'000);
    ASSERT_TRUE(claim.ok() && claim->has_value());
    ASSERT_TRUE(store->MarkInFlight("batch_1", {1, 2}).ok());
    ASSERT_TRUE(store->UnmarkInFlight("batch_1", {2}).ok());
  }
  auto store = Open(path);
  EXPECT_EQ(*store->RecoverInFlight(), 1);
  auto claim = store->ClaimChunk("alive", {}, 60'000);
  ASSERT_TRUE(claim.ok() && claim->has_value()) << "the dead process's lease does not hold";
  EXPECT_EQ((*claim)->reclaims, 1);
  std::map<int64_t, int32_t> crashes;
  for (const PendingRequest& p : (*claim)->rows) crashes[p.line] = p.crashes;
  EXPECT_EQ(crashes, (std::map<int64_t, int32_t>{{1, 1}, {2, 0}, {3, 0}, {4, 0}}));
}

TEST(SqliteStoreOnDisk, UsesWalAndRefusesANewerSchemaVersion) {
  TempDir dir;
  const std::string path = dir.File("kvb.db");
  ASSERT_NE(Open(path), nullptr);

  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  auto query_int = [&](const char* sql) {
    sqlite3_stmt* st = nullptr;
    int64_t v = -1;
    if (sqlite3_prepare_v2(db, sql, -1, &st, nullptr) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW) {
      v = sqlite3_column_type(st, 0) == SQLITE_TEXT
              ? (std::string(reinterpret_cast<const char*>(sqlite3_column_text(st, 0))) == "wal")
              : sqlite3_column_int64(st, 0);
    }
    sqlite3_finalize(st);
    return v;
  };
  EXPECT_EQ(query_int("PRAGMA journal_mode"), 1);  // "wal"
  EXPECT_EQ(query_int("PRAGMA user_version"), 3);
  ASSERT_EQ(sqlite3_exec(db, "PRAGMA user_version = 1000", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);

  auto reopened = ks::SqliteStore::Open(path);
  EXPECT_EQ(reopened.status().code(), StatusCode::kFailedPrecondition);
}

}  // namespace

// The shared fixture of the store conformance suite: every TEST_P runs on
// SQLite in memory, SQLite on a file, and PostgreSQL (one private server for
// the whole test binary, a fresh database per test).
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "store/store.h"
#include "tests/support/pg_server.h"

namespace kvb::store::conformance {

enum class Backend { kSqliteMemory, kSqliteFile, kPostgres };

// The test binary's PostgreSQL server, started on first use, stopped when
// the tests end (main registers its environment).
kvb::testing::PgTestServer& Server();
// A fresh, empty database on it; its URI. Fails the test when the server
// did not start (the message names the package to install).
std::string FreshDatabase();

// A directory under /tmp removed with its contents.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

class StoreTest : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override;
  Store& store() { return *store_; }
  // Another store object on the same data, as a second node would have
  // (SQLite file and PostgreSQL; ":memory:" has no second connection and
  // returns null).
  std::unique_ptr<Store> OpenAnother();

  // A batch in validating, created at `created_at` (ordering), expiring in a day.
  BatchRecord MakeBatch(const std::string& id, int64_t created_at);
  // Puts `id` and gives it `n` rows in chunks of `chunk_size` (rows 1..n;
  // chunk = (line - 1) / chunk_size; prefix_hash = hash_of(chunk)).
  void AddBatch(const std::string& id, int64_t created_at, int n, int chunk_size,
                const std::function<uint64_t(int64_t chunk)>& hash_of = nullptr);
  // A complete local file holding `content`, to hand to PutFile.
  std::string LocalCopy(const std::string& name, const std::string& content);
  FileRecord MakeFile(const std::string& id, int64_t created_at, int64_t bytes, const std::string& purpose = "batch");
  std::string ReadAll(const std::string& file_id);

  TempDir dir_;
  std::string files_dir_;
  std::string cache_dir_;
  std::string uri_;  // PostgreSQL: this test's database
  std::unique_ptr<Store> store_;
};

// Outcome for `line`: result text "ok <line>" / "err <line>", tokens given.
RequestOutcome Outcome(int64_t line, bool ok = true, int64_t in = 10, int64_t cached = 4, int64_t out = 3);
// Every row of the batch via ForEachRequest.
std::vector<StoredRequest> AllRequests(Store& store, const std::string& batch_id);
// Polls `done` every 10 ms until it is true or `timeout` passes.
bool WaitFor(const std::function<bool()>& done, std::chrono::milliseconds timeout = std::chrono::seconds(10));
int64_t UnixNow();

}  // namespace kvb::store::conformance

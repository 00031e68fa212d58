#include "fixture.h"

#include <stdlib.h>

#include <atomic>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "store/pg_store.h"
#include "store/sqlite_store.h"

namespace kvb::store::conformance {
namespace {

kvb::testing::PgTestServer* g_server = nullptr;

// Stops the server after the last test (gtest deletes registered environments).
class ServerEnvironment : public ::testing::Environment {
 public:
  void TearDown() override {
    delete g_server;
    g_server = nullptr;
  }
};

const bool kRegistered = [] {
  ::testing::AddGlobalTestEnvironment(new ServerEnvironment);
  return true;
}();

}  // namespace

kvb::testing::PgTestServer& Server() {
  (void)kRegistered;
  if (g_server == nullptr) g_server = new kvb::testing::PgTestServer();
  return *g_server;
}

std::string FreshDatabase() {
  static std::atomic<int> next{0};
  kvb::testing::PgTestServer& server = Server();
  EXPECT_TRUE(server.ok()) << "the PostgreSQL test server did not start: " << server.error();
  if (!server.ok()) return "";
  const std::string name = "kvb_test_" + std::to_string(next++);
  std::string error;
  EXPECT_TRUE(server.CreateDatabase(name, &error)) << error;
  return server.UriFor(name);
}

TempDir::TempDir() {
  std::string tmpl = "/tmp/kvb_conformance_XXXXXX";
  if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  if (!path_.empty()) std::filesystem::remove_all(path_, ec);
}

void StoreTest::SetUp() {
  ASSERT_FALSE(dir_.path().empty());
  files_dir_ = dir_.File("files");
  cache_dir_ = dir_.File("cache");
  std::filesystem::create_directories(files_dir_);
  switch (GetParam()) {
    case Backend::kSqliteMemory:
    case Backend::kSqliteFile: {
      auto s = SqliteStore::Open(GetParam() == Backend::kSqliteMemory ? ":memory:" : dir_.File("kvb.db"), files_dir_);
      ASSERT_TRUE(s.ok()) << s.status().ToString();
      store_ = std::move(s).value();
      break;
    }
    case Backend::kPostgres: {
      uri_ = FreshDatabase();
      ASSERT_FALSE(uri_.empty());
      auto s = PgStore::Open(uri_);
      ASSERT_TRUE(s.ok()) << s.status().ToString();
      store_ = std::move(s).value();
      break;
    }
  }
}

std::unique_ptr<Store> StoreTest::OpenAnother() {
  switch (GetParam()) {
    case Backend::kSqliteMemory: return nullptr;
    case Backend::kSqliteFile: {
      auto s = SqliteStore::Open(dir_.File("kvb.db"), files_dir_);
      EXPECT_TRUE(s.ok()) << s.status().ToString();
      return s.ok() ? std::unique_ptr<Store>(std::move(s).value()) : nullptr;
    }
    case Backend::kPostgres: {
      auto s = PgStore::Open(uri_);
      EXPECT_TRUE(s.ok()) << s.status().ToString();
      return s.ok() ? std::unique_ptr<Store>(std::move(s).value()) : nullptr;
    }
  }
  return nullptr;
}

BatchRecord StoreTest::MakeBatch(const std::string& id, int64_t created_at) {
  BatchRecord b;
  b.id = id;
  b.endpoint = "/v1/chat/completions";
  b.input_file_id = "file-in";
  b.completion_window = "24h";
  b.created_at = created_at;
  // Claims compare expires_at with the store's clock: a day from now.
  b.expires_at = UnixNow() + 86400;
  return b;
}

void StoreTest::AddBatch(const std::string& id, int64_t created_at, int n, int chunk_size,
                         const std::function<uint64_t(int64_t)>& hash_of) {
  ASSERT_TRUE(store().PutBatch(MakeBatch(id, created_at)).ok());
  std::vector<PendingRequest> rows;
  for (int line = 1; line <= n; ++line) {
    PendingRequest r;
    r.line = line;
    r.custom_id = "req-" + std::to_string(line);
    r.offset = int64_t{line} * 100;
    r.length = 50 + line;
    r.chunk = (line - 1) / chunk_size;
    // The top bit set by default: the uint64 <-> int64 cast is exercised.
    r.prefix_hash = hash_of ? hash_of(r.chunk) : 0xF000'0000'0000'0000ULL + static_cast<uint64_t>(r.chunk);
    rows.push_back(std::move(r));
  }
  Status s = store().AddRequests(id, rows, created_at + 1);
  ASSERT_TRUE(s.ok()) << s.ToString();
}

std::string StoreTest::LocalCopy(const std::string& name, const std::string& content) {
  const std::string path = dir_.File(name);
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

FileRecord StoreTest::MakeFile(const std::string& id, int64_t created_at, int64_t bytes, const std::string& purpose) {
  return {id, id + ".jsonl", purpose, bytes, created_at, created_at + 3600};
}

std::string StoreTest::ReadAll(const std::string& file_id) {
  std::string out;
  auto f = store().GetFile(file_id);
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  if (!f.ok()) return out;
  Status s = store().ReadFile(file_id, 0, f->bytes, &out);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return out;
}

RequestOutcome Outcome(int64_t line, bool ok, int64_t in, int64_t cached, int64_t out) {
  return {line, ok, (ok ? "ok " : "err ") + std::to_string(line), in, cached, out};
}

std::vector<StoredRequest> AllRequests(Store& store, const std::string& batch_id) {
  std::vector<StoredRequest> out;
  Status s = store.ForEachRequest(batch_id, [&](const StoredRequest& r) {
    out.push_back(r);
    return Status::Ok();
  });
  EXPECT_TRUE(s.ok()) << s.ToString();
  return out;
}

bool WaitFor(const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

int64_t UnixNow() { return static_cast<int64_t>(std::time(nullptr)); }

INSTANTIATE_TEST_SUITE_P(, StoreTest,
                         ::testing::Values(Backend::kSqliteMemory, Backend::kSqliteFile, Backend::kPostgres),
                         [](const auto& info) {
                           switch (info.param) {
                             case Backend::kSqliteMemory: return "SqliteMemory";
                             case Backend::kSqliteFile: return "SqliteFile";
                             case Backend::kPostgres: return "Postgres";
                           }
                           return "Unknown";
                         });

}  // namespace kvb::store::conformance

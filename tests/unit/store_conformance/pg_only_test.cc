// PostgreSQL-only parts of the contract: surviving a server restart,
// several nodes (store objects) on one database, schema creation by nodes
// starting together.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "fixture.h"
#include "store/pg_store.h"

namespace kvb::store::conformance {
namespace {

class PgOnlyTest : public StoreTest {};

std::unique_ptr<PgStore> OpenPg(const std::string& uri) {
  auto s = PgStore::Open(uri);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? std::move(s).value() : nullptr;
}

TEST_P(PgOnlyTest, OpenRefusesABadConnectionString) {
  EXPECT_EQ(PgStore::Open("postgresql://host:notaport/x?bogus_option=1").status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(PgStore::Open("this is = not valid = conninfo").status().code(), StatusCode::kInvalidArgument);
}

TEST_P(PgOnlyTest, OpenTakesKeyValueConninfoToo) {
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_a", 1)).ok());
  // uri_ is "postgresql:///<db>?host=<dir>/sock&user=kvb".
  const std::string db = uri_.substr(14, uri_.find('?') - 14);
  auto kv = PgStore::Open("host=" + Server().dir() + "/sock user=kvb dbname=" + db);
  ASSERT_TRUE(kv.ok()) << kv.status().ToString();
  EXPECT_TRUE((*kv)->GetBatch("batch_a").ok());
}

TEST_P(PgOnlyTest, NodesStartingTogetherCreateTheSchemaOnce) {
  const std::string uri = FreshDatabase();
  std::vector<std::thread> threads;
  std::atomic<int> opened{0};
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&] {
      auto s = PgStore::Open(uri);
      EXPECT_TRUE(s.ok()) << s.status().ToString();
      if (s.ok() && (*s)->PutBatch(MakeBatch("batch_" + std::to_string(opened++), 1)).ok()) return;
      ADD_FAILURE() << "store unusable";
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(opened.load(), 6);
}

TEST_P(PgOnlyTest, RecoverInFlightLeavesLeasesToExpire) {
  AddBatch("batch_a", 10, 2, 2);
  auto c = store().ClaimChunk("w", {}, 60'000);
  ASSERT_TRUE(c.ok() && *c);
  ASSERT_TRUE(store().MarkInFlight("batch_a", {1}).ok());
  EXPECT_EQ(*store().RecoverInFlight(), 0);
  EXPECT_EQ(*store().LeasedChunks("batch_a"), 1);
}

TEST_P(PgOnlyTest, SameStoreKeepsWorkingAcrossAServerRestart) {
  AddBatch("batch_a", 10, 8, 4);
  auto c = store().ClaimChunk("w", {}, 60'000);
  ASSERT_TRUE(c.ok() && *c);
  // Several pooled connections exist before the restart.
  std::vector<std::thread> readers;
  for (int i = 0; i < 4; ++i) readers.emplace_back([&] { EXPECT_TRUE(store().GetBatch("batch_a").ok()); });
  for (auto& t : readers) t.join();

  ASSERT_TRUE(Server().Restart()) << Server().error();
  // Every connection is dead; the calls reconnect and go on.
  auto n = store().CommitFenced((*c)->fence, {Outcome(1), Outcome(2)}, 60'000);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 2);
  for (int i = 0; i < 8; ++i) EXPECT_TRUE(store().GetBatch("batch_a").ok());
  EXPECT_EQ(store().GetBatch("batch_a")->counts.completed, 2);
}

TEST_P(PgOnlyTest, UnreachableIsUnavailableAndNothingIsLostOrDoubled) {
  AddBatch("batch_a", 10, 4, 4);
  auto c = store().ClaimChunk("w", {}, 60'000);
  ASSERT_TRUE(c.ok() && *c);
  ASSERT_EQ(*store().CommitFenced((*c)->fence, {Outcome(1)}, 60'000), 1);

  ASSERT_TRUE(Server().Stop()) << Server().error();
  // Started again whatever happens below: the other tests share the server.
  struct StartAgain {
    bool needed = true;
    ~StartAgain() {
      if (needed) Server().Start();
    }
  } start_again;
  const auto start = std::chrono::steady_clock::now();
  auto down = store().CommitFenced((*c)->fence, {Outcome(1), Outcome(2), Outcome(3)}, 60'000);
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(down.status().code(), StatusCode::kUnavailable) << down.status().ToString();
  EXPECT_LT(waited, std::chrono::seconds(15)) << "gives up after a few seconds";
  EXPECT_EQ(store().GetBatch("batch_a").status().code(), StatusCode::kUnavailable);
  start_again.needed = false;
  ASSERT_TRUE(Server().Start()) << Server().error();

  // The caller kept its outcomes and commits them again: each counted once.
  auto n = store().CommitFenced((*c)->fence, {Outcome(1), Outcome(2), Outcome(3)}, 60'000);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 2);
  auto b = store().GetBatch("batch_a");
  EXPECT_EQ(b->counts.completed, 3);
  EXPECT_EQ(b->usage.input_tokens, 30);
}

TEST_P(PgOnlyTest, TwoNodesRacingNeverHoldTheSameChunk) {
  AddBatch("batch_a", 10, 600, 3);  // 200 chunks
  auto node_a = OpenPg(uri_);
  auto node_b = OpenPg(uri_);
  ASSERT_TRUE(node_a && node_b);
  std::mutex mu;
  std::vector<std::string> claimed;
  std::atomic<int64_t> recorded{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    Store* node = t % 2 == 0 ? static_cast<Store*>(node_a.get()) : node_b.get();
    threads.emplace_back([&, node, t] {
      for (;;) {
        auto c = node->ClaimChunk("node-" + std::to_string(t % 2) + "/" + std::to_string(t), {}, 60'000);
        ASSERT_TRUE(c.ok()) << c.status().ToString();
        if (!*c) return;
        {
          std::lock_guard lock(mu);
          claimed.push_back(std::to_string((*c)->fence.chunk));
        }
        std::vector<RequestOutcome> outcomes;
        for (const PendingRequest& r : (*c)->rows) outcomes.push_back(Outcome(r.line));
        auto n = node->CommitFenced((*c)->fence, outcomes, 60'000);
        ASSERT_TRUE(n.ok()) << n.status().ToString();
        recorded += *n;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(claimed.size(), 200u);
  EXPECT_EQ(std::set<std::string>(claimed.begin(), claimed.end()).size(), claimed.size());
  EXPECT_EQ(recorded.load(), 600);
  EXPECT_EQ(store().GetBatch("batch_a")->counts.completed, 600);
}

TEST_P(PgOnlyTest, ANodeSeesAnotherNodesWork) {
  auto other = OpenAnother();
  ASSERT_TRUE(other);
  AddBatch("batch_a", 10, 2, 2);
  auto c = other->ClaimChunk("node-b", {}, 60'000);
  ASSERT_TRUE(c.ok() && *c);
  EXPECT_EQ(*store().LeasedChunks("batch_a"), 1);
  ASSERT_TRUE(other->PutFile(MakeFile("file-a", 1, 5), LocalCopy("a", "hello")).ok());
  EXPECT_EQ(ReadAll("file-a"), "hello");
  auto local = store().LocalFile("file-a", cache_dir_);
  ASSERT_TRUE(local.ok()) << local.status().ToString();
  EXPECT_EQ(local->rfind(cache_dir_, 0), 0u) << "a copy under cache_dir";
}

INSTANTIATE_TEST_SUITE_P(, PgOnlyTest, ::testing::Values(Backend::kPostgres),
                         [](const auto&) { return "Postgres"; });

}  // namespace
}  // namespace kvb::store::conformance

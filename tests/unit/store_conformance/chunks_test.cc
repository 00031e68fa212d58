// The Store contract: claiming chunks, leases, reclaims and in-flight marks.
// Leases are short (100-200 ms); expiry is waited for by polling.
#include <gtest/gtest.h>

#include <functional>
#include <mutex>
#include <set>
#include <thread>
#include <string>
#include <vector>

#include "fixture.h"

namespace kvb::store::conformance {
namespace {

using Claim = std::optional<ChunkClaim>;

Claim MustClaim(Store& store, const std::vector<uint64_t>& resident = {}, int64_t lease_ms = 60'000,
                const std::string& owner = "worker-1") {
  auto c = store.ClaimChunk(owner, resident, lease_ms);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? *c : std::nullopt;
}

std::vector<int64_t> Lines(const ChunkClaim& c) {
  std::vector<int64_t> lines;
  for (const PendingRequest& r : c.rows) lines.push_back(r.line);
  return lines;
}

std::string Key(const ChunkClaim& c) { return c.fence.batch_id + "/" + std::to_string(c.fence.chunk); }

TEST_P(StoreTest, ClaimTakesEachChunkOnceWithItsRows) {
  AddBatch("batch_a", 10, 7, 3);  // chunks 0: 1-3, 1: 4-6, 2: 7
  auto first = MustClaim(store());
  ASSERT_TRUE(first);
  EXPECT_EQ(first->fence.batch_id, "batch_a");
  EXPECT_EQ(first->fence.chunk, 0);
  EXPECT_GT(first->fence.token, 0);
  EXPECT_EQ(first->reclaims, 0);
  EXPECT_EQ(first->prefix_hash, 0xF000'0000'0000'0000ULL);
  EXPECT_EQ(Lines(*first), (std::vector<int64_t>{1, 2, 3}));
  const PendingRequest& r = first->rows[1];
  EXPECT_EQ(r.custom_id, "req-2");
  EXPECT_EQ(r.offset, 200);
  EXPECT_EQ(r.length, 52);
  EXPECT_EQ(r.chunk, 0);
  EXPECT_EQ(r.crashes, 0);

  auto second = MustClaim(store());
  ASSERT_TRUE(second);
  EXPECT_EQ(second->fence.chunk, 1);
  auto third = MustClaim(store());
  ASSERT_TRUE(third);
  EXPECT_EQ(third->fence.chunk, 2);
  EXPECT_EQ(Lines(*third), std::vector<int64_t>{7});
  EXPECT_FALSE(MustClaim(store())) << "every chunk is leased";
  EXPECT_EQ(*store().LeasedChunks("batch_a"), 3);
}

TEST_P(StoreTest, ClaimOrderPriorityThenResidentThenOldestThenChunk) {
  // Older batch a (priority 0), newer batch b (priority 0), newest c (priority 1).
  auto hash = [](const std::string& batch) {
    return [batch](int64_t chunk) { return std::hash<std::string>()(batch) ^ static_cast<uint64_t>(chunk * 7919); };
  };
  AddBatch("batch_a", 10, 4, 2, hash("a"));
  AddBatch("batch_b", 20, 4, 2, hash("b"));
  AddBatch("batch_c", 30, 2, 2, hash("c"));
  ASSERT_TRUE(store().SetBatchControl("batch_c", std::nullopt, 1).ok());
  const uint64_t b1 = hash("b")(1);

  auto c = MustClaim(store(), {b1});
  ASSERT_TRUE(c);
  EXPECT_EQ(Key(*c), "batch_c/0") << "priority first, even over a resident prefix";
  c = MustClaim(store(), {b1});
  ASSERT_TRUE(c);
  EXPECT_EQ(Key(*c), "batch_b/1") << "then a resident prefix, even in a newer batch";
  EXPECT_EQ(c->prefix_hash, b1);
  c = MustClaim(store(), {b1});
  ASSERT_TRUE(c);
  EXPECT_EQ(Key(*c), "batch_a/0") << "then the oldest batch";
  c = MustClaim(store());
  EXPECT_EQ(Key(*c), "batch_a/1") << "then the chunk number";
  c = MustClaim(store());
  EXPECT_EQ(Key(*c), "batch_b/0");
  EXPECT_FALSE(MustClaim(store()));
}

// Workers starting on one batch spread over its prefix groups: a chunk of
// a group nobody holds comes before the next chunk of a group in work.
TEST_P(StoreTest, ClaimPrefersPrefixGroupsNobodyWorksOn) {
  // Chunks 0-1 share prefix A, 2-3 prefix B, 4-5 prefix C.
  AddBatch("batch_a", 10, 12, 2, [](int64_t chunk) { return 0xA000'0000'0000'0000ULL + static_cast<uint64_t>(chunk / 2); });
  auto first = MustClaim(store(), {}, 60'000, "w1");
  ASSERT_TRUE(first);
  EXPECT_EQ(Key(*first), "batch_a/0");
  auto second = MustClaim(store(), {}, 60'000, "w2");
  ASSERT_TRUE(second);
  EXPECT_EQ(Key(*second), "batch_a/2") << "group A is in work: the next group";
  auto third = MustClaim(store(), {}, 60'000, "w3");
  ASSERT_TRUE(third);
  EXPECT_EQ(Key(*third), "batch_a/4");
  // Every group in work: the chunk number decides; a resident group first.
  auto fourth = MustClaim(store(), {second->prefix_hash}, 60'000, "w2");
  ASSERT_TRUE(fourth);
  EXPECT_EQ(Key(*fourth), "batch_a/3");
  auto fifth = MustClaim(store(), {}, 60'000, "w4");
  ASSERT_TRUE(fifth);
  EXPECT_EQ(Key(*fifth), "batch_a/1");
}

TEST_P(StoreTest, ClaimSkipsBatchesThatMustNotRun) {
  AddBatch("batch_paused", 10, 2, 2);
  ASSERT_TRUE(store().SetBatchControl("batch_paused", true, std::nullopt).ok());
  // expires_at in the past (by the store's clock).
  ASSERT_TRUE(store().PutBatch([&] {
    BatchRecord b = MakeBatch("batch_expired", 11);
    b.expires_at = UnixNow() - 60;
    return b;
  }()).ok());
  {
    PendingRequest r{1, "x", 0, 1, 5, 0, 0};
    ASSERT_TRUE(store().AddRequests("batch_expired", {r}, 12).ok());
  }
  AddBatch("batch_finalizing", 12, 2, 2);
  ASSERT_TRUE(
      store().TransitionBatch("batch_finalizing", {BatchStatus::kInProgress}, BatchStatus::kFinalizing, 13).ok());
  AddBatch("batch_cancelling", 13, 2, 2);
  ASSERT_TRUE(
      store().TransitionBatch("batch_cancelling", {BatchStatus::kInProgress}, BatchStatus::kCancelling, 14).ok());
  AddBatch("batch_answered", 14, 2, 2);
  ASSERT_EQ(*store().CommitResults("batch_answered", {Outcome(1), Outcome(2, false)}), 2);
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_validating", 15)).ok());
  EXPECT_FALSE(MustClaim(store()));

  // No expiry (0) is claimable; resuming a paused batch makes it claimable.
  ASSERT_TRUE(store().PutBatch([&] {
    BatchRecord b = MakeBatch("batch_forever", 16);
    b.expires_at = 0;
    return b;
  }()).ok());
  ASSERT_TRUE(store().AddRequests("batch_forever", {PendingRequest{1, "y", 0, 1, 5, 0, 0}}, 17).ok());
  auto c = MustClaim(store());
  ASSERT_TRUE(c);
  EXPECT_EQ(c->fence.batch_id, "batch_forever");
  ASSERT_TRUE(store().SetBatchControl("batch_paused", false, std::nullopt).ok());
  c = MustClaim(store());
  ASSERT_TRUE(c);
  EXPECT_EQ(c->fence.batch_id, "batch_paused");
}

TEST_P(StoreTest, ExpiredLeaseIsReclaimedWithCrashesForRowsInFlight) {
  AddBatch("batch_a", 10, 3, 3);
  auto first = MustClaim(store(), {}, 100);
  ASSERT_TRUE(first);
  ASSERT_TRUE(store().MarkInFlight("batch_a", {1, 3}).ok());
  ASSERT_TRUE(store().UnmarkInFlight("batch_a", {3}).ok());  // 3 left the engine
  EXPECT_FALSE(MustClaim(store())) << "leased until it expires";

  Claim second;
  ASSERT_TRUE(WaitFor([&] { return (second = MustClaim(store(), {}, 100)).has_value(); }));
  EXPECT_EQ(second->fence.chunk, 0);
  EXPECT_GT(second->fence.token, first->fence.token);
  EXPECT_EQ(second->reclaims, 1);
  ASSERT_EQ(second->rows.size(), 3u);
  EXPECT_EQ(second->rows[0].crashes, 1) << "in flight when its holder went away";
  EXPECT_EQ(second->rows[1].crashes, 0);
  EXPECT_EQ(second->rows[2].crashes, 0) << "unmarked before";

  // The reclaim cleared the marks: a second expiry counts a reclaim, no crash.
  Claim third;
  ASSERT_TRUE(WaitFor([&] { return (third = MustClaim(store())).has_value(); }));
  EXPECT_EQ(third->reclaims, 2);
  EXPECT_GT(third->fence.token, second->fence.token);
  EXPECT_EQ(third->rows[0].crashes, 1);
  auto pending = store().PendingRequests("batch_a");
  EXPECT_EQ((*pending)[0].crashes, 1);
}

TEST_P(StoreTest, ReleasedChunkIsClaimableAtOnceWithoutAReclaim) {
  AddBatch("batch_a", 10, 2, 2);
  auto first = MustClaim(store());
  ASSERT_TRUE(first);
  ASSERT_TRUE(store().MarkInFlight("batch_a", {1, 2}).ok());
  ASSERT_TRUE(store().ReleaseChunk(first->fence).ok());
  EXPECT_EQ(*store().LeasedChunks("batch_a"), 0);

  auto second = MustClaim(store(), {}, 100);
  ASSERT_TRUE(second);
  EXPECT_EQ(second->reclaims, 0);
  EXPECT_GT(second->fence.token, first->fence.token);
  EXPECT_EQ(second->rows[0].crashes, 0);
  // The release cleared the marks: the expiry of this lease finds none.
  Claim third;
  ASSERT_TRUE(WaitFor([&] { return (third = MustClaim(store())).has_value(); }));
  EXPECT_EQ(third->reclaims, 1);
  EXPECT_EQ(third->rows[0].crashes, 0);
  EXPECT_EQ(third->rows[1].crashes, 0);

  // A release with a stale token changes nothing.
  ASSERT_TRUE(store().ReleaseChunk(second->fence).ok());
  EXPECT_EQ(*store().LeasedChunks("batch_a"), 1);
  EXPECT_FALSE(MustClaim(store()));
}

TEST_P(StoreTest, RenewLeaseKeepsTheChunkAndFailsForAStaleToken) {
  AddBatch("batch_a", 10, 2, 2);
  auto first = MustClaim(store(), {}, 150);
  ASSERT_TRUE(first);
  ASSERT_TRUE(store().RenewLease(first->fence, 60'000).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_FALSE(MustClaim(store())) << "renewed past its first expiry";
  EXPECT_EQ(*store().LeasedChunks("batch_a"), 1);

  // Expired and taken by another: the old holder's renewal fails.
  ASSERT_TRUE(store().RenewLease(first->fence, 100).ok());
  Claim second;
  ASSERT_TRUE(WaitFor([&] { return (second = MustClaim(store(), {}, 60'000, "worker-2")).has_value(); }));
  Status stale = store().RenewLease(first->fence, 60'000);
  EXPECT_EQ(stale.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(stale.message().find("lease lost"), std::string::npos) << stale.message();
  EXPECT_TRUE(store().RenewLease(second->fence, 60'000).ok());
}

TEST_P(StoreTest, LeasedChunksCountsUnexpiredLeases) {
  AddBatch("batch_a", 10, 6, 2);
  AddBatch("batch_b", 20, 2, 2);
  EXPECT_EQ(*store().LeasedChunks("batch_a"), 0);
  auto a0 = MustClaim(store(), {}, 100);
  auto a1 = MustClaim(store(), {}, 60'000);
  ASSERT_TRUE(a0 && a1);
  EXPECT_EQ(*store().LeasedChunks("batch_a"), 2);
  EXPECT_EQ(*store().LeasedChunks("batch_b"), 0);
  EXPECT_TRUE(WaitFor([&] { return *store().LeasedChunks("batch_a") == 1; }));
  // A chunk with nothing left pending holds no lease.
  ASSERT_EQ(*store().CommitFenced(a1->fence, {Outcome(3), Outcome(4)}, 60'000), 2);
  EXPECT_EQ(*store().LeasedChunks("batch_a"), 0);
}

TEST_P(StoreTest, MarksOnAnsweredRowsAreIgnored) {
  AddBatch("batch_a", 10, 2, 2);
  auto c = MustClaim(store(), {}, 100);
  ASSERT_TRUE(c);
  ASSERT_EQ(*store().CommitFenced(c->fence, {Outcome(1)}, 100), 1);
  ASSERT_TRUE(store().MarkInFlight("batch_a", {1, 2}).ok());
  Claim again;
  ASSERT_TRUE(WaitFor([&] { return (again = MustClaim(store())).has_value(); }));
  ASSERT_EQ(again->rows.size(), 1u);
  EXPECT_EQ(again->rows[0].line, 2);
  EXPECT_EQ(again->rows[0].crashes, 1);
  EXPECT_TRUE(store().MarkInFlight("batch_a", {}).ok());
  EXPECT_TRUE(store().UnmarkInFlight("batch_a", {}).ok());
}

TEST_P(StoreTest, ConcurrentClaimersNeverShareALiveChunk) {
  AddBatch("batch_a", 10, 200, 2);  // 100 chunks
  std::mutex mu;
  std::vector<std::string> claimed;
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      for (;;) {
        auto c = store().ClaimChunk("worker-" + std::to_string(t), {}, 60'000);
        ASSERT_TRUE(c.ok()) << c.status().ToString();
        if (!*c) return;
        std::lock_guard lock(mu);
        claimed.push_back(Key(**c));
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(claimed.size(), 100u);
  EXPECT_EQ(std::set<std::string>(claimed.begin(), claimed.end()).size(), claimed.size());
}

}  // namespace
}  // namespace kvb::store::conformance

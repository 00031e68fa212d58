// The Store contract: group commits (fenced and not), exactly once, usage,
// and reading the rows back (ForEachRequest).
#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "fixture.h"

namespace kvb::store::conformance {
namespace {

ChunkClaim Claim(Store& store, int64_t lease_ms = 60'000) {
  auto c = store.ClaimChunk("worker-1", {}, lease_ms);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_TRUE(c.ok() && c->has_value());
  return c.ok() && *c ? **c : ChunkClaim{};
}

TEST_P(StoreTest, CommitFencedRecordsTheChunksRowsOnce) {
  AddBatch("batch_a", 10, 6, 3);  // chunk 0: 1-3, chunk 1: 4-6
  ChunkClaim c = Claim(store());
  ASSERT_EQ(c.fence.chunk, 0);
  // Line 4 is another chunk's and line 99 does not exist: skipped.
  auto n = store().CommitFenced(c.fence, {Outcome(1), Outcome(2, false, 7, 1, 2), Outcome(4), Outcome(99)}, 60'000);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 2);
  auto b = store().GetBatch("batch_a");
  EXPECT_EQ(b->counts.completed, 1);
  EXPECT_EQ(b->counts.failed, 1);
  EXPECT_EQ(b->usage.input_tokens, 17);
  EXPECT_EQ(b->usage.cached_tokens, 5);
  EXPECT_EQ(b->usage.output_tokens, 5);
  // Again: nothing new, nothing counted twice.
  EXPECT_EQ(*store().CommitFenced(c.fence, {Outcome(1), Outcome(2)}, 60'000), 0);
  EXPECT_EQ(store().GetBatch("batch_a")->counts.completed, 1);
  EXPECT_EQ(store().GetBatch("batch_a")->usage.input_tokens, 17);
  // An empty commit only renews.
  EXPECT_EQ(*store().CommitFenced(c.fence, {}, 60'000), 0);

  auto pending = store().PendingRequests("batch_a");
  ASSERT_EQ(pending->size(), 4u);
  EXPECT_EQ((*pending)[0].line, 3);
  auto rows = AllRequests(store(), "batch_a");
  ASSERT_EQ(rows.size(), 6u);
  EXPECT_EQ(rows[0].state, RequestState::kCompleted);
  EXPECT_EQ(rows[0].result_line, "ok 1");
  EXPECT_EQ(rows[1].state, RequestState::kFailed);
  EXPECT_EQ(rows[1].result_line, "err 2");
  EXPECT_EQ(rows[3].state, RequestState::kPending);
  EXPECT_EQ(rows[3].result_line, "");

  // The last row answered: the chunk is done, never claimed again.
  EXPECT_EQ(*store().CommitFenced(c.fence, {Outcome(3)}, 60'000), 1);
  ChunkClaim next = Claim(store());
  EXPECT_EQ(next.fence.chunk, 1);
  auto none = store().ClaimChunk("worker-1", {}, 60'000);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(*none);
}

TEST_P(StoreTest, CommitFencedWithAStaleTokenWritesNothing) {
  AddBatch("batch_a", 10, 3, 3);
  ChunkClaim old = Claim(store(), 100);
  ChunkClaim now;
  ASSERT_TRUE(WaitFor([&] {
    auto c = store().ClaimChunk("worker-2", {}, 60'000);
    if (!c.ok() || !*c) return false;
    now = **c;
    return true;
  }));
  auto stale = store().CommitFenced(old.fence, {Outcome(1), Outcome(2)}, 60'000);
  EXPECT_EQ(stale.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(stale.status().message().find("lease lost"), std::string::npos) << stale.status().message();
  auto b = store().GetBatch("batch_a");
  EXPECT_EQ(b->counts.completed, 0);
  EXPECT_EQ(b->usage.input_tokens, 0);
  EXPECT_EQ(store().PendingRequests("batch_a")->size(), 3u);
  // The stale commit did not renew the old holder's lease either: the new
  // holder's token is the one that works.
  EXPECT_EQ(*store().CommitFenced(now.fence, {Outcome(1)}, 60'000), 1);
  EXPECT_EQ(store().GetBatch("batch_a")->counts.completed, 1);
}

TEST_P(StoreTest, CommitResultsSkipsAnsweredAndUnknownRows) {
  AddBatch("batch_a", 10, 4, 2);
  // The first outcome given for a line wins.
  auto n = store().CommitResults("batch_a", {Outcome(1), Outcome(1, false), Outcome(3, false), Outcome(42)});
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 2);
  auto b = store().GetBatch("batch_a");
  EXPECT_EQ(b->counts.completed, 1);
  EXPECT_EQ(b->counts.failed, 1);
  EXPECT_EQ(b->usage.input_tokens, 20);
  auto rows = AllRequests(store(), "batch_a");
  EXPECT_EQ(rows[0].result_line, "ok 1");
  EXPECT_EQ(rows[2].result_line, "err 3");
  EXPECT_EQ(*store().CommitResults("batch_a", {Outcome(1), Outcome(3)}), 0);
  EXPECT_EQ(*store().CommitResults("batch_a", {}), 0);

  // Unfenced commits count toward the chunks too: a chunk answered this way
  // is not claimed.
  ASSERT_EQ(*store().CommitResults("batch_a", {Outcome(2)}), 1);
  ChunkClaim c = Claim(store());
  EXPECT_EQ(c.fence.chunk, 1);
  ASSERT_EQ(c.rows.size(), 1u);
  EXPECT_EQ(c.rows[0].line, 4);
}

TEST_P(StoreTest, CommitsAreExactlyOnceUnderConcurrency) {
  constexpr int kRows = 120;
  AddBatch("batch_a", 10, kRows, kRows);  // one chunk
  ChunkClaim c = Claim(store());
  std::vector<RequestOutcome> all;
  for (int line = 1; line <= kRows; ++line) all.push_back(Outcome(line, line % 3 != 0, 1, 1, 1));
  // Eight threads commit every line: half fenced, half not, each in groups
  // of 16 from a different starting point.
  std::atomic<int64_t> recorded{0};
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < kRows; k += 16) {
        std::vector<RequestOutcome> group;
        for (int i = k; i < std::min(kRows, k + 16); ++i) {
          RequestOutcome o = all[static_cast<size_t>((i + t * 37) % kRows)];
          o.result_line += " by " + std::to_string(t);
          group.push_back(o);
        }
        auto n = t % 2 == 0 ? store().CommitFenced(c.fence, group, 60'000) : store().CommitResults("batch_a", group);
        if (n.ok()) recorded += *n;
        else ++errors;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(recorded.load(), kRows);
  auto b = store().GetBatch("batch_a");
  EXPECT_EQ(b->counts.completed + b->counts.failed, kRows);
  EXPECT_EQ(b->counts.failed, kRows / 3);
  EXPECT_EQ(b->usage.input_tokens, kRows);
  EXPECT_EQ(b->usage.output_tokens, kRows);
  for (const StoredRequest& r : AllRequests(store(), "batch_a")) {
    EXPECT_NE(r.state, RequestState::kPending);
    EXPECT_EQ(r.result_line.rfind((r.line % 3 != 0 ? "ok " : "err ") + std::to_string(r.line) + " by ", 0), 0u)
        << r.result_line;
  }
  EXPECT_TRUE(store().PendingRequests("batch_a")->empty());
  EXPECT_EQ(*store().LeasedChunks("batch_a"), 0);
}

TEST_P(StoreTest, UsageSumsOnlyWhatWasRecorded) {
  AddBatch("batch_a", 10, 5, 5);
  ASSERT_EQ(*store().CommitResults("batch_a", {Outcome(1, true, 100, 60, 10), Outcome(2, false, 5, 0, 0)}), 2);
  ASSERT_EQ(*store().CommitResults("batch_a", {Outcome(2, true, 1000, 1000, 1000), Outcome(3, true, 7, 7, 7)}), 1);
  auto b = store().GetBatch("batch_a");
  EXPECT_EQ(b->counts.total, 5);
  EXPECT_EQ(b->counts.completed, 2);
  EXPECT_EQ(b->counts.failed, 1);
  EXPECT_EQ(b->usage.input_tokens, 112);
  EXPECT_EQ(b->usage.cached_tokens, 67);
  EXPECT_EQ(b->usage.output_tokens, 17);
}

TEST_P(StoreTest, StringsAreBinarySafe) {
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_a", 10)).ok());
  const std::string custom_id("id\0\xff\xfe end", 10);
  const std::string result("{\"x\":\"\xc3\x28\"}\0tail", 15);
  ASSERT_TRUE(store().AddRequests("batch_a", {PendingRequest{1, custom_id, 0, 5, 9, 0, 0}}, 11).ok());
  EXPECT_EQ((*store().PendingRequests("batch_a"))[0].custom_id, custom_id);
  ASSERT_EQ(*store().CommitResults("batch_a", {RequestOutcome{1, true, result, 1, 1, 1}}), 1);
  auto rows = AllRequests(store(), "batch_a");
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].custom_id, custom_id);
  EXPECT_EQ(rows[0].result_line, result);
}

TEST_P(StoreTest, ForEachRequestStreamsInLineOrder) {
  constexpr int kRows = 2345;  // several pages of any implementation
  AddBatch("batch_a", 10, kRows, 64);
  std::vector<RequestOutcome> some;
  for (int line = 1; line <= kRows; line += 7) some.push_back(Outcome(line, line % 2 == 0));
  ASSERT_EQ(*store().CommitResults("batch_a", some), static_cast<int64_t>(some.size()));

  int64_t expect_line = 1;
  int visited = 0;
  Status s = store().ForEachRequest("batch_a", [&](const StoredRequest& r) {
    EXPECT_EQ(r.line, expect_line++);
    EXPECT_EQ(r.custom_id, "req-" + std::to_string(r.line));
    if ((r.line - 1) % 7 == 0) {
      EXPECT_EQ(r.state, r.line % 2 == 0 ? RequestState::kCompleted : RequestState::kFailed);
      EXPECT_EQ(r.result_line, (r.line % 2 == 0 ? "ok " : "err ") + std::to_string(r.line));
    } else {
      EXPECT_EQ(r.state, RequestState::kPending);
    }
    // The callback may call the store, writes included.
    if (r.line == 1500) {
      auto b = store().GetBatch("batch_a");
      EXPECT_TRUE(b.ok()) << b.status().ToString();
      auto n = store().CommitResults("batch_a", {Outcome(2)});
      EXPECT_TRUE(n.ok()) << n.status().ToString();
    }
    ++visited;
    return Status::Ok();
  });
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(visited, kRows);

  // A callback's error stops the visit and is returned.
  visited = 0;
  s = store().ForEachRequest("batch_a", [&](const StoredRequest& r) {
    ++visited;
    return r.line == 1001 ? Status::Cancelled("enough") : Status::Ok();
  });
  EXPECT_EQ(s.code(), StatusCode::kCancelled);
  EXPECT_EQ(visited, 1001);

  // A batch without rows visits nothing.
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_b", 10)).ok());
  EXPECT_TRUE(AllRequests(store(), "batch_b").empty());
}

}  // namespace
}  // namespace kvb::store::conformance

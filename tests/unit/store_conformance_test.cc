// The Store contract (src/store/store.h), one suite for every implementation:
// SQLite in memory, SQLite on a file, PostgreSQL. This file: batch records
// and their lifecycle. The rest of the suite is in store_conformance/
// (files, chunks and leases, commits, PostgreSQL-only tests); the fixture
// is store_conformance/fixture.h.
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "store_conformance/fixture.h"

namespace kvb::store::conformance {
namespace {

std::vector<std::string> Ids(const std::vector<BatchRecord>& batches) {
  std::vector<std::string> ids;
  for (const BatchRecord& b : batches) ids.push_back(b.id);
  return ids;
}

TEST_P(StoreTest, BatchRoundTripsEveryField) {
  BatchRecord b = MakeBatch("batch_a", 1000);
  b.status = BatchStatus::kInProgress;
  b.output_file_id = "file-out";
  b.error_file_id = "file-err";
  b.metadata_json = R"({"k":"v \u00e9"})";
  b.errors = {{"invalid_json", "line 2 is not JSON", "body", 2}, {"too_big", "message", "", 0}};
  int64_t t = 1001;
  for (int64_t* f : {&b.in_progress_at, &b.finalizing_at, &b.completed_at, &b.failed_at, &b.expired_at,
                     &b.cancelling_at, &b.cancelled_at})
    *f = t++;
  b.counts = {10, 4, 2};
  b.usage = {100, 40, 30};
  b.priority = -7;
  b.paused = true;
  ASSERT_TRUE(store().PutBatch(b).ok());

  auto got = store().GetBatch("batch_a");
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->id, b.id);
  EXPECT_EQ(got->endpoint, b.endpoint);
  EXPECT_EQ(got->input_file_id, b.input_file_id);
  EXPECT_EQ(got->completion_window, b.completion_window);
  EXPECT_EQ(got->status, BatchStatus::kInProgress);
  EXPECT_EQ(got->output_file_id, b.output_file_id);
  EXPECT_EQ(got->error_file_id, b.error_file_id);
  EXPECT_EQ(got->metadata_json, b.metadata_json);
  ASSERT_EQ(got->errors.size(), 2u);
  EXPECT_EQ(got->errors[0].code, "invalid_json");
  EXPECT_EQ(got->errors[0].message, "line 2 is not JSON");
  EXPECT_EQ(got->errors[0].param, "body");
  EXPECT_EQ(got->errors[0].line, 2);
  EXPECT_EQ(got->errors[1].param, "");
  EXPECT_EQ(got->errors[1].line, 0);
  EXPECT_EQ(got->created_at, b.created_at);
  EXPECT_EQ(got->in_progress_at, b.in_progress_at);
  EXPECT_EQ(got->expires_at, b.expires_at);
  EXPECT_EQ(got->finalizing_at, b.finalizing_at);
  EXPECT_EQ(got->completed_at, b.completed_at);
  EXPECT_EQ(got->failed_at, b.failed_at);
  EXPECT_EQ(got->expired_at, b.expired_at);
  EXPECT_EQ(got->cancelling_at, b.cancelling_at);
  EXPECT_EQ(got->cancelled_at, b.cancelled_at);
  EXPECT_EQ(got->counts.total, 10);
  EXPECT_EQ(got->counts.completed, 4);
  EXPECT_EQ(got->counts.failed, 2);
  EXPECT_EQ(got->usage.input_tokens, 100);
  EXPECT_EQ(got->usage.cached_tokens, 40);
  EXPECT_EQ(got->usage.output_tokens, 30);
  EXPECT_EQ(got->priority, -7);
  EXPECT_TRUE(got->paused);

  // Nulls stay nulls.
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_b", 1000)).ok());
  auto plain = store().GetBatch("batch_b");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->output_file_id, "");
  EXPECT_EQ(plain->metadata_json, "");
  EXPECT_TRUE(plain->errors.empty());
  EXPECT_EQ(plain->status, BatchStatus::kValidating);
}

TEST_P(StoreTest, DuplicateAndUnknownBatchIds) {
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_a", 1)).ok());
  Status dup = store().PutBatch(MakeBatch("batch_a", 2));
  EXPECT_EQ(dup.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(dup.message().find("already exists"), std::string::npos) << dup.message();
  EXPECT_EQ(store().GetBatch("batch_a")->created_at, 1);  // the first one kept

  EXPECT_EQ(store().GetBatch("batch_nope").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store().GetBatch(std::string("batch_\xff\0x", 8)).status().code(), StatusCode::kNotFound);
  const std::vector<BatchStatus> from = {BatchStatus::kValidating};
  EXPECT_EQ(store().TransitionBatch("batch_nope", from, BatchStatus::kCancelling, 5).status().code(),
            StatusCode::kNotFound);
  EXPECT_EQ(store().SetBatchControl("batch_nope", true, std::nullopt).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store().LeaseBatch("batch_nope", "node-a", 1000).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store().FailBatch("batch_nope", {}, 5).code(), StatusCode::kNotFound);
  EXPECT_EQ(store()
                .FinalizeBatch("batch_nope", BatchStatus::kCancelling, BatchStatus::kCancelled, 5, std::nullopt,
                               std::nullopt)
                .status()
                .code(),
            StatusCode::kNotFound);
  EXPECT_EQ(store().AddRequests("batch_nope", {}, 5).code(), StatusCode::kNotFound);
  EXPECT_EQ(store().PendingRequests("batch_nope").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store().LeasedChunks("batch_nope").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store().CommitResults("batch_nope", {Outcome(1)}).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store().ForEachRequest("batch_nope", [](const StoredRequest&) { return Status::Ok(); }).code(),
            StatusCode::kNotFound);
}

TEST_P(StoreTest, ListBatchesNewestFirstWithPaging) {
  // c and d share a second: creation (insertion) order breaks the tie.
  for (auto [id, t] : std::vector<std::pair<std::string, int64_t>>{
           {"batch_a", 10}, {"batch_b", 20}, {"batch_c", 30}, {"batch_d", 30}, {"batch_e", 40}})
    ASSERT_TRUE(store().PutBatch(MakeBatch(id, t)).ok());
  auto all = store().ListBatches("", 100);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(Ids(*all), (std::vector<std::string>{"batch_e", "batch_d", "batch_c", "batch_b", "batch_a"}));

  std::vector<std::string> paged;
  std::string after;
  for (int pages = 0; pages < 10; ++pages) {
    auto page = store().ListBatches(after, 2);
    ASSERT_TRUE(page.ok());
    if (page->empty()) break;
    for (auto& b : *page) paged.push_back(b.id);
    after = page->back().id;
  }
  EXPECT_EQ(paged, Ids(*all));
  EXPECT_TRUE(store().ListBatches("batch_nope", 10)->empty());
  EXPECT_TRUE(store().ListBatches("", 0)->empty());
  EXPECT_TRUE(store().ListBatches("", -1)->empty());
}

TEST_P(StoreTest, BatchesWithStatusOldestFirst) {
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_a", 30)).ok());
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_b", 10)).ok());
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_c", 20)).ok());
  ASSERT_TRUE(store().TransitionBatch("batch_c", {BatchStatus::kValidating}, BatchStatus::kCancelling, 50).ok());
  auto validating = store().BatchesWithStatus({BatchStatus::kValidating});
  ASSERT_TRUE(validating.ok());
  EXPECT_EQ(Ids(*validating), (std::vector<std::string>{"batch_b", "batch_a"}));
  auto both = store().BatchesWithStatus({BatchStatus::kCancelling, BatchStatus::kValidating});
  EXPECT_EQ(Ids(*both), (std::vector<std::string>{"batch_b", "batch_c", "batch_a"}));
  EXPECT_TRUE(store().BatchesWithStatus({})->empty());
  EXPECT_TRUE(store().BatchesWithStatus({BatchStatus::kCompleted})->empty());
}

TEST_P(StoreTest, TransitionBatchIsCompareAndSet) {
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_a", 10)).ok());
  // Not a lifecycle transition: refused whatever the status.
  auto bad = store().TransitionBatch("batch_a", {BatchStatus::kValidating}, BatchStatus::kCompleted, 20);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  bad = store().TransitionBatch("batch_a", {BatchStatus::kValidating, BatchStatus::kCompleted},
                                BatchStatus::kCancelling, 20);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);

  // Allowed from the current status: moved, its timestamp set.
  auto moved = store().TransitionBatch("batch_a", {BatchStatus::kInProgress, BatchStatus::kValidating},
                                       BatchStatus::kCancelling, 20);
  ASSERT_TRUE(moved.ok()) << moved.status().ToString();
  EXPECT_EQ(moved->status, BatchStatus::kCancelling);
  EXPECT_EQ(moved->cancelling_at, 20);
  EXPECT_EQ(store().GetBatch("batch_a")->status, BatchStatus::kCancelling);

  // The same move again lost the race: FailedPrecondition naming the status, nothing changed.
  auto lost = store().TransitionBatch("batch_a", {BatchStatus::kValidating}, BatchStatus::kCancelling, 30);
  EXPECT_EQ(lost.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(lost.status().message().find("cancelling"), std::string::npos) << lost.status().message();
  EXPECT_EQ(store().GetBatch("batch_a")->cancelling_at, 20);

  auto done = store().TransitionBatch("batch_a", {BatchStatus::kCancelling}, BatchStatus::kCancelled, 40);
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->cancelled_at, 40);
  EXPECT_EQ(done->cancelling_at, 20);

  // in_progress -> finalizing / expired set their own timestamps.
  AddBatch("batch_b", 50, 3, 2);
  auto fin = store().TransitionBatch("batch_b", {BatchStatus::kInProgress}, BatchStatus::kFinalizing, 60);
  ASSERT_TRUE(fin.ok());
  EXPECT_EQ(fin->finalizing_at, 60);
  AddBatch("batch_c", 50, 3, 2);
  auto exp = store().TransitionBatch("batch_c", {BatchStatus::kInProgress}, BatchStatus::kExpired, 70);
  ASSERT_TRUE(exp.ok());
  EXPECT_EQ(exp->expired_at, 70);
}

TEST_P(StoreTest, TransitionRacesHaveOneWinner) {
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_a", 10)).ok());
  std::atomic<int> won{0}, lost{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&] {
      auto r = store().TransitionBatch("batch_a", {BatchStatus::kValidating}, BatchStatus::kCancelling, 20);
      if (r.ok()) ++won;
      else if (r.status().code() == StatusCode::kFailedPrecondition) ++lost;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(won.load(), 1);
  EXPECT_EQ(lost.load(), 5);
}

TEST_P(StoreTest, SetBatchControlChangesOnlyWhatIsGiven) {
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_a", 10)).ok());
  auto paused = store().SetBatchControl("batch_a", true, std::nullopt);
  ASSERT_TRUE(paused.ok()) << paused.status().ToString();
  EXPECT_TRUE(paused->paused);
  EXPECT_EQ(paused->priority, 0);
  auto prio = store().SetBatchControl("batch_a", std::nullopt, 5);
  ASSERT_TRUE(prio.ok());
  EXPECT_TRUE(prio->paused);
  EXPECT_EQ(prio->priority, 5);
  auto both = store().SetBatchControl("batch_a", false, -2);
  ASSERT_TRUE(both.ok());
  EXPECT_FALSE(both->paused);
  EXPECT_EQ(both->priority, -2);
  EXPECT_FALSE(store().GetBatch("batch_a")->paused);

  ASSERT_TRUE(store().FailBatch("batch_a", {}, 20).ok());
  EXPECT_EQ(store().SetBatchControl("batch_a", true, std::nullopt).status().code(),
            StatusCode::kFailedPrecondition);
  EXPECT_FALSE(store().GetBatch("batch_a")->paused);
}

TEST_P(StoreTest, LeaseBatchIsHeldByOneOwnerUntilItExpires) {
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_a", 10)).ok());
  EXPECT_TRUE(*store().LeaseBatch("batch_a", "node-a", 150));   // free
  EXPECT_FALSE(*store().LeaseBatch("batch_a", "node-b", 150));  // held by another
  EXPECT_TRUE(*store().LeaseBatch("batch_a", "node-a", 150));   // own: renewed
  // Expired: the other owner gets it, and then holds it.
  EXPECT_TRUE(WaitFor([&] { return *store().LeaseBatch("batch_a", "node-b", 60'000); }));
  EXPECT_FALSE(*store().LeaseBatch("batch_a", "node-a", 150));
}

TEST_P(StoreTest, FailBatchOnlyFromValidating) {
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_a", 10)).ok());
  ASSERT_TRUE(store().FailBatch("batch_a", {{"invalid_json", "bad line", "", 3}}, 20).ok());
  auto b = store().GetBatch("batch_a");
  EXPECT_EQ(b->status, BatchStatus::kFailed);
  EXPECT_EQ(b->failed_at, 20);
  ASSERT_EQ(b->errors.size(), 1u);
  EXPECT_EQ(b->errors[0].line, 3);
  EXPECT_EQ(store().FailBatch("batch_a", {}, 30).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store().GetBatch("batch_a")->failed_at, 20);

  AddBatch("batch_b", 10, 2, 2);
  EXPECT_EQ(store().FailBatch("batch_b", {}, 30).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store().GetBatch("batch_b")->status, BatchStatus::kInProgress);
}

TEST_P(StoreTest, FinalizeBatchStoresFilesOnceAndConditionally) {
  AddBatch("batch_a", 10, 4, 2);
  ASSERT_TRUE(store().TransitionBatch("batch_a", {BatchStatus::kInProgress}, BatchStatus::kFinalizing, 20).ok());
  const std::string out_text = "{\"id\":\"r1\"}\n{\"id\":\"r2\"}\n", err_text = "{\"id\":\"e1\"}\n";
  ResultFile out{MakeFile("file-out", 30, static_cast<int64_t>(out_text.size()), "batch_output"),
                 LocalCopy("out.jsonl", out_text)};
  ResultFile err{MakeFile("file-err", 30, static_cast<int64_t>(err_text.size()), "batch_output"),
                 LocalCopy("err.jsonl", err_text)};
  // Not a finalization (in_progress is not final): refused.
  EXPECT_EQ(store()
                .FinalizeBatch("batch_a", BatchStatus::kInProgress, BatchStatus::kFinalizing, 30, out, err)
                .status()
                .code(),
            StatusCode::kInvalidArgument);

  auto done = store().FinalizeBatch("batch_a", BatchStatus::kFinalizing, BatchStatus::kCompleted, 30, out, err);
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  EXPECT_EQ(done->status, BatchStatus::kCompleted);
  EXPECT_EQ(done->completed_at, 30);
  EXPECT_EQ(done->output_file_id, "file-out");
  EXPECT_EQ(done->error_file_id, "file-err");
  EXPECT_EQ(ReadAll("file-out"), out_text);
  EXPECT_EQ(ReadAll("file-err"), err_text);
  EXPECT_EQ(store().GetFile("file-out")->purpose, "batch_output");
  EXPECT_FALSE(std::filesystem::exists(out.local_path));
  EXPECT_FALSE(std::filesystem::exists(err.local_path));

  // A second finalization (another node) fails and stores nothing; its
  // local files stay the caller's.
  ResultFile again{MakeFile("file-out2", 40, 3, "batch_output"), LocalCopy("out2.jsonl", "abc")};
  auto second = store().FinalizeBatch("batch_a", BatchStatus::kFinalizing, BatchStatus::kCompleted, 40, again,
                                      std::nullopt);
  EXPECT_EQ(second.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store().GetFile("file-out2").status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(std::filesystem::exists(again.local_path));
  EXPECT_EQ(store().GetBatch("batch_a")->output_file_id, "file-out");
  EXPECT_EQ(store().GetBatch("batch_a")->completed_at, 30);

  // Without files: no ids.
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_b", 10)).ok());
  ASSERT_TRUE(store().TransitionBatch("batch_b", {BatchStatus::kValidating}, BatchStatus::kCancelling, 20).ok());
  auto cancelled = store().FinalizeBatch("batch_b", BatchStatus::kCancelling, BatchStatus::kCancelled, 50,
                                         std::nullopt, std::nullopt);
  ASSERT_TRUE(cancelled.ok()) << cancelled.status().ToString();
  EXPECT_EQ(cancelled->status, BatchStatus::kCancelled);
  EXPECT_EQ(cancelled->cancelled_at, 50);
  EXPECT_EQ(cancelled->output_file_id, "");
  EXPECT_EQ(cancelled->error_file_id, "");
}

TEST_P(StoreTest, AddRequestsMovesToInProgressWithCounts) {
  AddBatch("batch_a", 10, 5, 2);
  auto b = store().GetBatch("batch_a");
  EXPECT_EQ(b->status, BatchStatus::kInProgress);
  EXPECT_EQ(b->in_progress_at, 11);
  EXPECT_EQ(b->counts.total, 5);
  EXPECT_EQ(b->counts.completed, 0);
  EXPECT_EQ(b->counts.failed, 0);
  auto pending = store().PendingRequests("batch_a");
  ASSERT_TRUE(pending.ok());
  ASSERT_EQ(pending->size(), 5u);
  for (int i = 0; i < 5; ++i) {
    const PendingRequest& r = (*pending)[i];
    EXPECT_EQ(r.line, i + 1);
    EXPECT_EQ(r.custom_id, "req-" + std::to_string(i + 1));
    EXPECT_EQ(r.offset, (i + 1) * 100);
    EXPECT_EQ(r.length, 51 + i);
    EXPECT_EQ(r.chunk, i / 2);
    EXPECT_EQ(r.prefix_hash, 0xF000'0000'0000'0000ULL + static_cast<uint64_t>(i / 2));
    EXPECT_EQ(r.crashes, 0);
  }
  // Only from validating.
  EXPECT_EQ(store().AddRequests("batch_a", {}, 20).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(store().PendingRequests("batch_a")->size(), 5u);

  // A line given twice: refused, nothing changed.
  ASSERT_TRUE(store().PutBatch(MakeBatch("batch_b", 10)).ok());
  PendingRequest r{1, "x", 0, 1, 7, 0, 0};
  EXPECT_EQ(store().AddRequests("batch_b", {r, r}, 20).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store().GetBatch("batch_b")->status, BatchStatus::kValidating);
  EXPECT_TRUE(store().PendingRequests("batch_b")->empty());
}

}  // namespace
}  // namespace kvb::store::conformance

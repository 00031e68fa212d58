// RunStore (`kvbatch run`'s store): chunks are claimed and fenced as in the
// database stores, answers land in the result log exactly once, and
// in-flight marks in the crash journal.
#include "worker/run_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "batch/response.h"

namespace kvb::worker {
namespace {

namespace fs = std::filesystem;

class RunStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("kvb_run_store_test_" + std::to_string(getpid()) + "_" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
    out_ = (dir_ / "out.jsonl").string();
    auto log = batch::ResultLog::Open(out_, (dir_ / "err.jsonl").string());
    ASSERT_TRUE(log.ok()) << log.status().message();
    log_.emplace(std::move(log).value());
    auto journal = batch::CrashJournal::Open(out_ + ".inflight", {});
    ASSERT_TRUE(journal.ok()) << journal.status().message();
    journal_.emplace(std::move(journal).value());
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Rows 1..n, `per_chunk` to a chunk; `suspect` (if > 0) crashed once.
  static std::vector<store::PendingRequest> Rows(int n, int per_chunk, int64_t suspect = 0) {
    std::vector<store::PendingRequest> rows;
    for (int i = 1; i <= n; ++i) {
      store::PendingRequest& p = rows.emplace_back();
      p.line = i;
      p.custom_id = "r" + std::to_string(i);
      p.prefix_hash = static_cast<uint64_t>((i - 1) / per_chunk) + 100;
      p.chunk = (i - 1) / per_chunk;
      p.crashes = i == suspect ? 1 : 0;
    }
    return rows;
  }
  static store::RequestOutcome Ok(int64_t line) {
    return {line, true, batch::SuccessLine("r" + std::to_string(line), {{"x", line}}), 3, 1, 2};
  }
  static store::RequestOutcome Failed(int64_t line, const std::string& code) {
    return {line, false, batch::RequestErrorLine("r" + std::to_string(line), code, "no"), 0, 0, 0};
  }
  static std::string Read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

  fs::path dir_;
  std::string out_;
  std::optional<batch::ResultLog> log_;
  std::optional<batch::CrashJournal> journal_;
};

TEST_F(RunStoreTest, ClaimsSuspectsFirstThenChunkOrderAndCommitsEachRowOnce) {
  RunStore s("in.jsonl", Rows(6, 2, /*suspect=*/5), &*log_, &*journal_);
  auto a = s.ClaimChunk("run", {}, 1000);
  ASSERT_TRUE(a.ok() && a->has_value());
  EXPECT_EQ((*a)->fence.chunk, 2);  // holds the suspect
  ASSERT_EQ((*a)->rows.size(), 2u);
  EXPECT_EQ((*a)->rows[0].crashes, 1);
  auto b = s.ClaimChunk("run", {}, 1000);
  ASSERT_TRUE(b.ok() && b->has_value());
  EXPECT_EQ((*b)->fence.chunk, 0);

  // A row of another chunk is not this holder's to answer.
  auto n = s.CommitFenced((*b)->fence, {Ok(1), Ok(5)}, 1000);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 1);
  // Answered once: a second commit of row 1 records nothing.
  n = s.CommitFenced((*b)->fence, {Ok(1), Failed(2, "some_code")}, 1000);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 1);
  // Chunk 0 is answered: its lease is free, and a commit on it is refused.
  EXPECT_EQ(s.CommitFenced((*b)->fence, {Ok(2)}, 1000).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(*s.LeasedChunks(RunStore::kBatchId), 1);

  RunTally t = s.Tally();
  EXPECT_EQ(t.ok, 1);
  EXPECT_EQ(t.failed, 1);
  EXPECT_EQ(t.failures["some_code"], 1);
  EXPECT_EQ(t.usage.output_tokens, 2);
  EXPECT_TRUE(log_->answered().count("r1"));
  EXPECT_TRUE(log_->answered().count("r2"));
  EXPECT_FALSE(s.Done());
}

TEST_F(RunStoreTest, AReleasedChunkIsClaimedAgainWithANewTokenAndTheOldOneIsFenced) {
  RunStore s("in.jsonl", Rows(4, 2), &*log_, &*journal_);
  auto a = s.ClaimChunk("run", {}, 1000);
  ASSERT_TRUE(a.ok() && a->has_value());
  ASSERT_TRUE(s.CommitFenced((*a)->fence, {Ok(1)}, 1000).ok());
  ASSERT_TRUE(s.ReleaseChunk((*a)->fence).ok());
  // A resident prefix group is preferred over chunk order.
  auto b = s.ClaimChunk("run", {101}, 1000);
  ASSERT_TRUE(b.ok() && b->has_value());
  EXPECT_EQ((*b)->fence.chunk, 1);
  auto c = s.ClaimChunk("run", {}, 1000);
  ASSERT_TRUE(c.ok() && c->has_value());
  EXPECT_EQ((*c)->fence.chunk, 0);
  ASSERT_EQ((*c)->rows.size(), 1u);  // only what is still pending
  EXPECT_EQ((*c)->rows[0].line, 2);
  EXPECT_EQ(s.RenewLease((*a)->fence, 1000).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.CommitFenced((*a)->fence, {Ok(2)}, 1000).status().code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(s.CommitFenced((*c)->fence, {Ok(2)}, 1000).ok());
  ASSERT_TRUE(s.CommitFenced((*b)->fence, {Ok(3), Ok(4)}, 1000).ok());
  EXPECT_TRUE(s.Done());
  auto none = s.ClaimChunk("run", {}, 1000);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

TEST_F(RunStoreTest, InFlightMarksGoToTheJournalAndTheInputIsTheLocalFile) {
  RunStore s("/data/in.jsonl", Rows(2, 2), &*log_, &*journal_);
  ASSERT_TRUE(s.MarkInFlight(RunStore::kBatchId, {1, 2}).ok());
  ASSERT_TRUE(s.UnmarkInFlight(RunStore::kBatchId, {1}).ok());
  const std::string journal = Read(out_ + ".inflight");
  EXPECT_NE(journal.find("+ 1"), std::string::npos) << journal;
  EXPECT_NE(journal.find("- 1"), std::string::npos) << journal;
  auto rec = s.GetBatch(RunStore::kBatchId);
  ASSERT_TRUE(rec.ok());
  EXPECT_EQ(rec->status, store::BatchStatus::kInProgress);
  EXPECT_EQ(rec->counts.total, 2);
  auto path = s.LocalFile(rec->input_file_id, "");
  ASSERT_TRUE(path.ok());
  EXPECT_EQ(*path, "/data/in.jsonl");
  EXPECT_EQ(s.GetBatch("batch_other").status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvb::worker

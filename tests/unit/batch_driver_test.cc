// The batch driver (keeper + chunk runner) on a real SQLite store with a fake
// engine: lifecycle, exactly-once results, several runners on one store,
// lost leases, cancel, pause, reclaims. No model.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "store/sqlite_store.h"
#include "support/fake_engine.h"
#include "worker/batch_driver.h"

namespace {

namespace ks = kvb::store;
namespace kw = kvb::worker;
using kvb::Status;
using kvb::testing::FakeEngine;
using nlohmann::json;

class DriverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvb_driver_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    store_ = OpenStore();
  }
  void TearDown() override {
    store_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::unique_ptr<ks::SqliteStore> OpenStore() {
    auto s = ks::SqliteStore::Open(dir_ + "/kvb.db", dir_);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return std::move(s).value();
  }
  kw::DriverOptions Options(int64_t lease_ms = 30'000) {
    kw::DriverOptions o;
    o.cache_dir = dir_;
    o.chunk_rows = 8;
    o.lease_ms = lease_ms;
    o.poll_interval = std::chrono::milliseconds(10);
    o.commit_interval = std::chrono::milliseconds(10);
    return o;
  }
  // A batch of n chat lines; every 10 lines share a system prompt.
  std::string CreateBatch(int n, const std::string& extra_line = "") {
    std::string text;
    for (int i = 0; i < n; ++i) {
      json line = {{"custom_id", "id-" + std::to_string(i)},
                   {"method", "POST"},
                   {"url", "/v1/chat/completions"},
                   {"body",
                    {{"messages",
                      {{{"role", "system"}, {"content", "rubric " + std::to_string(i / 10)}},
                       {{"role", "user"}, {"content", "candidate " + std::to_string(i)}}}}}}};
      text += line.dump() + "\n";
    }
    text += extra_line;
    const std::string file_id = "file-" + std::to_string(++files_);
    const std::string local = dir_ + "/upload" + std::to_string(files_);
    FILE* f = std::fopen(local.c_str(), "wb");
    std::fwrite(text.data(), 1, text.size(), f);
    std::fclose(f);
    EXPECT_TRUE(store_->PutFile({file_id, "in.jsonl", "batch", static_cast<int64_t>(text.size()), 1, 0}, local).ok());
    ks::BatchRecord b;
    b.id = "batch_" + std::to_string(files_);
    b.endpoint = "/v1/chat/completions";
    b.input_file_id = file_id;
    b.completion_window = "24h";
    b.created_at = 1;
    EXPECT_TRUE(store_->PutBatch(b).ok());
    return b.id;
  }
  bool WaitFor(const std::function<bool()>& done, int timeout_ms = 20'000) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (std::chrono::steady_clock::now() < until) {
      if (done()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return done();
  }
  // One keeper pass: validates the batches waiting for it.
  void Validate() { kw::BatchKeeper(store_.get(), Options()).Tick(); }
  ks::BatchStatus StatusOf(const std::string& id) { return store_->GetBatch(id)->status; }
  bool Ended(const std::string& id) { return ks::IsFinal(StatusOf(id)); }
  std::string Content(const std::string& file_id) {
    if (file_id.empty()) return "";
    std::string out;
    EXPECT_TRUE(store_->ReadFile(file_id, 0, int64_t{1} << 30, &out).ok());
    return out;
  }
  // custom_id -> how often it appears across output and error files; the
  // error codes seen.
  std::map<std::string, int> Answers(const std::string& batch_id, std::map<std::string, int>* codes = nullptr) {
    auto b = store_->GetBatch(batch_id);
    std::map<std::string, int> seen;
    for (const std::string& id : {b->output_file_id, b->error_file_id}) {
      std::string text = Content(id);
      size_t start = 0;
      while (start < text.size()) {
        size_t end = text.find('\n', start);
        json j = json::parse(text.substr(start, end - start));
        ++seen[j["custom_id"].get<std::string>()];
        if (codes && j["error"].is_object()) ++(*codes)[j["error"]["code"].get<std::string>()];
        if (codes && j["response"].is_object() && j["response"]["status_code"] != 200) ++(*codes)["http_error"];
        start = end + 1;
      }
    }
    return seen;
  }

  std::string dir_;
  std::unique_ptr<ks::SqliteStore> store_;
  int files_ = 0;
};

TEST_F(DriverTest, ABatchRunsThroughItsLifecycleWithEachLineOnce) {
  FakeEngine engine;
  kw::BatchDriver driver(store_.get(), &engine, Options());
  driver.Start();
  const std::string id = CreateBatch(50, R"({"custom_id":"bad","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"fail me"}]}})"
                                         "\n");
  ASSERT_TRUE(WaitFor([&] { return Ended(id); }));
  auto b = store_->GetBatch(id);
  EXPECT_EQ(b->status, ks::BatchStatus::kCompleted);
  EXPECT_EQ(b->counts.total, 51);
  EXPECT_EQ(b->counts.completed, 50);
  EXPECT_EQ(b->counts.failed, 1);
  EXPECT_EQ(b->usage.input_tokens, 150);
  EXPECT_EQ(b->usage.output_tokens, 100);
  EXPECT_GT(b->in_progress_at, 0);
  EXPECT_GT(b->finalizing_at, 0);
  auto seen = Answers(id);
  EXPECT_EQ(seen.size(), 51u);
  for (const auto& [cid, n] : seen) EXPECT_EQ(n, 1) << cid;
  EXPECT_NE(Content(b->output_file_id).find("echo: candidate 7"), std::string::npos);
  EXPECT_NE(Content(b->error_file_id).find("asked to fail"), std::string::npos);
  auto stats = driver.Stats();
  ASSERT_TRUE(stats.has_value());
  EXPECT_EQ(stats->results_committed, 51);
  // Chunks follow the shared prefixes: the 5 rubrics (the failing line's
  // one-row group fills up the last rubric's chunk).
  EXPECT_EQ(stats->distinct_prefixes, 5);
}

TEST_F(DriverTest, AnInvalidFileFailsValidationWithLineNumbers) {
  FakeEngine engine;
  kw::BatchDriver driver(store_.get(), &engine, Options());
  driver.Start();
  const std::string id = CreateBatch(3, "not json\n");
  ASSERT_TRUE(WaitFor([&] { return Ended(id); }));
  auto b = store_->GetBatch(id);
  EXPECT_EQ(b->status, ks::BatchStatus::kFailed);
  ASSERT_FALSE(b->errors.empty());
  EXPECT_EQ(b->errors[0].line, 4);
  EXPECT_EQ(engine.submitted(), 0);
}

// Data parallel on one store: two engines (two runners, each with its own
// store connection) share the chunks; every line is answered once.
TEST_F(DriverTest, TwoEnginesShareOneBatch) {
  FakeEngine a("a"), b("b");
  // Held until both have claimed work: a fast fake engine could otherwise
  // finish the batch before the other runner's first claim.
  a.Hold();
  b.Hold();
  auto store_b = OpenStore();
  kw::DriverOptions o = Options();
  o.window = 16;
  kw::BatchDriver da(store_.get(), &a, o), db(store_b.get(), &b, o);
  da.Start();
  db.Start();
  const std::string id = CreateBatch(400);
  ASSERT_TRUE(WaitFor([&] { return a.submitted() > 0 && b.submitted() > 0; }));
  a.Release();
  b.Release();
  ASSERT_TRUE(WaitFor([&] { return Ended(id); }));
  EXPECT_EQ(StatusOf(id), ks::BatchStatus::kCompleted);
  auto seen = Answers(id);
  EXPECT_EQ(seen.size(), 400u);
  for (const auto& [cid, n] : seen) EXPECT_EQ(n, 1) << cid;
  EXPECT_EQ(da.Stats()->results_committed + db.Stats()->results_committed, 400);
  EXPECT_GT(a.submitted(), 0);
  EXPECT_GT(b.submitted(), 0);
}

// A runner that stalls past its lease (paused, cut off) loses its chunk to
// another; when it wakes, its late results are rejected, not doubled.
TEST_F(DriverTest, AStaleRunnersResultsAreRejected) {
  const std::string id = CreateBatch(8);  // one chunk
  FakeEngine slow("slow");
  slow.Hold();
  auto store_b = OpenStore();
  kw::BatchDriver stale(store_.get(), &slow, Options(/*lease_ms=*/150));
  stale.Start();
  ASSERT_TRUE(WaitFor([&] { return slow.submitted() == 8; }));
  // The stale holder's renewals stop being possible: a second claimer takes
  // over once the lease lapses (simulated by a store that claims directly).
  std::this_thread::sleep_for(std::chrono::milliseconds(0));
  auto taken = store_b->ClaimChunk("other", {}, 60'000);
  // Its lease is renewed every lease/3, so nothing is claimable yet.
  ASSERT_TRUE(taken.ok());
  EXPECT_FALSE(taken->has_value()) << "a live holder's chunk is not claimable";
  stale.Stop();  // the holder gives it back cleanly...
  slow.Release();
  FakeEngine fast("fast");
  kw::BatchDriver fresh(store_b.get(), &fast, Options());
  fresh.Start();
  ASSERT_TRUE(WaitFor([&] { return Ended(id); }));
  auto seen = Answers(id);
  EXPECT_EQ(seen.size(), 8u);
  for (const auto& [cid, n] : seen) EXPECT_EQ(n, 1) << cid;
}

TEST_F(DriverTest, ALeaseTakenOverDropsTheOldHoldersWork) {
  const std::string id = CreateBatch(8);  // one chunk
  Validate();
  // The old holder: claimed directly, its token kept, then its lease lapses.
  auto old = store_->ClaimChunk("old", {}, 50);
  ASSERT_TRUE(old.ok() && old->has_value());
  std::this_thread::sleep_for(std::chrono::milliseconds(80));
  FakeEngine engine;
  kw::BatchDriver driver(store_.get(), &engine, Options());
  driver.Start();
  ASSERT_TRUE(WaitFor([&] { return Ended(id); }));
  // The old holder wakes and commits: rejected, nothing written.
  ks::RequestOutcome late{1, true, "late", 1, 0, 1};
  auto n = store_->CommitFenced((*old)->fence, {late}, 1000);
  EXPECT_EQ(n.status().code(), kvb::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Content(store_->GetBatch(id)->output_file_id).find("late"), std::string::npos);
  auto seen = Answers(id);
  EXPECT_EQ(seen.size(), 8u);
}

TEST_F(DriverTest, CancelAnswersEveryLineOnceAndEndsCancelled) {
  FakeEngine engine;
  engine.Hold();
  kw::BatchDriver driver(store_.get(), &engine, Options());
  driver.Start();
  const std::string id = CreateBatch(100);
  ASSERT_TRUE(WaitFor([&] { return engine.submitted() > 0; }));
  ASSERT_TRUE(store_->TransitionBatch(id, {ks::BatchStatus::kInProgress}, ks::BatchStatus::kCancelling, 5).ok());
  driver.Wake();
  ASSERT_TRUE(WaitFor([&] { return Ended(id); }));
  EXPECT_EQ(StatusOf(id), ks::BatchStatus::kCancelled);
  std::map<std::string, int> codes;
  auto seen = Answers(id, &codes);
  EXPECT_EQ(seen.size(), 100u);
  for (const auto& [cid, n] : seen) EXPECT_EQ(n, 1) << cid;
  EXPECT_EQ(codes["batch_cancelled"], 100);
}

TEST_F(DriverTest, APausedBatchIsNotFedUntilResumed) {
  FakeEngine engine;
  kw::BatchDriver driver(store_.get(), &engine, Options());
  const std::string id = CreateBatch(30);
  ASSERT_TRUE(store_->SetBatchControl(id, true, std::nullopt).ok());
  driver.Start();
  ASSERT_TRUE(WaitFor([&] { return StatusOf(id) == ks::BatchStatus::kInProgress; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(engine.submitted(), 0);
  ASSERT_TRUE(store_->SetBatchControl(id, false, std::nullopt).ok());
  driver.Wake();
  ASSERT_TRUE(WaitFor([&] { return Ended(id); }));
  EXPECT_EQ(StatusOf(id), ks::BatchStatus::kCompleted);
  EXPECT_EQ(Answers(id).size(), 30u);
}

// Holders that keep dying (their leases lapse, never released) must not make
// a chunk loop forever: after max_reclaims its unanswered rows fail.
TEST_F(DriverTest, AChunkReclaimedTooOftenFailsItsRows) {
  const std::string id = CreateBatch(8);
  Validate();
  kw::DriverOptions o = Options();
  o.max_reclaims = 2;
  for (int i = 0; i < 2; ++i) {
    auto c = store_->ClaimChunk("dies", {}, 20);
    ASSERT_TRUE(c.ok() && c->has_value());
    std::this_thread::sleep_for(std::chrono::milliseconds(40));
  }
  FakeEngine engine;
  kw::BatchDriver driver(store_.get(), &engine, o);
  driver.Start();
  ASSERT_TRUE(WaitFor([&] { return Ended(id); }));
  std::map<std::string, int> codes;
  auto seen = Answers(id, &codes);
  EXPECT_EQ(seen.size(), 8u);
  EXPECT_EQ(codes["request_crashed_engine"], 8);
  EXPECT_EQ(engine.submitted(), 0);
}

// An API node keeps batches without an engine: it validates, and a batch it
// cannot run waits for a worker.
TEST_F(DriverTest, ANodeWithoutAnEngineValidatesAndFinalizes) {
  kw::BatchDriver api(store_.get(), nullptr, Options());
  api.Start();
  const std::string id = CreateBatch(20);
  ASSERT_TRUE(WaitFor([&] { return StatusOf(id) == ks::BatchStatus::kInProgress; }));
  FakeEngine engine;
  auto store_w = OpenStore();
  kw::BatchDriver worker(store_w.get(), &engine, Options());
  worker.Start();
  ASSERT_TRUE(WaitFor([&] { return Ended(id); }));
  EXPECT_EQ(StatusOf(id), ks::BatchStatus::kCompleted);
  EXPECT_EQ(Answers(id).size(), 20u);
}

}  // namespace

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
  auto store = ks::SqliteStore::Open(path);
  EXPECT_TRUE(store.ok()) << store.status().ToString();
  return store.ok() ? std::move(*store) : nullptr;
}

FileRecord MakeFile(const std::string& id, int64_t created_at, const std::string& purpose = "batch") {
  return {id, id + ".jsonl", purpose, "/data/files/" + id, 1234, created_at, created_at + 3600};
}

BatchRecord MakeBatch(const std::string& id, int64_t created_at, const std::string& status = "validating") {
  BatchRecord b;
  b.id = id;
  b.endpoint = "/v1/chat/completions";
  b.input_file_id = "file-in";
  b.completion_window = "24h";
  b.status = status;
  b.created_at = created_at;
  b.expires_at = created_at + 86400;
  return b;
}

// Lines 1..n; the hash has its top bit set so the uint64 <-> int64 cast is exercised.
std::vector<PendingRequest> MakeRows(int n, const std::string& id_prefix = "req-") {
  std::vector<PendingRequest> rows;
  for (int i = 1; i <= n; ++i) {
    rows.push_back({i, id_prefix + std::to_string(i), int64_t{i} * 100, 50 + i, 0xF000'0000'0000'0000ULL + i});
  }
  return rows;
}

RequestOutcome Outcome(int64_t line, bool ok, int64_t in = 10, int64_t cached = 8, int64_t out = 3) {
  return {line, ok, (ok ? "ok " : "err ") + std::to_string(line), in, cached, out};
}

template <typename Record>
std::vector<std::string> Ids(const std::vector<Record>& records) {
  std::vector<std::string> ids;
  for (const Record& r : records) ids.push_back(r.id);
  return ids;
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

enum class Backend { kMemory, kFile };

// Every behaviour test runs on ":memory:" and on a WAL file database (which
// reads ForEachRequest through a second connection).
class SqliteStore : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    store_ = Open(GetParam() == Backend::kMemory ? ":memory:" : dir_.File("kvb.db"));
    ASSERT_NE(store_, nullptr);
  }
  // A batch "batch_1" with `n` request rows.
  void AddBatchWithRows(int n) {
    ASSERT_TRUE(store_->PutBatch(MakeBatch("batch_1", 100)).ok());
    ASSERT_TRUE(store_->AddRequests("batch_1", MakeRows(n)).ok());
  }

  TempDir dir_;
  std::unique_ptr<ks::SqliteStore> store_;
};

INSTANTIATE_TEST_SUITE_P(, SqliteStore, ::testing::Values(Backend::kMemory, Backend::kFile),
                         [](const auto& info) { return info.param == Backend::kMemory ? "Memory" : "File"; });

TEST_P(SqliteStore, FilesRoundTripAndUnknownIdsAreNotFound) {
  FileRecord f = MakeFile("file-a", 10);
  ASSERT_TRUE(store_->PutFile(f).ok());
  auto got = store_->GetFile("file-a");
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->id, f.id);
  EXPECT_EQ(got->filename, f.filename);
  EXPECT_EQ(got->purpose, f.purpose);
  EXPECT_EQ(got->path, f.path);
  EXPECT_EQ(got->bytes, f.bytes);
  EXPECT_EQ(got->created_at, f.created_at);
  EXPECT_EQ(got->expires_at, f.expires_at);

  EXPECT_EQ(store_->PutFile(f).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->GetFile("file-nope").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store_->DeleteFile("file-nope").code(), StatusCode::kNotFound);
  EXPECT_TRUE(store_->DeleteFile("file-a").ok());
  EXPECT_EQ(store_->GetFile("file-a").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store_->DeleteFile("file-a").code(), StatusCode::kNotFound);
}

TEST_P(SqliteStore, ListFilesPagesByCreatedAtThenCreationOrderAfterTheLastId) {
  // file-c and file-b share created_at: the order they were created in breaks the tie.
  for (const FileRecord& f : {MakeFile("file-c", 20), MakeFile("file-a", 30), MakeFile("file-b", 20),
                              MakeFile("file-d", 10, "batch_output")}) {
    ASSERT_TRUE(store_->PutFile(f).ok());
  }
  auto all = store_->ListFiles("", "", 100, /*ascending=*/true);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(Ids(*all), (std::vector<std::string>{"file-d", "file-c", "file-b", "file-a"}));
  auto desc = store_->ListFiles("", "", 100, /*ascending=*/false);
  EXPECT_EQ(Ids(*desc), (std::vector<std::string>{"file-a", "file-b", "file-c", "file-d"}));
  auto batch_only = store_->ListFiles("batch", "", 100, true);
  EXPECT_EQ(Ids(*batch_only), (std::vector<std::string>{"file-c", "file-b", "file-a"}));

  // Pages of 2 walk every file once, in both directions.
  for (bool ascending : {true, false}) {
    std::vector<std::string> walked;
    std::string after;
    for (int page = 0; page < 5; ++page) {
      auto p = store_->ListFiles("", after, 2, ascending);
      ASSERT_TRUE(p.ok());
      if (p->empty()) break;
      EXPECT_LE(p->size(), 2u);
      for (const FileRecord& f : *p) walked.push_back(f.id);
      after = p->back().id;
    }
    EXPECT_EQ(walked, ascending ? Ids(*all) : Ids(*desc));
  }
  auto after_tie = store_->ListFiles("batch", "file-c", 10, true);
  EXPECT_EQ(Ids(*after_tie), (std::vector<std::string>{"file-b", "file-a"}));

  // An unknown cursor ends the listing; limit <= 0 gives nothing.
  EXPECT_TRUE(store_->ListFiles("", "file-gone", 10, true)->empty());
  EXPECT_TRUE(store_->ListFiles("", "", 0, true)->empty());
}

TEST_P(SqliteStore, BatchRoundTripsEveryField) {
  BatchRecord b = MakeBatch("batch_x", 1000, "in_progress");
  b.output_file_id = "file-out";
  b.error_file_id = "file-err";
  b.metadata_json = R"({"job":"rubric","n":"170000"})";
  b.errors = {{"invalid_json", "Line 3 is not JSON: naïve \"quote\"", "", 3},
              {"duplicate_custom_id", "custom_id x repeats", "custom_id", 0}};
  b.in_progress_at = 1001;
  b.finalizing_at = 1002;
  b.completed_at = 1003;
  b.failed_at = 1004;
  b.expired_at = 1005;
  b.cancelling_at = 1006;
  b.cancelled_at = 1007;
  b.counts = {10, 4, 2};
  b.usage = {500, 400, 60};
  b.priority = -7;
  b.paused = true;
  ASSERT_TRUE(store_->PutBatch(b).ok());

  auto got = store_->GetBatch("batch_x");
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->endpoint, b.endpoint);
  EXPECT_EQ(got->input_file_id, b.input_file_id);
  EXPECT_EQ(got->completion_window, b.completion_window);
  EXPECT_EQ(got->status, b.status);
  EXPECT_EQ(got->output_file_id, b.output_file_id);
  EXPECT_EQ(got->error_file_id, b.error_file_id);
  EXPECT_EQ(got->metadata_json, b.metadata_json);
  ASSERT_EQ(got->errors.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(got->errors[i].code, b.errors[i].code);
    EXPECT_EQ(got->errors[i].message, b.errors[i].message);
    EXPECT_EQ(got->errors[i].param, b.errors[i].param);
    EXPECT_EQ(got->errors[i].line, b.errors[i].line);
  }
  EXPECT_EQ(
      std::vector<int64_t>({got->created_at, got->in_progress_at, got->expires_at, got->finalizing_at,
                            got->completed_at, got->failed_at, got->expired_at, got->cancelling_at, got->cancelled_at}),
      std::vector<int64_t>({1000, 1001, 87400, 1002, 1003, 1004, 1005, 1006, 1007}));
  EXPECT_EQ(got->counts.total, 10);
  EXPECT_EQ(got->counts.completed, 4);
  EXPECT_EQ(got->counts.failed, 2);
  EXPECT_EQ(got->usage.input_tokens, 500);
  EXPECT_EQ(got->usage.cached_tokens, 400);
  EXPECT_EQ(got->usage.output_tokens, 60);
  EXPECT_EQ(got->priority, -7);
  EXPECT_TRUE(got->paused);

  // Unset optional fields stay empty.
  ASSERT_TRUE(store_->PutBatch(MakeBatch("batch_y", 5)).ok());
  auto y = store_->GetBatch("batch_y");
  EXPECT_TRUE(y->output_file_id.empty() && y->error_file_id.empty() && y->metadata_json.empty());
  EXPECT_TRUE(y->errors.empty());
  EXPECT_FALSE(y->paused);

  EXPECT_EQ(store_->PutBatch(b).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->GetBatch("batch_nope").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store_->UpdateBatch(MakeBatch("batch_nope", 1)).code(), StatusCode::kNotFound);
}

TEST_P(SqliteStore, UpdateBatchWritesFieldsButLeavesResultCountersAlone) {
  AddBatchWithRows(4);
  auto stale = store_->GetBatch("batch_1");  // counts 0/0, usage 0
  ASSERT_TRUE(stale.ok());
  ASSERT_EQ(*store_->CommitResults("batch_1", {Outcome(1, true), Outcome(2, false)}), 2);

  BatchRecord update = *stale;
  update.status = "cancelling";
  update.cancelling_at = 555;
  update.priority = 3;
  update.paused = true;
  update.errors = {{"code", "msg", "p", 9}};
  update.metadata_json = R"({"a":"b"})";
  update.counts.completed = 99;  // ignored
  update.usage.output_tokens = 99;
  ASSERT_TRUE(store_->UpdateBatch(update).ok());

  auto got = store_->GetBatch("batch_1");
  EXPECT_EQ(got->status, "cancelling");
  EXPECT_EQ(got->cancelling_at, 555);
  EXPECT_EQ(got->priority, 3);
  EXPECT_TRUE(got->paused);
  ASSERT_EQ(got->errors.size(), 1u);
  EXPECT_EQ(got->errors[0].line, 9);
  EXPECT_EQ(got->metadata_json, R"({"a":"b"})");
  EXPECT_EQ(got->counts.total, 4);
  EXPECT_EQ(got->counts.completed, 1);
  EXPECT_EQ(got->counts.failed, 1);
  EXPECT_EQ(got->usage.input_tokens, 20);
  EXPECT_EQ(got->usage.output_tokens, 6);
}

TEST_P(SqliteStore, ListBatchesNewestFirstAfterTheLastId) {
  // batch_c and batch_b share created_at: batch_b, created later, is newer.
  for (const BatchRecord& b :
       {MakeBatch("batch_a", 10), MakeBatch("batch_c", 30), MakeBatch("batch_b", 30), MakeBatch("batch_d", 20)}) {
    ASSERT_TRUE(store_->PutBatch(b).ok());
  }
  auto all = store_->ListBatches("", 100);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(Ids(*all), (std::vector<std::string>{"batch_b", "batch_c", "batch_d", "batch_a"}));
  auto first = store_->ListBatches("", 2);
  EXPECT_EQ(Ids(*first), (std::vector<std::string>{"batch_b", "batch_c"}));
  auto second = store_->ListBatches("batch_c", 2);
  EXPECT_EQ(Ids(*second), (std::vector<std::string>{"batch_d", "batch_a"}));
  EXPECT_TRUE(store_->ListBatches("batch_a", 2)->empty());
  EXPECT_TRUE(store_->ListBatches("batch_gone", 2)->empty());
  EXPECT_TRUE(store_->ListBatches("", 0)->empty());
}

TEST_P(SqliteStore, BatchesWithStatusOldestFirst) {
  ASSERT_TRUE(store_->PutBatch(MakeBatch("batch_new", 30, "in_progress")).ok());
  ASSERT_TRUE(store_->PutBatch(MakeBatch("batch_done", 5, "completed")).ok());
  ASSERT_TRUE(store_->PutBatch(MakeBatch("batch_old", 10, "validating")).ok());
  ASSERT_TRUE(store_->PutBatch(MakeBatch("batch_mid", 20, "in_progress")).ok());
  auto got = store_->BatchesWithStatus({"validating", "in_progress"});
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(Ids(*got), (std::vector<std::string>{"batch_old", "batch_mid", "batch_new"}));
  EXPECT_TRUE(store_->BatchesWithStatus({})->empty());
  EXPECT_TRUE(store_->BatchesWithStatus({"expired"})->empty());
}

TEST_P(SqliteStore, AddRequestsReplacesRowsAndResetsCounts) {
  AddBatchWithRows(5);
  ASSERT_EQ(*store_->CommitResults("batch_1", {Outcome(1, true), Outcome(2, false)}), 2);

  ASSERT_TRUE(store_->AddRequests("batch_1", MakeRows(3, "again-")).ok());
  auto b = store_->GetBatch("batch_1");
  EXPECT_EQ(b->counts.total, 3);
  EXPECT_EQ(b->counts.completed, 0);
  EXPECT_EQ(b->counts.failed, 0);
  EXPECT_EQ(b->usage.input_tokens + b->usage.cached_tokens + b->usage.output_tokens, 0);
  auto rows = AllRequests(*store_, "batch_1");
  ASSERT_EQ(rows.size(), 3u);
  for (const StoredRequest& r : rows) {
    EXPECT_EQ(r.custom_id, "again-" + std::to_string(r.line));
    EXPECT_EQ(r.state, RequestState::kPending);
    EXPECT_TRUE(r.result_line.empty());
  }

  // A failing replacement changes nothing.
  std::vector<PendingRequest> dup = MakeRows(2);
  dup.push_back(dup[0]);
  EXPECT_EQ(store_->AddRequests("batch_1", dup).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(AllRequests(*store_, "batch_1").size(), 3u);
  EXPECT_EQ(store_->GetBatch("batch_1")->counts.total, 3);

  EXPECT_EQ(store_->AddRequests("batch_nope", MakeRows(1)).code(), StatusCode::kNotFound);
}

TEST_P(SqliteStore, PendingRequestsByLineWithTheirPlaceInTheFile) {
  ASSERT_TRUE(store_->PutBatch(MakeBatch("batch_1", 100)).ok());
  std::vector<PendingRequest> rows = MakeRows(6);
  std::reverse(rows.begin(), rows.end());
  ASSERT_TRUE(store_->AddRequests("batch_1", rows).ok());
  ASSERT_EQ(*store_->CommitResults("batch_1", {Outcome(2, true), Outcome(5, false)}), 2);

  auto pending = store_->PendingRequests("batch_1");
  ASSERT_TRUE(pending.ok()) << pending.status().ToString();
  std::vector<int64_t> lines;
  for (const PendingRequest& p : *pending) {
    lines.push_back(p.line);
    EXPECT_EQ(p.custom_id, "req-" + std::to_string(p.line));
    EXPECT_EQ(p.offset, p.line * 100);
    EXPECT_EQ(p.length, 50 + p.line);
    EXPECT_EQ(p.prefix_hash, 0xF000'0000'0000'0000ULL + static_cast<uint64_t>(p.line));
  }
  EXPECT_EQ(lines, (std::vector<int64_t>{1, 3, 4, 6}));
  EXPECT_EQ(store_->PendingRequests("batch_nope").status().code(), StatusCode::kNotFound);
}

TEST_P(SqliteStore, CommitResultsAnswersEachRequestOnce) {
  AddBatchWithRows(4);
  // Line 1 twice in one call, and a line that does not exist: recorded once, skipped.
  auto n = store_->CommitResults("batch_1", {Outcome(1, true, 10, 8, 3), Outcome(1, false, 100, 100, 100),
                                             Outcome(3, false, 20, 0, 0), Outcome(99, true)});
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 2);
  // A later call (a resumed worker) cannot answer line 1 or 3 again.
  EXPECT_EQ(*store_->CommitResults("batch_1", {Outcome(1, false), Outcome(3, true), Outcome(4, true, 5, 1, 2)}), 1);
  EXPECT_EQ(*store_->CommitResults("batch_1", {}), 0);

  auto b = store_->GetBatch("batch_1");
  EXPECT_EQ(b->counts.total, 4);
  EXPECT_EQ(b->counts.completed, 2);
  EXPECT_EQ(b->counts.failed, 1);
  EXPECT_EQ(b->usage.input_tokens, 35);
  EXPECT_EQ(b->usage.cached_tokens, 9);
  EXPECT_EQ(b->usage.output_tokens, 5);

  auto rows = AllRequests(*store_, "batch_1");
  ASSERT_EQ(rows.size(), 4u);
  EXPECT_EQ(rows[0].state, RequestState::kCompleted);
  EXPECT_EQ(rows[0].result_line, "ok 1");
  EXPECT_EQ(rows[1].state, RequestState::kPending);
  EXPECT_EQ(rows[2].state, RequestState::kFailed);
  EXPECT_EQ(rows[2].result_line, "err 3");
  EXPECT_EQ(rows[3].state, RequestState::kCompleted);
  EXPECT_EQ(store_->CommitResults("batch_nope", {Outcome(1, true)}).status().code(), StatusCode::kNotFound);
}

TEST_P(SqliteStore, ForEachRequestVisitsByLineAndStopsOnError) {
  // More rows than one chunk of the ":memory:" path.
  AddBatchWithRows(1300);
  auto rows = AllRequests(*store_, "batch_1");
  ASSERT_EQ(rows.size(), 1300u);
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(rows[i].line, static_cast<int64_t>(i) + 1);

  int visited = 0;
  Status s = store_->ForEachRequest("batch_1", [&](const StoredRequest& r) {
    ++visited;
    return r.line == 700 ? Status::Cancelled("enough") : Status::Ok();
  });
  EXPECT_EQ(s.code(), StatusCode::kCancelled);
  EXPECT_EQ(visited, 700);
  EXPECT_EQ(store_->ForEachRequest("batch_nope", [](const StoredRequest&) { return Status::Ok(); }).code(),
            StatusCode::kNotFound);
  // The store stays usable after an early stop.
  EXPECT_EQ(AllRequests(*store_, "batch_1").size(), 1300u);
}

TEST_P(SqliteStore, ForEachRequestCallbackMayWriteToTheStore) {
  AddBatchWithRows(1100);
  // Every 50th line (few commits: each one is an fsync on disk).
  Status s = store_->ForEachRequest("batch_1", [&](const StoredRequest& r) -> Status {
    if (r.line % 50 != 0) return Status::Ok();
    auto n = store_->CommitResults("batch_1", {Outcome(r.line, true)});
    return n.ok() ? Status::Ok() : n.status();
  });
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(store_->GetBatch("batch_1")->counts.completed, 22);
}

TEST_P(SqliteStore, ConcurrentCommitsOfTheSameLinesCountEachLineOnce) {
  AddBatchWithRows(200);
  std::atomic<int64_t> recorded{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      // Each thread answers every line, in groups of 20, from a different start.
      for (int g = 0; g < 10; ++g) {
        std::vector<RequestOutcome> group;
        for (int i = 1; i <= 20; ++i) group.push_back(Outcome(((g + t * 3) % 10) * 20 + i, t % 2 == 0));
        auto n = store_->CommitResults("batch_1", group);
        EXPECT_TRUE(n.ok()) << n.status().ToString();
        if (n.ok()) recorded += *n;
      }
    });
  }
  threads.emplace_back([&] { EXPECT_EQ(AllRequests(*store_, "batch_1").size(), 200u); });
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(recorded.load(), 200);
  auto b = store_->GetBatch("batch_1");
  EXPECT_EQ(b->counts.completed + b->counts.failed, 200);
  EXPECT_TRUE(store_->PendingRequests("batch_1")->empty());
}

TEST_P(SqliteStore, FinalizeBatchIsAllOrNothing) {
  AddBatchWithRows(2);
  ASSERT_TRUE(store_->PutFile(MakeFile("file-taken", 1)).ok());
  BatchRecord done = *store_->GetBatch("batch_1");
  done.status = "completed";
  done.completed_at = 777;
  done.output_file_id = "file-out";
  done.error_file_id = "file-taken";

  // The second file's id exists: neither file nor the batch change.
  EXPECT_EQ(store_->FinalizeBatch(done, {MakeFile("file-out", 2, "batch_output"), MakeFile("file-taken", 2)}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->GetFile("file-out").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store_->GetBatch("batch_1")->status, "validating");

  // An unknown batch: the files are not inserted either.
  BatchRecord ghost = MakeBatch("batch_ghost", 1);
  EXPECT_EQ(store_->FinalizeBatch(ghost, {MakeFile("file-out", 2, "batch_output")}).code(), StatusCode::kNotFound);
  EXPECT_EQ(store_->GetFile("file-out").status().code(), StatusCode::kNotFound);

  done.error_file_id = "file-err";
  ASSERT_TRUE(
      store_->FinalizeBatch(done, {MakeFile("file-out", 2, "batch_output"), MakeFile("file-err", 2, "batch_output")})
          .ok());
  auto b = store_->GetBatch("batch_1");
  EXPECT_EQ(b->status, "completed");
  EXPECT_EQ(b->completed_at, 777);
  EXPECT_EQ(b->output_file_id, "file-out");
  EXPECT_TRUE(store_->GetFile("file-out").ok());
  EXPECT_TRUE(store_->GetFile("file-err").ok());
}

TEST_P(SqliteStore, HandlesTheFullSizeJobOf170000Requests) {
  constexpr int kRows = 170'000;
  ASSERT_TRUE(store_->PutBatch(MakeBatch("batch_1", 100)).ok());
  std::vector<PendingRequest> rows = MakeRows(kRows);
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(store_->AddRequests("batch_1", rows).ok());
  auto t1 = std::chrono::steady_clock::now();
  auto pending = store_->PendingRequests("batch_1");
  auto t2 = std::chrono::steady_clock::now();
  ASSERT_TRUE(pending.ok());
  ASSERT_EQ(pending->size(), static_cast<size_t>(kRows));
  EXPECT_EQ(pending->back().line, kRows);
  EXPECT_EQ(store_->GetBatch("batch_1")->counts.total, kRows);
  auto ms = [](auto a, auto b) { return std::chrono::duration_cast<std::chrono::milliseconds>(b - a).count(); };
  std::printf("[ timing   ] AddRequests %lld ms, PendingRequests %lld ms for %d rows\n",
              static_cast<long long>(ms(t0, t1)), static_cast<long long>(ms(t1, t2)), kRows);
}

// --- on-disk only: what survives closing, and a process dying ---

TEST(SqliteStoreOnDisk, ReopenedDatabaseKeepsEverything) {
  TempDir dir;
  const std::string path = dir.File("kvb.db");
  {
    auto store = Open(path);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->PutFile(MakeFile("file-a", 1)).ok());
    ASSERT_TRUE(store->PutBatch(MakeBatch("batch_1", 2, "in_progress")).ok());
    ASSERT_TRUE(store->AddRequests("batch_1", MakeRows(3)).ok());
    ASSERT_EQ(*store->CommitResults("batch_1", {Outcome(2, true)}), 1);
  }
  auto store = Open(path);
  ASSERT_NE(store, nullptr);
  EXPECT_TRUE(store->GetFile("file-a").ok());
  auto b = store->GetBatch("batch_1");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->status, "in_progress");
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
    ASSERT_TRUE(store->PutBatch(MakeBatch("batch_1", 2, "in_progress")).ok());
    ASSERT_TRUE(store->AddRequests("batch_1", MakeRows(3)).ok());
  }
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // The child opens its own connection (never one made before fork),
    // commits, and dies without closing or checkpointing.
    auto store = ks::SqliteStore::Open(path);
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
  ASSERT_TRUE(store->PutBatch(MakeBatch("batch_1", 2, "in_progress")).ok());
  ASSERT_TRUE(store->AddRequests("batch_1", MakeRows(100)).ok());
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

TEST_P(SqliteStore, InFlightRowsCountACrashOnlyWhenNotStoppedCleanly) {
  AddBatchWithRows(5);
  ASSERT_TRUE(store_->MarkInFlight("batch_1", {1, 2, 3, 5}).ok());
  ASSERT_TRUE(store_->UnmarkInFlight("batch_1", {5}).ok());  // done, not committed yet
  ASSERT_EQ(*store_->CommitResults("batch_1", {Outcome(2, true)}), 1);
  // The process died: rows 1 and 3 were in flight, row 2 was answered.
  auto n = store_->RecoverInFlight();
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 2);
  EXPECT_EQ(*store_->RecoverInFlight(), 0) << "the marks are cleared";
  ASSERT_TRUE(store_->MarkInFlight("batch_1", {3, 4}).ok());
  EXPECT_EQ(*store_->RecoverInFlight(), 2);
  // A clean stop counts nothing.
  ASSERT_TRUE(store_->MarkInFlight("batch_1", {5}).ok());
  ASSERT_TRUE(store_->ClearInFlight().ok());
  EXPECT_EQ(*store_->RecoverInFlight(), 0);
  std::map<int64_t, int32_t> crashes;
  auto pending = store_->PendingRequests("batch_1");
  ASSERT_TRUE(pending.ok());
  for (const PendingRequest& p : *pending) crashes[p.line] = p.crashes;
  EXPECT_EQ(crashes, (std::map<int64_t, int32_t>{{1, 1}, {3, 2}, {4, 1}, {5, 0}}));
}

TEST(SqliteStoreOnDisk, MigratesAVersion1DatabaseKeepingItsRows) {
  TempDir dir;
  const std::string path = dir.File("kvb.db");
  {
    auto store = Open(path);
    ASSERT_TRUE(store->PutBatch(MakeBatch("batch_1", 100)).ok());
    ASSERT_TRUE(store->AddRequests("batch_1", MakeRows(3)).ok());
  }
  // Turn it back into what version 1 wrote.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db,
                         "DROP INDEX requests_inflight; ALTER TABLE requests DROP COLUMN inflight; "
                         "ALTER TABLE requests DROP COLUMN crashes; PRAGMA user_version = 1;",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto store = Open(path);
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->PendingRequests("batch_1")->size(), 3u);
  EXPECT_TRUE(store->MarkInFlight("batch_1", {1}).ok());
  EXPECT_EQ(*store->RecoverInFlight(), 1);
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
  EXPECT_EQ(query_int("PRAGMA user_version"), 2);
  ASSERT_EQ(sqlite3_exec(db, "PRAGMA user_version = 1000", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);

  auto reopened = ks::SqliteStore::Open(path);
  EXPECT_EQ(reopened.status().code(), StatusCode::kFailedPrecondition);
}

}  // namespace

#include "batch/result_log.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "batch/response.h"

namespace kvb::batch {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

class ResultLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("kvb_result_log_test_" + std::to_string(getpid()) + "_" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
    out_ = (dir_ / "out.jsonl").string();
    err_ = (dir_ / "err.jsonl").string();
  }
  void TearDown() override { fs::remove_all(dir_); }

  static std::string Read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

  static std::vector<std::string> Ids(const std::string& path) {
    std::vector<std::string> ids;
    std::istringstream in(Read(path));
    for (std::string line; std::getline(in, line);) ids.push_back(json::parse(line)["custom_id"]);
    return ids;
  }

  fs::path dir_;
  std::string out_;
  std::string err_;
};

std::string Ok(const std::string& id) { return SuccessLine(id, json{{"text", "answer for " + id}}); }
std::string Bad(const std::string& id) {
  return FailureLine(id, 400, ErrorBody("n must be 1", "invalid_request_error", "n", ""));
}

TEST_F(ResultLogTest, AppendThenReopenGivesAnsweredSet) {
  {
    auto log = ResultLog::Open(out_, err_);
    ASSERT_TRUE(log.ok()) << log.status().ToString();
    EXPECT_TRUE(log->answered().empty());
    ASSERT_TRUE(log->AppendSuccess("a", Ok("a")).ok());
    ASSERT_TRUE(log->AppendFailure("b", Bad("b")).ok());
    ASSERT_TRUE(log->AppendFailure("c", RequestErrorLine("c", "batch_cancelled", "cancelled")).ok());
    ASSERT_TRUE(log->Sync().ok());
    EXPECT_EQ(log->answered().size(), 3u);
  }
  EXPECT_EQ(Ids(out_), std::vector<std::string>{"a"});
  EXPECT_EQ(Ids(err_), (std::vector<std::string>{"b", "c"}));
  auto log = ResultLog::Open(out_, err_);
  ASSERT_TRUE(log.ok());
  EXPECT_EQ(log->answered(), (std::unordered_set<std::string>{"a", "b", "c"}));
  EXPECT_EQ(log->failed_count(), 2);
}

TEST_F(ResultLogTest, TornLastLineIsRepairedAndNotAnswered) {
  {
    auto log = ResultLog::Open(out_, err_);
    ASSERT_TRUE(log.ok());
    ASSERT_TRUE(log->AppendSuccess("a", Ok("a")).ok());
    ASSERT_TRUE(log->AppendSuccess("b", Ok("b")).ok());
  }
  const std::string complete = Read(out_);
  std::string torn = Ok("c");
  std::ofstream(out_, std::ios::binary | std::ios::app) << torn.substr(0, torn.size() / 2);

  auto log = ResultLog::Open(out_, err_);
  ASSERT_TRUE(log.ok()) << log.status().ToString();
  EXPECT_EQ(Read(out_), complete);  // ends at the last complete line
  EXPECT_EQ(log->answered(), (std::unordered_set<std::string>{"a", "b"}));
  ASSERT_TRUE(log->AppendSuccess("c", Ok("c")).ok());
  EXPECT_EQ(Ids(out_), (std::vector<std::string>{"a", "b", "c"}));
}

TEST_F(ResultLogTest, FinalLineThatIsNotJsonIsDropped) {
  {
    auto log = ResultLog::Open(out_, err_);
    ASSERT_TRUE(log.ok());
    ASSERT_TRUE(log->AppendFailure("a", Bad("a")).ok());
  }
  const std::string complete = Read(err_);
  std::ofstream(err_, std::ios::binary | std::ios::app) << "{\"custom_id\":\"z\",\"resp\n";
  auto log = ResultLog::Open(out_, err_);
  ASSERT_TRUE(log.ok()) << log.status().ToString();
  EXPECT_EQ(Read(err_), complete);
  EXPECT_EQ(log->answered(), (std::unordered_set<std::string>{"a"}));
}

TEST_F(ResultLogTest, GarbageInTheMiddleIsRefusedAndLeftAlone) {
  std::string content = "not json\n" + Ok("a") + "\n";
  std::ofstream(out_, std::ios::binary) << content;
  auto log = ResultLog::Open(out_, err_);
  ASSERT_FALSE(log.ok());
  EXPECT_EQ(log.status().code(), StatusCode::kIoError);
  EXPECT_EQ(Read(out_), content);
}

TEST_F(ResultLogTest, DuplicateAppendIsRefusedAndWritesNothing) {
  auto log = ResultLog::Open(out_, err_);
  ASSERT_TRUE(log.ok());
  ASSERT_TRUE(log->AppendSuccess("a", Ok("a")).ok());
  const std::string out_before = Read(out_);
  Status again = log->AppendSuccess("a", Ok("a"));
  EXPECT_EQ(again.code(), StatusCode::kFailedPrecondition);
  Status as_failure = log->AppendFailure("a", Bad("a"));
  EXPECT_EQ(as_failure.code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(Read(out_), out_before);
  EXPECT_EQ(Read(err_), "");
}

TEST_F(ResultLogTest, DuplicateOfIdFoundAtOpenIsRefused) {
  {
    auto log = ResultLog::Open(out_, err_);
    ASSERT_TRUE(log.ok());
    ASSERT_TRUE(log->AppendFailure("a", Bad("a")).ok());
  }
  auto log = ResultLog::Open(out_, err_);
  ASSERT_TRUE(log.ok());
  EXPECT_EQ(log->AppendSuccess("a", Ok("a")).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(Read(out_), "");
}

TEST_F(ResultLogTest, LineWithNewlineIsRejected) {
  auto log = ResultLog::Open(out_, err_);
  ASSERT_TRUE(log.ok());
  EXPECT_EQ(log->AppendSuccess("a", "{}\n{}").code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(log->answered().empty());
}

TEST_F(ResultLogTest, FinalizeRestoresInputOrderInBothFiles) {
  // Input order: id-0 .. id-9; results arrive shuffled.
  std::map<std::string, int64_t> line_of;
  for (int i = 0; i < 10; ++i) line_of["id-" + std::to_string(i)] = i + 1;
  const std::vector<int> arrival = {7, 2, 9, 0, 4, 1, 8, 3, 6, 5};
  {
    auto log = ResultLog::Open(out_, err_);
    ASSERT_TRUE(log.ok());
    for (int i : arrival) {
      std::string id = "id-" + std::to_string(i);
      Status s = i % 3 == 0 ? log->AppendFailure(id, Bad(id)) : log->AppendSuccess(id, Ok(id));
      ASSERT_TRUE(s.ok());
    }
  }
  const std::string out_unsorted = Read(out_);
  auto log = ResultLog::Open(out_, err_);
  ASSERT_TRUE(log.ok());
  Status s = log->Finalize([&](std::string_view id) {
    auto it = line_of.find(std::string(id));
    return it == line_of.end() ? int64_t{-1} : it->second;
  });
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(Ids(out_), (std::vector<std::string>{"id-1", "id-2", "id-4", "id-5", "id-7", "id-8"}));
  EXPECT_EQ(Ids(err_), (std::vector<std::string>{"id-0", "id-3", "id-6", "id-9"}));
  // Same bytes, only reordered: every line exactly once.
  EXPECT_EQ(Read(out_).size(), out_unsorted.size());
  std::istringstream before(out_unsorted);
  std::multiset<std::string> lines_before, lines_after;
  for (std::string l; std::getline(before, l);) lines_before.insert(l);
  std::istringstream after(Read(out_));
  for (std::string l; std::getline(after, l);) lines_after.insert(l);
  EXPECT_EQ(lines_before, lines_after);
  EXPECT_FALSE(fs::exists(out_ + ".kvb-finalize.tmp"));

  // The log keeps working on the new files.
  ASSERT_TRUE(log->AppendSuccess("late", Ok("late")).ok());
  EXPECT_EQ(Ids(out_).back(), "late");
  EXPECT_EQ(log->AppendSuccess("id-4", Ok("id-4")).code(), StatusCode::kFailedPrecondition);
}

TEST_F(ResultLogTest, FinalizePutsUnknownIdsLastInTheirOrder) {
  auto log = ResultLog::Open(out_, "");
  ASSERT_TRUE(log.ok());
  for (const char* id : {"x", "b", "y", "a"}) ASSERT_TRUE(log->AppendSuccess(id, Ok(id)).ok());
  ASSERT_TRUE(log->Finalize([](std::string_view id) -> int64_t { return id == "a" ? 1 : id == "b" ? 2 : -1; }).ok());
  EXPECT_EQ(Ids(out_), (std::vector<std::string>{"a", "b", "x", "y"}));
}

TEST_F(ResultLogTest, SameFileForBothKinds) {
  {
    auto log = ResultLog::Open(out_, (dir_ / "." / "out.jsonl").string());
    ASSERT_TRUE(log.ok()) << log.status().ToString();
    ASSERT_TRUE(log->AppendFailure("b", Bad("b")).ok());
    ASSERT_TRUE(log->AppendSuccess("a", Ok("a")).ok());
    ASSERT_TRUE(log->Finalize([](std::string_view id) -> int64_t { return id == "a" ? 1 : 2; }).ok());
  }
  EXPECT_EQ(Ids(out_), (std::vector<std::string>{"a", "b"}));
  auto log = ResultLog::Open(out_, out_);
  ASSERT_TRUE(log.ok());
  EXPECT_EQ(log->answered().size(), 2u);
  EXPECT_EQ(log->failed_count(), 1);
}

TEST_F(ResultLogTest, EmptyErrorPathSendsFailuresToOutput) {
  auto log = ResultLog::Open(out_, "");
  ASSERT_TRUE(log.ok());
  ASSERT_TRUE(log->AppendFailure("b", Bad("b")).ok());
  EXPECT_EQ(Ids(out_), std::vector<std::string>{"b"});
}

TEST_F(ResultLogTest, SecondWriterIsRefusedWhileFirstIsOpen) {
  auto first = ResultLog::Open(out_, err_);
  ASSERT_TRUE(first.ok());
  auto second = ResultLog::Open(out_, err_);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kFailedPrecondition);
}

TEST_F(ResultLogTest, IsMovable) {
  auto opened = ResultLog::Open(out_, err_);
  ASSERT_TRUE(opened.ok());
  ResultLog log = std::move(opened.value());
  ASSERT_TRUE(log.AppendSuccess("a", Ok("a")).ok());
  ResultLog other = std::move(log);
  ASSERT_TRUE(other.AppendFailure("b", Bad("b")).ok());
  EXPECT_EQ(other.answered().size(), 2u);
  EXPECT_EQ(Ids(out_), std::vector<std::string>{"a"});
  EXPECT_EQ(Ids(err_), std::vector<std::string>{"b"});
}

}  // namespace
}  // namespace kvb::batch

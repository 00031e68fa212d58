#include "batch/crash_guard.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <map>

namespace kvb::batch {
namespace {

class JournalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvb_journal_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/out.jsonl.inflight";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::map<int64_t, int32_t> Crashes(const std::vector<int64_t>& answered = {}) {
    auto j = CrashJournal::Open(path_, answered);
    EXPECT_TRUE(j.ok()) << j.status().ToString();
    if (!j.ok()) return {};
    return {j->crashes().begin(), j->crashes().end()};
  }

  std::string dir_, path_;
};

TEST_F(JournalTest, ASessionWithoutAnEndCrashedAndBlamesWhatWasInFlight) {
  {
    auto j = CrashJournal::Open(path_, {});
    ASSERT_TRUE(j.ok());
    EXPECT_TRUE(j->crashes().empty());
    ASSERT_TRUE(j->MarkInFlight({3, 4, 5, 6}).ok());
    ASSERT_TRUE(j->MarkDone(6).ok());  // done, its answer not written yet
    // no EndSession: the process died
  }
  EXPECT_EQ(Crashes({4}), (std::map<int64_t, int32_t>{{3, 1}, {5, 1}}));
  // That Open started a session with nothing in flight and died too.
  {
    auto j = CrashJournal::Open(path_, {});
    ASSERT_TRUE(j.ok());
    ASSERT_TRUE(j->MarkInFlight({3}).ok());
  }
  EXPECT_EQ(Crashes(), (std::map<int64_t, int32_t>{{3, 2}, {5, 1}}));
}

TEST_F(JournalTest, ACleanEndCountsNothingAndRemoveDeletesTheFile) {
  {
    auto j = CrashJournal::Open(path_, {});
    ASSERT_TRUE(j->MarkInFlight({1, 2}).ok());
    ASSERT_TRUE(j->EndSession().ok());
  }
  auto j = CrashJournal::Open(path_, {});
  EXPECT_TRUE(j->crashes().empty());
  ASSERT_TRUE(j->Remove().ok());
  EXPECT_FALSE(std::filesystem::exists(path_));
}

TEST_F(JournalTest, ATornLastLineIsSkipped) {
  std::ofstream(path_) << "s\n+ 7\n+ 8\n+ 9";  // the crash cut "+ 9x..." short: 9 still counts
  std::ofstream(path_, std::ios::app) << "\n+";
  EXPECT_EQ(Crashes(), (std::map<int64_t, int32_t>{{7, 1}, {8, 1}, {9, 1}}));
}

}  // namespace
}  // namespace kvb::batch

#include "cli/progress.h"

#include <gtest/gtest.h>

namespace kvb::cli {
namespace {

TEST(Progress, LineShowsCountsRatesEtaCacheHitsAndKvCells) {
  ProgressSnapshot s;
  s.done = 100;
  s.total = 400;
  s.engine.prefill_tokens = 3000;
  s.engine.completion_tokens = 2000;
  s.engine.prompt_tokens = 20000;
  s.engine.cached_tokens = 19000;
  s.engine.cells_used = 4200;
  s.engine.cells_reserved = 5100;
  s.engine.cells_total = 32768;
  s.engine.active = 32;
  std::string line = Progress::Line(s, /*elapsed_s=*/10.0, /*bar_width=*/0);
  EXPECT_NE(line.find("100/400"), std::string::npos) << line;
  EXPECT_NE(line.find(" 25%"), std::string::npos) << line;
  EXPECT_NE(line.find("10.0 req/s"), std::string::npos) << line;
  EXPECT_NE(line.find("500 tok/s"), std::string::npos) << line;
  EXPECT_NE(line.find("ETA 0:30"), std::string::npos) << line;
  EXPECT_NE(line.find("cache hit 95%"), std::string::npos) << line;
  EXPECT_NE(line.find("KV 4.2k/32.8k cells (5.1k reserved)"), std::string::npos) << line;
  EXPECT_NE(line.find("32 running"), std::string::npos) << line;
  EXPECT_EQ(line.find("resumed"), std::string::npos) << line;
}

TEST(Progress, BarFillsWithProgressAndResumedWorkIsShown) {
  ProgressSnapshot s;
  s.done = 5;
  s.total = 10;
  s.resumed = 7;
  std::string line = Progress::Line(s, 1.0, 10);
  EXPECT_NE(line.find("[=====>    ]"), std::string::npos) << line;
  EXPECT_NE(line.find("resumed 7"), std::string::npos) << line;
}

TEST(Progress, UnknownEtaBeforeAnyRequestFinishes) {
  ProgressSnapshot s;
  s.total = 10;
  EXPECT_NE(Progress::Line(s, 0.0, 0).find("ETA ?"), std::string::npos);
}

TEST(Progress, HumanUnits) {
  EXPECT_EQ(HumanCount(999), "999");
  EXPECT_EQ(HumanCount(1234), "1.2k");
  EXPECT_EQ(HumanCount(2500000), "2.5M");
  EXPECT_EQ(HumanDuration(75), "1:15");
  EXPECT_EQ(HumanDuration(3725), "1:02:05");
}

}  // namespace
}  // namespace kvb::cli

// Replays the fuzzers' inputs through the same code and invariants
// (tests/fuzz/<target>_target.h): every file of tests/fuzz/regressions/<target>/
// (inputs that once crashed or broke an invariant; one test each, so a crash
// fails only its own test) and the seed corpora (tests/fuzz/corpus/<target>/).
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <ostream>
#include <string>
#include <vector>

// Invariant failures become test failures (the fuzzers abort instead).
#define KVB_FUZZ_CHECK(cond, msg)                                    \
  do {                                                               \
    if (!(cond)) {                                                   \
      ADD_FAILURE() << "fuzz invariant failed: " #cond "\n" << (msg); \
      return;                                                        \
    }                                                                \
  } while (0)

#include "../fuzz/line_target.h"
#include "../fuzz/multipart_target.h"
#include "../fuzz/schema_target.h"
#include "../fuzz/stream_target.h"

namespace kvb::fuzz {
namespace {

namespace fs = std::filesystem;

const fs::path& FuzzDir() {
  static const fs::path dir = fs::path(__FILE__).parent_path().parent_path() / "fuzz";
  return dir;
}

const char* const kTargets[] = {"line", "schema", "multipart", "stream"};

void Replay(const std::string& target, const std::string& bytes) {
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  if (target == "line") return FuzzLine(data, bytes.size());
  if (target == "schema") return FuzzSchema(data, bytes.size());
  if (target == "multipart") return FuzzMultipart(data, bytes.size());
  if (target == "stream") return FuzzStream(data, bytes.size());
  FAIL() << "unknown fuzz target " << target;
}

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::vector<fs::path> FilesIn(const fs::path& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.is_regular_file() && e.path().filename().string()[0] != '.') out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

struct Case {
  std::string target;
  fs::path path;
};

std::vector<Case> RegressionCases() {
  std::vector<Case> cases;
  for (const char* t : kTargets)
    for (const auto& p : FilesIn(FuzzDir() / "regressions" / t)) cases.push_back({t, p});
  return cases;
}

// Names the file in test listings (not the struct's bytes).
void PrintTo(const Case& c, std::ostream* os) { *os << c.path.string(); }

class FuzzRegression : public ::testing::TestWithParam<Case> {};

TEST_P(FuzzRegression, ReplaysWithoutCrashOrBrokenInvariant) {
  const Case& c = GetParam();
  SCOPED_TRACE(c.path.string());
  Replay(c.target, ReadFile(c.path));
}

INSTANTIATE_TEST_SUITE_P(Inputs, FuzzRegression, ::testing::ValuesIn(RegressionCases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string name = info.param.target + "_" + info.param.path.filename().string();
                           for (char& ch : name)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name;
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(FuzzRegression);

TEST(FuzzCorpus, EverySeedPassesItsTarget) {
  int seeds = 0;
  for (const char* t : kTargets) {
    for (const auto& p : FilesIn(FuzzDir() / "corpus" / t)) {
      SCOPED_TRACE(p.string());
      Replay(t, ReadFile(p));
      ++seeds;
    }
  }
  EXPECT_GT(seeds, 0) << "no seeds under " << (FuzzDir() / "corpus");
}

}  // namespace
}  // namespace kvb::fuzz

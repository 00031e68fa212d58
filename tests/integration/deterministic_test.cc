// --deterministic: a request's answer is bitwise the same alone, in any batch,
// in any order, across KV-cache drains and after a kill and resume: the same
// tokens and the same float log-probabilities, not merely close ones.
#include <gtest/gtest.h>

#include <cstring>
#include <map>

#include "engine/engine.h"
#include "fixtures.h"

namespace kvb::testing {
namespace {

using engine::EngineOptions;
using engine::Model;
using engine::Request;
using engine::Result;
using json = nlohmann::json;

// Greedy, with logprobs and the first token's logits: every float to compare.
Request RubricRequest(const Model& model, int i, int max_tokens) {
  Request r = kvb::testing::RubricRequest(model, i, 24, max_tokens, 0.0f);
  r.logprobs = true;
  r.capture_top_logits = 8;
  return r;
}

// Bitwise: same tokens, and the same bits in every float reported.
bool SameBits(const Result& a, const Result& b, std::string* why) {
  if (a.tokens != b.tokens) return *why = "tokens differ", false;
  const auto& la = a.choices.at(0).logprobs;
  const auto& lb = b.choices.at(0).logprobs;
  if (la.size() != lb.size()) return *why = "logprob counts differ", false;
  for (size_t i = 0; i < la.size(); ++i)
    if (std::memcmp(&la[i].logprob, &lb[i].logprob, sizeof(float)) != 0)
      return *why = "logprob of token " + std::to_string(i) + " differs", false;
  if (a.top_logits.size() != b.top_logits.size()) return *why = "top logits counts differ", false;
  for (size_t i = 0; i < a.top_logits.size(); ++i)
    if (a.top_logits[i].first != b.top_logits[i].first ||
        std::memcmp(&a.top_logits[i].second, &b.top_logits[i].second, sizeof(float)) != 0)
      return *why = "first-token logit " + std::to_string(i) + " differs", false;
  return true;
}

using Deterministic = TinyModelSuite;

// Requests of different lengths finish at different steps (holes in the
// cache), the cache is small enough to fill and drain during the run, and
// the order and the number of parallel sequences change between runs.
TEST_F(Deterministic, AnswersAreBitwiseTheSameAloneBatchedReversedAndAcrossCacheDrains) {
  std::vector<Request> reqs;
  for (int i = 0; i < 14; ++i) reqs.push_back(RubricRequest(*model_, i, 4 + (i * 7) % 13));
  const int32_t prompt = static_cast<int32_t>(reqs[0].prompt.size());
  ASSERT_GT(prompt, 400);

  auto options = [&](int32_t seqs, bool deterministic, int32_t cells) {
    EngineOptions o;
    o.context.deterministic = deterministic;
    o.context.max_seqs = seqs;
    o.context.kv_cells = cells;
    o.context.n_threads = 2;
    return o;
  };
  // Room for the prompt and about five requests: the run drains the cache
  // twice or more.
  const int32_t small = prompt + 5 * 80;
  auto forward = RunEngine(*model_, reqs, options(6, true, small));
  std::vector<Request> reversed(reqs.rbegin(), reqs.rend());
  auto backward = RunEngine(*model_, reversed, options(3, true, 4096));
  auto plain = RunEngine(*model_, reqs, options(6, false, small));

  int differ_default = 0;
  for (const Request& r : reqs) {
    auto alone = RunEngine(*model_, {r}, [&] {
      EngineOptions o = options(1, true, 2048);
      o.context.anchors = 0;
      return o;
    }());
    const uint64_t i = r.id;
    ASSERT_TRUE(forward.count(i) && backward.count(i) && alone.count(i));
    ASSERT_TRUE(forward[i].status.ok()) << forward[i].status.ToString();
    std::string why;
    EXPECT_TRUE(SameBits(alone[i], forward[i], &why)) << "request " << i << " batched: " << why;
    EXPECT_TRUE(SameBits(alone[i], backward[i], &why)) << "request " << i << " reversed: " << why;
    differ_default += !SameBits(alone[i], plain[i], &why);
  }
  std::printf("[ report ] without --deterministic, %d of %zu answers differ bitwise from the same request alone\n",
              differ_default, reqs.size());
}

std::map<std::string, json> ById(const std::vector<json>& lines) {
  std::map<std::string, json> out;
  for (const auto& l : lines) out[l["custom_id"]] = l;
  return out;
}

// What must not change: the text and each token's logprob (as printed).
json Answer(const json& line) {
  const json& c = line["response"]["body"]["choices"][0];
  return {c["message"]["content"], c["logprobs"]};
}

TEST(DeterministicRun, AnswersAfterAKillAndResumeAreBitwiseThoseOfAnUninterruptedRun) {
  fs::path dir = TestDir("deterministic_resume");
  std::vector<json> lines;
  for (int i = 0; i < 16; ++i) {
    json l = ChatLine("c" + std::to_string(i), Rubric(16), Candidate(i), 3 + i % 9);
    l["body"]["logprobs"] = true;
    l["body"]["top_logprobs"] = 2;
    lines.push_back(l);
  }
  WriteLines(dir / "in.jsonl", lines);
  auto args = [&](const std::string& out) {
    return "run " + (dir / "in.jsonl").string() + " -o " + (dir / out).string() + " -m " + TinyModel() +
           " --threads 2 --max-seqs 4 --kv-cells 1536 --deterministic -q";
  };
  std::string err;
  ASSERT_EQ(RunKvbatch(args("whole.jsonl"), &err), 0) << err;
  ::setenv("KVBATCH_TEST_CRASH_ON", "c9", 1);
  EXPECT_NE(RunKvbatch(args("resumed.jsonl"), &err), 0) << "the crash hook aborts the run";
  ::unsetenv("KVBATCH_TEST_CRASH_ON");
  auto partial = ReadJsonl(dir / "resumed.jsonl");
  EXPECT_GT(partial.size(), 0u) << "answers were committed before the crash";
  EXPECT_LT(partial.size(), lines.size());
  ASSERT_EQ(RunKvbatch(args("resumed.jsonl"), &err), 0) << err;
  auto whole = ById(ReadJsonl(dir / "whole.jsonl"));
  auto resumed = ById(ReadJsonl(dir / "resumed.jsonl"));
  ASSERT_EQ(whole.size(), lines.size());
  ASSERT_EQ(resumed.size(), lines.size());
  for (auto& [id, line] : whole) EXPECT_EQ(Answer(line), Answer(resumed[id])) << id;
}

}  // namespace
}  // namespace kvb::testing

// Shared-prefix batching must not change answers: every request of a batch
// sharing a long system prompt gets the next-token logits it gets alone in
// a fresh context (up to float noise). Any scheme where requests see each
// other (conversation stuffing) fails this.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>

#include "engine/engine.h"
#include "fixtures.h"

namespace kvb::testing {
namespace {

using engine::EngineOptions;
using engine::Model;
using engine::Request;
using engine::Result;

using SharedPrefix = TinyModelSuite;

TEST_F(SharedPrefix, BatchedLogitsMatchEachRequestRunAloneAndOnlyTheFirstComputesThePrefix) {
  constexpr int kRequests = 40;
  constexpr int kTopK = 10;
  std::vector<Request> reqs;
  for (int i = 0; i < kRequests; ++i) {
    reqs.push_back(RubricRequest(*model_, i, 30, 8, 0.0f));
    reqs.back().capture_top_logits = kTopK;
  }
  ASSERT_GT(reqs[0].prompt.size(), 500u);

  EngineOptions batched;
  batched.context.max_seqs = 16;
  batched.context.kv_cells = 8192;
  auto together = RunEngine(*model_, reqs, batched);
  ASSERT_EQ(together.size(), static_cast<size_t>(kRequests));

  EngineOptions alone_opts;
  alone_opts.context.max_seqs = 1;
  alone_opts.context.anchors = 0;
  alone_opts.context.kv_cells = 2048;
  int same_text = 0;
  double worst = 0;
  double max_tie_gap = 0;
  for (int i = 0; i < kRequests; ++i) {
    const Result& b = together[i];
    ASSERT_TRUE(b.status.ok()) << b.status.ToString();
    auto alone = RunEngine(*model_, {reqs[i]}, alone_opts);
    const Result& a = alone[i];
    ASSERT_EQ(a.cached_tokens, 0);
    // Top-k agree: the same best token, and every token of the alone top-5
    // has (nearly) the same logit in the batched run.
    ASSERT_EQ(b.top_logits.size(), static_cast<size_t>(kTopK));
    std::map<engine::Token, float> al(a.top_logits.begin(), a.top_logits.end());
    std::map<engine::Token, float> bl(b.top_logits.begin(), b.top_logits.end());
    if (a.top_logits[0].first != b.top_logits[0].first) {
      // Only an exact tie of the random model may break the other way.
      ASSERT_TRUE(al.count(b.top_logits[0].first)) << "request " << i << ": batched best token not in the alone top-10";
      EXPECT_LT(a.top_logits[0].second - al[b.top_logits[0].first], 0.02) << "request " << i << ": best first token differs";
    }
    int found = 0;
    for (int k = 0; k < 5; ++k) {
      auto it = bl.find(a.top_logits[k].first);
      if (it == bl.end()) continue;
      ++found;
      const double diff = std::fabs(it->second - a.top_logits[k].second);
      worst = std::max(worst, diff);
      EXPECT_LT(diff, 0.02 * std::max(1.0, std::fabs(static_cast<double>(a.top_logits[k].second))))
          << "request " << i << " token " << a.top_logits[k].first;
    }
    EXPECT_GE(found, 4) << "request " << i;
    if (a.tokens == b.tokens) {
      ++same_text;
    } else {
      // A divergence must be float noise at a near-tie: fed the common
      // tokens alone, the token the batched run chose scores within a hair
      // of the best one. (Seeing another request's text would not.)
      size_t k = 0;
      while (k < a.tokens.size() && k < b.tokens.size() && a.tokens[k] == b.tokens[k]) ++k;
      ASSERT_LT(k, b.tokens.size()) << "request " << i;
      Request probe = reqs[i];
      probe.prompt.insert(probe.prompt.end(), a.tokens.begin(), a.tokens.begin() + static_cast<long>(k));
      probe.capture_top_logits = 50;
      auto p = RunEngine(*model_, {probe}, alone_opts)[i];
      std::map<engine::Token, float> pl(p.top_logits.begin(), p.top_logits.end());
      ASSERT_TRUE(pl.count(b.tokens[k])) << "request " << i << ": batched token not even in the top 50";
      const double gap = p.top_logits[0].second - pl[b.tokens[k]];
      max_tie_gap = std::max(max_tie_gap, gap);
      EXPECT_LT(gap, 0.05) << "request " << i << " diverges at token " << k;
    }
    // Prompt-token accounting: the first request's prefix was computed for it.
    if (i == 0) {
      EXPECT_EQ(b.cached_tokens, 0);
    } else {
      EXPECT_GT(b.cached_tokens, 500) << "request " << i;
    }
  }
  const double rate = static_cast<double>(same_text) / kRequests;
  std::printf(
      "[ report ] greedy outputs identical batched vs alone: %d/%d (%.0f%%); worst first-token top-5 logit diff %.2e; "
      "divergences all at near-ties (largest gap %.4f)\n",
      same_text, kRequests, 100 * rate, worst, max_tie_gap);
  // The tiny random model has many exact ties (gap 0.0000 above), which any
  // rounding difference breaks either way: batched rows take the tiled
  // flash-attention kernel (f32 products, patches/0001), a request alone the
  // row-by-row one. What proves no request saw another is the logit
  // tolerance and the tie check above; --deterministic (deterministic_test.cc)
  // makes the answers bitwise equal. Which kernel path a row takes depends
  // on the ubatch, which depends on timing (prompts are tokenized on the
  // feeding thread): 62% in most runs, so the floor leaves room.
  EXPECT_GE(rate, 0.5);
}

TEST_F(SharedPrefix, DifferentRequestsGetDifferentAnswers) {
  // Guards the test above against a degenerate model that ignores its input.
  std::vector<Request> reqs;
  for (int i = 0; i < 8; ++i) reqs.push_back(RubricRequest(*model_, i, 5, 12, 0.0f));
  EngineOptions opts;
  opts.context.kv_cells = 4096;
  opts.context.max_seqs = 8;
  auto out = RunEngine(*model_, reqs, opts);
  std::set<std::string> texts;
  for (auto& [_, r] : out) texts.insert(r.text);
  EXPECT_GE(texts.size(), 5u);
}

// Sampling at temperature > 0 uses each request's own RNG (seeded from its
// seed or custom_id), so a request samples the same text whatever runs
// beside it and in whatever order it arrives.
TEST_F(SharedPrefix, SampledTextDoesNotDependOnBatchCompositionOrOrder) {
  std::vector<Request> reqs;
  for (int i = 0; i < 12; ++i) {
    reqs.push_back(RubricRequest(*model_, i, 8, 10, 0.9f));
    reqs.back().sampling.top_p = 0.95f;
    reqs.back().sampling.seed = 1000 + static_cast<uint64_t>(i % 3);  // several requests share a seed
  }
  EngineOptions opts;
  opts.context.kv_cells = 4096;
  opts.context.max_seqs = 12;
  auto forward = RunEngine(*model_, reqs, opts);
  std::vector<Request> reversed(reqs.rbegin(), reqs.rend());
  opts.context.max_seqs = 5;
  auto backward = RunEngine(*model_, reversed, opts);
  EngineOptions alone_opts;
  alone_opts.context.max_seqs = 1;
  alone_opts.context.anchors = 0;
  alone_opts.context.kv_cells = 2048;
  int same = 0;
  std::set<std::string> texts;
  for (int i = 0; i < 12; ++i) {
    auto alone = RunEngine(*model_, {reqs[i]}, alone_opts)[i];
    same += forward[i].text == alone.text && backward[i].text == alone.text;
    texts.insert(forward[i].text);
  }
  std::printf("[ report ] sampled texts identical across compositions and orders: %d/12\n", same);
  EXPECT_GE(same, 10);
  EXPECT_GE(texts.size(), 10u);  // different prompts still sample different texts
}

}  // namespace
}  // namespace kvb::testing

// The sampler's own draw (Gumbel-max in two levels) must follow softmax(logits / T).
#include "engine/llama_sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace kvb::engine {
namespace {

TEST(LlamaSampler, DrawsFollowTheSoftmaxOfTheLogits) {
  constexpr int32_t kVocab = 300;  // several 64-id blocks
  std::vector<float> logits(kVocab, -3.0f);
  logits[5] = 1.0f;
  logits[70] = 0.5f;
  logits[200] = 0.0f;
  logits[299] = -1.0f;
  double z = 0;
  for (float l : logits) z += std::exp(l);
  std::vector<int> count(kVocab, 0);
  constexpr int kDraws = 40000;
  for (int i = 0; i < kDraws; ++i) {
    SamplingParams p;
    p.temperature = 1.0f;
    p.seed = static_cast<uint64_t>(i) * 7919;
    count[NewLlamaSampler(kVocab, p, nullptr)->Sample(logits.data())]++;
  }
  for (int t : {5, 70, 200, 299, 0, 150}) {
    const double expected = kDraws * std::exp(logits[t]) / z;
    EXPECT_NEAR(count[t], expected, 5 * std::sqrt(expected) + 2) << "token " << t;
  }
}

TEST(LlamaSampler, SameSeedSameDrawsDifferentSeedDifferentDraws) {
  std::vector<float> logits(1000, 0.0f);  // flat: the draw is all noise
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 42;
  auto a = NewLlamaSampler(1000, p, nullptr), b = NewLlamaSampler(1000, p, nullptr);
  p.seed = 43;
  auto c = NewLlamaSampler(1000, p, nullptr);
  int same_ab = 0, same_ac = 0;
  for (int i = 0; i < 50; ++i) {
    const Token ta = a->Sample(logits.data()), tb = b->Sample(logits.data()), tc = c->Sample(logits.data());
    same_ab += ta == tb;
    same_ac += ta == tc;
  }
  EXPECT_EQ(same_ab, 50);
  EXPECT_LT(same_ac, 5);
}

}  // namespace
}  // namespace kvb::engine

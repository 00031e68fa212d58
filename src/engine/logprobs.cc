#include "engine/logprobs.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace kvb::engine {

TokenLogprob ComputeLogprobs(const float* logits, int32_t n_vocab, Token chosen, int32_t top_k,
                             const Backend& backend) {
  const float max = *std::max_element(logits, logits + n_vocab);
  double sum = 0.0;
  for (int32_t i = 0; i < n_vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - max);
  const double log_z = max + std::log(sum);
  auto logprob = [&](Token t) { return static_cast<float>(static_cast<double>(logits[t]) - log_z); };

  TokenLogprob out;
  out.token = chosen;
  out.piece = backend.Piece(chosen);
  out.logprob = logprob(chosen);
  const int32_t k = std::clamp(top_k, 0, n_vocab);
  if (k > 0) {
    std::vector<Token> idx(n_vocab);
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [logits](Token a, Token b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    out.top.reserve(k);
    for (int32_t i = 0; i < k; ++i) out.top.push_back({idx[i], backend.Piece(idx[i]), logprob(idx[i])});
  }
  return out;
}

}  // namespace kvb::engine

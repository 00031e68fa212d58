// Token log-probabilities as OpenAI reports them: log-softmax of the raw
// next-token logits (before temperature, penalties, bias or grammar).
#pragma once

#include <cstdint>

#include "engine/backend.h"
#include "engine/types.h"

namespace kvb::engine {

// The log-probability of `chosen` and the `top_k` most likely tokens (best
// first; ties by token id), with their pieces from `backend`. One pass for
// the normaliser (in double) plus a partial sort for the top-k.
TokenLogprob ComputeLogprobs(const float* logits, int32_t n_vocab, Token chosen, int32_t top_k,
                             const Backend& backend);

}  // namespace kvb::engine

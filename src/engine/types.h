// Native types the engine speaks. No JSON, no HTTP: callers translate.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "util/status.h"

namespace kvb::engine {

using Token = int32_t;

struct ChatMessage {
  std::string role;     // "system", "user", "assistant", ...
  std::string content;  // plain text (multi-part content is joined by the caller)
};

// Per-request sampling. Defaults follow OpenAI's.
struct SamplingParams {
  float temperature = 1.0f;  // 0 = greedy
  float top_p = 1.0f;
  int32_t top_k = 0;  // 0 = off
  float min_p = 0.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  std::vector<std::pair<Token, float>> logit_bias;
  std::vector<std::string> stop;  // stop strings; the text is cut before them
  int32_t max_tokens = -1;        // -1: until the sequence's context is full
  uint64_t seed = 0;              // the request's own RNG seed (from `seed` or its custom_id)
};

enum class FinishReason { kStop, kLength };

inline const char* FinishReasonName(FinishReason r) { return r == FinishReason::kStop ? "stop" : "length"; }

struct Request {
  uint64_t id = 0;  // caller's handle, echoed in the Result
  std::vector<Token> prompt;
  SamplingParams sampling;
  int32_t capture_top_logits = 0;  // >0: report the top-k next-token logits after the prompt
  bool stream = false;             // report text as it is generated (Scheduler::DeltaFn)
};

struct Result {
  uint64_t id = 0;
  Status status;  // non-OK: the request could not run (e.g. prompt longer than the context)
  std::string text;
  std::vector<Token> tokens;
  FinishReason finish = FinishReason::kStop;
  int32_t prompt_tokens = 0;
  int32_t cached_tokens = 0;  // prompt tokens served from a shared prefix
  int32_t completion_tokens = 0;
  std::vector<std::pair<Token, float>> top_logits;  // when capture_top_logits > 0, best first
};

}  // namespace kvb::engine

// Native types the engine speaks. No JSON, no HTTP: callers translate.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "util/status.h"

namespace kvb::engine {

using Token = int32_t;

// A function call, in an assistant message of the history or in an answer.
struct ToolCall {
  std::string id;
  std::string name;
  std::string arguments;  // JSON text, as the model wrote it
};

struct ChatMessage {
  std::string role;     // "system", "user", "assistant", "tool", ...
  std::string content;  // plain text (multi-part content is joined by the caller)
  std::vector<ToolCall> tool_calls;  // an assistant turn that called tools
  std::string tool_call_id;          // a "tool" message: the call it answers
};

class ReplyParser;  // engine/chat_tools.h: turns a tools request's text into content and tool calls

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
  // GBNF grammar (root rule "root") the output must follow; empty = none.
  // See engine/grammar.h for JSON schemas.
  std::string grammar;
  // A lazy grammar (tool calls with tool_choice "auto") constrains nothing
  // until the output matches one of the trigger patterns (regular
  // expressions, llama.cpp's lazy-grammar syntax) or a trigger token is
  // sampled; then the rest follows the grammar.
  bool grammar_lazy = false;
  std::vector<std::string> grammar_trigger_patterns;
  std::vector<Token> grammar_trigger_tokens;
  // Tokens the chat template put at the start of the assistant's turn that
  // the grammar also covers: a (non-lazy) grammar has accepted them before
  // the first sampled token.
  std::vector<Token> grammar_prefill;
  // Special tokens kept in the text (a tool call's markers, such as
  // <tool_call>), which are otherwise rendered as nothing. Sorted.
  std::vector<Token> preserved_tokens;
};

// The seed of choice `index` of a request seeded with `seed`: choice 0 uses
// the seed itself (so it equals the n = 1 answer), the others a SplitMix64
// mix of seed and index (independent streams, not seed + i, which would
// equal choice 0 of the request seeded seed + i).
inline uint64_t ChoiceSeed(uint64_t seed, int32_t index) {
  if (index == 0) return seed;
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(index);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The sampler seed of a choice: ChoiceSeed mixed with a hash of the prompt
// tokens. The same request (prompt, seed) always draws the same random
// numbers; requests with different prompts that share a seed (a batch
// file with "seed": 42 on every line) draw independent ones.
inline uint64_t SamplerSeed(uint64_t seed, const std::vector<Token>& prompt, int32_t choice) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a over the tokens' bytes
  for (Token t : prompt)
    for (int b = 0; b < 4; ++b) h = (h ^ ((static_cast<uint32_t>(t) >> (8 * b)) & 0xff)) * 0x100000001b3ull;
  return ChoiceSeed(seed ^ h, choice);
}

enum class FinishReason { kStop, kLength };

inline const char* FinishReasonName(FinishReason r) { return r == FinishReason::kStop ? "stop" : "length"; }

struct Request {
  uint64_t id = 0;  // caller's handle, echoed in the Result
  std::vector<Token> prompt;
  SamplingParams sampling;
  int32_t capture_top_logits = 0;  // >0: report the top-k next-token logits after the prompt
  bool stream = false;             // report text as it is generated (Scheduler::DeltaFn)
  // Run alone: nothing else runs beside it and it shares no prefix (a
  // request that was in flight when the process crashed, see
  // batch/crash_guard.h). Failed steps make a request isolated too.
  bool isolate = false;
  // Test-only (KVBATCH_TEST_CRASH_ON, tests of poison requests): abort the
  // process when this request is admitted, as a crash inside llama.cpp would.
  bool test_abort = false;
  // Choices: n independent answers to one prompt. The prompt is decoded
  // once; choices 1..n-1 fork its cells (no copy) and sample with their own
  // RNG (ChoiceSeed). All n run at once: n <= the engine's parallel sequences.
  int32_t n = 1;
  // Per generated token: its log-probability and the top_logprobs most
  // likely alternatives (log-softmax of the raw logits, before temperature,
  // penalties, bias or grammar, as OpenAI reports them). Costs nothing when off.
  bool logprobs = false;
  int32_t top_logprobs = 0;
  // When the engine received it (steady clock, ns; set by Engine::Submit):
  // the start of the Result's timings.
  int64_t submitted_ns = 0;
  // An embeddings request (prompt unused): one vector per input, pooled as
  // the model says (or --pooling). embed_base64 is echoed in the Result.
  std::vector<std::vector<Token>> embed;
  bool embed_base64 = false;
  // A chat request with tools: how its text becomes content and tool calls
  // (the engine only carries it to the Result).
  std::shared_ptr<const ReplyParser> reply_parser;
};

struct TokenProb {
  Token token = 0;
  std::string piece;  // the token's bytes (may be part of a UTF-8 character)
  float logprob = 0.0f;
};

struct TokenLogprob : TokenProb {
  std::vector<TokenProb> top;  // the top_logprobs most likely tokens, best first
};

// One generated answer.
struct Choice {
  std::string text;
  std::vector<Token> tokens;
  FinishReason finish = FinishReason::kStop;
  std::vector<TokenLogprob> logprobs;  // one per token of `tokens`, when requested
};

struct Result {
  uint64_t id = 0;
  Status status;  // non-OK: the request could not run (e.g. prompt longer than the context)
  // Choice 0 (the only one when n = 1); copies of choices[0]'s fields.
  std::string text;
  std::vector<Token> tokens;
  FinishReason finish = FinishReason::kStop;
  std::vector<Choice> choices;  // every choice, by index (n of them); empty only in hand-made Results
  bool logprobs = false;        // the request asked for logprobs (Choice::logprobs are filled)
  int32_t prompt_tokens = 0;
  int32_t cached_tokens = 0;  // prompt tokens served from a shared prefix
  int32_t completion_tokens = 0;  // over all choices
  std::vector<std::pair<Token, float>> top_logits;  // when capture_top_logits > 0, best first
  std::vector<std::vector<float>> embeddings;       // an embeddings request: one unit vector per input
  bool embed_base64 = false;
  std::shared_ptr<const ReplyParser> reply_parser;  // Request::reply_parser
  // Seconds from submission (Request::submitted_ns) to admission, to the
  // first generated token and to the Result; -1 where it did not happen.
  struct Timing {
    double queued = -1;
    double first_token = -1;
    double total = -1;
  } timing;
};

// One decode step, as the engine reports it (EngineOptions::on_step).
struct StepInfo {
  double seconds = 0;         // the whole step: admission, decode, sampling
  double decode_seconds = 0;  // llama_decode alone
  int32_t tokens = 0;         // tokens in the batch
  int32_t sequences = 0;      // sequences that got a token sampled
  bool ok = true;             // the decode succeeded
};

// Steady-clock nanoseconds (the engine's timestamps).
inline int64_t SteadyNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace kvb::engine

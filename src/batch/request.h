// One input line of an OpenAI Batch file: structural validation (done for
// every line before anything runs) and the full parse used to run it.
//
// An input line is `{"custom_id","method":"POST","url","body"}` where url is
// "/v1/chat/completions", "/v1/completions" or "/v1/embeddings". JSON stays in batch/: what
// leaves this module is engine::ChatMessage / engine::SamplingParams.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "engine/chat_tools.h"
#include "engine/types.h"
#include "util/status.h"

namespace kvb::batch {

enum class Endpoint { kChatCompletions, kCompletions, kEmbeddings };

// "/v1/chat/completions", "/v1/completions" or "/v1/embeddings".
std::string_view EndpointPath(Endpoint endpoint);
// Exact match on the supported paths; anything else is nullopt.
std::optional<Endpoint> EndpointFromPath(std::string_view path);

// LineError codes. They follow OpenAI's batch validation codes where one
// exists, and are stable: clients and tests match on them.
inline constexpr char kInvalidJson[] = "invalid_json";               // not JSON, or not a JSON object
inline constexpr char kMissingCustomId[] = "missing_custom_id";      // absent, empty or not a string
inline constexpr char kInvalidMethod[] = "invalid_method";           // method is not "POST"
inline constexpr char kInvalidUrl[] = "invalid_url";                 // not one of the two endpoints
inline constexpr char kInvalidBody[] = "invalid_body";               // body absent or not an object
inline constexpr char kInvalidMessages[] = "invalid_messages";       // chat: messages malformed
inline constexpr char kInvalidPrompt[] = "invalid_prompt";           // completions: prompt malformed
inline constexpr char kInvalidInput[] = "invalid_input";             // embeddings: input malformed
inline constexpr char kDuplicateCustomId[] = "duplicate_custom_id";  // set by ScanInputFile
inline constexpr char kLineTooLong[] = "line_too_long";              // set by ScanInputFile
inline constexpr char kJsonTooDeep[] = "json_too_deep";              // nesting over Limits::max_json_depth
inline constexpr char kUnsupported[] = "unsupported";                // a field kvbatch cannot honour yet

// A line that fails structural validation.
struct LineError {
  int64_t line = 0;       // 1-based physical line number in the input file
  std::string code;       // one of the k* codes above
  std::string message;    // human-readable, valid UTF-8
  std::string param;      // the offending field ("custom_id", "body.messages[2].content", ...)
  std::string custom_id;  // the line's custom_id when it could be read, else empty. With
                          // code kDuplicateCustomId it belongs to an earlier line: a writer
                          // must not emit a per-request line for it (ids must stay unique).
};

// What the scheduler needs about a structurally valid line; small on purpose
// (170,000 of them are kept in memory, the bodies are not).
struct LineInfo {
  std::string custom_id;
  Endpoint endpoint = Endpoint::kChatCompletions;
  // Groups requests that share a prefix so they run together. Chat: FNV-1a 64
  // of the endpoint, the model, the tools and every message except the last (role and joined text,
  // length-framed). Completions: of the endpoint and the prompt's first 256
  // bytes. Equal prefixes give equal hashes; it is a grouping hint, not an
  // identity (collisions only cost ordering quality).
  uint64_t prefix_hash = 0;
};

// Structural validation of one line (see the codes above). Never throws,
// never recurses over the input (nesting is bounded by batch/limits.h first).
// Roles must be system, developer, user, assistant or tool. An assistant
// message may carry tool_calls, a tool message needs its tool_call_id
// (batch/tools.h); the legacy "function" role and function_call are kUnsupported.
// Content parts must all be {"type":"text","text":<string>}; an assistant
// message may have null content. At most Limits::max_messages messages and
// Limits::max_prompt_bytes of text.
std::variant<LineInfo, LineError> ValidateLine(std::string_view text, int64_t line_no);

// response_format: free text, any JSON object, or JSON valid against a schema.
enum class ResponseFormat { kText, kJsonObject, kJsonSchema };

inline constexpr int32_t kMaxChoices = 128;      // n
inline constexpr int32_t kMaxTopLogprobs = 20;   // top_logprobs, and completions' integer logprobs

struct ParsedRequest {
  std::string custom_id;
  Endpoint endpoint = Endpoint::kChatCompletions;
  std::string model;                          // as given; empty when absent
  std::vector<engine::ChatMessage> messages;  // chat; multi-part text is joined with "\n" (as vLLM does)
  std::string prompt;                         // completions
  engine::SamplingParams sampling;            // seed always filled, see has_seed
  bool has_seed = false;                      // body.seed given; else seed = SeedFromCustomId(custom_id)
  int32_t n = 1;                              // choices
  bool logprobs = false;                      // report token log-probabilities
  int32_t top_logprobs = 0;                   // alternatives per token (0..kMaxTopLogprobs)
  ResponseFormat response_format = ResponseFormat::kText;
  std::string json_schema;                    // kJsonSchema: the schema as JSON text, keys in input order
  engine::ChatOptions chat_options;           // tools, tool_choice, parallel_tool_calls
  // Embeddings: the inputs, as texts or as token ids (one of the two), and
  // encoding_format "base64" (little-endian float32) instead of "float".
  std::vector<std::string> inputs;
  std::vector<std::vector<engine::Token>> input_tokens;
  bool base64 = false;
};

// Full parse for running one line. Structural problems give the same message
// as ValidateLine, as InvalidArgument. Parameter VALUE problems give
// InvalidArgument with an OpenAI-style message naming the parameter, and the
// parameter's name in *error_param when given (for ErrorBody's "param"); the
// request then gets a 400 line and the batch goes on. Accepted (null = absent):
//   temperature [0,2], top_p (0,1], top_k >= 0 (-1 also means "off", as in
//   vLLM), min_p [0,1], presence_penalty / frequency_penalty [-2,2],
//   n [1, kMaxChoices], logprobs: chat a boolean with top_logprobs
//   [0, kMaxTopLogprobs] (> 0 needs logprobs true), completions an integer
//   [0, kMaxTopLogprobs] (the number of alternatives), response_format:
//   {"type":"text"}, {"type":"json_object"} (llama-server's optional
//   "schema" member makes it a json_schema), or {"type":"json_schema",
//   "json_schema":{"name":<string>,"schema":<object>,"strict":<bool>}} (a
//   missing schema means any JSON object),
//   max_tokens / max_completion_tokens integers in [1, 2^31-1] (the latter
//   wins when both are given), stop: a string or an array of at most 4
//   strings (empty strings are dropped), logit_bias: {"<token id>": [-100,100]},
//   seed: a 64-bit integer (negative values are taken modulo 2^64), model: a
//   string, metadata: an object of string values (Limits). Integers may be
//   written as integral floats (5.0). Fields that would change the answer
//   and are not supported (the legacy functions / function_call, audio,
//   modalities other than text, prediction, web_search_options;
//   completions: tools, echo, suffix, best_of > 1) are a 400 naming the
//   field. Chat: tools, tool_choice and parallel_tool_calls (batch/tools.h).
//   Other unknown fields are ignored: OpenAI clients send many. Schemas are
//   bounded by Limits (size, enum values, repetition counts).
StatusOr<ParsedRequest> ParseRequest(std::string_view text, std::string* error_param = nullptr);

// A metadata object as OpenAI accepts it: at most Limits::max_metadata_keys
// keys of at most max_metadata_key_chars, string values of at most
// max_metadata_value_chars. InvalidArgument with an OpenAI-style message.
// *param (when given) names the offending member: "metadata" or "metadata.<key>".
Status CheckMetadataValue(const nlohmann::json& metadata, std::string* param = nullptr);

// FNV-1a 64: stable across builds and platforms (std::hash is not), so a
// request's default seed, and therefore its output, never changes between runs.
uint64_t Fnv1a64(std::string_view data, uint64_t state = 0xcbf29ce484222325ull);
inline uint64_t SeedFromCustomId(std::string_view custom_id) { return Fnv1a64(custom_id); }

}  // namespace kvb::batch

// OpenAI response objects and the lines of the output / error files.
//
// Every string built here is valid UTF-8: model text that is not (a
// multi-byte character cut by max_tokens, a byte-level token) has its bad
// bytes replaced by U+FFFD, so a later dump() never throws.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "engine/chat_tools.h"
#include "engine/types.h"

namespace kvb::batch {

// {"id","object":"chat.completion","created","model","choices":[{"index":0,
//  "message":{"role":"assistant","content":r.text,"refusal":null},"logprobs":null,
//  "finish_reason":"stop"|"length"}],"usage":{...},"system_fingerprint"}.
// One choice per r.choices (by index; r.text/r.finish when it is empty).
// A tools request (r.reply_parser) that stopped: the text is read back by
// the template's parser; tool calls give "tool_calls":[ToolCallJson...]
// (ids "call_<hex>" unless the model wrote one), content null when there
// is no text beside them, finish_reason "tool_calls", and reasoning the
// template marks as "reasoning_content".
// With r.logprobs: "logprobs":{"content":[{"token","logprob","bytes":[ints],
// "top_logprobs":[{"token","logprob","bytes"}]}],"refusal":null}; a logprob
// of -inf is written -9999.0, as OpenAI does.
// usage = {"prompt_tokens","completion_tokens","total_tokens",
//          "prompt_tokens_details":{"cached_tokens"},"completion_tokens_details":{"reasoning_tokens":0}}.
// An empty system_fingerprint is written as null (as vLLM does).
nlohmann::json ChatCompletionBody(const engine::Result& r, std::string_view model, int64_t created, std::string_view id,
                                  std::string_view system_fingerprint = {});

// {"id","type":"function","function":{"name","arguments"}}.
nlohmann::json ToolCallJson(const engine::ToolCall& call);

// {"id","object":"text_completion","created","model","choices":[{"text","index":0,
//  "logprobs":null,"finish_reason"}],"usage":{... as above},"system_fingerprint"}.
// With r.logprobs: "logprobs":{"tokens":[...],"token_logprobs":[...],
// "top_logprobs":[{token: logprob}, ...],"text_offset":[byte offsets]}.
nlohmann::json TextCompletionBody(const engine::Result& r, std::string_view model, int64_t created, std::string_view id,
                                  std::string_view system_fingerprint = {});

// {"error":{"message","type","param","code"}}; an empty param or code is null.
// type is usually "invalid_request_error" (400) or "server_error" (500).
nlohmann::json ErrorBody(std::string_view message, std::string_view type, std::string_view param,
                         std::string_view code);

// Output/error-file lines: one JSON object, no trailing newline, no raw
// newline inside (so one line = one request).
//
// {"id":"batch_req_<hex>","custom_id","response":{"status_code":200,"request_id":"req_<hex>","body":body},"error":null}
std::string SuccessLine(std::string_view custom_id, const nlohmann::json& body);
// As SuccessLine with status_code and an ErrorBody as body (a request that ran, or was
// parsed, and failed: 400 for bad parameters, 500 for engine failures).
std::string FailureLine(std::string_view custom_id, int status_code, const nlohmann::json& error_body);
// {"id","custom_id","response":null,"error":{"code","message"}}: a request that never
// ran (invalid line with --skip-invalid, cancelled, expired).
std::string RequestErrorLine(std::string_view custom_id, std::string_view code, std::string_view message);

// prefix + 24 lowercase hex characters (96 bits) from the OS CSPRNG
// (getrandom(2), std::random_device as a fallback): unguessable and unique in practice.
std::string NewId(std::string_view prefix);

// s with every invalid UTF-8 sequence replaced by U+FFFD (s itself when valid).
std::string ToValidUtf8(std::string_view s);

// JSON text of j, never throwing on invalid UTF-8 (replaced by U+FFFD).
std::string DumpJson(const nlohmann::json& j);

}  // namespace kvb::batch

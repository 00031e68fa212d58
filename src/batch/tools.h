// Tool calling in request bodies: `tools`, `tool_choice`,
// `parallel_tool_calls`, and the tool calls and tool results of a
// conversation's history, checked and turned into engine::ChatOptions /
// engine::ChatMessage. Private to src/batch (request.cc uses it).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "batch/request.h"
#include "batch/request_params.h"
#include "engine/types.h"
#include "util/status.h"

namespace kvb::batch {

inline constexpr int32_t kMaxTools = 128;           // OpenAI's limit
inline constexpr int32_t kMaxToolCallsPerMessage = 128;

// The tool part of one message of the history: an assistant's tool_calls
// ([{"id","type":"function","function":{"name","arguments"}}]; arguments a
// JSON string, or an object, which is written out), a tool message's
// tool_call_id. Legacy "function" roles and function_call are refused
// (FailedPrecondition: use tools). InvalidArgument for malformed ones.
// *field names the member (".tool_calls[1].function.name").
Status ParseMessageTools(const nlohmann::json& msg, const std::string& role, engine::ChatMessage* out,
                         std::string* field);

// tools, tool_choice and parallel_tool_calls of a chat body into
// r->chat_options. `line` is the whole batch line as text: each function's
// parameters are read from it again with their key order kept.
void ParseTools(params::Params& p, std::string_view line, ParsedRequest* r);

}  // namespace kvb::batch
